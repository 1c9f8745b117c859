"""The benchmark's SMTP server, in a process of its own so that it shares neither the GIL nor the
peak memory figure with the sender being measured.

Prints one JSON line (host, port, ca_file), then answers commands read from stdin, one per
line: ``stats`` (messages, bytes and connections so far, as JSON), ``clear`` (forget received
messages), ``pipelining on`` / ``pipelining off`` (offer PIPELINING, RFC 2920, to the next
sessions: on at the start, as Postfix does), ``chunking on`` / ``chunking off`` (offer
CHUNKING, RFC 3030, likewise: on at the start, as Postfix 3.4 and later does) and ``quit``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from e2email.testing import LoopbackSMTPServer


class _Unlimited(LoopbackSMTPServer):
    """No message size limit: aiosmtpd's default (32 MiB) is below a 25 MB attachment once it
    is base64-encoded, encrypted and armored."""

    def _make_protocol(self) -> Any:
        protocol = super()._make_protocol()
        protocol.data_size_limit = None
        return protocol


def main() -> None:
    with _Unlimited(tls="implicit", offer_pipelining=True, offer_chunking=True) as server:
        print(
            json.dumps({"host": server.host, "port": server.port, "ca_file": str(server.ca_file)}),
            flush=True,
        )
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print(
                    json.dumps(
                        {
                            "messages": len(server.messages),
                            "bytes": sum(len(m.data) for m in server.messages),
                            "connections": server.connections,
                        }
                    ),
                    flush=True,
                )
            elif command == "clear":
                # The server also keeps a transcript of every chunk; drop both.
                server.messages.clear()
                server.transcript.clear()
                print("{}", flush=True)
            elif command in ("pipelining on", "pipelining off"):
                server.offer_pipelining = command.endswith("on")
                print("{}", flush=True)
            elif command in ("chunking on", "chunking off"):
                server.offer_chunking = command.endswith("on")
                print("{}", flush=True)
            elif command == "quit":
                break


if __name__ == "__main__":
    main()
