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

A message another program wrote (sendmail callers, Django, an SMTP relay) is read with
:meth:`Message.from_bytes`: its own MIME body is kept as the payload (:class:`MimeBody`), not
rebuilt. The stdlib :mod:`email` package only *reads* its structure (parameters, addresses,
RFC 2047 words); the bytes are still written here. Leaves that are not safe to sign as they
are (8-bit, NUL, lines over 998 octets, trailing whitespace, ``From `` lines) are re-encoded
so that they decode to the same bytes; everything else, a signed subtree above all, is kept
byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.message
import email.policy
import email.utils
import enum
import io
import mimetypes
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Literal

import idna

from e2email.errors import MessageError
from e2email.spool import Spool, line_pieces

__all__ = [
    "HP",
    "Address",
    "Attachment",
    "HeaderField",
    "Message",
    "MimeBody",
    "PayloadStream",
    "build_message",
    "build_payload",
    "check_wire_safe",
    "existing_protection",
    "message_head",
    "new_boundary",
    "render_header",
    "split_message",
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
#: A plain addr-spec, as nearly every address is written: a dot-atom local part, "@", ASCII
#: host-name labels (either case). One match of this (and the length limits) accepts it
#: with exactly the result of the general checks (:func:`_check_addr_spec`), which are
#: skipped; anything else goes through them and is accepted or refused as it always was.
_PLAIN_ADDR = re.compile(
    rf"({_DOT_ATOM.pattern})@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
)
# RFC 2045 token (any CHAR except SPACE, CTLs and tspecials).
_TOKEN = r"[!#$%&'*+.^_`{|}~0-9A-Za-z-]{1,127}"  # RFC 6838 §4.2: at most 127 characters
_MIME_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
# Control characters refused in one-line values: C0 (incl. TAB), DEL, C1, U+2028/U+2029.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A text line that may go out as 7bit: printable ASCII (and TAB), at most 76 characters, no
# trailing whitespace, not starting with "From " or ".".
_SEVEN_BIT_LINE = re.compile(r"(?!\.|From )[\t\x20-\x7e]{0,76}+(?<![ \t])")
#: The characters a 7bit text may have: TAB, SP to "~" and its line ends (LF).
_SEVEN_BIT_CHARS = bytes(range(0x20, 0x7F)) + b"\t\n"
#: Every line of a text (LF-separated, as bytes, of :data:`_SEVEN_BIT_CHARS` only: that is
#: checked first, by one ``bytes.translate``) a :data:`_SEVEN_BIT_LINE`: one match for the
#: whole text instead of one per line (a bulk run's 4 KB body has about 90 lines), matching
#: "not LF" where the line pattern matches its character class (a cheaper step per
#: character). Possessive (Python 3.11): a line matched is never taken back, so the engine
#: keeps no backtracking point per line (about 120 bytes a line otherwise: a GB for 10 MB of
#: short lines).
_SEVEN_BIT_LINE_SHAPE = rb"(?!\.|From )[^\n]{0,76}+(?<![ \t])"
_SEVEN_BIT_SHAPE = re.compile(rb"(?:%s\n)*+%s" % (_SEVEN_BIT_LINE_SHAPE, _SEVEN_BIT_LINE_SHAPE))
# RFC 2231 attribute-char: CHAR except SPACE, CTLs, "*", "'", "%" and tspecials.
_ATTR_CHARS = frozenset(
    b"!#$&+-.^_`{|}~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9._+,()!#$&'~@^-]+(?: [A-Za-z0-9._+,()!#$&'~@^-]+)*")
_FALLBACK_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+()")
# Headers whose value is free text (RFC 5322 unstructured): non-ASCII and overlong words are
# written as encoded-words. Every other header must be ASCII and is folded at spaces only.
_UNSTRUCTURED = frozenset({"subject", "comments"})
# A CR not before LF, a LF not after CR: two patterns, each starting with its one literal
# byte, which the regex engine finds with a tight scan (one alternation of both is tried at
# every byte, ten times slower; three counts of CR, LF and CRLF are slower too).
_CR_NOT_CRLF = re.compile(rb"\r(?!\n)")
_LF_NOT_CRLF = re.compile(rb"\n(?<!\r\n)")
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


def _plain_addr_spec(addr_spec: str) -> str | None:
    """:func:`_check_addr_spec` of a plain addr-spec (:data:`_PLAIN_ADDR`) that passes every
    check; None for anything else (which the general checks then accept or refuse)."""
    if len(addr_spec) > 254:
        return None  # refused by the general checks, before any pattern runs over it
    match = _PLAIN_ADDR.fullmatch(addr_spec)
    if match is None:
        return None
    local, domain = match.groups()
    if len(local) > 64 or len(domain) > 253 or len(addr_spec) > 254:
        return None
    domain = domain.lower()
    if domain.rpartition(".")[2].isdigit():
        return None  # an IP address: the general checks say so
    return f"{local}@{domain}"


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
        if name:
            bad = _CONTROLS.search(name)
            if bad:
                raise MessageError(
                    f"display name {name!r}: {_describe_control(bad.group())} is not allowed"
                )
            _check_unicode(name, "display name", None)
            name = re.sub(" {2,}", " ", name.strip(" "))
            object.__setattr__(self, "display_name", name)
        addr_spec = _plain_addr_spec(self.addr_spec) or _check_addr_spec(self.addr_spec)
        object.__setattr__(self, "addr_spec", addr_spec)

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse one mailbox: ``a@b.org``, ``<a@b.org>``, ``Name <a@b.org>`` or
        ``"Quoted, Name" <a@b.org>``. Errors have ``field=None``; the caller names the field."""
        if not isinstance(text, str):
            raise MessageError(f"an address must be a string, not {type(text).__name__}")
        simple = _plain_addr_spec(text)
        if simple is not None:
            # A bare plain addr-spec that passes every check: what the tokenizer below
            # would make of it, without its loop over each character (and, for this class,
            # without __post_init__ checking it again: this is the address it would make).
            if cls is not Address:
                return cls(text)
            address = object.__new__(cls)
            address.__dict__.update(addr_spec=simple, display_name="")
            return address
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
class _FileSource:
    """A regular file to be read when the message is produced, as it was when it was chosen.

    Its identity and state (device, inode, size, modification time in ns) are recorded when the
    attachment is made and checked before and after every read: the bytes signed or encrypted
    are the bytes that were chosen, and a file that changes while it is attached (appended to,
    rewritten, replaced) is refused with a MessageError, never sent half old and half new. A
    rewrite of the same size within the file system's timestamp granularity cannot be seen by
    any stat-based check; reading the file whole at attach time was the only stronger promise,
    at the cost of holding it in memory."""

    path: Path
    shown: str
    size: int
    mtime_ns: int
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path, shown: str, info: os.stat_result) -> _FileSource:
        return cls(path, shown, info.st_size, info.st_mtime_ns, info.st_dev, info.st_ino)

    def _changed(self) -> MessageError:
        return MessageError(
            f"{self.shown} changed after it was attached; nothing was sent (attach it again)",
            field="attachment",
        )

    def _check(self, info: os.stat_result) -> None:
        now = (info.st_size, info.st_mtime_ns, info.st_dev, info.st_ino)
        if now != (self.size, self.mtime_ns, self.device, self.inode):
            raise self._changed()

    def blocks(self, block: int) -> Iterator[bytes]:
        """The file's bytes, ``block`` at a time, checked to be the recorded file unchanged."""
        try:
            with open(self.path, "rb") as file:
                self._check(os.fstat(file.fileno()))
                left = self.size
                while left:
                    data = file.read(min(block, left))
                    if not data:  # shorter than recorded: truncated while being read
                        raise self._changed()
                    left -= len(data)
                    yield data
                # Nothing appended, and the file as recorded after the last byte was read.
                extra = file.read(1)
                self._check(os.fstat(file.fileno()))
                if extra:
                    raise self._changed()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MessageError(f"cannot read {self.shown}: {reason}", field="attachment") from exc

    def read(self) -> bytes:
        out = bytearray()
        for data in self.blocks(1 << 20):
            out += data
        return bytes(out)


class _Content:
    """The ``content`` field of :class:`Attachment` (a dataclass descriptor-typed field): bytes
    given in memory, or a :class:`_FileSource` read when asked for. Reading ``content`` gives
    bytes either way; the payload streams a file without holding it (see :class:`_Base64Lines`).
    """

    def __get__(self, obj: object | None, owner: type | None = None) -> bytes:
        if obj is None:
            raise AttributeError("content")  # no default value for the field
        value = obj.__dict__["_content"]
        return value.read() if isinstance(value, _FileSource) else value

    def __set__(self, obj: object, value: bytes | _FileSource) -> None:
        obj.__dict__["_content"] = value


@dataclass(frozen=True)
class Attachment:
    """A file to attach: its name as the recipient sees it, its bytes and its MIME type.

    An attachment made by :meth:`from_path` holds the file's path, not its bytes: the file is
    read block by block as the message is produced (and again for each copy that is made)."""

    filename: str
    content: _Content = _Content()
    content_type: str = "application/octet-stream"

    def __repr__(self) -> str:
        source = self._source
        content = f"<file {source.shown}, {source.size} bytes>" if source else repr(self.content)
        return (
            f"Attachment(filename={self.filename!r}, content={content}, "
            f"content_type={self.content_type!r})"
        )

    @property
    def _source(self) -> _FileSource | None:
        value = self.__dict__["_content"]
        return value if isinstance(value, _FileSource) else None

    @property
    def size(self) -> int:
        """The attachment's size in bytes (of the file as it was attached), without reading it."""
        source = self._source
        return source.size if source is not None else len(self.__dict__["_content"])

    def _segment(self) -> _Base64Lines:
        return _Base64Lines(self.__dict__["_content"])

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
        content = self.__dict__["_content"]
        if isinstance(content, bytearray | memoryview):
            object.__setattr__(self, "content", bytes(content))
        elif not isinstance(content, bytes | _FileSource):
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
        """A regular file, read when the message is produced (block by block as it is signed or
        encrypted, so a large file is never held whole), not now. It must stay as it is until
        the message is sent: a file changed in between is refused (MessageError), not sent half
        changed. It must be readable now. The type is guessed from the name when not given.

        The gpg engine pipes the payload to gpg as it is read, so neither the file nor its
        base64 form is ever held whole. The Sequoia engine does the same for a large payload
        (from ``e2email.crypto.sequoia.FEED_MIN`` up, where a child process can be started: the
        child reads the file and feeds Sequoia); for a smaller one it holds the encoded payload
        once, as S/MIME does (``cryptography`` signs and envelopes whole buffers), read into it
        block by block; never the file's bytes as well."""
        where = Path(path)
        shown = os.fspath(path)
        try:
            info = where.stat()
            if stat.S_ISDIR(info.st_mode):
                raise MessageError(f"cannot attach {shown}: it is a directory", field="attachment")
            if not stat.S_ISREG(info.st_mode):
                raise MessageError(f"cannot attach {shown}: not a regular file", field="attachment")
            # Readable now (permissions), so the mistake is reported when the file is named.
            with open(where, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MessageError(f"cannot read {shown}: {reason}", field="attachment") from exc
        name = filename if filename is not None else where.name
        if content_type is None:
            content_type = _guess_type(name, where.name)
        source = _FileSource.of(where.absolute(), shown, info)
        return cls(name, source, content_type)


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
    if type(value) is tuple or type(value) is list:
        # The usual (and the defaults): no need to ask the Iterable ABC; an Address as it is.
        return tuple(a if type(a) is Address else _coerce_address(a, field_name) for a in value)
    if isinstance(value, str | Address):
        return (_coerce_address(value, field_name),)
    if isinstance(value, bytes | bytearray) or not isinstance(value, Iterable):
        raise MessageError("expected an address or a list of addresses", field=field_name)
    return tuple(_coerce_address(item, field_name) for item in value)


def _check_attachments(attachments: object) -> tuple[Attachment, ...]:
    if type(attachments) is tuple and not attachments:
        return ()  # none, the default: nothing to ask the Iterable ABC
    if isinstance(attachments, Attachment):
        attachments = (attachments,)
    if not isinstance(attachments, Iterable):
        raise MessageError("expected a list of attachments", field="attachments")
    attachments = tuple(attachments)
    for item in attachments:
        if not isinstance(item, Attachment):
            raise MessageError(f"not an Attachment: {item!r}", field="attachments")
    return attachments


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
    #: Extra header fields (In-Reply-To, References, List-*, X-Mailer, ...), in order; values
    #: as written (encoded-words kept; other non-ASCII text is RFC 2047-encoded on output).
    #: When encrypting they go inside the protected part; only those the mail system acts on
    #: (threading, list and auto-reply fields) also stay outside (RFC 9788 policy, see
    #: ``_OUTSIDE_TOO``). Signed-only or unprotected, all of them are outside too.
    headers: tuple[tuple[str, str], ...]
    #: A pre-built MIME entity sent as the payload as it is, instead of text/html/attachments.
    body: MimeBody | None
    #: The To and Cc header fields as the author wrote them, when they list an address more
    #: than once (``To: bob@example.net, BOB@EXAMPLE.NET`` / ``Cc: bob@example.net``, as
    #: reply-to-all makes): shown as written in the header, while :attr:`to` and :attr:`cc`
    #: (the recipients: envelope, keys, copies) hold each address once. None: :attr:`to` and
    #: :attr:`cc` as they are. Set by :meth:`from_bytes`; they must name exactly the
    #: addresses of :attr:`to` and :attr:`cc` (never a Bcc one).
    shown_to: tuple[Address, ...] | None
    shown_cc: tuple[Address, ...] | None

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
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        body: MimeBody | None = None,
        shown_to: Iterable[AddressInput] | AddressInput | None = None,
        shown_cc: Iterable[AddressInput] | AddressInput | None = None,
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
            "headers": headers,
            "body": body,
            "shown_to": shown_to,
            "shown_cc": shown_cc,
        }
        # What object.__setattr__ would do for each (frozen dataclass, no slots), at once.
        self.__dict__.update(values)
        self.__post_init__()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sender", _coerce_address(self.sender, "sender"))
        for name in ("to", "cc", "bcc", "reply_to"):
            object.__setattr__(self, name, _coerce_addresses(getattr(self, name), name))

        if not isinstance(self.subject, str):
            raise MessageError("must be a string", field="subject")
        if type(self.subject) is not str:
            # A str subclass (an Enum member, or one whose __str__ says something else) is
            # kept as its characters: those are what is checked and what is written.
            object.__setattr__(self, "subject", str.__str__(self.subject))
        if not (self.subject.isascii() and self.subject.isprintable()):  # else nothing to find
            bad = _CONTROLS_BUT_TAB.search(self.subject)
            if bad:
                raise MessageError(
                    f"{_describe_control(bad.group())} is not allowed in the subject",
                    field="subject",
                )
            _check_unicode(self.subject, "the subject", "subject")
        _check_body(self.text, "text")
        if self.html is not None:
            _check_body(self.html, "html")

        object.__setattr__(self, "attachments", _check_attachments(self.attachments))
        object.__setattr__(self, "headers", _check_extra_headers(self.headers))
        if self.body is not None:
            if not isinstance(self.body, MimeBody):
                raise MessageError("must be a MimeBody (see MimeBody.parse)", field="body")
            if self.text or self.html is not None or self.attachments:
                raise MessageError(
                    "give either a MIME body or text/html/attachments, not both", field="body"
                )

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

        self._check_shown()

        self._check_id_and_date()

    def _check_id_and_date(self) -> None:
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

    @classmethod
    def from_bytes(
        cls,
        raw: bytes,
        *,
        sender: AddressInput | None = None,
        envelope: Iterable[AddressInput] | None = None,
    ) -> Message:
        """Parse an RFC 5322 message made by another program (CRLF or LF line ends; a leading
        mbox ``From `` line is ignored).

        From, To, Cc, Bcc, Reply-To, Subject (RFC 2047 decoded), Date and Message-ID fill the
        fields; Content-* and the body become :attr:`body` as they are (canonicalised only,
        see :meth:`MimeBody.parse`); MIME-Version and Return-Path are dropped; every other
        field goes into :attr:`headers`. ``sender`` fills a missing or unqualified From (cron
        writes ``From: root (Cron Daemon)``). An address listed twice is kept once.

        ``envelope``, when given, lists who this message goes to (sendmail's command line):
        an address not in To or Cc becomes a Bcc recipient (a copy of its own), and a Bcc
        header address not in it is dropped. Malformed input raises MessageError.
        """
        return _message_from_bytes(raw, sender, envelope)

    def _check_shown(self) -> None:
        if self.shown_to is None and self.shown_cc is None:
            return
        for name in ("shown_to", "shown_cc"):
            value = getattr(self, name)
            default = self.to if name == "shown_to" else self.cc
            shown = default if value is None else _coerce_addresses(value, name)
            object.__setattr__(self, name, shown)
        written = {a.addr_spec.lower() for a in (*(self.shown_to or ()), *(self.shown_cc or ()))}
        listed = {a.addr_spec.lower() for a in (*self.to, *self.cc)}
        if written != listed:
            # A header naming someone who does not get the message (or hiding one who does)
            # would show recipients that are not, or reveal a Bcc.
            raise MessageError(
                "the To and Cc fields as written must name the same addresses as to and cc",
                field="shown_to",
            )

    @property
    def to_field(self) -> tuple[Address, ...]:
        """The To field's addresses as shown in the header (:attr:`shown_to` or :attr:`to`)."""
        return self.to if self.shown_to is None else self.shown_to

    @property
    def cc_field(self) -> tuple[Address, ...]:
        """The Cc field's addresses as shown in the header (:attr:`shown_cc` or :attr:`cc`)."""
        return self.cc if self.shown_cc is None else self.shown_cc

    @property
    def recipients(self) -> tuple[Address, ...]:
        """Every envelope recipient: To, then Cc, then Bcc."""
        return self.to + self.cc + self.bcc

    def __getstate__(self) -> dict[str, object]:
        # Pickles and copies carry the message, not the header fields worked out for it
        # (_fields: a cache, private to this module, whose class has no pickle state).
        state = dict(self.__dict__)
        state.pop("_fields", None)
        return state

    def finalized(self) -> Message:
        """A copy with Date (now, local time zone) and Message-ID filled in where missing;
        the message itself when both are there (it is immutable: nothing to copy, and its
        checks already ran)."""
        if self.date is not None and self.message_id is not None:
            return self
        date = self.date
        if date is None:
            date = datetime.datetime.now().astimezone().replace(microsecond=0)
        message_id = self.message_id
        if message_id is None:
            message_id = f"{secrets.token_hex(16)}@{self.sender.domain}"
            if len(message_id) > 250:
                raise MessageError(
                    f"the sender's domain is too long for a Message-ID ({len(self.sender.domain)}"
                    " characters); give message_id= yourself",
                    field="message_id",
                )
        # Every other field was checked when this message was made and is unchanged: only the
        # two new values are checked (dataclasses.replace would parse every address again,
        # a tenth of a millisecond per message in a bulk run).
        # copy.copy's result (a new object with this one's attributes) without its protocol
        # look-ups; not the header fields worked out for the other Date and Message-ID.
        final = object.__new__(type(self))
        final.__dict__.update(self.__dict__)
        final.__dict__.pop("_fields", None)
        object.__setattr__(final, "date", date)
        object.__setattr__(final, "message_id", message_id)
        final._check_id_and_date()
        return final


class HP(enum.Enum):
    """RFC 9788 header protection mode of the protected part."""

    #: The part will be encrypted: the outer Subject becomes "[...]".
    CIPHER = "cipher"
    #: The part will only be signed: the outer Subject stays.
    CLEAR = "clear"


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date_text(date: datetime.datetime) -> str:
    """``format_datetime(date)``: the RFC 5322 §3.3 date-time, written here for the usual
    offset of whole minutes (the stdlib's goes through ``timetuple`` and ``strftime``, a
    sixth of a message's header work); any other offset, or none, is left to it."""
    offset = date.utcoffset()
    if offset is None or offset.microseconds or offset.seconds % 60:
        return format_datetime(date)
    minutes = offset.days * 1440 + offset.seconds // 60
    hours, minutes = divmod(abs(minutes), 60)
    sign = "-" if offset.days < 0 else "+"
    return (
        f"{_DAYS[date.weekday()]}, {date.day:02d} {_MONTHS[date.month - 1]} {date.year:04d} "
        f"{date.hour:02d}:{date.minute:02d}:{date.second:02d} {sign}{hours:02d}{minutes:02d}"
    )


#: The fields this module writes, as it spells them (valid names, no need to match them),
#: each with whether it is free text (:data:`_UNSTRUCTURED`).
_OWN_FIELDS = {
    name: name.lower() in _UNSTRUCTURED
    for name in (
        "Date",
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Message-ID",
        "Content-Transfer-Encoding",
    )
}


def _one_line_header(name: str, value: str) -> bytes | None:
    """:func:`render_header`'s bytes for a field that goes out as it is, on one line: a
    valid name, a value of printable ASCII (no control character, not even TAB) that fits
    in 78 octets with it and, for free text, needs no encoded-word (no "=?", no blank at
    either end or twice in a row). None for anything else (the general path's)."""
    if not value or len(name) + len(value) > _MAX_LINE - 2:
        return None
    if not (value.isascii() and value.isprintable()):
        return None
    free = _OWN_FIELDS.get(name)
    if free is None:
        if not _FIELD_NAME.fullmatch(name):
            return None
        free = name.lower() in _UNSTRUCTURED
    if free and ("=?" in value or value[0] == " " or value[-1] == " " or "  " in value):
        return None
    return f"{name}: {value}\r\n".encode("ascii")


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
    if type(name) is str and type(value) is str:  # a subclass may format as other text
        line = _one_line_header(name, value)
        if line is not None:
            return line
    _check_header(name, value)
    name, value = str.__str__(name), str.__str__(value)  # the characters checked, as written
    return ("\r\n".join(_header_lines(name, value)) + "\r\n").encode("ascii")


def _hp_outer(name: str, value: str) -> bytes:
    """``HP-Outer: Name: value`` (RFC 9788 §2.2), with the inner value encoded as the outer
    header writes it."""
    head = f"HP-Outer: {name}:"
    if not value:
        lines = [head]
    elif name.lower() in _UNSTRUCTURED and not _plain_unstructured(head, value):
        lines = _fold_encoded(head, value)
    elif type(value) is str and len(head) + 1 + len(value) <= _MAX_LINE:
        return f"{head} {value}\r\n".encode("ascii")  # fits: _fold_words's one line
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
    if "\r" not in text:
        return text  # the usual text: no need for two passes that change nothing
    return text.replace("\r\n", "\n").replace("\r", "\n")


#: Attachments are base64-encoded this many bytes at a time: a multiple of 57, the input of
#: one 76-character line (RFC 2045 §6.8), so the blocks' lines are exactly the whole's lines.
_B64_BLOCK = 57 * 4096


@dataclass(frozen=True)
class _Base64Lines:
    """Bytes as base64 lines of 76 characters joined by CRLF (none after the last), made one
    block at a time as they are iterated: a large attachment's encoded form (a third bigger,
    plus line ends) is never held whole."""

    content: bytes | _FileSource

    def __len__(self) -> int:
        size = self.content.size if isinstance(self.content, _FileSource) else len(self.content)
        full, rest = divmod(size, 57)
        lines = full + (rest > 0)
        return full * 76 + (rest + 2) // 3 * 4 + 2 * max(lines - 1, 0)

    def _blocks(self) -> Iterator[bytes | memoryview]:
        if isinstance(self.content, _FileSource):
            # Read from disk as the payload is produced, one block at a time (checked to be
            # the file as attached), never the whole file.
            return self.content.blocks(_B64_BLOCK)
        data = memoryview(self.content)
        return (data[start : start + _B64_BLOCK] for start in range(0, len(data), _B64_BLOCK))

    def __iter__(self) -> Iterator[bytes]:
        size = len(self)
        done = 0
        for block in self._blocks():
            encoded = binascii.b2a_base64(block, newline=False)
            lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
            done += len(encoded) + 2 * (len(lines) - 1)
            if done < size:
                lines.append(b"")  # the CRLF between this block and the next
                done += 2
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


def _seven_bit_body(text: str) -> bytes | None:
    """``text`` (LF line ends) with CRLF line ends when every line is a
    :data:`_SEVEN_BIT_LINE` (it may go out as 7bit, as it is); None otherwise."""
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if data.translate(None, _SEVEN_BIT_CHARS) or not _SEVEN_BIT_SHAPE.fullmatch(data):
        return None
    return data.replace(b"\n", b"\r\n")


def _text_part(subtype: str, text: str) -> _Part:
    text = _normalise_newlines(text)
    params = ["charset=utf-8"]
    plain = _seven_bit_body(text)
    if plain is not None:
        return _Part(f"text/{subtype}", params, [plain])
    lines = text.split("\n")
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
        [attachment._segment()],
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


class _Fields:
    """A finalized message's header fields, worked out once for all the payloads and heads
    made of it (a send makes the outer fields twice, for the HP-Outer record and the head
    itself, and writes the Date three times). Kept in the message's ``__dict__`` (not a
    field: not compared, not shown): a Message does not change once made, and
    :meth:`Message.finalized`'s copy, the one object that is changed after it is made (its
    Date and Message-ID), starts without it, and pickles and copies leave it out. A message
    given with its own Date and Message-ID keeps it for as long as the caller keeps the
    message (about 1.2 KB per protection mode it was sent with). Made for the Date and
    Message-ID objects it was made with, and made anew if those are not the message's
    (whatever sets them)."""

    __slots__ = ("date", "date_text", "message_id", "outer", "protected")

    def __init__(self, date: datetime.datetime, message_id: str) -> None:
        self.date = date
        self.message_id = message_id
        self.date_text = _date_text(date)
        self.outer: dict[HP | None, tuple[tuple[str, str], ...]] = {}
        self.protected: tuple[tuple[str, str], ...] | None = None


def _fields(message: Message) -> _Fields:
    date, message_id = _require_finalized(message)
    fields = message.__dict__.get("_fields")
    if not (
        isinstance(fields, _Fields) and fields.date is date and fields.message_id is message_id
    ):
        fields = _Fields(date, message_id)
        message.__dict__["_fields"] = fields  # not a dataclass field: frozen does not apply
    return fields


def _outer_fields(message: Message, hp: HP | None) -> tuple[tuple[str, str], ...]:
    """The non-structural header fields of the outer message, in order."""
    memo = _fields(message)
    found = memo.outer.get(hp)
    if found is None:
        found = memo.outer[hp] = tuple(_make_outer_fields(message, hp, memo))
    return found


def _protected_fields(message: Message) -> tuple[tuple[str, str], ...]:
    """The header fields inside the protected payload (RFC 9788 §2). Never Bcc."""
    memo = _fields(message)
    if memo.protected is None:
        memo.protected = tuple(_make_protected_fields(message, memo))
    return memo.protected


def _make_outer_fields(message: Message, hp: HP | None, memo: _Fields) -> list[tuple[str, str]]:
    message_id = memo.message_id
    fields = [("Date", memo.date_text), ("From", message.sender.header_form())]
    # As the author wrote them (an address listed twice stays so), outside as inside: a
    # reader without RFC 9788 sees the same To and Cc as one that reads the protected part.
    if message.to_field:
        fields.append(("To", ", ".join(a.header_form() for a in message.to_field)))
    elif not message.cc_field:
        fields.append(("To", "undisclosed-recipients:;"))
    if message.cc_field:
        fields.append(("Cc", ", ".join(a.header_form() for a in message.cc_field)))
    if message.reply_to:
        fields.append(("Reply-To", ", ".join(a.header_form() for a in message.reply_to)))
    fields.append(("Subject", "[...]" if hp is HP.CIPHER else message.subject))
    fields.append(("Message-ID", f"<{message_id}>"))
    fields.extend(_extra_fields(message, outside=True, hp=hp))
    return fields


def _make_protected_fields(message: Message, memo: _Fields) -> list[tuple[str, str]]:
    message_id = memo.message_id
    fields = [("From", message.sender.header_form())]
    # As the author wrote them: duplicates are removed from the recipients, not the header.
    if message.to_field:
        fields.append(("To", ", ".join(a.header_form() for a in message.to_field)))
    if message.cc_field:
        fields.append(("Cc", ", ".join(a.header_form() for a in message.cc_field)))
    if message.reply_to:
        fields.append(("Reply-To", ", ".join(a.header_form() for a in message.reply_to)))
    fields.append(("Subject", message.subject))
    fields.append(("Date", memo.date_text))
    fields.append(("Message-ID", f"<{message_id}>"))
    fields.extend(_extra_fields(message, outside=False, hp=None))
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


def stream_payload(
    message: Message,
    *,
    hp: HP | None,
    canonical: bool = True,
    extra_fields: Sequence[tuple[str, str]] = (),
) -> PayloadStream:
    """:func:`build_payload`'s bytes as a :class:`PayloadStream` (same arguments, same checks,
    same bytes), for feeding a large message to a signer or encrypter piece by piece."""
    extra = _prefolded_fields(extra_fields, hp)
    if message.body is not None:
        mime = message.body
        mime_head, mime_body = mime.form(canonical=canonical)
        if hp is None:
            return PayloadStream([mime_head, b"\r\n", mime_body])
        head = [mime.head_with(['protected-headers="v1"', f'hp="{hp.value}"'], canonical=canonical)]
        head.extend(render_header(name, value) for name, value in _protected_fields(message))
        head.extend(extra)
        head.extend(_hp_outer(n, v) for n, v in _outer_fields(message, hp) if _recorded(n))
        return PayloadStream([b"".join(head), b"\r\n", mime_body])
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
    head.extend(extra)
    head.extend(_hp_outer(name, value) for name, value in outer if _recorded(name))
    return PayloadStream([b"".join(head), b"\r\n", *body.body])


def build_payload(
    message: Message,
    *,
    hp: HP | None,
    canonical: bool = True,
    extra_fields: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The MIME entity to sign and/or encrypt, as bytes (header block, CRLF, body): canonical
    (CRLF, 7-bit, RFC 3156 §3) by default.

    ``canonical=False`` is for a payload that is only ever encrypted with OpenPGP (binary
    literal data, RFC 3156 §6.2 / RFC 9580 §5.9): a :attr:`Message.body` is then sent as the
    program wrote it (:meth:`MimeBody.form`), 8-bit and trailing spaces kept. Whatever is
    signed in a multipart/signed (OpenPGP sign-only, every S/MIME signature) stays canonical.
    Messages built from text/html/attachments are canonical either way.

    text/plain, or multipart/alternative (text, html), wrapped in multipart/mixed when there
    are attachments. With ``hp`` the top-level Content-Type carries ``protected-headers="v1"``
    and ``hp="cipher"|"clear"``, and the header block carries the protected From, To, Cc,
    Reply-To, Subject, Date, Message-ID (never Bcc) and one ``HP-Outer`` field per outer
    header (RFC 9788). ``hp`` needs a finalized message (:meth:`Message.finalized`).

    ``extra_fields`` are (name, value) fields for this payload's root header block only,
    after the protected fields (e.g. ``Autocrypt-Gossip``, which Autocrypt Level 1 "Key
    Gossip" puts in the root MIME part *inside* the encryption). Each value is written
    exactly as given, already folded (CRLF + SP or HTAB before each continuation line,
    ASCII, lines within 998 octets); they need ``hp``. MessageError for a field that is not
    well formed.
    """
    return bytes(stream_payload(message, hp=hp, canonical=canonical, extra_fields=extra_fields))


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


def check_wire_safe(data: bytes | Spool) -> None:
    """Refuse data that is unsafe to hand to SMTP (RFC 5322 §2.1.1, CVE-2023-51764 smuggling):
    a bare CR or LF, a NUL, any byte >= 0x80, or a line longer than 998 octets. A spooled copy
    is read and checked a piece at a time (each piece whole lines), never held whole."""
    if isinstance(data, Spool):
        for offset, piece in line_pieces(data):
            _check_wire_piece(piece, offset)
        return
    _check_wire_piece(data, 0)


def _check_wire_piece(data: bytes, base: int) -> None:
    """:func:`check_wire_safe` of ``data``, which starts a line at offset ``base``."""
    if b"\0" in data:
        raise MessageError(f"NUL byte at offset {base + data.index(0)}", field="message")
    if not data.isascii():
        high = _HIGH_BYTE.search(data)
        offset = base + high.start() if high else -1
        raise MessageError(f"8-bit byte at offset {offset}", field="message")
    bare = [m.start() for m in (_CR_NOT_CRLF.search(data), _LF_NOT_CRLF.search(data)) if m]
    if bare:
        raise MessageError(f"bare CR or LF at offset {base + min(bare)}", field="message")
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


# --------------------------------------------------------------------------------------------
# Messages made by other programs: parsing, and their MIME bodies made safe to sign
# --------------------------------------------------------------------------------------------

#: Fields a program's message carries that :class:`Message` holds in its own attributes (or
#: writes itself); :attr:`Message.headers` refuses them.
_STRUCTURAL = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "hp-outer",
    }
)
#: Extra fields that stay readable outside an encrypted message as well as inside it. RFC 9788
#: lets the header confidentiality policy decide per field whether the outer copy keeps it
#: (recorded in HP-Outer), replaces it or leaves it out; its baseline policy obscures only the
#: Subject (§3.3 asks at least that) and keeps the rest. Here the policy is stricter for extra
#: fields, privacy by default: only the fields the mail system itself acts on without
#: decrypting stay outside: threading (In-Reply-To, References: RFC 5322 §3.6.4, so replies
#: thread in clients that cannot decrypt), mailing-list fields (RFC 2369, RFC 2919, RFC 8058)
#: and auto-reply suppression (Auto-Submitted, RFC 3834 §5; Precedence), which autoresponders
#: must see to avoid mail loops. Every other extra field (X-Mailer, X-Cron-Env, ...) is only
#: inside: what the sender's software and environment reveal is the recipients' business.
_OUTSIDE_TOO = re.compile(
    r"in-reply-to|references|list-[a-z0-9-]+|auto-submitted|precedence|archived-at", re.I
)
#: Fields about the transport or the outer message itself, never protected: trace fields
#: (RFC 5322 §3.6.7) and the Autocrypt header (which must be readable to be of any use).
_OUTSIDE_ONLY = frozenset({"received", "autocrypt"})
#: Dropped from a program's message: the final delivery MTA writes Return-Path (RFC 5321
#: §4.4), and MIME-Version is written by e2email (the Bcc field goes into ``bcc``: never sent).
_DROPPED = frozenset({"return-path", "mime-version"})


def _check_extra_headers(value: object) -> tuple[tuple[str, str], ...]:
    if type(value) is tuple and not value:
        return ()  # none, the default
    items: Iterable[object]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise MessageError("expected (name, value) pairs or a mapping", field="headers")
    else:
        items = value
    out: list[tuple[str, str]] = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise MessageError(f"not a (name, value) pair: {item!r}", field="headers")
        name, text = item
        _check_header(name, text)
        # Plain str: the characters checked are the ones written (a subclass's __str__ or
        # __format__ could say something else, e.g. a CRLF and another field).
        name, text = str.__str__(name), str.__str__(text)
        lower = name.lower()
        if lower in _STRUCTURAL or lower.startswith("content-"):
            raise MessageError(
                f"{name} is not an extra header (it is set from the message itself)",
                field="headers",
            )
        if len(text) > 16384:
            raise MessageError(f"{name} is longer than 16384 characters", field="headers")
        try:
            _fold_words(f"{name}:", _ascii_value(text).split(" "))  # foldable at all?
        except MessageError as exc:
            raise MessageError(exc.reason, field="headers") from None
        out.append((name, text))
    return tuple(out)


def _prefolded(value: str) -> bool:
    """A folded header value: printable ASCII and HTAB, each line with something besides
    whitespace (a blank line would end the header block), each line after the first starting
    with folding whitespace (RFC 5322 §2.2.3), and CR or LF only as the CRLF of a fold."""
    lines = value.split("\r\n")
    return all(
        line.strip(" \t") and all(c == "\t" or " " <= c <= "~" for c in line) for line in lines
    ) and all(line[0] in " \t" for line in lines[1:])


def _prefolded_fields(fields: Sequence[tuple[str, str]], hp: HP | None) -> list[bytes]:
    """``extra_fields`` of :func:`build_payload`, checked and rendered byte for byte."""
    if not fields:
        return []
    if hp is None:
        raise ValueError("extra_fields go in a protected payload's header block: pass hp")
    out = []
    for item in fields:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise MessageError(f"not a (name, value) pair: {item!r}", field="extra_fields")
        name, value = item
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise MessageError(f"invalid header field name {name!r}", field="extra_fields")
        lower = name.lower()
        if lower in _STRUCTURAL or lower.startswith("content-"):
            raise MessageError(f"{name} is set from the message itself", field="extra_fields")
        if not isinstance(value, str) or not _prefolded(value):
            raise MessageError(
                f"{name}: the value must be folded ASCII text (CRLF + SP before each "
                "continuation line, no other control characters)",
                field="extra_fields",
            )
        field = f"{name}: {value}"
        if any(len(line) > _HARD_MAX_LINE for line in field.split("\r\n")):
            raise MessageError(
                f"{name} has a line longer than {_HARD_MAX_LINE} characters",
                field="extra_fields",
            )
        out.append(field.encode("ascii") + b"\r\n")
    return out


def _recorded(name: str) -> bool:
    """Is this outer field recorded in HP-Outer (RFC 9788 §2.2)? Not the ones that are never
    protected (trace fields, Autocrypt): there is no protected copy to compare them with."""
    return name.lower() not in _OUTSIDE_ONLY


def _ascii_value(value: str) -> str:
    """An extra field's value as ASCII: non-ASCII text as RFC 2047 encoded-words."""
    if value.isascii():
        return value
    return " ".join(_b64_words(value, _MAX_ENCODED_WORD))


def _extra_fields(message: Message, *, outside: bool, hp: HP | None) -> list[tuple[str, str]]:
    """The extra fields for the outer header (``outside``) or for the protected part."""
    out: list[tuple[str, str]] = []
    for name, value in message.headers:
        lower = name.lower()
        if outside:
            keep = (
                hp is not HP.CIPHER
                or lower in _OUTSIDE_ONLY
                or _OUTSIDE_TOO.fullmatch(name) is not None
            )
        else:
            keep = lower not in _OUTSIDE_ONLY
        if keep:
            out.append((name, _ascii_value(value)))
    return out


_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")
_UNFOLD = re.compile(rb"\r\n(?=[ \t])")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
#: Something in a body that is not safe to sign and send as it is (RFC 3156 §3, RFC 5322
#: §2.1.1): an 8-bit byte or NUL, whitespace at the end of a line (transports strip it), a
#: line starting "From " (mbox mangles it to ">From ").
_UNSAFE_BODY = re.compile(rb"[\x00\x80-\xff]|[ \t](?:\r\n|\Z)|(?:\A|\r\n)From ")


@dataclass(frozen=True)
class HeaderField:
    """One header field as a program wrote it (see :func:`split_message`)."""

    name: str
    #: The whole field, folded as received, ending in CRLF.
    raw: bytes

    @property
    def lower(self) -> str:
        return self.name.lower()

    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (RFC 6532)."""
        text = _UNFOLD.sub(b"", self.raw[self.raw.index(b":") + 1 : -2]).strip(b" \t")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(
                "the value is neither ASCII nor UTF-8 (encode it as RFC 2047 says)",
                field=self.lower,
            ) from None

    def addresses(self) -> list[tuple[str, str]]:
        """(display name, addr-spec) of an address field: groups flattened, RFC 2047 names
        decoded, comments dropped; an addr-spec without a domain (``root``) is returned as
        it is for the caller to judge. MessageError when unreadable."""
        value = self.value()
        parsed = email.policy.default.header_factory(self.name, value)
        problems = [str(d) for d in parsed.defects if "local part with no domain" not in str(d)]
        if problems:
            raise MessageError(f"cannot read {value[:80]!r} ({problems[0]})", field=self.lower)
        return [(a.display_name, a.addr_spec) for a in parsed.addresses]


def _split_fields(head: bytes, where: str) -> list[HeaderField]:
    """The fields of a header block (CRLF lines, each ending in CRLF), as written."""
    fields: list[tuple[str, list[bytes]]] = []
    if not head:
        return []
    for number, line in enumerate(head[:-2].split(b"\r\n"), 1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise MessageError(f"{where} starts with a continuation line")
            fields[-1][1].append(line)
            continue
        match = _FIELD_START.match(line)
        if match is None:
            shown = line[:40].decode("ascii", "replace")
            raise MessageError(
                f"{where}: line {number} is not a header field ({shown!r}); a blank line must "
                "separate the header from the body"
            )
        fields.append((match.group(1).decode("ascii"), [line]))
    return [HeaderField(name, b"\r\n".join(lines) + b"\r\n") for name, lines in fields]


def _split_entity(data: bytes) -> tuple[bytes, bytes] | None:
    """(header block ending in CRLF, body) of a CRLF entity, or None without a blank line."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    return data[: end + 2], data[end + 4 :]


def _content_type(fields: Sequence[HeaderField], default: str) -> tuple[str, email.message.Message]:
    """The lower-case type/subtype (RFC 2045 §5.2 default when absent or invalid) and a
    stdlib message holding only the Content-Type, to read its parameters with."""
    holder = email.message.Message()
    holder.set_default_type(default)
    for item in fields:
        if item.lower == "content-type":
            holder["Content-Type"] = item.value()
    return holder.get_content_type(), holder


def _field_value(fields: Sequence[HeaderField], name: str) -> str | None:
    found = [f for f in fields if f.lower == name]
    return found[-1].value() if found else None


def _ascii_field(item: HeaderField, where: str) -> bytes:
    """A MIME field of a part, as ASCII: raw UTF-8 (RFC 6532) parameters as RFC 2231, other
    raw UTF-8 text as RFC 2047 encoded-words. Lines over 998 octets are refused."""
    # Trailing whitespace on a header line is insignificant (RFC 5322 §3.2.2) but transports
    # strip it, which would break a signature over this part: drop it here.
    lines = [ln.rstrip(b" \t") for ln in item.raw[:-2].split(b"\r\n")]
    raw = b"\r\n".join(ln for ln in lines if ln) + b"\r\n"
    if raw.isascii():
        if _has_long_line(raw):
            raise MessageError(f"{where}: the {item.name} field has a line over 998 octets")
        return raw
    value = item.value()
    if item.lower in ("content-type", "content-disposition"):
        holder = email.message.Message()
        holder[item.name] = value
        params = holder.get_params(header=item.name) or []
        if not params:
            raise MessageError(f"{where}: cannot read the {item.name} field")
        main = params[0][0]
        rendered: list[str] = []
        for key, val in params[1:]:
            text = email.utils.collapse_rfc2231_value(val)
            if text.isascii() and len(text) < _MAX_PARAM - len(key) - 3:
                rendered.append(f"{key}={_quote(text)}")
            else:
                rendered.extend(_rfc2231(key, text))
        return _param_header(item.name, main, rendered)
    return ("\r\n".join(_fold_encoded(f"{item.name}:", value)) + "\r\n").encode("ascii")


def _has_long_line(data: bytes) -> bool:
    """Is a line of ``data`` (CRLF line ends) longer than 998 octets? Jumps from line start
    to the last LF within reach, as :func:`check_wire_safe` does: about one step per KiB."""
    start, size = 0, len(data)
    while size - start > _HARD_MAX_LINE + 2:
        newline = data.rfind(b"\n", start, start + _HARD_MAX_LINE + 2)
        if newline < 0:
            return True
        start = newline + 1
    end = data.find(b"\n", start)
    return (size if end < 0 else end - 1) - start > _HARD_MAX_LINE


def _wire_lines_ok(data: bytes) -> bool:
    return data.isascii() and b"\0" not in data and not _has_long_line(data)


def _qp_body(content: bytes) -> bytes:
    """``content`` (lines joined by CRLF) as quoted-printable from our encoder."""
    return "\r\n".join(line for raw in content.split(b"\r\n") for line in _qp_line(raw)).encode(
        "ascii"
    )


def _b64_body(content: bytes) -> bytes:
    return b"".join(_Base64Lines(content)) + b"\r\n"


def _set_encoding(fields: list[bytes], names: list[str], encoding: str) -> None:
    line = render_header("Content-Transfer-Encoding", encoding)
    for i, name in enumerate(names):
        if name == "content-transfer-encoding":
            fields[i] = line
            return
    fields.append(line)
    names.append("content-transfer-encoding")


def _canon_entity(head: bytes, body: bytes, *, default: str, where: str, depth: int) -> bytes:
    """One MIME entity (header block and body, CRLF) made canonical for signing without
    changing what any part decodes to: the entity's bytes (header block, CRLF, body)."""
    if depth > 50:
        raise MessageError(f"{where}: MIME parts nested more than 50 deep")
    fields = _split_fields(head, where)
    for name in ("content-type", "content-transfer-encoding"):
        if sum(f.lower == name for f in fields) > 1:
            # Readers disagree on which one counts: what one shows another would not.
            raise MessageError(f"{where}: {name} appears more than once")
    ctype, holder = _content_type(fields, default)
    encoding = (_field_value(fields, "content-transfer-encoding") or "7bit").lower()
    out = [_ascii_field(f, where) for f in fields]
    names = [f.lower for f in fields]
    major = ctype.partition("/")[0]

    if ctype in ("multipart/signed", "multipart/encrypted"):
        # Signed or encrypted by the calling program: these bytes are what its signature
        # covers (RFC 1847 §2.1); they are sent exactly as they are, never re-encoded.
        if not _wire_lines_ok(body):
            raise MessageError(
                f"{where}: the {ctype} part has 8-bit data or over-long lines; it cannot be "
                "made safe without breaking its signature"
            )
        return b"".join([*out, b"\r\n", body])
    if major == "multipart":
        if encoding not in ("7bit", "8bit", "binary"):
            raise MessageError(
                f"{where}: a multipart part cannot have a {encoding} encoding (RFC 2045 §6.4)"
            )
        boundary = holder.get_boundary()
        if not boundary:
            raise MessageError(f"{where}: {ctype} without a boundary parameter")
        if not boundary.isascii() or len(boundary) > 70:
            raise MessageError(f"{where}: invalid boundary {boundary[:80]!r} (RFC 2046 §5.1.1)")
        inner = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        new_body = _canon_multipart(body, boundary, default=inner, where=where, depth=depth)
        if encoding != "7bit":
            _set_encoding(out, names, "7bit")
        return b"".join([*out, b"\r\n", new_body])
    if ctype == "message/rfc822" and encoding in ("7bit", "8bit", "binary"):
        # An attached message (RFC 2046 §5.2.1: never encoded itself): canonicalise inside it.
        split = _split_entity(body)
        if split is None:
            split = (body + b"\r\n" if body and not body.endswith(b"\r\n") else body), b""
        inner_head, inner_body = split
        try:
            new_body = _canon_entity(
                inner_head,
                inner_body,
                default="text/plain",
                where=f"{where} (attached message)",
                depth=depth + 1,
            )
        except MessageError:
            # Not a readable message: kept as it is when that is safe to sign and send.
            if _wire_lines_ok(body) and not _UNSAFE_BODY.search(body):
                return b"".join([*out, b"\r\n", body])
            raise
        if encoding != "7bit":
            _set_encoding(out, names, "7bit")
        return b"".join([*out, b"\r\n", new_body])
    return _canon_leaf(out, names, body, major=major, encoding=encoding, where=where)


def _canon_leaf(
    out: list[bytes], names: list[str], body: bytes, *, major: str, encoding: str, where: str
) -> bytes:
    """A leaf part: kept byte for byte when it is 7-bit and safe; otherwise re-encoded (text
    as quoted-printable from our encoder, anything else base64), decoding to the same."""
    safe = _wire_lines_ok(body) and not _UNSAFE_BODY.search(body)
    if safe:
        return b"".join([*out, b"\r\n", body])
    if encoding in ("7bit", "8bit", "binary"):
        content = body
    elif encoding == "quoted-printable":
        content = binascii.a2b_qp(body)
    elif encoding == "base64":
        try:
            content = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body))
        except binascii.Error as exc:
            raise MessageError(f"{where}: invalid base64 ({exc})") from None
    else:
        raise MessageError(
            f"{where}: {encoding} content with 8-bit data or over-long lines cannot be made safe"
        )
    if major == "text" or (encoding == "quoted-printable" and major not in ("message",)):
        new_body, new_encoding = _qp_body(content), "quoted-printable"
    else:
        new_body, new_encoding = _b64_body(content), "base64"
    _set_encoding(out, names, new_encoding)
    return b"".join([*out, b"\r\n", new_body])


def _canon_multipart(body: bytes, boundary: str, *, default: str, where: str, depth: int) -> bytes:
    """A multipart body with each part canonicalised; boundaries, preamble and epilogue kept
    (preamble and epilogue are dropped when unsafe: readers ignore them, RFC 2046 §5.1.1)."""
    delimiter = re.compile(
        rb"(?:\A|\r\n)--"
        + re.escape(boundary.encode("ascii", "replace"))
        + rb"(--)?[ \t]*(?=\r\n|\Z)"
    )
    matches = list(delimiter.finditer(body))
    if not matches:
        raise MessageError(f"{where}: no part starts with the boundary {boundary!r}")
    dash = b"--" + boundary.encode("ascii")
    pieces: list[bytes] = []
    preamble = body[: matches[0].start()]
    # A delimiter after CRLF has a preamble before it, if only an empty line.
    has_preamble = matches[0].group().startswith(b"\r\n")
    if has_preamble and _wire_lines_ok(preamble) and not _UNSAFE_BODY.search(preamble):
        pieces += [preamble, b"\r\n"]
    closed = False
    for number, (match, after) in enumerate(zip(matches, [*matches[1:], None], strict=True), 1):
        if match.group(1):
            closed = True
            epilogue = body[match.end() :]
            pieces.append(dash + b"--")
            if _wire_lines_ok(epilogue) and not _UNSAFE_BODY.search(epilogue):
                pieces.append(epilogue)  # starts with CRLF (the delimiter line's end) or empty
            elif epilogue.startswith(b"\r\n"):
                pieces.append(b"\r\n")
            break
        part = body[match.end() : after.start() if after is not None else len(body)]
        if part.startswith(b"\r\n"):
            part = part[2:]
        name = f"{where}, part {number}"
        split = _split_entity(part)
        if split is None:
            try:
                _split_fields(part + b"\r\n", name)
                split = part + b"\r\n", b""
            except MessageError:
                split = b"", part
        pieces += [dash, b"\r\n"]
        pieces.append(
            _canon_entity(split[0], split[1], default=default, where=name, depth=depth + 1)
        )
        pieces.append(b"\r\n")
    if not closed:
        pieces += [dash, b"--\r\n"]
    return b"".join(pieces)


def _normalise_line_ends(raw: bytes) -> bytes:
    """CRLF for every line end: programs pipe LF (or mixed) text to sendmail."""
    if raw.count(b"\r\n") == raw.count(b"\n") == raw.count(b"\r"):
        return raw
    return _LINE_ENDS.sub(b"\r\n", raw)


@dataclass(frozen=True)
class MimeBody:
    """A MIME entity made elsewhere (its Content-* fields and body), used as a message's
    payload as it is: not rebuilt, only made canonical for signing (:meth:`parse`)."""

    #: The entity's header block: Content-* fields only, each line ending in CRLF, no blank line.
    head: bytes
    #: The body, canonical: CRLF, 7-bit, lines of at most 998 octets.
    body: bytes = field(repr=False)
    #: The entity as the program wrote it (its header block and body, line ends made CRLF
    #: and nothing else), when that differs from the canonical :attr:`head` and :attr:`body`;
    #: None when they are the same. RFC 3156 §3's 7-bit rules are for what gets signed in a
    #: multipart/signed: an entity that is encrypted with OpenPGP (encrypt-only or combined
    #: sign+encrypt, §6.2) travels as binary literal data and is sent in this form, so that
    #: it decrypts to the program's bytes (a patch byte for byte: no ``=C3=A9``, no ``=20``).
    original: tuple[bytes, bytes] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.head, bytes) or not isinstance(self.body, bytes):
            raise MessageError("head and body must be bytes", field="body")
        fields = (
            _split_fields(self.head, "MIME body header") if self.head.endswith(b"\r\n") else None
        )
        if fields is None:
            raise MessageError("the header block must end in CRLF", field="body")
        for item in fields:
            if not item.lower.startswith("content-"):
                raise MessageError(
                    f"{item.name} does not belong in a MIME body's header", field="body"
                )
        if not any(item.lower == "content-type" for item in fields):
            raise MessageError("the MIME body has no Content-Type", field="body")
        for what, data in (("header", self.head), ("body", self.body)):
            try:
                check_wire_safe(data)
            except MessageError as exc:
                raise MessageError(
                    f"the {what} is not canonical ({exc.reason}); use MimeBody.parse",
                    field="body",
                ) from None
        if self.original is not None:
            self._check_original(self.original)

    @staticmethod
    def _check_original(original: tuple[bytes, bytes]) -> None:
        """The program's form may be 8-bit with long lines (it only ever travels encrypted),
        but its line ends must be CRLF and its header block Content-* fields with a
        Content-Type, as for the canonical form."""
        if (
            not isinstance(original, tuple)
            or len(original) != 2
            or not all(isinstance(part, bytes) for part in original)
        ):
            raise MessageError("original must be a (head, body) pair of bytes", field="body")
        head = original[0]
        for data in original:
            if _BARE_CR.search(data) or data.count(b"\n") != data.count(b"\r\n"):
                raise MessageError("the original entity has a bare CR or LF", field="body")
        fields = _split_fields(head, "MIME body header") if head.endswith(b"\r\n") else None
        if fields is None or not any(item.lower == "content-type" for item in fields):
            raise MessageError("the original header block has no Content-Type", field="body")
        for item in fields:
            if not item.lower.startswith("content-"):
                raise MessageError(
                    f"{item.name} does not belong in a MIME body's header", field="body"
                )

    def form(self, *, canonical: bool = True) -> tuple[bytes, bytes]:
        """The header block and body to send: canonical (for signing, RFC 3156 §3 / RFC 8551
        §3.1.1) or, with ``canonical=False``, as the program wrote them (only for a payload
        that is encrypted with OpenPGP, where it is binary literal data)."""
        if canonical or self.original is None:
            return self.head, self.body
        return self.original

    @classmethod
    def parse(cls, entity: bytes) -> MimeBody:
        """A MIME entity (Content-* header block, blank line, body; CRLF or LF) made canonical
        for RFC 3156 / RFC 8551 signing without changing what any part decodes to: CRLF line
        ends; 8-bit, NUL, over-long lines, trailing whitespace and ``From `` lines in a leaf
        re-encoded (text as quoted-printable, anything else base64); safe leaves kept byte
        for byte; boundaries kept; a signed or encrypted subtree kept exactly.

        Every CR, LF or CRLF is a line end, as SMTP and RFC 2045 §2.7-2.8 have it (a program
        piping LF text means CRLF): so a bare CR or LF inside 8bit or binary data becomes
        CRLF too. Binary data that must keep them is sent base64-encoded by the programs
        that make it (and is then kept as it is)."""
        if not isinstance(entity, bytes | bytearray | memoryview):
            raise MessageError("a MIME entity must be bytes", field="body")
        data = _normalise_line_ends(bytes(entity))
        split = _split_entity(data)
        if split is None:
            raise MessageError("no blank line after the MIME header", field="body")
        return cls._from_parts(*split)

    @classmethod
    def _from_parts(cls, head: bytes, body: bytes) -> MimeBody:
        fields = _split_fields(head, "MIME header")
        if not any(f.lower == "content-type" for f in fields):
            # RFC 2045 §5.2's default, written out (the payload needs its own Content-Type).
            charset = "us-ascii" if body.isascii() else "utf-8"
            if charset == "utf-8":
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError:
                    charset = "unknown-8bit"  # RFC 1428
            head = render_header("Content-Type", f"text/plain; charset={charset}") + head
        entity = _canon_entity(head, body, default="text/plain", where="body", depth=0)
        new_head, new_body = _split_entity(entity) or (entity, b"")
        original = None if (head, body) == (new_head, new_body) else (head, body)
        return cls(new_head, new_body, original)

    @property
    def content_type(self) -> str:
        """The top-level type/subtype, lower case."""
        return _content_type(_split_fields(self.head, "MIME header"), "text/plain")[0]

    def head_with(self, params: Sequence[str], *, canonical: bool = True) -> bytes:
        """The header block with ``params`` added to its Content-Type (e.g. RFC 9788's)."""
        out: list[bytes] = []
        for item in _split_fields(self.form(canonical=canonical)[0], "MIME header"):
            if item.lower == "content-type":
                lines = [item.raw[:-2].rstrip(b"; \t")]
                for param in params:
                    lines.append(b" " + param.encode("ascii"))
                out.append(b";\r\n".join(lines) + b"\r\n")
            else:
                out.append(item.raw)
        return b"".join(out)


ProtectionKind = Literal["pgp-encrypted", "pgp-signed", "smime-encrypted", "smime-signed"]


def existing_protection(raw: bytes) -> ProtectionKind | None:
    """Is this message already PGP/MIME (RFC 3156) or S/MIME (RFC 8551) encrypted or signed?
    Read from its top-level Content-Type only; None when it is neither (or unreadable)."""
    data = _normalise_line_ends(_strip_mbox_line(bytes(raw)))
    split = _split_entity(data)
    head = split[0] if split is not None else data
    try:
        fields = _split_fields(head, "header")
        ctype, holder = _content_type(fields, "text/plain")
    except MessageError:
        return None
    protocol = ""
    if ctype.startswith("multipart/"):
        param = holder.get_param("protocol")
        protocol = param.lower() if isinstance(param, str) else ""
    if ctype == "multipart/encrypted" and protocol == "application/pgp-encrypted":
        return "pgp-encrypted"
    if ctype == "multipart/signed":
        if protocol == "application/pgp-signature":
            return "pgp-signed"
        if protocol in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
            return "smime-signed"
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        smime_type = str(holder.get_param("smime-type") or "").lower()
        if smime_type == "signed-data":
            return "smime-signed"
        if smime_type in ("enveloped-data", "authenveloped-data", ""):
            return "smime-encrypted"
    return None


def _strip_mbox_line(raw: bytes) -> bytes:
    """A leading mbox ``From sender date`` line (as some programs write) is not a header."""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        return b"" if end < 0 else raw[end + 1 :]
    return raw


def split_message(raw: bytes) -> tuple[list[HeaderField], bytes]:
    """A program's RFC 5322 message as its header fields (as written) and its body, with CRLF
    line ends (it may use LF or mixed; a leading mbox ``From `` line is dropped). A message
    of header fields only has an empty body. MessageError for what is not a message: empty,
    no header, a line in the header that is not a field, a NUL in the header."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MessageError("the message must be bytes", field="message")
    data = _strip_mbox_line(bytes(raw))
    end = re.search(rb"\r?\n\r?\n", data)
    bare = _BARE_CR.search(data, 0, end.start() if end else len(data))
    if bare is not None:
        # A CR not followed by LF would start a new header line for some readers and not
        # for others (header injection, RFC 5322 §2.2): refused rather than guessed.
        raise MessageError(f"a CR without LF in the header (offset {bare.start()})")
    data = _normalise_line_ends(data)
    if not data.strip():
        raise MessageError("the message is empty", field="message")
    split = _split_entity(data)
    if split is None:
        # Only a header (no body at all) is a message too.
        split = (data if data.endswith(b"\r\n") else data + b"\r\n"), b""
    head, body = split
    if not head:
        raise MessageError("the message has no header (it starts with a blank line)")
    fields = _split_fields(head, "header")
    for item in fields:
        if b"\0" in item.raw:
            raise MessageError("NUL byte in the header", field=item.lower)
    return fields, body


def _message_from_bytes(
    raw: bytes, sender: AddressInput | None, envelope: Iterable[AddressInput] | None
) -> Message:
    fields, body = split_message(raw)

    def single(name: str) -> HeaderField | None:
        found = [f for f in fields if f.lower == name]
        if len(found) > 1:
            raise MessageError("appears more than once (RFC 5322 §3.6)", field=name)
        return found[0] if found else None

    lists: dict[str, list[Address]] = {}
    written: dict[str, list[Address]] = {}
    seen: set[str] = set()
    for name in ("to", "cc", "bcc", "reply-to"):
        found: list[Address] = []
        as_written = written.setdefault(name, [])
        for item in (f for f in fields if f.lower == name):
            for display, addr in item.addresses():
                if "@" not in addr:
                    raise MessageError(
                        f"{addr!r} is not a full address (it needs @domain)", field=name
                    )
                try:
                    address = Address(addr, display)
                except MessageError as exc:
                    raise MessageError(exc.reason, field=name) from None
                key = address.addr_spec.lower()
                as_written.append(address)
                if name != "reply-to":
                    # The same address twice (To and Cc, as replies-to-all make) is one
                    # recipient; a Bcc listed in To or Cc is not hidden anyway.
                    if key in seen:
                        continue
                    seen.add(key)
                found.append(address)
        lists[name] = found

    from_field = single("from")
    author: AddressInput | None = None
    if from_field is not None:
        mailboxes = from_field.addresses()
        if len(mailboxes) != 1:
            raise MessageError(f"expected one address, found {len(mailboxes)}", field="from")
        display, addr = mailboxes[0]
        if "@" in addr:
            try:
                author = Address(addr, display)
            except MessageError as exc:
                raise MessageError(exc.reason, field="from") from None
        elif sender is None:
            raise MessageError(
                f"{addr!r} is not a full address and no envelope sender was given",
                field="from",
            )
    if author is None:
        if sender is None:
            raise MessageError("no From header and no envelope sender", field="from")
        author = _coerce_address(sender, "sender")

    subject_field = single("subject")
    subject = ""
    if subject_field is not None:
        subject = str(email.policy.default.header_factory("Subject", subject_field.value()))
        subject = re.sub(r"[\r\n]+", " ", subject)
    date: datetime.datetime | None = None
    date_field = single("date")
    if date_field is not None:
        try:
            date = email.utils.parsedate_to_datetime(date_field.value())
        except (TypeError, ValueError, IndexError):
            raise MessageError(
                f"cannot read the date {date_field.value()[:60]!r}", field="date"
            ) from None
        if date.tzinfo is None:  # "-0000": UTC, time zone unknown (RFC 5322 §3.3)
            date = date.replace(tzinfo=datetime.UTC)
    message_id: str | None = None
    id_field = single("message-id")
    if id_field is not None:
        message_id = id_field.value().strip()
        if message_id.startswith("<") and message_id.endswith(">"):
            message_id = message_id[1:-1].strip()

    extra: list[tuple[str, str]] = []
    content: list[bytes] = []
    for item in fields:
        lower = item.lower
        if lower.startswith("content-"):
            content.append(item.raw)
        elif lower in _STRUCTURAL or lower in _DROPPED:
            continue
        else:
            extra.append((item.name, item.value()))
    if envelope is not None:
        given = _coerce_addresses(envelope, "recipients")
        wanted = {a.addr_spec.lower() for a in given}
        shown = {a.addr_spec.lower() for a in (*lists["to"], *lists["cc"])}
        lists["bcc"] = [a for a in lists["bcc"] if a.addr_spec.lower() in wanted]
        hidden = {a.addr_spec.lower() for a in lists["bcc"]}
        for address in given:
            key = address.addr_spec.lower()
            if key not in shown and key not in hidden:
                lists["bcc"].append(address)
                hidden.add(key)
    mime = MimeBody._from_parts(b"".join(content), body)
    # Duplicates are removed from the recipients only; the To and Cc fields are shown as the
    # author wrote them (those written list only addresses that are in to or cc).
    shown_to = shown_cc = None
    if (written["to"], written["cc"]) != (lists["to"], lists["cc"]):
        shown_to, shown_cc = written["to"], written["cc"]
    return Message(
        sender=author,
        to=lists["to"],
        cc=lists["cc"],
        bcc=lists["bcc"],
        reply_to=lists["reply-to"],
        subject=subject,
        date=date,
        message_id=message_id,
        headers=extra,
        body=mime,
        shown_to=shown_to,
        shown_cc=shown_cc,
    )
