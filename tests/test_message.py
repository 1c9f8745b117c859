"""Tests for e2email.message: MIME building, canonical form, header safety, wire gate."""

from __future__ import annotations

import base64
import binascii
import datetime
import email
import email.header
import email.message
import email.policy
import itertools
import random
import re
import time
from pathlib import Path

import pytest

from e2email import message as message_module
from e2email.errors import MessageError
from e2email.message import (
    HP,
    Address,
    Attachment,
    Message,
    build_message,
    build_payload,
    check_wire_safe,
    message_head,
    new_boundary,
    render_header,
    stream_payload,
)

UTC = datetime.UTC
DATE = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))

# Text bodies that break naive canonicalisation.
NASTY_TEXTS = [
    pytest.param("", id="empty"),
    pytest.param("Hello, world.", id="plain"),
    pytest.param("From me to you\nFrom here\n>From quoted", id="from-lines"),
    pytest.param(".\n..\n.leading dot\n. \nend", id="leading-dots"),
    pytest.param("trailing space \ntrailing tab\t\n \n\t\n  \t ", id="trailing-ws"),
    pytest.param("x" * 1000, id="1000-char-line"),
    pytest.param(("word " * 250).strip(), id="1250-char-line-with-spaces"),
    pytest.param("é" * 500 + "\n" + "日本語のテキスト" * 40, id="non-ascii-long"),
    pytest.param("lone\rcarriage return\r", id="lone-cr"),
    pytest.param("lone\nline feed\n", id="lone-lf"),
    pytest.param("mixed\r\nnew\rlines\nhere\r\n\r\rend", id="mixed-newlines"),
    pytest.param("\n\n\n", id="only-newlines"),
    pytest.param("x" * 75 + "From here on", id="from-after-soft-break"),
    pytest.param("x" * 75 + ".dot after soft break", id="dot-after-soft-break"),
    pytest.param("y" * 74 + "=3D" + "From x", id="escape-at-break"),
    pytest.param("a=b==c =?utf-8?q?not_a_word?= =", id="equals-signs"),
    pytest.param("bell\x07 esc\x1b[31m del\x7f vt\x0b ff\x0c", id="controls"),
    pytest.param("\tleading tab\n--=_e2email_fake boundary\n-- \n", id="tabs-and-dashes"),
    pytest.param("a\u2028b\x85c\u2029d", id="unicode-separators"),
    pytest.param("x" * 74 + "€👍🏽" * 30, id="multibyte-at-break"),
    pytest.param("x" * 76, id="76-chars-7bit"),
    pytest.param("x" * 77, id="77-chars"),
    pytest.param("From", id="bare-From-word"),
    pytest.param("From ", id="From-space-only"),
]


def normalised(text: str) -> str:
    """The text as the receiver sees it: every newline form turned into CRLF."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def make(**kwargs: object) -> Message:
    """A finalized message with a sensible default sender, recipient, date and id."""
    fields: dict[str, object] = {
        "sender": "Alice Example <alice@example.org>",
        "to": ["bob@example.net"],
        "date": DATE,
        "message_id": "0123abcd@example.org",
    }
    fields.update(kwargs)
    return Message(**fields)  # type: ignore[arg-type]


def fake_signed(payload: bytes) -> bytes:
    """Stand-in for the crypto layer: a multipart/signed wrapper around ``payload``."""
    return (
        b'Content-Type: multipart/signed; boundary="sig";\r\n'
        b' protocol="application/pgp-signature"; micalg=pgp-sha256\r\n\r\n'
        b"--sig\r\n" + payload + b"\r\n--sig\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nSIGNATURE\r\n--sig--\r\n"
    )


def full(msg: Message, hp: HP | None = None) -> bytes:
    """build_message around build_payload: unwrapped without hp (the unprotected send),
    inside a fake multipart/signed wrapper with hp."""
    payload = build_payload(msg, hp=hp)
    if hp is not None:
        payload = fake_signed(payload)
    return build_message(msg, payload=payload, hp=hp)


def lines_of(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n") or not data.endswith(b"\n")
    return data.split(b"\r\n")


def assert_wire_invariants(data: bytes, *, max_line: int = 78) -> None:
    """Everything we emit: CRLF only, 7-bit, no NUL, short lines, no trailing whitespace,
    no line starting with "From " or "." (checked on the raw bytes, all parts at once)."""
    assert b"\0" not in data
    assert data.isascii()
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    for line in lines_of(data):
        assert len(line) <= max_line, line
        assert not line.endswith((b" ", b"\t")), line
        assert not line.startswith(b"From "), line
        assert not line.startswith(b"."), line
    check_wire_safe(data)


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header_names(block: bytes) -> list[str]:
    return [
        line.split(b":", 1)[0].decode()
        for line in block.split(b"\r\n")
        if line and not line.startswith((b" ", b"\t"))
    ]


def qp_parts(data: bytes) -> list[bytes]:
    """The raw bodies of every quoted-printable part in ``data``."""
    out = []
    for chunk in re.split(rb"\r\n--=_e2email_[0-9a-f]{32}(?:--)?\r\n", data):
        head, _, body = chunk.partition(b"\r\n\r\n")
        if b"Content-Transfer-Encoding: quoted-printable" in head:
            out.append(body)
    return out


# --------------------------------------------------------------------------------------------
# Module surface
# --------------------------------------------------------------------------------------------


def test_all_lists_exactly_the_public_api() -> None:
    """__all__ names exactly the public API the other modules build on."""
    assert sorted(message_module.__all__) == sorted(
        [
            "Address",
            "Attachment",
            "HP",
            "HeaderField",
            "Message",
            "MimeBody",
            "PayloadStream",
            "build_message",
            "build_payload",
            "check_wire_safe",
            "existing_protection",
            "split_message",
            "message_head",
            "new_boundary",
            "render_header",
            "stream_payload",
        ]
    )


def test_new_boundary_format_and_uniqueness() -> None:
    """Boundaries start with "=_" (impossible in QP/base64 output) and are random."""
    seen = {new_boundary() for _ in range(100)}
    assert len(seen) == 100
    for boundary in seen:
        assert re.fullmatch(r"=_e2email_[0-9a-f]{32}", boundary)


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "addr_spec", "name"),
    [
        ("alice@example.org", "alice@example.org", ""),
        ("  alice@example.org  ", "alice@example.org", ""),
        ("<alice@example.org>", "alice@example.org", ""),
        ("Alice Example <alice@example.org>", "alice@example.org", "Alice Example"),
        ('"Example, Alice" <alice@example.org>', "alice@example.org", "Example, Alice"),
        ('"Al \\"The Boss\\" Ice" <a@example.org>', "a@example.org", 'Al "The Boss" Ice'),
        ("Zoé Ébène <zoe@example.org>", "zoe@example.org", "Zoé Ébène"),
        ("山田太郎 <taro@example.jp>", "taro@example.jp", "山田太郎"),
        ("John Q. Public <jqp@example.org>", "jqp@example.org", "John Q. Public"),
        ("Alice@EXAMPLE.Org", "Alice@example.org", ""),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org", ""),
        ("user@bücher.example", "user@xn--bcher-kva.example", ""),
        ("user@straße.de", "user@xn--strae-oqa.de", ""),
        ("root@localhost", "root@localhost", ""),
    ],
)
def test_address_parse_accepts(text: str, addr_spec: str, name: str) -> None:
    """Address.parse reads the usual single-mailbox forms; the domain is lower-cased and
    IDNA 2008 encoded (ß stays ß, not "ss"), the local part keeps its case."""
    address = Address.parse(text)
    assert address.addr_spec == addr_spec
    assert address.display_name == name
    assert address.domain == addr_spec.rpartition("@")[2]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("<>", "empty"),
        ("alice@example.org, bob@example.org", "more than one"),
        ("<a@example.org> <b@example.org>", "more than one"),
        ("friends: alice@example.org;", "group"),
        ("undisclosed-recipients:;", "group"),
        ("alice.example.org", "missing '@'"),
        ("alice @example.org", "spaces"),
        ("alice@exa mple.org", "spaces"),
        ("alice@", "no domain"),
        ("@example.org", "nothing before"),
        ("alice@-bad.example", "invalid domain"),
        ("alice@bad-.example", "invalid domain"),
        ("alice@example..org", "invalid domain"),
        ("alice@example.org.", "invalid domain"),
        ("alice@exa_mple.org", "invalid domain"),
        ("alice@1.2.3.4", "IP address"),
        ("alice@[192.0.2.1]", "domain literal"),
        ("jörg@example.org", "SMTPUTF8"),
        ('"quoted"@example.org', "quoted local"),
        ("a..b@example.org", "invalid local part"),
        (".a@example.org", "invalid local part"),
        ("<alice@example.org", "without '>'"),
        ("alice@example.org>", "without '<'"),
        ("Alice <alice@example.org> extra", "after '>'"),
        ("alice@example.org (Alice)", "comments"),
        ("bob@evil.example <alice@example.org>", "double quotes"),
        ("a" * 65 + "@example.org", "64"),
        ("a@" + ".".join(["b" * 63] * 4) + ".org", "invalid domain"),
        ("a" * 60 + "@" + ".".join(["b" * 40] * 5) + ".org", "254"),
        ("alice@example.org\r\nBcc: eve@example.org", "CR"),
        ("alice@example.org\nBcc: eve@example.org", "LF"),
        ("alice@example.org\r", "CR"),
        ("alice\0@example.org", "NUL"),
        ("Alice\x1b <alice@example.org>", "U+001B"),
        ("Alice\ud800 <alice@example.org>", "surrogate"),
    ],
)
def test_address_parse_refuses(text: str, reason: str) -> None:
    """Invalid, ambiguous or injecting address text is refused with a MessageError that says
    why, and leaves the field for the caller to fill in."""
    with pytest.raises(MessageError) as info:
        Address.parse(text)
    assert reason in str(info.value)
    assert info.value.field is None


@pytest.mark.parametrize(
    "name",
    ["Alice\r\nBcc: eve@example.org", "Alice\nX: y", "Alice\rX", "Al\0ice", "Al\tice", "A\x85B"],
)
def test_display_name_injection_refused_on_construction(name: str) -> None:
    """A display name with CR, LF, NUL or other controls is refused even when the Address is
    constructed directly, so header injection cannot bypass parse()."""
    with pytest.raises(MessageError):
        Address("alice@example.org", name)


def test_address_constructor_validates_addr_spec() -> None:
    """Direct construction normalises the domain and rejects bad addr-specs too."""
    assert Address("bob@EXAMPLE.net").addr_spec == "bob@example.net"
    with pytest.raises(MessageError):
        Address("bob@example.net\r\nBcc: eve@example.org")
    with pytest.raises(MessageError):
        Address("not an address")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (Address("alice@example.org"), "alice@example.org"),
        (Address("alice@example.org", "Alice Example"), "Alice Example <alice@example.org>"),
        (
            Address("alice@example.org", "Example, Alice"),
            '"Example, Alice" <alice@example.org>',
        ),
        (
            Address("alice@example.org", 'Al "Boss" \\ Ice'),
            '"Al \\"Boss\\" \\\\ Ice" <alice@example.org>',
        ),
        (Address("alice@example.org", "A. Lice"), '"A. Lice" <alice@example.org>'),
        (Address("alice@example.org", "(x) <y> [z] : ; @"), None),
        (Address("zoe@example.org", "Zoé"), "=?utf-8?b?Wm/DqQ==?= <zoe@example.org>"),
        (
            Address("zoe@example.org", "Zoé Example"),
            "=?utf-8?b?Wm/DqQ==?= Example <zoe@example.org>",
        ),
    ],
)
def test_header_form(address: Address, expected: str | None) -> None:
    """header_form is ASCII, quotes names with specials using backslash escapes, encodes
    non-ASCII names as RFC 2047 words, and parses back to the same mailbox."""
    form = address.header_form()
    assert form.isascii()
    if expected is not None:
        assert form == expected
    parsed = parse(render_header("To", form) + b"\r\n")["to"].addresses
    assert len(parsed) == 1
    assert parsed[0].addr_spec == address.addr_spec
    assert parsed[0].display_name == address.display_name


@pytest.mark.parametrize(
    "name",
    [
        "Ñandú Ñoño",
        "Ünïcödé Ñame Ñame Ñame Ñame Ñame",
        "=?utf-8?b?Zm9v?=",
        "x" * 120,
        "Very Long Display Name With Many Words " * 3,
    ],
)
def test_header_form_round_trips_awkward_names(name: str) -> None:
    """Long, encoded-word-looking and non-ASCII names fold to lines of at most 78 octets and
    decode exactly under RFC 2047 (whitespace between adjacent encoded-words dropped). CPython's
    address parser keeps that whitespace, so there we compare ignoring whitespace."""
    address = Address("someone@example.org", name)
    rendered = render_header("From", address.header_form())
    for line in rendered.split(b"\r\n"):
        assert len(line) <= 78
    value = rendered.decode().removeprefix("From:").replace("\r\n", "").strip()
    phrase = value.rsplit(" <", 1)[0]
    if phrase.startswith('"'):
        phrase = phrase[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    decoded = str(email.header.make_header(email.header.decode_header(phrase)))
    assert decoded == address.display_name
    got = parse(rendered + b"\r\n")["from"].addresses[0]
    assert "".join(got.display_name.split()) == "".join(address.display_name.split())
    assert got.addr_spec == "someone@example.org"


def test_long_non_ascii_name_splits_after_spaces() -> None:
    """When a name needs several encoded-words, each split falls right after a space, so no
    word is cut in two."""
    address = Address("p@example.org", "Александр Сергеевич Пушкин Младший")
    words = re.findall(r"=\?utf-8\?b\?([A-Za-z0-9+/=]*)\?=", address.header_form())
    assert len(words) >= 2
    pieces = [base64.b64decode(w).decode() for w in words]
    assert "".join(pieces) == address.display_name
    assert all(piece.endswith(" ") for piece in pieces[:-1])


@pytest.mark.parametrize(
    "address",
    [
        Address("a@example.org"),
        Address("a@example.org", "Plain Name"),
        Address("a@example.org", "Example, Alice"),
        Address("a@example.org", 'Quote " and \\ backslash'),
        Address("a@example.org", "Zoé"),
    ],
)
def test_str_is_human_and_parses_back(address: Address) -> None:
    """str(address) is readable (Unicode kept) and Address.parse reads it back unchanged."""
    assert Address.parse(str(address)) == address
    if address.display_name == "Zoé":
        assert str(address) == "Zoé <a@example.org>"


# --------------------------------------------------------------------------------------------
# Message validation
# --------------------------------------------------------------------------------------------


def test_message_coerces_strings_and_lists() -> None:
    """Strings become Addresses and lists become tuples, so Message is hashable and typed."""
    msg = Message(
        sender="alice@example.org",
        to="Bob <bob@example.net>",
        cc=["carol@example.net", Address("dave@example.net")],
        bcc=iter(["eve@example.net"]),  # type: ignore[arg-type]
        reply_to=["list@example.org"],
    )
    assert msg.sender == Address("alice@example.org")
    assert msg.to == (Address("bob@example.net", "Bob"),)
    assert isinstance(msg.cc, tuple)
    assert [a.addr_spec for a in msg.recipients] == [
        "bob@example.net",
        "carol@example.net",
        "dave@example.net",
        "eve@example.net",
    ]
    assert msg.reply_to == (Address("list@example.org"),)
    hash(msg)


@pytest.mark.parametrize("field", ["sender", "to", "cc", "bcc", "reply_to"])
def test_bad_address_error_names_the_field(field: str) -> None:
    """An invalid address in any field raises MessageError whose field says which one."""
    kwargs: dict[str, object] = {"sender": "alice@example.org", "to": "bob@example.net"}
    kwargs[field] = "not an address"
    with pytest.raises(MessageError) as info:
        Message(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert "not an address" in str(info.value)


@pytest.mark.parametrize(
    "subject", ["Hi\r\nBcc: eve@example.org", "Hi\nthere", "Hi\rthere", "Hi\0", "a\x1bb", "\x85"]
)
def test_subject_injection_refused(subject: str) -> None:
    """CR, LF, NUL and other control characters in the subject are refused (field=subject)."""
    with pytest.raises(MessageError) as info:
        make(subject=subject)
    assert info.value.field == "subject"


def test_subject_tab_allowed() -> None:
    """A TAB in the subject is not a control we refuse; it round-trips."""
    msg = make(subject="a\tb")
    assert parse(full(msg))["subject"] == "a\tb"


@pytest.mark.parametrize("field", ["text", "html"])
def test_nul_in_body_refused(field: str) -> None:
    """NUL in text or html is refused with advice to attach binary data."""
    with pytest.raises(MessageError) as info:
        make(**{field: "abc\0def"})
    assert info.value.field == field
    assert "attach" in str(info.value)


def test_lone_surrogate_in_text_refused() -> None:
    """Text that cannot be encoded as UTF-8 (lone surrogate) is refused, not crashed on."""
    with pytest.raises(MessageError) as info:
        make(text="bad \udcff byte")
    assert info.value.field == "text"


def test_no_recipients_refused() -> None:
    """A message needs at least one To, Cc or Bcc recipient."""
    with pytest.raises(MessageError, match="recipient"):
        Message(sender="alice@example.org", reply_to=["bob@example.net"])


def test_bcc_only_is_allowed() -> None:
    """Bcc alone counts as a recipient."""
    msg = Message(sender="alice@example.org", bcc=["bob@example.net"])
    assert msg.recipients == (Address("bob@example.net"),)


@pytest.mark.parametrize(
    ("to", "cc", "bcc", "field"),
    [
        (["bob@example.net"], [], ["BOB@Example.NET"], "bcc"),
        (["bob@example.net"], ["Bob <bob@example.net>"], [], "cc"),
        (["bob@example.net", "bob@EXAMPLE.net"], [], [], "to"),
        ([], ["carol@example.net"], ["carol@example.net"], "bcc"),
    ],
)
def test_duplicate_recipients_refused(
    to: list[str], cc: list[str], bcc: list[str], field: str
) -> None:
    """A recipient listed twice (case-insensitive) is refused: a Bcc that is also a To or Cc
    would defeat Bcc privacy."""
    with pytest.raises(MessageError) as info:
        Message(sender="alice@example.org", to=to, cc=cc, bcc=bcc)  # type: ignore[arg-type]
    assert info.value.field == field
    text = str(info.value).lower()
    assert "bob@example.net" in text or "carol@example.net" in text


@pytest.mark.parametrize(
    "message_id",
    ["<abc@example.org>", "abc", "a b@example.org", "abc@example.org\r\nX: y", "@example.org", ""],
)
def test_bad_message_id_refused(message_id: str) -> None:
    """Message-ID must be id-left@id-right without brackets, spaces or line breaks."""
    with pytest.raises(MessageError) as info:
        make(message_id=message_id)
    assert info.value.field == "message_id"


def test_naive_date_refused() -> None:
    """A date without a time zone is refused; the Date header needs an offset."""
    with pytest.raises(MessageError) as info:
        make(date=datetime.datetime(2024, 1, 1, 12, 0))
    assert info.value.field == "date"


def test_finalized_fills_date_and_message_id() -> None:
    """finalized() adds an aware current date and a random id at the sender's domain, and
    keeps values that were given."""
    msg = Message(sender="alice@Example.ORG", to=["bob@example.net"])
    assert msg.date is None
    assert msg.message_id is None
    done = msg.finalized()
    assert done.date is not None
    assert done.date.utcoffset() is not None
    assert abs((datetime.datetime.now(UTC) - done.date).total_seconds()) < 60
    assert done.message_id is not None
    assert re.fullmatch(r"[0-9a-f]{32}@example\.org", done.message_id)
    assert msg.finalized().message_id != done.message_id
    again = done.finalized()
    assert (again.date, again.message_id) == (done.date, done.message_id)


def test_build_requires_finalized() -> None:
    """build_message and build_payload with hp need Date and Message-ID (ValueError: a
    programming error, not user input)."""
    msg = Message(sender="alice@example.org", to=["bob@example.net"])
    with pytest.raises(ValueError, match="finalized"):
        build_payload(msg, hp=HP.CIPHER)
    payload = build_payload(msg, hp=None)  # fine without
    with pytest.raises(ValueError, match="finalized"):
        build_message(msg, payload=payload, hp=None)


# --------------------------------------------------------------------------------------------
# Body canonicalisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", NASTY_TEXTS)
def test_nasty_text_invariants_and_round_trip(text: str) -> None:
    """Every nasty body comes out canonical (CRLF, 7-bit, short lines, no trailing
    whitespace, no leading "From "/".") and a real parser gets back exactly the normalised
    text, trailing whitespace included."""
    msg = make(text=text, subject="nasty")
    data = full(msg)
    assert_wire_invariants(data)
    assert parse(data).get_content() == normalised(text)


@pytest.mark.parametrize("text", NASTY_TEXTS)
def test_nasty_html_round_trip(text: str) -> None:
    """The HTML alternative gets the same canonicalisation and round-trips too."""
    msg = make(text=text, html=text)
    data = full(msg)
    assert_wire_invariants(data)
    parsed = parse(data)
    assert parsed.get_content_type() == "multipart/alternative"
    plain, html = list(parsed.iter_parts())
    assert plain.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert plain.get_content() == normalised(text)
    assert html.get_content() == normalised(text)


@pytest.mark.parametrize("text", NASTY_TEXTS)
def test_quoted_printable_lines_are_well_formed(text: str) -> None:
    """Each QP line is <= 76 chars, every "=" starts a complete escape or a final soft break,
    and decoding gives the UTF-8 of the CRLF-normalised text."""
    data = build_payload(make(text=text), hp=None)
    for body in qp_parts(data):
        for line in body.split(b"\r\n"):
            assert len(line) <= 76
            assert re.fullmatch(rb"(?:[^=]|=[0-9A-F]{2})*=?", line), line
            assert not line.startswith((b".", b"From "))
        assert binascii.a2b_qp(body) == normalised(text).encode()


def test_seven_bit_when_possible() -> None:
    """Short printable ASCII lines go out unencoded (no CTE header), byte for byte."""
    payload = build_payload(make(text="Hello Bob,\n\nsee you.\nAlice"), hp=None)
    assert payload == (
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello Bob,\r\n\r\nsee you.\r\nAlice"
    )


def test_signature_separator_is_encoded() -> None:
    """The "-- " signature separator has a trailing space, so the body becomes QP and the
    space survives as =20."""
    payload = build_payload(make(text="Hi\n-- \nAlice"), hp=None)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in payload
    assert payload.endswith(b"\r\n\r\nHi\r\n--=20\r\nAlice")


@pytest.mark.parametrize(
    ("text", "needs_qp"),
    [
        ("x" * 76, False),
        ("x" * 77, True),
        ("ok\ttab", False),
        ("trailing ", True),
        ("From here", True),
        ("from here", False),
        ("Fromage", False),
        (".", True),
        ("a.b", False),
        ("caf\u00e9", True),
        ("bell\x07", True),
    ],
)
def test_seven_bit_decision(text: str, needs_qp: bool) -> None:
    """7bit only for printable ASCII lines <= 76 chars without trailing whitespace and not
    starting with "From " or "."; anything else is quoted-printable."""
    payload = build_payload(make(text=text), hp=None)
    assert (b"Content-Transfer-Encoding: quoted-printable" in payload) is needs_qp


def test_from_and_dot_encoding_exact() -> None:
    """ "From " at line start becomes "=46rom ", a leading "." becomes "=2E", trailing space
    and tab become =20 / =09 (pins the exact choice)."""
    payload = build_payload(make(text="From x\n.y\nz \nw\t"), hp=None)
    body = payload.split(b"\r\n\r\n", 1)[1]
    assert body == b"=46rom x\r\n=2Ey\r\nz=20\r\nw=09"


def test_from_after_soft_break_is_encoded() -> None:
    """A soft line break that would leave "From " or "." at the start of the next encoded
    line encodes that first character too."""
    payload = build_payload(make(text="x" * 75 + "From here\n" + "x" * 75 + ".z"), hp=None)
    body = payload.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert lines == [b"x" * 75 + b"=", b"=46rom here", b"x" * 75 + b"=", b"=2Ez"]


def test_qp_never_splits_escapes() -> None:
    """Around every break position, a multi-byte character's =XX escapes stay whole and the
    text decodes back exactly."""
    for prefix in range(60, 80):
        text = "x" * prefix + "é€👍" * 8 + "=" * 30
        body = build_payload(make(text=text), hp=None).split(b"\r\n\r\n", 1)[1]
        for line in body.split(b"\r\n"):
            assert len(line) <= 76
            assert re.fullmatch(rb"(?:[^=]|=[0-9A-F]{2})*=?", line)
        assert binascii.a2b_qp(body).decode() == text


def _reference_qp_line(raw: bytes) -> list[str]:
    """The rules, one token at a time: "=XX" for "=", 8-bit bytes and controls but TAB, and for
    a trailing SP/TAB; "." and the "F" of "From " encoded at the start of every encoded line;
    greedy lines of at most 75 characters plus the soft-break "=", the last one up to 76."""
    tokens = [
        chr(b) if (0x20 <= b <= 0x7E and b != 0x3D) or b == 0x09 else f"={b:02X}" for b in raw
    ]
    if raw and raw[-1] in (0x20, 0x09):
        tokens[-1] = f"={raw[-1]:02X}"
    lines: list[str] = []
    line = ""
    for i, token in enumerate(tokens):
        if not line and (token == "." or (token == "F" and raw.startswith(b"From ", i))):
            token = f"={raw[i]:02X}"
        limit = 76 if i == len(tokens) - 1 else 75
        if len(line) + len(token) > limit:
            lines.append(line + "=")
            line = ""
            if token == "." or (token == "F" and raw.startswith(b"From ", i)):
                token = f"={raw[i]:02X}"
        line += token
    lines.append(line)
    return lines


def test_qp_matches_the_rules_on_random_lines() -> None:
    """The quoted-printable encoder (which escapes a line in one pass and cuts it per encoded
    line) gives exactly what applying the rules token by token gives, on thousands of random
    lines built to put dots, "From ", "=", spaces, 8-bit bytes and escapes at break points."""
    rnd = random.Random(2026)
    atoms = [b".", b"F", b"From ", b"From", b" ", b"\t", b"=", b"x", b"\xc3\xa9", b"\x07", b".."]
    for _ in range(3000):
        head = b"x" * rnd.choice([0, 70, 72, 73, 74, 75, 76, 77, 148, 149, 150, 151])
        tail = b"".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 15)))
        raw = head + tail if rnd.random() < 0.7 else tail + head + tail
        assert message_module._qp_line(raw) == _reference_qp_line(raw), raw


def test_qp_long_lines_are_cut_per_line() -> None:
    """A 4000-character line and a long UTF-8 line encode to lines of at most 76 characters
    that decode back exactly."""
    for text in ("All work and no play. " * 200, "Grüße aus Köln " * 300):
        lines = message_module._qp_line(text.encode())
        assert all(len(line) <= 76 for line in lines)
        assert all(line.endswith("=") for line in lines[:-1])
        assert binascii.a2b_qp("\r\n".join(lines)).decode() == text


def _numbered_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = itertools.count()
    monkeypatch.setattr(message_module, "new_boundary", lambda: f"=_e2email_{next(counter):032x}")


@pytest.mark.parametrize(
    "size", [0, 1, 56, 57, 58, 57 * 4096 - 1, 57 * 4096, 57 * 4096 + 1, 2 * 57 * 4096 + 100]
)
@pytest.mark.parametrize("hp", [None, HP.CIPHER])
def test_stream_payload_yields_build_payload(
    monkeypatch: pytest.MonkeyPatch, size: int, hp: HP | None
) -> None:
    """stream_payload's pieces joined are build_payload's bytes (attachments encoded block by
    block, around block edges), on every iteration; len() is their size; the base64 body is
    the standard encoding in 76-character CRLF lines."""
    content = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    msg = make(html="<p>hi</p>", attachments=[Attachment("a.bin", content)])
    _numbered_boundaries(monkeypatch)
    stream = stream_payload(msg, hp=hp)
    _numbered_boundaries(monkeypatch)
    expected = build_payload(msg, hp=hp)
    assert b"".join(stream) == expected
    assert b"".join(stream) == expected  # a second pass gives the same bytes
    assert bytes(stream) == expected and len(stream) == len(expected)
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n").removesuffix(b"\r\n")
    assert b"base64\r\n\r\n" + encoded + b"\r\n--=_e2email_" in expected


def test_message_head_is_what_build_message_puts_first() -> None:
    """message_head(...) + payload is build_message(...), for every mode."""
    msg = make(cc=["carol@example.net"], subject="Grüße")
    wrapped = fake_signed(build_payload(msg, hp=HP.CLEAR))
    for hp in (None, HP.CIPHER, HP.CLEAR):
        assert message_head(msg, hp=hp) + wrapped == build_message(msg, payload=wrapped, hp=hp)


def test_empty_text_body() -> None:
    """An empty text body is allowed and yields an empty text/plain part."""
    payload = build_payload(make(text=""), hp=None)
    assert payload == b"Content-Type: text/plain; charset=utf-8\r\n\r\n"


# --------------------------------------------------------------------------------------------
# Attachments
# --------------------------------------------------------------------------------------------


def attachment_parts(data: bytes) -> list[email.message.EmailMessage]:
    parsed = parse(data)
    return [p for p in parsed.walk() if p.get_content_disposition() == "attachment"]


def test_attachment_structure_and_bytes() -> None:
    """With attachments: multipart/mixed, body first, then each file base64 (76-char lines)
    with name= and Content-Disposition: attachment; the bytes round-trip."""
    blob = bytes(range(256)) * 40
    msg = make(
        text="see attached",
        html="<p>see attached</p>",
        attachments=[
            Attachment("data.bin", blob),
            Attachment("notes.txt", b"From x\r\n.\r\n", "text/plain"),
            Attachment("empty", b""),
        ],
    )
    data = full(msg)
    assert_wire_invariants(data)
    parsed = parse(data)
    assert parsed.get_content_type() == "multipart/mixed"
    parts = list(parsed.iter_parts())
    assert parts[0].get_content_type() == "multipart/alternative"
    assert [p.get_filename() for p in parts[1:]] == ["data.bin", "notes.txt", "empty"]
    assert [p.get_content_type() for p in parts[1:]] == [
        "application/octet-stream",
        "text/plain",
        "application/octet-stream",
    ]
    assert [p.get_payload(decode=True) for p in parts[1:]] == [blob, b"From x\r\n.\r\n", b""]
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in parts[1:])
    assert parts[1].get_param("name") == "data.bin"
    raw = data.split(b'filename="data.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n', 1)[1]
    b64_lines = raw.split(b"\r\n--", 1)[0].split(b"\r\n")
    assert all(len(line) == 76 for line in b64_lines[:-1])
    assert base64.b64decode(b"".join(b64_lines)) == blob


@pytest.mark.parametrize(
    "filename",
    [
        "a" * 36 + ".pdf",  # 40 characters
        "résumé.pdf",
        "日本語のファイル名.txt",
        "Ünïcödé " * 12 + ".docx",
        "x" * 200 + ".tar.gz",
        'quote " and = and %20 and ; and *.txt',
        "=?utf-8?b?Zm9v?=.txt",
        "spaced  name .txt",
        "emoji 👍🏽 file.png",
    ],
)
def test_attachment_filename_round_trips(filename: str) -> None:
    """40-character, non-ASCII, very long and special-character file names come back exactly,
    with every header line <= 78 octets and an ASCII name= fallback."""
    msg = make(attachments=[Attachment(filename, b"payload")])
    data = full(msg)
    assert_wire_invariants(data)
    (part,) = attachment_parts(data)
    assert part.get_filename() == filename
    assert part.get_payload(decode=True) == b"payload"
    fallback = part.get_param("name", header="content-type")
    assert isinstance(fallback, str)
    assert fallback.isascii()
    assert fallback


def test_long_filename_uses_rfc2231_continuations() -> None:
    """A long non-ASCII name is written as filename*0*=utf-8''...; filename*1*=... ."""
    data = full(make(attachments=[Attachment("é" * 60 + ".pdf", b"x")]))
    assert b"filename*0*=utf-8''%C3%A9" in data
    assert b"filename*1*=" in data
    assert b'name="e' in data


def test_attachment_filename_blanks_stripped() -> None:
    """Leading and trailing blanks (which receivers drop and which can hide an extension)
    are stripped from file names."""
    assert Attachment("  report.pdf.exe  ", b"x").filename == "report.pdf.exe"
    with pytest.raises(MessageError):
        Attachment("   ", b"x")


@pytest.mark.parametrize(
    "filename", ["", "a/b.txt", "..\\evil.exe", "a\r\nX: y.txt", "a\nb", "nul\0.txt", "..", "."]
)
def test_attachment_bad_filename_refused(filename: str) -> None:
    """Empty names, path separators and CR/LF/NUL in file names are refused."""
    with pytest.raises(MessageError) as info:
        Attachment(filename, b"x")
    assert info.value.field == "attachment"


@pytest.mark.parametrize(
    "content_type", ["text/plain; charset=latin1", "nonsense", "a b/c", "multipart/mixed", ""]
)
def test_attachment_bad_content_type_refused(content_type: str) -> None:
    """Content types must be a bare type/subtype, and not multipart or message (which may not
    be base64-encoded)."""
    with pytest.raises(MessageError):
        Attachment("a.txt", b"x", content_type)


def test_attachment_content_type_lowercased() -> None:
    """MIME types are case-insensitive; they are stored lower-case."""
    assert Attachment("a.pdf", b"x", "Application/PDF").content_type == "application/pdf"


def test_from_path_reads_and_guesses(tmp_path: Path) -> None:
    """from_path reads the bytes, uses the file's name and guesses the type."""
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4")
    att = Attachment.from_path(path)
    assert (att.filename, att.content, att.content_type) == (
        "report.pdf",
        b"%PDF-1.4",
        "application/pdf",
    )
    other = Attachment.from_path(str(path), filename="other.bin", content_type="image/png")
    assert (other.filename, other.content_type) == ("other.bin", "image/png")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blob.unknownext", "application/octet-stream"),
        ("archive.tar.gz", "application/gzip"),
        ("mail.eml", "application/octet-stream"),
        ("noext", "application/octet-stream"),
    ],
)
def test_from_path_type_guess_fallbacks(tmp_path: Path, name: str, expected: str) -> None:
    """Unknown types fall back to octet-stream; compressed files get the compression type;
    message/* guesses (not allowed in base64) become octet-stream."""
    path = tmp_path / name
    path.write_bytes(b"x")
    assert Attachment.from_path(path).content_type == expected


def test_from_path_missing_file(tmp_path: Path) -> None:
    """A missing file raises MessageError(field="attachment") naming the path and reason."""
    path = tmp_path / "nope.txt"
    with pytest.raises(MessageError) as info:
        Attachment.from_path(path)
    assert info.value.field == "attachment"
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_from_path_directory(tmp_path: Path) -> None:
    """A directory is refused with MessageError naming the path."""
    with pytest.raises(MessageError) as info:
        Attachment.from_path(tmp_path)
    assert info.value.field == "attachment"
    assert str(tmp_path) in str(info.value)
    assert "directory" in str(info.value)


def test_from_path_unreadable(tmp_path: Path) -> None:
    """A file we may not read is refused with MessageError naming the path."""
    import os

    path = tmp_path / "secret.txt"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # running as root: permissions do not apply
            pytest.skip("running with privileges that ignore file modes")
        with pytest.raises(MessageError) as info:
            Attachment.from_path(path)
        assert str(path) in str(info.value)
        assert info.value.field == "attachment"
    finally:
        path.chmod(0o600)


def test_from_path_fifo_refused(tmp_path: Path) -> None:
    """A FIFO (or device) is refused instead of blocking forever on read."""
    import os

    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(MessageError, match="not a regular file"):
        Attachment.from_path(path)


def test_large_attachment_is_fast_and_safe() -> None:
    """A 25 MB attachment builds and passes check_wire_safe in reasonable time (the gate
    uses bytes methods, not a Python loop per byte)."""
    blob = bytes(range(256)) * (25 * 1024 * 4)
    msg = make(attachments=[Attachment("big.bin", blob)])
    start = time.perf_counter()
    data = full(msg)
    check_wire_safe(data)
    assert time.perf_counter() - start < 15
    assert len(data) > 25 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------

ASCII_WORDS = "The quick brown fox jumps over the lazy dog and keeps on running far away"
UTF8_WORDS = "Grüße aus Köln: Übermäßig lange Betreffzeilen sind ärgerlich für alle Leute"


def subjects() -> list[str]:
    """ASCII with spaces, UTF-8 with spaces, and one unbroken word, each 70..77 chars."""
    out = []
    for length in range(70, 78):
        for words in (ASCII_WORDS, UTF8_WORDS):
            text = (words * 2)[:length]
            out.append(text[:-1] + "x" if text.endswith(" ") else text)
        out.append("z" * length)
    return out


@pytest.mark.parametrize("subject", subjects())
def test_subjects_70_to_77_chars_round_trip(subject: str) -> None:
    """Subjects of 70-77 characters (ASCII, UTF-8, and one unbroken word) fold to lines of
    at most 78 octets and parse back exactly, both outside (CLEAR) and protected inside."""
    assert 70 <= len(subject) <= 77
    msg = make(subject=subject)
    payload = build_payload(msg, hp=HP.CLEAR)
    data = full(msg, HP.CLEAR)
    assert_wire_invariants(data)
    assert parse(data)["subject"] == subject
    assert parse(payload)["subject"] == subject


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "Hi",
        "x" * 990,
        "a" * 100 + " b",
        "word " * 60 + "end",
        "é" * 300,
        "=?utf-8?q?looks_encoded?=",
        "  leading and trailing  ",
        "double  space",
        "mixed ascii and ünïcödé and 👍🏽 emoji " * 4,
        "[...]",
    ],
)
def test_subject_edge_cases_round_trip(subject: str) -> None:
    """Empty, very long, unbroken, encoded-word-looking and whitespace-sensitive subjects
    are legal on the wire and parse back exactly."""
    data = full(make(subject=subject))
    assert_wire_invariants(data)
    assert parse(data)["subject"] == subject


def test_render_header_ascii_folds_at_spaces() -> None:
    """A long ASCII subject is folded at spaces (no encoding), each line <= 78 octets."""
    value = "word " * 30 + "end"
    rendered = render_header("Subject", value)
    assert b"=?" not in rendered
    lines = rendered.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) > 2
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:-1])
    assert rendered.replace(b"\r\n ", b" ") == b"Subject: " + value.encode() + b"\r\n"


def test_render_header_encoded_words() -> None:
    """Non-ASCII text becomes B encoded-words of UTF-8, each <= 75 chars, each decoding on
    its own (no character split across words)."""
    value = "€👍é" * 40
    rendered = render_header("Subject", value)
    assert rendered.isascii()
    lines = rendered.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    words = re.findall(rb"=\?utf-8\?b\?([A-Za-z0-9+/=]*)\?=", rendered)
    assert words
    for word in re.findall(rb"=\?utf-8\?b\?[A-Za-z0-9+/=]*\?=", rendered):
        assert len(word) <= 75
    decoded = "".join(base64.b64decode(w).decode("utf-8") for w in words)
    assert decoded == value


def test_render_header_short_plain() -> None:
    """A short ASCII header is rendered as is, ending in CRLF."""
    assert render_header("Subject", "Hello") == b"Subject: Hello\r\n"
    assert render_header("X-Test", "a b c") == b"X-Test: a b c\r\n"
    assert render_header("Subject", "") == b"Subject:\r\n"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Subject", "a\r\nBcc: eve@example.org"),
        ("Subject", "a\nb"),
        ("Subject", "a\rb"),
        ("Subject", "a\0b"),
        ("X-Foo", "a\x1bb"),
        ("Bad Name", "x"),
        ("Bad:Name", "x"),
        ("Bad\r\nName", "x"),
        ("", "x"),
        ("Näme", "x"),
    ],
)
def test_render_header_refuses_injection(name: str, value: str) -> None:
    """CR, LF, NUL (and other controls) in a header value, and anything but a field-name
    token as the name, raise MessageError."""
    with pytest.raises(MessageError):
        render_header(name, value)


def test_render_header_structured_needs_ascii() -> None:
    """Structured headers (addresses etc.) must already be ASCII: no silent mis-encoding."""
    with pytest.raises(MessageError):
        render_header("From", "Zoé <zoe@example.org>")


def test_render_header_structured_long_token() -> None:
    """A long unbreakable token in a structured header stays legal (<= 998) and is rejected
    beyond that rather than emitting an illegal line."""
    addr = "a" * 64 + "@" + "b" * 63 + ".example.org"
    rendered = render_header("To", f"x@example.org, {addr}")
    assert all(len(line) <= 998 for line in rendered.split(b"\r\n"))
    assert rendered.replace(b"\r\n ", b" ") == f"To: x@example.org, {addr}\r\n".encode()
    with pytest.raises(MessageError):
        render_header("X-Long", "k" * 1200)


def test_many_recipients_fold() -> None:
    """A long To list folds between addresses, lines <= 78, all addresses parse back."""
    to = [f"User Number {i} <user{i}@example.net>" for i in range(30)]
    data = full(make(to=to))
    assert_wire_invariants(data)
    got = [a.addr_spec for a in parse(data)["to"].addresses]
    assert got == [f"user{i}@example.net" for i in range(30)]


def test_outer_headers_order_and_values() -> None:
    """build_message writes Date, From, To, Cc, Reply-To, Subject, Message-ID, MIME-Version,
    then the payload exactly as given."""
    msg = make(
        to=["Bob <bob@example.net>"],
        cc=["carol@example.net"],
        reply_to=["list@example.org"],
        subject="Hello",
    )
    payload = build_payload(msg, hp=None)
    data = build_message(msg, payload=payload, hp=None)
    assert data.endswith(payload)
    outer = data[: len(data) - len(payload)]
    assert header_names(outer) == [
        "Date",
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Message-ID",
        "MIME-Version",
    ]
    parsed = parse(data)
    assert parsed["date"].datetime == DATE
    assert parsed["from"].addresses[0].display_name == "Alice Example"
    assert parsed["message-id"] == "<0123abcd@example.org>"
    assert parsed["mime-version"] == "1.0"
    assert parsed["reply-to"].addresses[0].addr_spec == "list@example.org"


def test_payload_bytes_not_reserialised() -> None:
    """An arbitrary payload (e.g. multipart/signed from the crypto layer) is appended
    byte for byte, including odd-looking but legal content."""
    payload = (
        b'Content-Type: multipart/signed; boundary="b";\r\n protocol="application/pgp-signature"'
        b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nFrom=20x\r\n--b--\r\n"
    )
    data = build_message(make(), payload=payload, hp=HP.CLEAR)
    assert data.endswith(b"MIME-Version: 1.0\r\n" + payload)


def test_build_message_rejects_headerless_payload() -> None:
    """A payload without its own Content-Type header block is a programming error."""
    with pytest.raises(ValueError, match="header"):
        build_message(make(), payload=b"\r\nbody", hp=None)
    with pytest.raises(ValueError, match="Content-Type"):
        build_message(make(), payload=b"X-Foo: bar\r\n\r\nbody", hp=None)


@pytest.mark.parametrize("hp", [HP.CIPHER, HP.CLEAR])
def test_build_message_refuses_unwrapped_protected_payload(hp: HP) -> None:
    """Passing the protected part itself (with its From/Subject/HP-Outer) to build_message
    would put a second, cleartext Subject in the outer header: refused as a programming error."""
    msg = make(subject="secret")
    with pytest.raises(ValueError, match="wrapper"):
        build_message(msg, payload=build_payload(msg, hp=hp), hp=hp)


def test_undisclosed_recipients_when_only_bcc() -> None:
    """With only Bcc recipients the outer To is "undisclosed-recipients:;"."""
    msg = make(to=[], bcc=["secret@example.net"])
    data = full(msg)
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in data
    assert b"secret" not in data


def test_cc_only_has_no_to() -> None:
    """With Cc but no To, there is no To header at all."""
    data = full(make(to=[], cc=["carol@example.net"]))
    assert header_names(header_block(data)).count("To") == 0
    assert b"\r\nCc: carol@example.net\r\n" in data


# --------------------------------------------------------------------------------------------
# Header protection and Bcc
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hp", [None, HP.CIPHER, HP.CLEAR])
def test_bcc_never_written(hp: HP | None) -> None:
    """No Bcc header and no Bcc address appear in the payload or the message, in any mode."""
    msg = make(
        to=["bob@example.net"], cc=["carol@example.net"], bcc=["Hidden Eve <eve@example.net>"]
    )
    payload = build_payload(msg, hp=hp)
    data = full(msg, hp)
    for blob in (payload, data):
        assert b"eve@" not in blob.lower()
        assert b"hidden" not in blob.lower()
        assert not re.search(rb"(?im)^bcc:", blob)  # no Bcc field (a boundary may hold "bcc")


@pytest.mark.parametrize("hp", [HP.CIPHER, HP.CLEAR])
def test_protected_headers_in_payload(hp: HP) -> None:
    """With hp, the payload's Content-Type carries protected-headers="v1" and hp=, and its
    header block holds From, To, Cc, Reply-To, Subject, Date, Message-ID (in that order)
    then HP-Outer fields recording the outer headers."""
    msg = make(
        to=["Bob <bob@example.net>"],
        cc=["carol@example.net"],
        reply_to=["list@example.org"],
        subject="Secret plans",
        attachments=[Attachment("a.txt", b"a")],
    )
    payload = build_payload(msg, hp=hp)
    assert_wire_invariants(payload)
    block = header_block(payload)
    names = header_names(block)
    assert names[0] == "Content-Type"
    protected = [n for n in names if n not in ("Content-Type", "HP-Outer")]
    assert protected == ["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID"]
    assert names.index("HP-Outer") > names.index("Message-ID")
    parsed = parse(payload)
    assert parsed.get_content_type() == "multipart/mixed"
    assert parsed.get_param("protected-headers") == "v1"
    assert parsed.get_param("hp") == hp.value
    assert parsed["subject"] == "Secret plans"
    assert parsed["from"].addresses[0].addr_spec == "alice@example.org"
    assert parsed["message-id"] == "<0123abcd@example.org>"
    outer = [str(v) for v in parsed.get_all("HP-Outer", [])]
    expected_subject = "Subject: [...]" if hp is HP.CIPHER else "Subject: Secret plans"
    assert expected_subject in outer
    assert "From: Alice Example <alice@example.org>" in outer
    assert "To: Bob <bob@example.net>" in outer
    assert "Cc: carol@example.net" in outer
    assert "Reply-To: list@example.org" in outer
    assert "Message-ID: <0123abcd@example.org>" in outer
    assert any(v.startswith("Date: ") for v in outer)
    assert len(outer) == 7


def test_outer_subject_cipher_vs_clear() -> None:
    """The outer Subject is "[...]" for CIPHER and the real subject for CLEAR or no hp."""
    msg = make(subject="Quarterly results")
    cipher = full(msg, HP.CIPHER)
    clear = full(msg, HP.CLEAR)
    plain = full(msg)
    assert header_block(cipher).count(b"Subject: [...]\r\n") == 1
    assert b"Quarterly" not in header_block(cipher)
    assert parse(cipher)["subject"] == "[...]"
    assert parse(clear)["subject"] == "Quarterly results"
    assert parse(plain)["subject"] == "Quarterly results"


def test_no_hp_means_no_protected_headers() -> None:
    """Without hp the payload has only MIME headers: no From/Subject/HP-Outer inside."""
    payload = build_payload(make(subject="x"), hp=None)
    assert header_names(header_block(payload)) == ["Content-Type"]
    assert b"protected-headers" not in payload


def test_hp_outer_with_undisclosed_and_unicode() -> None:
    """HP-Outer records "undisclosed-recipients:;" and encoded non-ASCII subjects, and the
    protected block never gains a To header for Bcc-only mail."""
    msg = make(to=[], bcc=["eve@example.net"], subject="Ünïcödé " * 12)
    payload = build_payload(msg, hp=HP.CLEAR)
    assert_wire_invariants(payload)
    parsed = parse(payload)
    assert parsed["to"] is None
    outer = [str(v) for v in parsed.get_all("HP-Outer", [])]
    assert "To: undisclosed-recipients:;" in outer
    subject_lines = [v for v in outer if v.startswith("Subject:")]
    assert len(subject_lines) == 1
    assert subject_lines[0].startswith("Subject: Ünïcödé Ünïcödé")
    assert b"\r\nHP-Outer: Subject: =?utf-8?b?" in payload
    assert parsed["subject"] == "Ünïcödé " * 12


def test_signed_part_is_stable_bytes() -> None:
    """build_payload is deterministic apart from boundaries, and contains no bytes a
    re-serialiser would rewrite (From-lines, trailing spaces) — what is signed is what is sent."""
    msg = make(text="From the start \n.\n", html="<b>x</b>")
    payload = build_payload(msg, hp=HP.CLEAR)
    wrapped = fake_signed(payload)
    data = build_message(msg, payload=wrapped, hp=HP.CLEAR)
    assert data.endswith(wrapped)
    assert payload in data
    assert_wire_invariants(data)


# --------------------------------------------------------------------------------------------
# check_wire_safe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"Subject: x\nbody\r\n", "bare"),
        (b"Subject: x\r\nbo\rdy\r\n", "bare"),
        (b"Subject: x\r\nbody\r", "bare"),
        (b"\nSubject: x\r\n", "bare"),
        (b"a\r\r\n", "bare"),
        (b"a\r\n\n", "bare"),
        (b"a\r\n.\n.\r\n", "bare"),
        (b"x" * 999 + b"\r\n", "999"),
        (b"ok\r\n" + b"x" * 5000, "5000"),
        (b"a\0b\r\n", "NUL"),
        (b"caf\xc3\xa9\r\n", "8-bit"),
        (b"\xff", "8-bit"),
    ],
)
def test_check_wire_safe_refuses(data: bytes, reason: str) -> None:
    """Bare CR, bare LF, lines over 998 octets, NUL and 8-bit bytes are refused."""
    with pytest.raises(MessageError) as info:
        check_wire_safe(data)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "data", [b"", b"a", b"x" * 998, b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n", b"\r\n\r\n"]
)
def test_check_wire_safe_accepts(data: bytes) -> None:
    """Clean CRLF ASCII with lines up to exactly 998 octets passes."""
    check_wire_safe(data)


def test_check_wire_safe_finds_a_long_line_anywhere() -> None:
    """The line-length gate (which skips ahead a kilobyte at a time) finds one 999-octet
    line wherever it is among short and 998-octet lines, also as the last, unterminated line,
    and names the longest line; 998 everywhere passes."""
    for before in range(0, 40):
        lines = [b"y" * (before * 37 % 999)] * before
        for long in (b"x" * 999, b"x" * 2000):
            for after in ([], [b"z" * 998], [b"", b"z" * 5]):
                data = b"\r\n".join([*lines, long, *after])
                with pytest.raises(MessageError, match=f"a line of {len(long)} octets"):
                    check_wire_safe(data)
                with pytest.raises(MessageError):
                    check_wire_safe(data + b"\r\n")
        check_wire_safe(b"\r\n".join([*lines, b"x" * 998, b"z" * 998]))


def test_check_wire_safe_passes_our_output() -> None:
    """Everything this module builds (all modes, attachments, Unicode) passes the gate."""
    msg = make(
        to=["Zoé <zoe@example.org>"],
        cc=['"Example, Carol" <carol@example.net>'],
        subject="Grüße " * 20,
        text="From x\n.\ntrailing \n" + "é" * 300,
        html="<p>" + "x" * 2000 + "</p>",
        attachments=[Attachment("naïve.bin", bytes(range(256)))],
    )
    for hp in (None, HP.CIPHER, HP.CLEAR):
        data = full(msg, hp)
        check_wire_safe(data)
        assert_wire_invariants(data)


# --------------------------------------------------------------------------------------------
# Messages made by other programs: Message.from_bytes, MimeBody, extra headers
# --------------------------------------------------------------------------------------------

from email.mime.application import MIMEApplication  # noqa: E402
from email.mime.multipart import MIMEMultipart  # noqa: E402
from email.mime.text import MIMEText  # noqa: E402

from e2email.message import MimeBody, existing_protection  # noqa: E402


def leaves(raw: bytes) -> list[tuple[str, bytes | None, str | None]]:
    """Every part of a message as a reader sees it: type, decoded content, file name."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    out: list[tuple[str, bytes | None, str | None]] = []
    for part in parsed.walk():
        if part.is_multipart():
            out.append((part.get_content_type(), None, None))
        else:
            out.append(
                (part.get_content_type(), part.get_payload(decode=True), part.get_filename())
            )
    return out


def crlf(raw: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw)


def payload_of(msg: Message, hp: HP | None = None) -> bytes:
    return build_payload(msg.finalized(), hp=hp)


def django_like() -> bytes:
    """What Django's EmailMultiAlternatives.message().as_bytes() makes: mixed > alternative
    (8bit UTF-8 text, html) + attachments; MIME-Version in every part; RFC 2047 subject."""
    alt = MIMEMultipart("alternative")
    text = MIMEText("Grüße, Zoë\nFrom the team\nline with trailing space \n", "plain", "utf-8")
    del text["Content-Transfer-Encoding"]
    text["Content-Transfer-Encoding"] = "8bit"
    text.set_payload("Grüße, Zoë\nFrom the team\nline with trailing space \n".encode())
    alt.attach(text)
    alt.attach(MIMEText("<p>Grüße</p>", "html", "utf-8"))
    outer = MIMEMultipart("mixed")
    outer.attach(alt)
    pdf = MIMEApplication(b"%PDF-1.4\n" + bytes(range(256)) * 8, "pdf")
    pdf.add_header("Content-Disposition", "attachment", filename="report.pdf")
    outer.attach(pdf)
    csv = MIMEText("a,b\n1,2\n", "csv", "utf-8")
    csv.add_header("Content-Disposition", "attachment", filename=("utf-8", "", "Zahlen é.csv"))
    outer.attach(csv)
    outer["Subject"] = "=?utf-8?q?Rechnung_f=C3=BCr_Mai?="
    outer["From"] = "Shop <alice@example.org>"
    outer["To"] = "Bob <bob@example.net>"
    outer["Cc"] = "carol@example.com"
    outer["Reply-To"] = "support@example.org"
    outer["Date"] = "Wed, 06 May 2026 07:08:09 -0000"
    outer["Message-ID"] = "<1.django@example.org>"
    outer["X-Mailer"] = "Django"
    outer.preamble = "This is a multi-part message in MIME format."
    return outer.as_bytes()


CANON_CASES = {
    "git-send-email-8bit": (
        "From 1a2b Mon Sep 17 00:00:00 2001\nFrom: Alice <alice@example.org>\n"
        "To: bob@example.net\nSubject: [PATCH] x\nContent-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 8bit\n\nGrüße\nFrom here\n \n-a \n+b\n-- \n2.39.5\n"
    ).encode(),
    "php-mail-lf": (
        b"To: bob@example.net\nSubject: Contact form\nFrom: alice@example.org\n"
        b"X-PHP-Originating-Script: 33:contact.php\nContent-type: text/plain; charset=iso-8859-1\n"
        b"\nName: J\xf6rg\nMessage: " + b"x" * 1200 + b"\n"
    ),
    "php-mail-crlf": (
        b"To: bob@example.net\r\nSubject: hi\r\nFrom: alice@example.org\r\n\r\nplain\r\n"
    ),
    "cron": (
        b"From: root (Cron Daemon)\nTo: bob@example.net\nSubject: Cron <root@host> run-parts\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
        b"Content-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\n"
        b"Message-Id: <20260506070809.1@host.example.org>\nDate: Wed, 6 May 2026 07:08:09 +0200\n"
        b"\n/etc/cron.daily/x:\n\xe2\x9c\x93 done\n"
    ),
    "smtphandler": (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: Error\r\n"
        b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n'
        b"MIME-Version: 1.0\r\nDate: Wed, 06 May 2026 07:08:09 +0200\r\n\r\n"
        b'Traceback (most recent call last):\r\n  File "x.py", line 1\r\nValueError: x\r\n'
    ),
    "mutt-attachment": (
        b"From: alice@example.org\nTo: bob@example.net\nSubject: file\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="mutt-b"\nContent-Disposition: inline\n\n'
        b"--mutt-b\nContent-Type: text/plain; charset=us-ascii\nContent-Disposition: inline\n\n"
        b"See attached.\n\n--mutt-b\nContent-Type: application/octet-stream\n"
        b'Content-Disposition: attachment; filename="data.bin"\n'
        b"Content-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(bytes(range(256)) * 4)
        + b"\n--mutt-b--\n"
    ),
    "django": django_like(),
}


@pytest.mark.parametrize("name", list(CANON_CASES))
def test_from_bytes_keeps_what_every_part_decodes_to(name: str) -> None:
    """The payload made from a program's message is wire-safe and canonical for signing, and
    every part decodes to exactly what it decoded to in the program's message (CRLF line
    ends), with the same types, structure and file names."""
    raw = CANON_CASES[name]
    msg = Message.from_bytes(raw, sender="alice@example.org")
    assert msg.body is not None
    for hp in (None, HP.CLEAR, HP.CIPHER):
        payload = payload_of(msg, hp)
        check_wire_safe(payload)
        for line in payload.split(b"\r\n"):
            assert not line.startswith(b"From "), line
            assert not line.endswith((b" ", b"\t")), line
        original = crlf(raw.split(b"\n", 1)[1] if raw.startswith(b"From ") else raw)
        assert leaves(payload) == leaves(original)
    # Made again from its own output, a body is kept byte for byte (it is already safe).
    again = MimeBody.parse(msg.body.head + b"\r\n" + msg.body.body)
    assert again == msg.body


def test_safe_parts_are_kept_byte_for_byte() -> None:
    """7bit, quoted-printable and base64 parts whose lines are safe are not re-encoded; the
    boundaries, preamble and epilogue stay."""
    entity = (
        b'Content-Type: multipart/mixed; boundary="xyz"\r\n\r\n'
        b"preamble text\r\n--xyz\r\nContent-Type: text/plain\r\n\r\nplain 7bit\r\n"
        b"--xyz\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe=\r\n ok\r\n"
        b"--xyz\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"iVBORw0KGgo=\r\n--xyz--\r\nepilogue\r\n"
    )
    body = MimeBody.parse(entity)
    assert body.head + b"\r\n" + body.body == entity
    assert body.content_type == "multipart/mixed"
    # An empty preamble line (as mutt writes) and a nested multipart without epilogue stay.
    nested = (
        b'Content-Type: multipart/mixed; boundary="out"\r\n\r\n\r\n--out\r\n'
        b'Content-Type: multipart/alternative; boundary="in"\r\n\r\n--in\r\n\r\na\r\n'
        b"--in--\r\n--out--\r\n"
    )
    body = MimeBody.parse(nested)
    assert body.head + b"\r\n" + body.body == nested


def test_signed_subtree_is_kept_exactly() -> None:
    """A multipart/signed part (signed by the program) is never re-encoded, not even its
    trailing whitespace or "From " lines; 8-bit inside it cannot be made safe: refused."""
    signed = (
        b'Content-Type: multipart/signed; protocol="application/pgp-signature";\r\n'
        b' micalg=pgp-sha256; boundary="s"\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\n'
        b"From me \r\n--s\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n"
    )
    entity = (
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n--m\r\n'
        + signed
        + b"\r\n--m\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "ü\r\n".encode()
        + b"--m--\r\n"
    )
    body = MimeBody.parse(entity)
    assert signed in body.body
    assert "ü".encode() not in body.body
    with pytest.raises(MessageError, match="cannot be made safe without breaking its signature"):
        MimeBody.parse(signed.replace(b"From me", "Fröm me".encode()))


@pytest.mark.parametrize(
    ("content_type", "encoding", "content", "expected"),
    [
        ("text/plain; charset=utf-8", "8bit", "ünïcödé\r\n".encode(), "quoted-printable"),
        ("text/plain", "7bit", b"From the start\r\n", "quoted-printable"),
        ("text/plain", "7bit", b"trailing \r\n", "quoted-printable"),
        ("text/plain", "7bit", b"x" * 2000 + b"\r\n", "quoted-printable"),
        ("text/plain", "7bit", b"nul\0byte\r\n", "quoted-printable"),
        # (8bit is line-oriented: a bare CR or LF would become CRLF, like every line end.)
        ("application/octet-stream", "8bit", bytes(range(14, 256)) + b"\r\n", "base64"),
        ("application/octet-stream", "binary", b"\xff\xfe" * 600, "base64"),
        ("application/x-patch", "7bit", b"-a \r\n+b\r\n", "base64"),
        ("image/png", "base64", base64.b64encode(b"\x89PNG" * 500), "base64"),
        ("text/plain", "quoted-printable", b"caf=C3=A9 \r\nFrom x", "quoted-printable"),
    ],
)
def test_unsafe_leaves_are_reencoded_to_the_same_content(
    content_type: str, encoding: str, content: bytes, expected: str
) -> None:
    """8-bit, NUL, long lines, trailing whitespace and "From " lines are re-encoded (text as
    quoted-printable from our encoder, other types base64) and decode to the same bytes."""
    entity = (
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode()
        + content
    )
    body = MimeBody.parse(entity)
    check_wire_safe(body.head + body.body)
    assert f"Content-Transfer-Encoding: {expected}\r\n".encode() in body.head
    assert body.head.count(b"Content-Transfer-Encoding") == 1
    assert leaves(body.head + b"\r\n" + body.body) == leaves(entity)
    for line in body.body.split(b"\r\n"):
        assert not line.startswith(b"From ") and not line.endswith(b" ")


def test_attached_message_is_canonicalised_inside() -> None:
    """A message/rfc822 part (never encoded itself, RFC 2046 §5.2.1) is canonicalised inside:
    its 8-bit body re-encoded, its 8-bit header made RFC 2047, its own label 7bit."""
    entity = (
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Subject: Grüße\r\nFrom: a@example.org\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nHallo Zoë\r\n".encode()
        + b"--o--\r\n"
    )
    body = MimeBody.parse(entity)
    check_wire_safe(body.body)
    parsed = email.message_from_bytes(body.head + b"\r\n" + body.body, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    (attached,) = parsed.iter_parts()
    assert attached.get_content_type() == "message/rfc822"
    assert attached["Content-Transfer-Encoding"] == "7bit"
    inner = attached.get_payload()[0]
    assert inner["Subject"] == "Grüße"
    # The CRLF before the boundary belongs to the boundary (RFC 2046 §5.1.1).
    assert inner.get_payload(decode=True) == "Hallo Zoë".encode()


def test_raw_utf8_file_name_becomes_rfc2231() -> None:
    entity = (
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
        + 'Content-Type: application/pdf; name="Grüße.pdf"\r\n'
        'Content-Disposition: attachment; filename="Grüße.pdf"\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--o--\r\n"
    )
    body = MimeBody.parse(entity)
    check_wire_safe(body.body)
    assert leaves(body.head + b"\r\n" + body.body)[1] == ("application/pdf", b"%PDF", "Grüße.pdf")


def test_from_bytes_fields_and_extra_headers() -> None:
    raw = (
        b"Return-Path: <x@example.org>\nFrom: =?utf-8?q?J=C3=B6rg?= <Alice@Example.ORG>\n"
        b"To: Bob <bob@example.net>, carol@example.com\nCc: bob@example.net, dave@example.com\n"
        b"Bcc: carol@example.com, erin@example.com\nReply-To: r@example.org\n"
        b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\n folded\nDate: Wed, 6 May 2026 07:08:09 +0200\n"
        b"Message-ID: <abc.1@example.org>\nIn-Reply-To: <p@example.org>\n"
        b"References: <q@example.org>\n <p@example.org>\nX-Mailer: Mutt\nMIME-Version: 1.0\n"
        b"\nbody\n"
    )
    msg = Message.from_bytes(raw)
    assert msg.sender == Address("Alice@example.org", "Jörg")
    assert [a.addr_spec for a in msg.to] == ["bob@example.net", "carol@example.com"]
    assert [a.addr_spec for a in msg.cc] == ["dave@example.com"]
    assert [a.addr_spec for a in msg.bcc] == ["erin@example.com"]
    assert msg.subject == "Grüße folded"
    assert msg.date == datetime.datetime(
        2026, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    assert msg.message_id == "abc.1@example.org"
    assert msg.headers == (
        ("In-Reply-To", "<p@example.org>"),
        ("References", "<q@example.org> <p@example.org>"),
        ("X-Mailer", "Mutt"),
    )
    assert msg.body == MimeBody(b"Content-Type: text/plain; charset=us-ascii\r\n", b"body\r\n")
    # The envelope decides who gets it: an address not in To/Cc becomes Bcc, a Bcc header
    # address that is not an envelope recipient is dropped.
    routed = Message.from_bytes(raw, envelope=["bob@example.net", "frank@example.com"])
    assert [a.addr_spec for a in routed.bcc] == ["frank@example.com"]


def test_extra_headers_placement_per_rfc9788() -> None:
    """Encrypted: every extra field inside; threading, list and auto-reply fields also
    outside (with HP-Outer), the rest (X-Mailer, X-Cron-Env) only inside. Signed-only or
    unprotected: all outside too. Never Bcc anywhere."""
    msg = make(
        bcc=["hidden@example.com"],
        headers=[
            ("In-Reply-To", "<p@example.org>"),
            ("References", "<q@example.org> <p@example.org>"),
            ("List-Id", "<dev.example.org>"),
            ("Auto-Submitted", "auto-generated"),
            ("X-Mailer", "git-send-email 2.39.5"),
            ("X-Cron-Env", "<HOME=/root>"),
            ("X-Note", "Grüße"),
            ("Received", "from localhost by host; Wed, 6 May 2026 07:08:09 +0200"),
        ],
    )
    outer = message_head(msg, hp=HP.CIPHER)
    inner = build_payload(msg, hp=HP.CIPHER)
    inner_head = inner.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    for name in (b"In-Reply-To", b"References", b"List-Id", b"Auto-Submitted"):
        assert b"\r\n" + name + b": " in b"\r\n" + outer
        assert b"\r\nHP-Outer: " + name + b": " in inner_head
        assert b"\r\n" + name + b": " in inner_head
    for name in (b"X-Mailer", b"X-Cron-Env", b"X-Note"):
        assert name not in outer
        assert b"\r\n" + name + b": " in inner_head
        assert b"HP-Outer: " + name not in inner_head
    parsed = email.message_from_bytes(inner, policy=email.policy.default)
    assert parsed["X-Note"] == "Grüße"
    # A trace field is only outside, and not recorded in HP-Outer: nothing protects it.
    assert b"\r\nReceived: from localhost" in b"\r\n" + outer
    assert b"Received" not in inner
    for hp in (HP.CLEAR, None):
        head = message_head(msg, hp=hp)
        assert b"X-Mailer: git-send-email" in head and b"X-Cron-Env" in head
    for data in (outer, inner, message_head(msg, hp=None), build_payload(msg, hp=HP.CLEAR)):
        assert b"Bcc" not in data and b"hidden" not in data


@pytest.mark.parametrize(
    "name", ["From", "to", "BCC", "Subject", "Date", "Message-ID", "Content-Type", "HP-Outer"]
)
def test_structural_fields_are_not_extra_headers(name: str) -> None:
    with pytest.raises(MessageError, match="not an extra header"):
        make(headers=[(name, "x")])


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ([("X-A", "a\r\nBcc: evil@example.com")], "CR is not allowed"),
        ([("X-A", "nul\0")], "NUL is not allowed"),
        ([("X A", "space in name")], "invalid header field name"),
        ([("X-A:", "colon")], "invalid header field name"),
        ("X-A: b", "expected"),
        ([("X-A", "y" * 2000)], "unbreakable part longer than 998"),
    ],
)
def test_extra_headers_are_validated(headers: object, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        make(headers=headers)


def test_body_excludes_text_html_and_attachments() -> None:
    body = MimeBody.parse(b"Content-Type: text/plain\r\n\r\nhi\r\n")
    with pytest.raises(MessageError, match="not both"):
        make(body=body, text="also")
    with pytest.raises(MessageError, match="must be a MimeBody"):
        make(body=b"Content-Type: text/plain\r\n\r\nhi")
    with pytest.raises(MessageError, match="does not belong"):
        MimeBody(b"Content-Type: text/plain\r\nX-A: b\r\n", b"hi")
    with pytest.raises(MessageError, match="not canonical"):
        MimeBody(b"Content-Type: text/plain\r\n", "ü".encode())


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty"),
        (b"\n\nbody only\n", "no header"),
        (b"From: alice@example.org\nTo: bob@example.net\nthis is the body\n", "line 3 is not"),
        (b" continued\nFrom: alice@example.org\n\nx", "continuation line"),
        (b"From: alice@example.org\nTo: b@example.net\nSubject: a\rBcc: x@y.org\n\nx", "CR"),
        (
            b"From: alice@example.org\nTo: b@example.net\nContent-Type: text/plain\n"
            b"Content-Type: text/html\n\nx",
            "content-type appears more than once",
        ),
        (b"From: alice@example.org\nTo: bob@example.net\nX-A: a\0b\n\nx", "NUL"),
        (b"From: alice@example.org\nTo: bob@example.net\nSubject: \xff\xfe\n\nx", "UTF-8"),
        (b"From: a@example.org\nFrom: b@example.org\nTo: bob@example.net\n\nx", "more than once"),
        (b"From: a@example.org, b@example.org\nTo: bob@example.net\n\nx", "one address"),
        (b"From: root\nTo: bob@example.net\n\nx", "not a full address"),
        (b"To: bob@example.net\n\nx", "no From header"),
        (b"From: alice@example.org\nTo: root\n\nx", "not a full address"),
        (b"From: alice@example.org\nTo: bad <<\n\nx", "cannot read"),
        (b"From: alice@example.org\nSubject: no recipient\n\nx", "at least one recipient"),
        (b"From: alice@example.org\nTo: b@example.net\nDate: someday\n\nx", "cannot read the date"),
        (b"From: alice@example.org\nTo: b@example.net\nMessage-ID: <no at>\n\nx", "Message-ID"),
        (
            b"From: alice@example.org\nTo: b@example.net\nContent-Type: multipart/mixed\n\nx",
            "without a boundary",
        ),
        (
            "From: a@example.org\nTo: b@example.net\nContent-Type: multipart/mixed; "
            'boundary="ü"\n\n--ü\n\nx\n--ü--\n'.encode(),
            "invalid boundary",
        ),
        (
            b"From: alice@example.org\nTo: b@example.net\nContent-Type: multipart/mixed; b"
            b'oundary="q"\n\nno delimiter\n',
            "no part starts with the boundary",
        ),
    ],
)
def test_from_bytes_refuses_malformed_input_with_one_line(raw: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match) as info:
        Message.from_bytes(raw)
    assert "\n" not in str(info.value)


def test_from_bytes_sender_fills_a_missing_or_unqualified_from() -> None:
    msg = Message.from_bytes(
        b"From: root (Cron Daemon)\nTo: bob@example.net\n\nx", sender="c@h.org"
    )
    assert msg.sender.addr_spec == "c@h.org"
    msg = Message.from_bytes(b"To: bob@example.net\nSubject: s", sender="c@h.org")
    assert msg.sender.addr_spec == "c@h.org"
    assert msg.body == MimeBody(b"Content-Type: text/plain; charset=us-ascii\r\n", b"")
    # An 8-bit body without a Content-Type gets a charset that says what it is.
    msg = Message.from_bytes("To: bob@example.net\n\nGrüße\n".encode(), sender="c@h.org")
    assert msg.body is not None and b"charset=utf-8" in msg.body.head


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ('multipart/encrypted; protocol="application/pgp-encrypted"; boundary=x', "pgp-encrypted"),
        ('multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature"', "pgp-signed"),
        ('multipart/signed; protocol="application/pkcs7-signature"', "smime-signed"),
        ('multipart/signed; protocol="application/x-pkcs7-signature"', "smime-signed"),
        ("application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m", "smime-encrypted"),
        ("application/x-pkcs7-mime; name=smime.p7m", "smime-encrypted"),
        ("application/pkcs7-mime; smime-type=signed-data", "smime-signed"),
        ("multipart/encrypted; boundary=x", None),
        ("multipart/mixed; boundary=x", None),
        ("text/plain", None),
    ],
)
def test_existing_protection(content_type: str, expected: str | None) -> None:
    raw = f"From: a@example.org\nContent-Type: {content_type}\n\nbody\n".encode()
    assert existing_protection(raw) == expected
    assert existing_protection(b"not a message") is None


def _random_leaf(rng: random.Random) -> email.message.Message:
    kind = rng.choice(["text", "binary", "long", "from", "spaces", "qp", "b64"])
    chunks = [
        b"From here ", b"x" * rng.randint(0, 1500), "ünï".encode(), b" \t", b".", b"=",
        b"\n", b"\n", b"--", b"\xff\x00", b"plain words",
    ]  # fmt: skip
    content = b"".join(rng.choice(chunks) for _ in range(rng.randint(0, 12)))
    part = email.message.Message()
    if kind in ("binary", "b64"):
        part["Content-Type"] = "application/octet-stream"
        content = content.replace(b"\n", b"")
    else:
        part["Content-Type"] = "text/plain; charset=utf-8"
    if kind == "qp":
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(binascii.b2a_qp(content).replace(b"\n", b"\r\n").decode("ascii"))
    elif kind == "b64":
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(base64.b64encode(content).decode("ascii"))  # one long line
    else:
        part["Content-Transfer-Encoding"] = rng.choice(["7bit", "8bit", "binary"])
        part.set_payload(content.replace(b"\r", b"").decode("latin-1"))
    return part


def _random_tree(rng: random.Random, depth: int = 0) -> email.message.Message:
    if depth > 2 or rng.random() < 0.4:
        return _random_leaf(rng)
    node = email.message.Message()
    node["Content-Type"] = (
        f'multipart/{rng.choice(["mixed", "alternative"])}; boundary="b{depth}{rng.randint(0, 99)}"'
    )
    node.set_payload([_random_tree(rng, depth + 1) for _ in range(rng.randint(1, 3))])
    node.preamble = rng.choice(["", "preamble", "From preamble ", "ümlaut"])
    node.epilogue = rng.choice(["", "epilogue", "From x"])
    return node


def _flatten(node: email.message.Message) -> bytes:
    """A MIME tree as raw bytes, written out by hand (8-bit bodies as they are)."""
    head = "".join(f"{k}: {v}\n" for k, v in node.items()).encode()
    if node.is_multipart():
        boundary = node.get_boundary()
        assert boundary is not None
        body = (node.preamble or "").encode("latin-1")
        body += b"\n" if node.preamble else b""
        for child in node.get_payload():
            body += f"--{boundary}\n".encode() + _flatten(child) + b"\n"
        body += f"--{boundary}--\n".encode() + (node.epilogue or "").encode("latin-1")
        return head + b"\n" + body
    payload = node.get_payload()
    assert isinstance(payload, str)
    return head + b"\n" + payload.encode("latin-1")


@pytest.mark.parametrize("seed", range(60))
def test_random_mime_trees_keep_their_content(seed: int) -> None:
    """Random trees of 7bit/8bit/binary/QP/base64 leaves with hostile content: the
    canonical body is wire-safe, signs safely (no "From " line, no trailing whitespace),
    every part decodes to what it did, and canonicalising again changes nothing."""
    rng = random.Random(seed)
    raw = _flatten(_random_tree(rng))
    body = MimeBody.parse(raw)
    entity = body.head + b"\r\n" + body.body
    check_wire_safe(entity)
    for line in entity.split(b"\r\n"):
        assert not line.startswith(b"From ") and not line.endswith((b" ", b"\t")), line
    assert leaves(entity) == leaves(crlf(raw))
    assert MimeBody.parse(entity) == body


def test_a_finalized_message_is_finalized_as_itself() -> None:
    """Finalizing a message that already has its Date and Message-ID copies nothing (it is
    immutable, and its checks already ran): the mailer finalizes every message it sends."""
    message = Message(sender="a@example.org", to=["b@example.net"], subject="s", text="t")
    final = message.finalized()
    assert final is not message and final.message_id is not None and final.date is not None
    assert final.finalized() is final
    # The copy is the message with those two fields set, field for field.
    import dataclasses

    assert final == dataclasses.replace(message, date=final.date, message_id=final.message_id)
    assert message.date is None and message.message_id is None  # the original is unchanged


def test_seven_bit_text_is_judged_as_its_lines_are() -> None:
    """The one-match check of a whole text agrees with the line-by-line rule (a line over 76
    characters, one ending in white space, one starting with "." or "From ", or a non-ASCII
    character makes it quoted-printable)."""
    import itertools

    from e2email.message import _SEVEN_BIT_LINE, _seven_bit_body

    pieces = ["a", " ", "\t", ".", "From ", "\n", "é", "x" * 75, "F", "\x7f", "\x0b", "\x85"]
    for n in range(5):
        for parts in itertools.product(pieces, repeat=n):
            text = "".join(parts)
            lines = all(_SEVEN_BIT_LINE.fullmatch(line) for line in text.split("\n"))
            body = _seven_bit_body(text)
            assert (body is not None) == lines, repr(text)
            assert body is None or body == text.replace("\n", "\r\n").encode("ascii")


def test_the_seven_bit_check_needs_no_memory_per_line() -> None:
    """One match over a whole text keeps no backtracking point per line (review finding: 120
    bytes a line, a GB for 10 MB of blank lines)."""
    import tracemalloc

    from e2email.message import _SEVEN_BIT_SHAPE

    blank, short = b"\n" * 1_000_000, b"a\n" * 500_000
    tracemalloc.start()
    try:
        assert _SEVEN_BIT_SHAPE.fullmatch(blank)
        assert _SEVEN_BIT_SHAPE.fullmatch(short)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_a_sender_domain_too_long_for_a_message_id_says_so() -> None:
    domain = ".".join(["a" * 60] * 4) + ".example"
    message = Message(sender=f"a@{domain}", to=["b@example.net"], subject="s", text="t")
    with pytest.raises(MessageError, match="sender's domain is too long"):
        message.finalized()
