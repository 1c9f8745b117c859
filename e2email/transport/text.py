"""Text a server sent, made safe to show: no terminal escape sequences, no control characters.

A greeting, a reply, an EHLO keyword's parameters or a certificate's subject are chosen by
whoever runs (or sits in front of) the server. Printed as they are, an ``ESC [ 2 J`` clears the
user's screen, an OSC sequence retitles the terminal window or writes the clipboard, a CR or BS
overwrites what came before (a "250 OK" over a refusal), and bytes that are not UTF-8
(aiosmtplib keeps them as surrogate escapes) make printing fail altogether. Everything the
transport and ``doctor`` take from a server passes through :func:`server_text` once, where
they turn it into an :class:`~e2email.errors.SMTPReply`, an error message, the EHLO extensions
or a doctor report, so that no consumer (terminal, log, outbox, JSON) ever sees such bytes.
Reply codes are numbers and are kept as they are.
"""

from __future__ import annotations

import re

__all__ = ["server_text"]

#: Escape sequences (ECMA-48), in their 7-bit (ESC ...) and 8-bit (C1) forms:
#: * control strings (OSC, DCS, SOS, PM, APC), up to their terminator (ST or BEL) or the end;
#: * CSI sequences: parameters, intermediates, one final byte;
#: * any other ESC with its intermediates and final byte (ESC c, ESC ( B, ...).
_ESCAPES = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"
)

#: Line breaks and tabs: a reply's lines are joined by LF; shown as one line.
_SPACES = re.compile(r"[\t\n\r\v\f]+")

#: What is left to drop: C0 and C1 controls, DEL, and the Unicode format characters that
#: reorder or hide text on screen (bidi embeddings, overrides, isolates and marks, zero-width
#: characters), so that "exe.txt" cannot be shown as "txt.exe".
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")

#: Surrogate escapes of bytes that were not UTF-8 (and any other lone surrogate).
_SURROGATES = re.compile("[\ud800-\udfff]")


def server_text(text: str) -> str:
    """``text`` from a server with escape sequences and control characters removed, line
    breaks and tabs turned into single spaces, and bytes that were not UTF-8 shown as U+FFFD.
    Printable text, including non-ASCII letters, is kept as it is."""
    if text.isascii() and text.isprintable():
        return text  # the usual case: nothing to do
    text = _SURROGATES.sub("\ufffd", text)
    text = _ESCAPES.sub("", text)
    text = _SPACES.sub(" ", text)
    return _CONTROLS.sub("", text).strip()
