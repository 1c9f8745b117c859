"""MIME building and canonicalisation: the bytes that get signed, encrypted and sent.

No crypto and no network here. Every byte is written by this module, never by
:mod:`email.generator` (which refolds headers inside signed parts and turns ``From `` into
``>From ``). Everything emitted is canonical for RFC 3156 / RFC 8551 signing:

* CRLF line endings only, 7-bit ASCII only, no NUL;
* header lines folded to at most 78 octets (never more than 998);
* text parts either plain 7-bit (short, printable lines without trailing whitespace) or
  quoted-printable from our own encoder, which also encodes trailing whitespace, ``From `` and
  ``.`` at the start of any encoded line (mbox ``>From`` mangling, SMTP dot and smuggling issues);
* attachments base64 with 76-character lines.

:func:`check_wire_safe` is the last gate before SMTP (bare CR/LF, NUL, 8-bit, long lines).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import enum
import io
import mimetypes
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path

import idna

from e2email.errors import MessageError

__all__ = [
    "HP",
    "Address",
    "Attachment",
    "Message",
    "PayloadStream",
    "build_message",
    "build_payload",
    "check_wire_safe",
    "message_head",
    "new_boundary",
    "render_header",
    "stream_payload",
]

#: Header lines are folded to this many octets (RFC 5322 §2.1.1 "SHOULD"), CRLF excluded.
_MAX_LINE = 78
#: Hard limit for any line, CRLF excluded (RFC 5322 §2.1.1 "MUST").
_HARD_MAX_LINE = 998
#: Longest RFC 2047 encoded-word (RFC 2047 §2).
_MAX_ENCODED_WORD = 75
#: Encoded-words inside display names are kept shorter, so "Reply-To: " + word fits a line.
_NAME_ENCODED_WORD = 68
#: Plain words of a display name longer than this are encoded (so they can be split).
_MAX_PLAIN_NAME_WORD = 60
#: Longest parameter ("key=value") put on one header line; leaves room for " " and ";".
_MAX_PARAM = 74
#: Filenames longer than this (or not plain ASCII) go through RFC 2231.
_MAX_PLAIN_FILENAME = 50
_EW_PREFIX = "=?utf-8?b?"
_EW_SUFFIX = "?="

# RFC 5322 atext; a display-name word made of these needs no quoting.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# RFC 2045 token (any CHAR except SPACE, CTLs and tspecials).
_TOKEN = r"[!#$%&'*+.^_`{|}~0-9A-Za-z-]{1,127}"  # RFC 6838 §4.2: at most 127 characters
_MIME_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
# Control characters refused in one-line values: C0 (incl. TAB), DEL, C1, U+2028/U+2029.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A text line that may go out as 7bit: printable ASCII (and TAB), at most 76 characters, no
# trailing whitespace, not starting with "From " or ".".
_SEVEN_BIT_LINE = re.compile(r"(?!\.|From )[\t\x20-\x7e]{0,76}(?<![ \t])")
# RFC 2231 attribute-char: CHAR except SPACE, CTLs, "*", "'", "%" and tspecials.
_ATTR_CHARS = frozenset(
    b"!#$&+-.^_`{|}~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9._+,()!#$&'~@^-]+(?: [A-Za-z0-9._+,()!#$&'~@^-]+)*")
_FALLBACK_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+()")
# Headers whose value is free text (RFC 5322 unstructured): non-ASCII and overlong words are
# written as encoded-words. Every other header must be ASCII and is folded at spaces only.
_UNSTRUCTURED = frozenset({"subject", "comments"})
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")
# Fields build_message writes itself; a payload header block must not repeat them.
_OUTER_NAMES = re.compile(
    rb"(?im)^(from|sender|to|cc|bcc|reply-to|subject|date|message-id|mime-version|hp-outer)"
    rb"[ \t]*:"
)
# Compressed files: mimetypes reports the wrapped type plus an encoding.
_COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


def _check_unicode(text: str, what: str, field: str | None) -> None:
    """Refuse strings that cannot be written as UTF-8 (lone surrogates, e.g. from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MessageError(
            f"{what} is not valid Unicode (lone surrogate at position {exc.start})", field=field
        ) from None


def _describe_control(char: str) -> str:
    names = {"\r": "CR", "\n": "LF", "\0": "NUL", "\t": "TAB"}
    return names.get(char, f"U+{ord(char):04X}")


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


def _normalise_domain(domain: str, shown: str) -> str:
    """Lower-case, IDNA-encode (IDNA 2008 with UTS #46 mapping) and check a host name."""
    if not domain:
        raise MessageError(f"{shown!r} has no domain after '@'")
    if domain.startswith("[") or domain.endswith("]"):
        raise MessageError(f"{shown!r}: domain literals ([...]) are not supported")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise MessageError(f"{shown!r}: invalid international domain name ({exc})") from None
    domain = domain.lower()
    labels = domain.split(".")
    if len(domain) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise MessageError(f"{shown!r}: invalid domain {domain!r}")
    if labels[-1].isdigit():
        raise MessageError(f"{shown!r}: IP addresses are not supported as a domain")
    return domain


def _check_addr_spec(addr_spec: str) -> str:
    """Validate an addr-spec and return it with its domain normalised."""
    if not addr_spec:
        raise MessageError("empty address")
    bad = _CONTROLS.search(addr_spec)
    if bad:
        raise MessageError(
            f"{addr_spec!r}: {_describe_control(bad.group())} is not allowed in an address"
        )
    _check_unicode(addr_spec, "address", None)
    if any(c.isspace() for c in addr_spec):
        raise MessageError(f"{addr_spec!r}: spaces are not allowed in an address")
    if "@" not in addr_spec:
        raise MessageError(f"{addr_spec!r}: missing '@'")
    local, _, domain = addr_spec.rpartition("@")
    if not local:
        raise MessageError(f"{addr_spec!r}: nothing before '@'")
    if '"' in local:
        raise MessageError(f"{addr_spec!r}: quoted local parts are not supported")
    if not local.isascii():
        raise MessageError(
            f"{addr_spec!r}: non-ASCII local parts need SMTPUTF8, which is not supported"
        )
    if not _DOT_ATOM.fullmatch(local):
        raise MessageError(f"{addr_spec!r}: invalid local part {local!r}")
    if len(local) > 64:
        raise MessageError(f"{addr_spec!r}: local part longer than 64 characters")
    result = f"{local}@{_normalise_domain(domain, addr_spec)}"
    if len(result) > 254:
        raise MessageError(f"{addr_spec[:40]!r}...: address longer than 254 characters")
    return result


def _b64_words(text: str, max_word: int) -> list[str]:
    """``text`` as RFC 2047 B encoded-words of UTF-8, each at most ``max_word`` characters,
    never splitting a character. Splits go after a space where possible (the space stays
    inside the earlier word: RFC 2047 decoders drop the whitespace *between* encoded-words)."""
    max_bytes = (max_word - len(_EW_PREFIX) - len(_EW_SUFFIX)) // 4 * 3
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode("utf-8"))
        if chunk and size + width > max_bytes:
            cut = len(chunk)
            if " " in chunk[1:]:
                cut = len(chunk) - chunk[::-1].index(" ")
            words.append(_encoded_word("".join(chunk[:cut]).encode("utf-8")))
            chunk = chunk[cut:]
            size = len("".join(chunk).encode("utf-8"))
        chunk.append(char)
        size += width
    if chunk:
        words.append(_encoded_word("".join(chunk).encode("utf-8")))
    return words


def _encoded_word(data: bytes) -> str:
    return _EW_PREFIX + base64.b64encode(data).decode("ascii") + _EW_SUFFIX


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _phrase(name: str) -> str:
    """A display name as an ASCII RFC 5322 phrase: atoms, a quoted-string, or encoded-words."""
    words = name.split(" ")
    if all(_ATEXT.fullmatch(w) and "=?" not in w and len(w) <= _MAX_PLAIN_NAME_WORD for w in words):
        return name
    if name.isascii() and "=?" not in name and all(len(w) <= _MAX_PLAIN_NAME_WORD for w in words):
        return _quote(name)
    # Plain atoms stay readable; runs of other words (with the spaces between them, which an
    # RFC 2047 decoder drops between adjacent encoded-words) become encoded-words.
    out: list[str] = []
    run: list[str] = []
    for word in words:
        if _ATEXT.fullmatch(word) and "=?" not in word and len(word) <= _MAX_PLAIN_NAME_WORD:
            if run:
                out.extend(_b64_words(" ".join(run), _NAME_ENCODED_WORD))
                run = []
            out.append(word)
        else:
            run.append(word)
    if run:
        out.extend(_b64_words(" ".join(run), _NAME_ENCODED_WORD))
    return " ".join(out)


def _parse_display_name(tokens: list[tuple[str, str]], text: str) -> str:
    parts: list[str] = []
    for kind, value in tokens:
        if kind == "quoted":
            parts.append(value)
            continue
        for char in "@[]\\":
            if char in value:
                raise MessageError(
                    f"{text!r}: {char!r} in a display name must be inside double quotes"
                )
        parts.append(value)
    return "".join(parts)


@dataclass(frozen=True)
class Address:
    """One mailbox. ``addr_spec`` is stored with its domain lower-cased and IDNA-encoded."""

    addr_spec: str
    display_name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.addr_spec, str) or not isinstance(self.display_name, str):
            raise MessageError("address and display name must be strings")
        name = self.display_name
        bad = _CONTROLS.search(name)
        if bad:
            raise MessageError(
                f"display name {name!r}: {_describe_control(bad.group())} is not allowed"
            )
        _check_unicode(name, "display name", None)
        name = re.sub(" {2,}", " ", name.strip(" "))
        object.__setattr__(self, "display_name", name)
        object.__setattr__(self, "addr_spec", _check_addr_spec(self.addr_spec))

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse one mailbox: ``a@b.org``, ``<a@b.org>``, ``Name <a@b.org>`` or
        ``"Quoted, Name" <a@b.org>``. Errors have ``field=None``; the caller names the field."""
        if not isinstance(text, str):
            raise MessageError(f"an address must be a string, not {type(text).__name__}")
        bad = _CONTROLS.search(text)
        if bad:
            raise MessageError(
                f"{text!r}: {_describe_control(bad.group())} is not allowed in an address"
            )
        _check_unicode(text, "address", None)
        source = text.strip()
        if not source:
            raise MessageError("empty address")
        if len(source) > 1000:
            raise MessageError("address text longer than 1000 characters")
        tokens: list[tuple[str, str]] = []  # ("text" | "quoted" | "angle", value)
        i = 0
        plain: list[str] = []

        def flush() -> None:
            if plain:
                tokens.append(("text", "".join(plain)))
                plain.clear()

        while i < len(source):
            char = source[i]
            if char == '"':
                flush()
                value: list[str] = []
                i += 1
                while True:
                    if i >= len(source):
                        raise MessageError(f"{text!r}: unterminated quoted string")
                    if source[i] == "\\" and i + 1 < len(source):
                        value.append(source[i + 1])
                        i += 2
                        continue
                    if source[i] == '"':
                        break
                    value.append(source[i])
                    i += 1
                tokens.append(("quoted", "".join(value)))
            elif char == "<":
                flush()
                end = source.find(">", i)
                if end < 0:
                    raise MessageError(f"{text!r}: '<' without '>'")
                tokens.append(("angle", source[i + 1 : end]))
                i = end
            elif char == ">":
                raise MessageError(f"{text!r}: '>' without '<'")
            elif char == ",":
                raise MessageError(
                    f"{text!r}: more than one address (give each address separately, "
                    "or quote a display name that contains a comma)"
                )
            elif char in ":;":
                raise MessageError(f"{text!r}: group syntax is not supported")
            elif char in "()":
                raise MessageError(f"{text!r}: comments in parentheses are not supported")
            else:
                plain.append(char)
            i += 1
        flush()
        angles = [idx for idx, (kind, _) in enumerate(tokens) if kind == "angle"]
        if not angles:
            if any(kind == "quoted" for kind, _ in tokens):
                raise MessageError(f"{text!r}: quoted local parts are not supported")
            return cls(source)
        if len(angles) > 1:
            raise MessageError(f"{text!r}: more than one address")
        where = angles[0]
        trailing = tokens[where + 1 :]
        if any(kind != "text" or value.strip() for kind, value in trailing):
            raise MessageError(f"{text!r}: unexpected text after '>'")
        addr = tokens[where][1]
        if "<" in addr:
            raise MessageError(f"{text!r}: more than one '<'")
        name = _parse_display_name(tokens[:where], text)
        return cls(addr.strip(), name.strip())

    @property
    def domain(self) -> str:
        """The (lower-case, ASCII) domain."""
        return self.addr_spec.rpartition("@")[2]

    def __str__(self) -> str:
        """Human form that :meth:`parse` reads back: ``Alice <alice@example.org>``."""
        if not self.display_name:
            return self.addr_spec
        name = self.display_name
        if re.search(r'[()<>\[\]:;@\\,."]', name):
            name = _quote(name)
        return f"{name} <{self.addr_spec}>"

    def header_form(self) -> str:
        """ASCII form for a header: ``Name <addr>`` with the name quoted or RFC 2047-encoded
        as needed, or the bare addr-spec when there is no display name."""
        if not self.display_name:
            return self.addr_spec
        return f"{_phrase(self.display_name)} <{self.addr_spec}>"


# --------------------------------------------------------------------------------------------
# Attachments
# --------------------------------------------------------------------------------------------


def _guess_type(*names: str) -> str:
    for name in names:
        guessed, encoding = mimetypes.guess_type(name, strict=False)
        if encoding is not None:
            return _COMPRESSED_TYPES.get(encoding, "application/octet-stream")
        if guessed is not None:
            major = guessed.split("/", 1)[0].lower()
            # message/* and multipart/* may not be base64-encoded (RFC 2046 §5); send as bytes.
            if major in ("message", "multipart"):
                return "application/octet-stream"
            return guessed
    return "application/octet-stream"


@dataclass(frozen=True)
class Attachment:
    """A file to attach: its name as the recipient sees it, its bytes and its MIME type."""

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"

    def __post_init__(self) -> None:
        name = self.filename
        if isinstance(name, str):
            # Leading/trailing blanks are lost by receivers and hide extensions ("x.exe ").
            name = name.strip()
            object.__setattr__(self, "filename", name)
        if not isinstance(name, str) or not name:
            raise MessageError("an attachment needs a non-empty file name", field="attachment")
        bad = _CONTROLS.search(name)
        if bad:
            raise MessageError(
                f"file name {name!r}: {_describe_control(bad.group())} is not allowed",
                field="attachment",
            )
        if "/" in name or "\\" in name or name in (".", ".."):
            raise MessageError(
                f"file name {name!r} must be a plain name, without path separators",
                field="attachment",
            )
        _check_unicode(name, "file name", "attachment")
        if isinstance(self.content, bytearray | memoryview):
            object.__setattr__(self, "content", bytes(self.content))
        if not isinstance(self.content, bytes):
            raise MessageError(f"content of {name!r} must be bytes", field="attachment")
        ctype = self.content_type
        match = _MIME_TYPE.fullmatch(ctype) if isinstance(ctype, str) else None
        if match is None:
            raise MessageError(
                f"invalid content type {ctype!r} for {name!r} (expected type/subtype, "
                "without parameters)",
                field="attachment",
            )
        ctype = ctype.lower()
        if match.group(1).lower() in ("multipart", "message"):
            raise MessageError(
                f"content type {ctype} cannot be sent base64-encoded; attach {name!r} as "
                "application/octet-stream",
                field="attachment",
            )
        object.__setattr__(self, "content_type", ctype)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        *,
        filename: str | None = None,
        content_type: str | None = None,
    ) -> Attachment:
        """Read a regular file. The type is guessed from the name when not given."""
        where = Path(path)
        shown = os.fspath(path)
        try:
            info = where.stat()
            if stat.S_ISDIR(info.st_mode):
                raise MessageError(f"cannot attach {shown}: it is a directory", field="attachment")
            if not stat.S_ISREG(info.st_mode):
                raise MessageError(f"cannot attach {shown}: not a regular file", field="attachment")
            data = where.read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MessageError(f"cannot read {shown}: {reason}", field="attachment") from exc
        name = filename if filename is not None else where.name
        if content_type is None:
            content_type = _guess_type(name, where.name)
        return cls(name, data, content_type)


# --------------------------------------------------------------------------------------------
# Message
# --------------------------------------------------------------------------------------------


def _coerce_address(value: object, field_name: str) -> Address:
    if isinstance(value, Address):
        return value
    if isinstance(value, str):
        try:
            return Address.parse(value)
        except MessageError as exc:
            raise MessageError(exc.reason, field=field_name) from exc
    raise MessageError(f"not an address: {value!r}", field=field_name)


def _coerce_addresses(value: object, field_name: str) -> tuple[Address, ...]:
    if isinstance(value, str | Address):
        return (_coerce_address(value, field_name),)
    if isinstance(value, bytes | bytearray) or not isinstance(value, Iterable):
        raise MessageError("expected an address or a list of addresses", field=field_name)
    return tuple(_coerce_address(item, field_name) for item in value)


def _check_body(text: object, field_name: str) -> None:
    if not isinstance(text, str):
        raise MessageError("must be a string", field=field_name)
    if "\0" in text:
        raise MessageError(
            "NUL characters are not allowed in the message text; attach binary data as a file",
            field=field_name,
        )
    _check_unicode(text, "the text", field_name)


_MESSAGE_ID = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)


AddressInput = Address | str


@dataclass(frozen=True, init=False)
class Message:
    """What to send. Strings and lists given for the address fields are parsed into
    :class:`Address` tuples; everything is validated when the message is made."""

    sender: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    subject: str
    text: str
    html: str | None
    attachments: tuple[Attachment, ...]
    date: datetime.datetime | None
    #: Without angle brackets: ``abc@example.org``.
    message_id: str | None

    # A hand-written __init__ so that type checkers accept what the class accepts at run time
    # (strings and any iterable for the address fields); the fields stay precise.
    def __init__(
        self,
        *,
        sender: AddressInput,
        to: Iterable[AddressInput] | AddressInput = (),
        cc: Iterable[AddressInput] | AddressInput = (),
        bcc: Iterable[AddressInput] | AddressInput = (),
        reply_to: Iterable[AddressInput] | AddressInput = (),
        subject: str = "",
        text: str = "",
        html: str | None = None,
        attachments: Iterable[Attachment] | Attachment = (),
        date: datetime.datetime | None = None,
        message_id: str | None = None,
    ) -> None:
        values = {
            "sender": sender,
            "to": to,
            "cc": cc,
            "bcc": bcc,
            "reply_to": reply_to,
            "subject": subject,
            "text": text,
            "html": html,
            "attachments": attachments,
            "date": date,
            "message_id": message_id,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sender", _coerce_address(self.sender, "sender"))
        for name in ("to", "cc", "bcc", "reply_to"):
            object.__setattr__(self, name, _coerce_addresses(getattr(self, name), name))

        if not isinstance(self.subject, str):
            raise MessageError("must be a string", field="subject")
        bad = _CONTROLS_BUT_TAB.search(self.subject)
        if bad:
            raise MessageError(
                f"{_describe_control(bad.group())} is not allowed in the subject", field="subject"
            )
        _check_unicode(self.subject, "the subject", "subject")
        _check_body(self.text, "text")
        if self.html is not None:
            _check_body(self.html, "html")

        attachments = self.attachments
        if isinstance(attachments, Attachment):
            attachments = (attachments,)
        if not isinstance(attachments, Iterable):
            raise MessageError("expected a list of attachments", field="attachments")
        attachments = tuple(attachments)
        for item in attachments:
            if not isinstance(item, Attachment):
                raise MessageError(f"not an Attachment: {item!r}", field="attachments")
        object.__setattr__(self, "attachments", attachments)

        if not self.recipients:
            raise MessageError("at least one recipient (To, Cc or Bcc) is needed", field="to")
        seen: dict[str, str] = {}
        for name in ("to", "cc", "bcc"):
            for address in getattr(self, name):
                key = address.addr_spec.lower()
                if key in seen:
                    first = seen[key]
                    where = f"twice in {name}" if first == name else f"in both {first} and {name}"
                    raise MessageError(
                        f"{address.addr_spec} is listed {where}; list each recipient once "
                        "(a Bcc recipient also listed in To or Cc would not stay hidden)",
                        field=name,
                    )
                seen[key] = name

        if self.message_id is not None:
            mid = self.message_id
            if not isinstance(mid, str) or len(mid) > 250 or not _MESSAGE_ID.fullmatch(mid):
                raise MessageError(
                    f"invalid Message-ID {mid!r} (expected left@right, without <>, spaces "
                    "or control characters)",
                    field="message_id",
                )
        if self.date is not None:
            if not isinstance(self.date, datetime.datetime):
                raise MessageError("must be a datetime", field="date")
            if self.date.tzinfo is None or self.date.utcoffset() is None:
                raise MessageError("the date must be timezone-aware", field="date")

    @property
    def recipients(self) -> tuple[Address, ...]:
        """Every envelope recipient: To, then Cc, then Bcc."""
        return self.to + self.cc + self.bcc

    def finalized(self) -> Message:
        """A copy with Date (now, local time zone) and Message-ID filled in where missing."""
        date = self.date
        if date is None:
            date = datetime.datetime.now().astimezone().replace(microsecond=0)
        message_id = self.message_id
        if message_id is None:
            message_id = f"{secrets.token_hex(16)}@{self.sender.domain}"
        return dataclasses.replace(self, date=date, message_id=message_id)


class HP(enum.Enum):
    """RFC 9788 header protection mode of the protected part."""

    #: The part will be encrypted: the outer Subject becomes "[...]".
    CIPHER = "cipher"
    #: The part will only be signed: the outer Subject stays.
    CLEAR = "clear"


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


def _check_header(name: str, value: str) -> None:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise MessageError(f"invalid header field name {name!r}")
    if not isinstance(value, str):
        raise MessageError(f"header {name}: value must be a string")
    bad = _CONTROLS_BUT_TAB.search(value)
    if bad:
        raise MessageError(
            f"{_describe_control(bad.group())} is not allowed in a header value",
            field=name.lower(),
        )
    _check_unicode(value, f"the {name} header", name.lower())


def _fold_words(head: str, words: Sequence[str]) -> list[str]:
    """Greedy folding: ``head`` then each word after a space; a fold replaces a space with
    CRLF + SP. Lines never end in whitespace. Checks the 998-octet hard limit."""
    lines: list[str] = []
    line = head
    previous = "x"
    for word in words:
        if len(line) + 1 + len(word) > _MAX_LINE and line.strip() and previous:
            lines.append(line)
            line = ""
        line += " " + word
        previous = word
    lines.append(line)
    for item in lines:
        if len(item) > _HARD_MAX_LINE:
            raise MessageError(
                f"header {head.rstrip(':')} has an unbreakable part longer than "
                f"{_HARD_MAX_LINE} characters"
            )
    return lines


def _plain_unstructured(head: str, value: str) -> bool:
    """Can this free text go out as it is, folded at its spaces?"""
    if not value.isascii() or "=?" in value or "\t" in value:
        return False
    if value != value.strip(" ") or "  " in value:
        return False
    words = value.split(" ")
    if len(head) + 1 + len(words[0]) > _MAX_LINE:
        return False
    return all(1 + len(word) <= _MAX_LINE for word in words)


def _fold_encoded(head: str, value: str) -> list[str]:
    """``value`` as B encoded-words sized to fill each line (<= 78 octets, <= 75 per word)."""
    data = [char.encode("utf-8") for char in value]
    lines: list[str] = []
    line = head
    i = 0
    while i < len(data):
        room = min(_MAX_ENCODED_WORD, _MAX_LINE - len(line) - 1)
        max_bytes = (room - len(_EW_PREFIX) - len(_EW_SUFFIX)) // 4 * 3
        if max_bytes < 4 and line.strip():
            lines.append(line)
            line = ""
            continue
        chunk = bytearray()
        while i < len(data) and len(chunk) + len(data[i]) <= max_bytes:
            chunk += data[i]
            i += 1
        line += " " + _encoded_word(bytes(chunk))
    lines.append(line)
    return lines


def _header_lines(name: str, value: str) -> list[str]:
    head = f"{name}:"
    if not value:
        return [head]
    if name.lower() in _UNSTRUCTURED:
        if _plain_unstructured(head, value):
            return _fold_words(head, value.split(" "))
        return _fold_encoded(head, value)
    if not value.isascii():
        raise MessageError(
            "non-ASCII text in a structured header must be encoded first", field=name.lower()
        )
    return _fold_words(head, value.split(" "))


def render_header(name: str, value: str) -> bytes:
    """One header field ending in CRLF, folded (CRLF + SP) so no line exceeds 78 octets.

    ``Subject`` and ``Comments`` are free text: non-ASCII or overlong words become RFC 2047
    B encoded-words of UTF-8 (at most 75 characters each, never splitting a character). Every
    other header must be ASCII already (use :meth:`Address.header_form` for addresses) and is
    folded at its spaces. CR, LF, NUL and other control characters are refused.
    """
    _check_header(name, value)
    return ("\r\n".join(_header_lines(name, value)) + "\r\n").encode("ascii")


def _hp_outer(name: str, value: str) -> bytes:
    """``HP-Outer: Name: value`` (RFC 9788 §2.2), with the inner value encoded as the outer
    header writes it."""
    head = f"HP-Outer: {name}:"
    if not value:
        lines = [head]
    elif name.lower() in _UNSTRUCTURED and not _plain_unstructured(head, value):
        lines = _fold_encoded(head, value)
    else:
        lines = _fold_words(head, value.split(" "))
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _param_header(name: str, value: str, params: Sequence[str]) -> bytes:
    """``Name: value; p1; p2`` folded at parameter boundaries."""
    lines: list[str] = []
    line = f"{name}: {value}"
    for param in params:
        if len(line) + 2 + len(param) + 1 <= _MAX_LINE:
            line += "; " + param
        else:
            lines.append(line + ";")
            line = " " + param
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def new_boundary() -> str:
    """A fresh multipart boundary. ``=_`` cannot occur in quoted-printable or base64 output."""
    return "=_e2email_" + secrets.token_hex(16)


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------

_QP_TOKENS = [
    chr(b) if (0x21 <= b <= 0x7E and b != 0x3D) or b in (0x20, 0x09) else f"={b:02X}"
    for b in range(256)
]
# A line whose every byte quoted-printable writes as itself (RFC 2045 §6.7 rule 2).
_QP_LITERAL = re.compile(rb"[\t\x20-\x3c\x3e-\x7e]*")
_QP_WHITESPACE = {0x20: "=20", 0x09: "=09"}


def _qp_line(raw: bytes) -> list[str]:
    """One hard line as quoted-printable encoded lines (soft breaks "=" where needed).

    Besides RFC 2045 (encode "=", 8-bit and controls; no encoded line over 76 characters; no
    trailing whitespace), every encoded line that would start with "." or "From " has that
    first character encoded, including lines that start after a soft break.

    Encoded lines are filled greedily, never splitting an "=XX" escape: each must leave room
    for its soft-break "=" (75 characters), only the hard line's end may reach column 76. The
    line is escaped in one pass (C loops), then cut per encoded line, not per character.
    """
    if not raw:
        return [""]
    if _QP_LITERAL.fullmatch(raw):
        text = raw.decode("ascii")
    else:
        text = "".join(map(_QP_TOKENS.__getitem__, raw))
    if raw[-1] in _QP_WHITESPACE:
        text = text[:-1] + _QP_WHITESPACE[raw[-1]]
    # Every "=" in ``text`` starts an escape: a literal "=" is itself escaped (=3D).
    size = len(text)
    lines: list[str] = []
    start = 0
    while True:
        first = text[start]
        if first == ".":
            first = "=2E"
        elif first == "F" and text.startswith(("From ", "From=20"), start):
            # "From=20" can only be the line's end: =20 is only written for trailing space.
            first = "=46"
        else:
            first = ""
        extra = len(first) - 1 if first else 0
        if size - start + extra <= 76:
            end = size
        else:
            end = start + 75 - extra
            escape = text.rfind("=", end - 2, end)
            if escape >= 0 and escape > start:
                end = escape  # the escape does not fit: it starts the next line
        line = first + text[start + 1 : end] if first else text[start:end]
        if end == size:
            lines.append(line)
            return lines
        lines.append(line + "=")
        start = end


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


#: Attachments are base64-encoded this many bytes at a time: a multiple of 57, the input of
#: one 76-character line (RFC 2045 §6.8), so the blocks' lines are exactly the whole's lines.
_B64_BLOCK = 57 * 4096


@dataclass(frozen=True)
class _Base64Lines:
    """Bytes as base64 lines of 76 characters joined by CRLF (none after the last), made one
    block at a time as they are iterated: a large attachment's encoded form (a third bigger,
    plus line ends) is never held whole."""

    content: bytes

    def __len__(self) -> int:
        full, rest = divmod(len(self.content), 57)
        lines = full + (rest > 0)
        return full * 76 + (rest + 2) // 3 * 4 + 2 * max(lines - 1, 0)

    def __iter__(self) -> Iterator[bytes]:
        data = memoryview(self.content)
        size = len(data)
        for start in range(0, size, _B64_BLOCK):
            encoded = binascii.b2a_base64(data[start : start + _B64_BLOCK], newline=False)
            lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
            if start + _B64_BLOCK < size:
                lines.append(b"")  # the CRLF between this block and the next
            yield b"\r\n".join(lines)


_Segment = bytes | _Base64Lines


def _segment_chunks(segments: Iterable[_Segment]) -> Iterator[bytes]:
    for segment in segments:
        if isinstance(segment, bytes):
            if segment:
                yield segment
        else:
            yield from segment


@dataclass
class _Part:
    content_type: str
    params: list[str]
    body: list[_Segment]
    transfer_encoding: str | None = None
    extra: list[bytes] = field(default_factory=list)

    def headers(self, more_params: Sequence[str] = ()) -> bytes:
        out = [_param_header("Content-Type", self.content_type, [*self.params, *more_params])]
        out.extend(self.extra)
        if self.transfer_encoding is not None:
            out.append(render_header("Content-Transfer-Encoding", self.transfer_encoding))
        return b"".join(out)

    def render(self) -> list[_Segment]:
        return [self.headers(), b"\r\n", *self.body]


def _text_part(subtype: str, text: str) -> _Part:
    lines = _normalise_newlines(text).split("\n")
    params = ["charset=utf-8"]
    if all(_SEVEN_BIT_LINE.fullmatch(line) for line in lines):
        return _Part(f"text/{subtype}", params, ["\r\n".join(lines).encode("ascii")])
    encoded: list[str] = []
    for line in lines:
        encoded.extend(_qp_line(line.encode("utf-8")))
    body = "\r\n".join(encoded).encode("ascii")
    return _Part(f"text/{subtype}", params, [body], "quoted-printable")


def _rfc2231(key: str, value: str) -> list[str]:
    """``key*=utf-8''...``, or ``key*0*=utf-8''...; key*1*=...`` when too long for a line."""
    encoded = "".join(chr(b) if b in _ATTR_CHARS else f"%{b:02X}" for b in value.encode("utf-8"))
    single = f"{key}*=utf-8''{encoded}"
    if len(single) <= _MAX_PARAM:
        return [single]
    params: list[str] = []
    pos = 0
    while pos < len(encoded):
        head = f"{key}*{len(params)}*=" + ("utf-8''" if not params else "")
        end = min(len(encoded), pos + _MAX_PARAM - len(head))
        # Never split a %XX escape.
        if end < len(encoded):
            percent = encoded.rfind("%", max(pos, end - 2), end)
            if percent >= 0:
                end = percent
        params.append(head + encoded[pos:end])
        pos = end
    return params


def _ascii_fallback(filename: str) -> str:
    """A plain ASCII stand-in for ``name=``, for readers without RFC 2231."""
    chars: list[str] = []
    for char in unicodedata.normalize("NFKD", filename):
        if unicodedata.combining(char):
            continue
        chars.append(char if char in _FALLBACK_CHARS else "_")
    name = re.sub("_{2,}", "_", "".join(chars)).strip("_ ")
    stem, dot, ext = name.rpartition(".")
    if not dot or len(ext) > 10:
        stem, ext = name, ""
    if not stem.strip("._"):
        stem = "attachment"
    room = _MAX_PLAIN_FILENAME - (len(ext) + 1 if ext else 0)
    stem = stem[:room]
    return f"{stem}.{ext}" if ext else stem


def _attachment_part(attachment: Attachment) -> _Part:
    name = attachment.filename
    if len(name) <= _MAX_PLAIN_FILENAME and "=?" not in name and _PLAIN_FILENAME.fullmatch(name):
        name_param = f'name="{name}"'
        disposition = [f'filename="{name}"']
    else:
        name_param = f'name="{_ascii_fallback(name)}"'
        disposition = _rfc2231("filename", name)
    return _Part(
        attachment.content_type,
        [name_param],
        [_Base64Lines(attachment.content)],
        "base64",
        [_param_header("Content-Disposition", "attachment", disposition)],
    )


def _multipart(subtype: str, parts: Sequence[_Part]) -> _Part:
    boundary = new_boundary().encode("ascii")
    segments: list[_Segment] = []
    for part in parts:
        segments += [b"--" + boundary + b"\r\n", *part.render(), b"\r\n"]
    segments.append(b"--" + boundary + b"--\r\n")
    return _Part(f"multipart/{subtype}", [f'boundary="{boundary.decode()}"'], segments)


def _require_finalized(message: Message) -> tuple[datetime.datetime, str]:
    if message.date is None or message.message_id is None:
        raise ValueError("the message needs a Date and a Message-ID: call message.finalized()")
    return message.date, message.message_id


def _outer_fields(message: Message, hp: HP | None) -> list[tuple[str, str]]:
    """The non-structural header fields of the outer message, in order."""
    date, message_id = _require_finalized(message)
    fields = [("Date", format_datetime(date)), ("From", message.sender.header_form())]
    if message.to:
        fields.append(("To", ", ".join(a.header_form() for a in message.to)))
    elif not message.cc:
        fields.append(("To", "undisclosed-recipients:;"))
    if message.cc:
        fields.append(("Cc", ", ".join(a.header_form() for a in message.cc)))
    if message.reply_to:
        fields.append(("Reply-To", ", ".join(a.header_form() for a in message.reply_to)))
    fields.append(("Subject", "[...]" if hp is HP.CIPHER else message.subject))
    fields.append(("Message-ID", f"<{message_id}>"))
    return fields


def _protected_fields(message: Message) -> list[tuple[str, str]]:
    """The header fields inside the protected payload (RFC 9788 §2). Never Bcc."""
    date, message_id = _require_finalized(message)
    fields = [("From", message.sender.header_form())]
    if message.to:
        fields.append(("To", ", ".join(a.header_form() for a in message.to)))
    if message.cc:
        fields.append(("Cc", ", ".join(a.header_form() for a in message.cc)))
    if message.reply_to:
        fields.append(("Reply-To", ", ".join(a.header_form() for a in message.reply_to)))
    fields.append(("Subject", message.subject))
    fields.append(("Date", format_datetime(date)))
    fields.append(("Message-ID", f"<{message_id}>"))
    return fields


class PayloadStream:
    """The bytes of :func:`build_payload`, in pieces: each iteration yields them anew, in
    order. Attachments are base64-encoded block by block as the pieces are read, so a large
    message is never held whole (e.g. while it is piped to gpg). Boundaries are chosen when the
    stream is made: every iteration yields the same bytes. ``len()`` is their total size."""

    __slots__ = ("_segments",)

    def __init__(self, segments: Sequence[_Segment]) -> None:
        self._segments = tuple(segments)

    def __iter__(self) -> Iterator[bytes]:
        return _segment_chunks(self._segments)

    def __len__(self) -> int:
        return sum(len(segment) for segment in self._segments)

    def __bytes__(self) -> bytes:
        if len(self) < 1 << 20:
            return b"".join(self)
        # One buffer that grows in place; getvalue() hands it over without a copy.
        out = io.BytesIO()
        for chunk in self:
            out.write(chunk)
        return out.getvalue()


def stream_payload(message: Message, *, hp: HP | None) -> PayloadStream:
    """:func:`build_payload`'s bytes as a :class:`PayloadStream` (same arguments, same checks,
    same bytes), for feeding a large message to a signer or encrypter piece by piece."""
    body = _text_part("plain", message.text)
    if message.html is not None:
        body = _multipart("alternative", [body, _text_part("html", message.html)])
    if message.attachments:
        body = _multipart("mixed", [body, *(_attachment_part(a) for a in message.attachments)])
    if hp is None:
        return PayloadStream(body.render())
    protected = _protected_fields(message)
    outer = _outer_fields(message, hp)
    head = [body.headers(['protected-headers="v1"', f'hp="{hp.value}"'])]
    head.extend(render_header(name, value) for name, value in protected)
    head.extend(_hp_outer(name, value) for name, value in outer)
    return PayloadStream([b"".join(head), b"\r\n", *body.body])


def build_payload(message: Message, *, hp: HP | None) -> bytes:
    """The MIME entity to sign and/or encrypt, as canonical bytes (header block, CRLF, body).

    text/plain, or multipart/alternative (text, html), wrapped in multipart/mixed when there
    are attachments. With ``hp`` the top-level Content-Type carries ``protected-headers="v1"``
    and ``hp="cipher"|"clear"``, and the header block carries the protected From, To, Cc,
    Reply-To, Subject, Date, Message-ID (never Bcc) and one ``HP-Outer`` field per outer
    header (RFC 9788). ``hp`` needs a finalized message (:meth:`Message.finalized`).
    """
    return bytes(stream_payload(message, hp=hp))


def message_head(message: Message, *, hp: HP | None) -> bytes:
    """The outer header block :func:`build_message` puts before the payload: Date, From, To
    or ``undisclosed-recipients:;``, Cc, Reply-To, Subject ("[...]" for :attr:`HP.CIPHER`),
    Message-ID, MIME-Version. Never Bcc. The payload that follows must start with its own
    header block (Content-Type ...)."""
    out = [render_header(name, value) for name, value in _outer_fields(message, hp)]
    out.append(b"MIME-Version: 1.0\r\n")
    return b"".join(out)


def build_message(message: Message, *, payload: bytes, hp: HP | None) -> bytes:
    """The complete message: outer headers (Date, From, To or ``undisclosed-recipients:;``,
    Cc, Reply-To, Subject -- "[...]" for :attr:`HP.CIPHER` -- Message-ID, MIME-Version) then
    ``payload`` exactly as given (it starts with its own Content-Type header). Never Bcc."""
    if not isinstance(payload, bytes):
        raise TypeError("payload must be bytes")
    if not payload or payload.startswith((b"\r\n", b"\n", b" ", b"\t")):
        raise ValueError("payload must start with its own header block (Content-Type ...)")
    header_end = payload.find(b"\r\n\r\n")
    head = payload if header_end < 0 else payload[: header_end + 2]
    if not re.search(rb"(?im)^content-type:", head):
        raise ValueError("payload has no Content-Type header")
    clash = _OUTER_NAMES.search(head)
    if clash:
        # E.g. a build_payload(..., hp=...) entity passed here unwrapped: its protected
        # Subject would become a second, cleartext outer Subject.
        raise ValueError(
            f"payload header block has a {clash.group(1).decode()} field; pass the "
            "signed/encrypted wrapper, not the protected part itself"
        )
    return b"".join([message_head(message, hp=hp), payload])


def check_wire_safe(data: bytes) -> None:
    """Refuse data that is unsafe to hand to SMTP (RFC 5322 §2.1.1, CVE-2023-51764 smuggling):
    a bare CR or LF, a NUL, any byte >= 0x80, or a line longer than 998 octets."""
    if b"\0" in data:
        raise MessageError(f"NUL byte at offset {data.index(0)}", field="message")
    if not data.isascii():
        high = _HIGH_BYTE.search(data)
        offset = high.start() if high else -1
        raise MessageError(f"8-bit byte at offset {offset}", field="message")
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        bare = _BARE_CR_OR_LF.search(data)
        offset = bare.start() if bare else -1
        raise MessageError(f"bare CR or LF at offset {offset}", field="message")
    # Every line is at most 998 octets: from each line start, a LF within the next 1000 octets
    # (998 + CRLF). rfind jumps to the last LF in that window, so this loops about once per
    # kilobyte, never per line, and copies nothing (until it has an error to report).
    start, size = 0, len(data)
    while size - start > _HARD_MAX_LINE + 2:
        newline = data.rfind(b"\n", start, start + _HARD_MAX_LINE + 2)
        if newline < 0:
            break
        start = newline + 1
    end = data.find(b"\n", start)
    if (size if end < 0 else end - 1) - start > _HARD_MAX_LINE:
        longest = max(map(len, data.split(b"\r\n")))
        raise MessageError(
            f"a line of {longest} octets (the limit is {_HARD_MAX_LINE})", field="message"
        )
