"""Golden check of e2email.message's output: the bytes of a varied set of messages, header
fields, addresses, texts and wire checks (and the errors refused ones give) must stay exactly
what they were before the module's fast paths were added.

The digests below were taken from the module as it was before any fast path (commit
6dd1924): each fast path (a plain header written without the general folding code, a plain
addr-spec checked by one pattern, a 7-bit text judged without a regex pass per line, the
Date rendered once) must produce what the general path produces, for what it takes and for
what it refuses. Boundaries are made deterministic; everything else is the module's own.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import itertools
import random
import re
from collections.abc import Callable, Iterator

import pytest

from e2email import message as message_module
from e2email.errors import MessageError
from e2email.message import (
    HP,
    Address,
    Attachment,
    Message,
    build_payload,
    check_wire_safe,
    message_head,
    render_header,
    stream_payload,
)

ZONES = [
    datetime.UTC,
    datetime.timezone(datetime.timedelta(hours=2)),
    datetime.timezone(datetime.timedelta(hours=-3, minutes=-30)),
    datetime.timezone(datetime.timedelta(hours=5, minutes=45)),
    datetime.timezone(datetime.timedelta(hours=-11)),
    datetime.timezone(datetime.timedelta(hours=1, seconds=30)),
    datetime.timezone(datetime.timedelta(minutes=-1)),
]
DATES = [
    datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=ZONES[1]),
    datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=ZONES[0]),
    datetime.datetime(2030, 2, 28, 0, 0, 0, tzinfo=ZONES[2]),
    datetime.datetime(2021, 7, 4, 12, 30, 1, tzinfo=ZONES[3]),
    datetime.datetime(2000, 1, 1, 1, 2, 3, tzinfo=ZONES[4]),
    datetime.datetime(2016, 2, 29, 13, 14, 15, tzinfo=ZONES[5]),
    datetime.datetime(987, 3, 9, 5, 6, 7, tzinfo=ZONES[6]),
    datetime.datetime(2024, 11, 3, 18, 0, 0, 123456, tzinfo=ZONES[0]),
]

TEXTS = [
    "",
    "Hello, world.",
    ("All work and no play makes Jack a dull boy.\n" * 100)[:4000],
    "x" * 76,
    "x" * 77,
    ("y" * 76 + "\n") * 3,
    "y" * 75 + " ",
    "trailing tab\t",
    "trailing space \nnext",
    "From me\nto you",
    "me\nFrom you",
    "From\nFromage\nfrom x",
    ".\n..\n.x",
    "x.\ny.",
    "\tleading tab\n\t",
    "bell\x07",
    "del\x7f",
    "vt\x0b ff\x0c",
    "é",
    "a\u2028b",
    "x" * 74 + "€👍🏽" * 30,
    "cr\rlf\ncrlf\r\nend\r",
    "\n\n\n",
    "\n",
    " \n",
    "a\n\n",
    "=?utf-8?q?x?= a=b",
]

SUBJECTS = [
    "",
    "one 1",
    "Re: [list] the meeting on Tuesday",
    "Grüße aus Köln",
    "日本語の件名" * 5,
    "a" * 80,
    "word " * 40,
    ("word " * 40).strip(),
    " leading space",
    "trailing space ",
    "double  space",
    "tab\there",
    "=?utf-8?q?looks_encoded?=",
    "x" * 69,
    "x" * 70,
    "x" * 71,
    "€" + "x" * 80,
    "a" * 1200,
]

NAMES = [
    "",
    "Alice",
    "Alice Example",
    "Example, Alice",
    'Alice "Al" Example',
    "Zoë Ünïcödé",
    "O'Brien",
    "a.b",
    "=?utf-8?q?x?=",
    "x" * 61,
    "名前 Name 名前",
    "  spaced   out  ",
]


def _boundaries() -> Iterator[str]:
    for n in itertools.count():
        yield f"=_e2email_golden{n:04d}"


def _messages() -> Iterator[tuple[str, Message]]:
    for i, text in enumerate(TEXTS):
        yield (
            f"text{i}",
            Message(
                sender="alice@example.org",
                to=["bob@example.net"],
                subject=f"one {i}",
                text=text,
                date=DATES[i % len(DATES)],
                message_id=f"text{i}@example.org",
            ),
        )
    for i, subject in enumerate(SUBJECTS):
        yield (
            f"subject{i}",
            Message(
                sender="Alice <alice@example.org>",
                to="bob@example.net",
                subject=subject,
                text="hi",
                date=DATES[i % len(DATES)],
                message_id=f"subject{i}@example.org",
            ),
        )
    for i, name in enumerate(NAMES):
        yield (
            f"name{i}",
            Message(
                sender=Address("alice@example.org", name),
                to=[Address("bob@example.net", name), "carol@Example.COM"],
                cc=[Address("dave@bücher.example", name)],
                bcc=["eve@example.net"],
                reply_to=[Address("list@example.org", name)],
                subject="names",
                text="hi",
                date=DATES[i % len(DATES)],
                message_id=f"name{i}@example.org",
            ),
        )
    many = [f"Person Number {n} <person{n}@example{n % 3}.org>" for n in range(12)]
    yield (
        "many",
        Message(
            sender="alice@example.org",
            to=many[:7],
            cc=many[7:],
            subject="to many",
            text="hi",
            html="<p>hi</p>",
            date=DATES[0],
            message_id="many@example.org",
        ),
    )
    yield (
        "bcc-only",
        Message(
            sender="alice@example.org",
            bcc=["bob@example.net", "carol@example.net"],
            subject="hidden",
            text="hi",
            date=DATES[1],
            message_id="bcc@example.org",
        ),
    )
    yield (
        "cc-only",
        Message(
            sender="alice@example.org",
            cc=["bob@example.net"],
            text="hi",
            date=DATES[2],
            message_id="cc@example.org",
        ),
    )
    yield (
        "headers",
        Message(
            sender="alice@example.org",
            to="bob@example.net",
            subject="threaded",
            text="reply\n",
            headers=[
                ("In-Reply-To", "<parent@example.org>"),
                ("References", " ".join(f"<ref{n}@example.org>" for n in range(12))),
                ("X-Mailer", "Grüß-Mailer 1.0"),
                ("List-Id", "Example list <list.example.org>"),
                ("Auto-Submitted", "auto-generated"),
                ("Autocrypt", "addr=alice@example.org; keydata=" + "A" * 200),
                ("Received", "from x by y; Mon, 6 May 2024 07:08:09 +0200"),
                ("X-Empty", ""),
                ("X-Tab", "a\tb"),
                ("X-Long", "w" * 300),
            ],
            date=DATES[3],
            message_id="headers@example.org",
        ),
    )
    yield (
        "attachments",
        Message(
            sender="alice@example.org",
            to="bob@example.net",
            subject="files",
            text="see attached\n",
            html="<p>see attached</p>",
            attachments=[
                Attachment("report.pdf", b"%PDF-1.4 " + bytes(range(256)) * 3, "application/pdf"),
                Attachment("Übersicht (final).txt", "ä\n".encode() * 50, "text/plain"),
                Attachment("x" * 120 + ".bin", b"\0" * 57),
                Attachment("a=?b?.dat", b""),
            ],
            date=DATES[4],
            message_id="attachments@example.org",
        ),
    )
    raw = (
        b"From: Alice <alice@example.org>\n"
        b"To: bob@example.net, BOB@EXAMPLE.NET\n"
        b"Cc: bob@example.net, Carol <carol@example.org>\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from\n a program\n"
        b"Date: Mon, 6 May 2024 07:08:09 +0200\n"
        b"Message-ID: <prog@example.org>\n"
        b"X-Cron-Env: <HOME=/root>\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n"
        b"caf\xc3\xa9 \nFrom here\n" + b"z" * 1200 + b"\n"
    )
    yield "from-bytes", Message.from_bytes(raw, envelope=["bob@example.net", "dan@example.org"])
    mixed = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: parts\r\n"
        b"Date: Tue, 7 May 2024 01:02:03 -0000\r\nMessage-ID: <mixed@example.org>\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nplain part\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\r\n--b1--\r\nepilogue\r\n"
    )
    yield "from-bytes-mixed", Message.from_bytes(mixed)


GOSSIP = [("Autocrypt-Gossip", "addr=bob@example.net; keydata=\r\n " + "B" * 70)]


def _payloads() -> Iterator[tuple[str, bytes]]:
    for name, msg in _messages():
        for hp in (None, HP.CLEAR, HP.CIPHER):
            for canonical in (True, False):
                key = f"{name}/{hp and hp.value}/{canonical}"
                stream = stream_payload(msg, hp=hp, canonical=canonical)
                yield f"{key}/stream", bytes(stream)
                yield f"{key}/stream-len", str(len(stream)).encode()
                yield f"{key}/build", build_payload(msg, hp=hp, canonical=canonical)
            yield f"{name}/{hp and hp.value}/head", message_head(msg, hp=hp)
        yield f"{name}/gossip", build_payload(msg, hp=HP.CIPHER, extra_fields=GOSSIP)


HEADERS = [
    ("Subject", ""),
    ("Subject", "plain"),
    ("SUBJECT", "Grüße"),
    ("comments", "x  y"),
    ("Subject", "x" * 69),
    ("Subject", "x" * 70),
    ("Subject", "x" * 71),
    ("Subject", "y " * 60),
    ("Subject", "a\tb"),
    ("Subject", "a\nb"),
    ("Subject", "=?x?="),
    ("X-A", "v" * 73),
    ("X-A", "v" * 74),
    ("X-A", "v" * 998),
    ("X-A", "v" * 999),
    ("X-A", "v " * 600),
    ("X-A", "a  b"),
    ("X-A", " a"),
    ("X-A", "a "),
    ("X-A", "a\tb"),
    ("X-A", "a\x7fb"),
    ("X-A", "a\x00b"),
    ("X-A", "a\rb"),
    ("X-A", "a\x85b"),
    ("X-A", "é"),
    ("X-A", ""),
    ("X-A", "\ud800"),
    ("X:A", "v"),
    ("X A", "v"),
    ("", "v"),
    ("X" * 76, "v"),
    ("X" * 77, "v"),
    ("Xé", "v"),
    ("Date", "Mon, 6 May 2024 07:08:09 +0200"),
    ("To", ", ".join(f"user{n}@example.org" for n in range(20))),
    ("Message-ID", "<" + "m" * 100 + "@example.org>"),
]

ADDRESSES = [
    "alice@example.org",
    "Alice@Example.ORG",
    " alice@example.org ",
    "<alice@example.org>",
    "Alice <alice@example.org>",
    '"Quoted, Name" <a@b.org>',
    '"a"@b.org',
    "a@b",
    "a@localhost",
    "a@b.c-d.org",
    "a@-b.org",
    "a@b-.org",
    "a@b..org",
    "a.@b.org",
    ".a@b.org",
    "a..b@b.org",
    "a@b.org.",
    "a@1.2.3.4",
    "a@b.123",
    "a@b.1x",
    "a@[1.2.3.4]",
    "a@xn--bcher-kva.example",
    "a@bücher.example",
    "A@Bücher.Example",
    "a@\uff42.org",  # fullwidth b: UTS #46 maps it to b
    "ü@b.org",
    "a b@c.org",
    "a@b@c.org",
    "a(comment)@b.org",
    "a@b.org,",
    "x" * 64 + "@b.org",
    "x" * 65 + "@b.org",
    "a@" + "l" * 63 + ".org",
    "a@" + "l" * 64 + ".org",
    "a@" + ".".join(["d" * 62] * 4) + ".org",
    "a@" + ".".join(["d" * 60] * 4) + ".org",
    "x" * 64 + "@" + ".".join(["d" * 61] * 3) + ".org",
    "x" * 64 + "@" + ".".join(["d" * 60] * 3) + ".org",
    "a+tag@b.org",
    "a@b_c.org",
    "",
    " ",
    "@b.org",
    "a@",
    "a",
    "a@b.org\n",
    "a\t@b.org",
    "a@b.org\x00",
    "a@b.org\u2028",
    "a@b.org>",
    "<a@b.org",
    "a@b.org <c@d.org>",
    "Name <a@b.org> trailing",
    "Na@me <a@b.org>",
    "é <a@b.org>",
    "grp: a@b.org;",
    "a@xn--.org",
    "a@0.org",
    "a@b.0",
    "a%b!c{d}e/f=g?h^i`j|k~l#m$n&o'p*q@c.org",
    "a\\b@c.org",
    "a@b\\.org",
    "a@.org",
    "a@ORG.",
    "user@sub.domain.co.uk",
    "\ud800@b.org",
    "a@b.org\u200b",
    "a@b.org\xa0x",
    "a@b.ORG" + " " * 3,
    "a@b.org" + "x" * 1000,
    "<>",
    "Name <>",
    "<a@b.org> <c@d.org>",
    "<<a@b.org>>",
    '"unterminated <a@b.org>',
    "a@b.-org",
    "a@B-C.D-E",
    "a-@b.org",
    "-a@b.org",
    "a@b.o-",
    "a@xn--ls8h.la",
    "a@☃.net",
    "a@b.org\ufeff",
    "a@" + "b." * 500 + "org",
    "a@" + "b." * 130 + "org",
    "a@" + "b." * 125 + "org",
    "x" * 64 + "@" + "b." * 94 + "org",
    "x" * 64 + "@" + "b." * 93 + "org",
    "A.B@C.D.E.F",
    "a@b.org.x1",
    "a@b.org.1",
]


def _addresses() -> Iterator[tuple[str, bytes]]:
    def outcome(make: Callable[[], Address]) -> bytes:
        try:
            address = make()
        except MessageError as exc:
            return f"error {exc.reason!r} {exc.field!r}".encode()
        shown = address.header_form()
        return f"ok {address.addr_spec!r} {address.display_name!r} {shown!r}".encode()

    for i, text in enumerate(ADDRESSES):
        yield f"parse{i}", outcome(lambda text=text: Address.parse(text))
        yield f"addr{i}", outcome(lambda text=text: Address(text))
        yield f"named{i}", outcome(lambda text=text: Address(text, "Some One"))
        yield (
            f"message{i}",
            outcome(lambda text=text: Message(sender=text, to=text, subject="x").sender),
        )
    for i, name in enumerate(NAMES):
        yield f"display{i}", outcome(lambda name=name: Address("a@b.org", name))


def _headers() -> Iterator[tuple[str, bytes]]:
    for i, (name, value) in enumerate(HEADERS):
        try:
            out = render_header(name, value)
        except MessageError as exc:
            out = f"error {exc.reason!r} {exc.field!r}".encode()
        yield f"header{i}", out
        try:
            msg = Message(
                sender="a@b.org",
                to="c@d.org",
                headers=[(name, value)],
                date=DATES[0],
                message_id="h@b.org",
            )
            out = message_head(msg, hp=None) + build_payload(msg, hp=HP.CIPHER)
        except MessageError as exc:
            out = f"error {exc.reason!r} {exc.field!r}".encode()
        yield f"extra{i}", out


WIRE = [
    b"",
    b"a\r\n",
    b"a\n",
    b"a\r",
    b"a\r\r\n",
    b"a\r\n\n",
    b"\n",
    b"\r",
    b"a\x00\r\n",
    b"a\x80\r\n",
    b"x" * 998 + b"\r\n",
    b"x" * 999 + b"\r\n",
    b"x" * 998,
    b"x" * 999,
    (b"y" * 76 + b"\r\n") * 200,
    (b"y" * 76 + b"\r\n") * 200 + b"z" * 999,
    (b"y" * 76 + b"\r\n") * 100 + b"\n" + (b"y" * 76 + b"\r\n") * 100,
    (b"y" * 76 + b"\r\n") * 100 + b"\r" + (b"y" * 76 + b"\r\n") * 100,
    b"\r\n" * 600 + b"w" * 998 + b"\r\n" + b"\r\n" * 3,
    b"x\ny\rz",
    b"x\ry\nz",
    b"\r\n\n\r",
    b"\r\n\r\r\n\n",
    b"\n\r",
    b"ab\r\n" * 50 + b"\rq\n",
]


def _wire() -> Iterator[tuple[str, bytes]]:
    for i, data in enumerate(WIRE):
        try:
            check_wire_safe(data)
            out = b"ok"
        except MessageError as exc:
            out = f"error {exc.reason!r} {exc.field!r}".encode()
        yield f"wire{i}", out


def _fuzz_label(rng: random.Random) -> str:
    size = rng.choice((1, 2, 5, 12, 62, 63, 64))
    label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(size))
    if rng.random() < 0.2:
        at = rng.randrange(len(label) + 1)
        label = label[:at] + rng.choice(["-", "--", "A", "Z", "_", "ü", "9", "xn--"]) + label[at:]
    return label


def _fuzz_address(rng: random.Random) -> str:
    words = [
        "".join(rng.choice("abcXYZ019+_-=%") for _ in range(rng.choice((1, 3, 8, 30))))
        for _ in range(rng.choice((1, 1, 2, 3)))
    ]
    left = ".".join(words)
    if rng.random() < 0.3:
        at = rng.randrange(len(left) + 1)
        weird = rng.choice([".", "..", '"', " ", "é", "(", ")", "<", ">", ",", ";", ":", "@", "\\"])
        left = left[:at] + weird + left[at:]
    right = ".".join(_fuzz_label(rng) for _ in range(rng.choice((1, 2, 2, 3, 4))))
    if rng.random() < 0.1:
        right = rng.choice(["", ".", "-", "[", "]", " ", "\t", "\x7f"]) + right
    if rng.random() < 0.1:
        right += rng.choice(["", ".", "-", "1", ".123", " ", ">", "\n"])
    text = f"{left}@{right}" if rng.random() < 0.95 else left + right
    if rng.random() < 0.1:
        text = rng.choice([" ", "  ", "\t"]) + text + rng.choice(["", " ", "\t"])
    if rng.random() < 0.2:
        text = f"{rng.choice(NAMES)} <{text}>"
    return text


def _fuzz() -> Iterator[tuple[str, bytes]]:
    """Seeded random addresses, header values and texts made of the characters the checks
    turn on, each run through the public API: its output or its error."""
    rng = random.Random(9)
    for i in range(2000):
        text = _fuzz_address(rng)
        for kind, make in (("parse", Address.parse), ("addr", Address)):
            try:
                address = make(text)
                out = f"ok {address.addr_spec!r} {address.display_name!r}".encode()
            except MessageError as exc:
                out = f"error {exc.reason!r} {exc.field!r}".encode()
            yield f"{kind}{i}", out
    chars = ["a", "b", "c", " ", " ", " ", "  ", ".", "From ", "F", "=?", "?=", "é", "\t", "\x7f"]
    weights = [10, 10, 10, 8, 1, 1, 1, 2, 1, 2, 1, 1, 1, 1, 0.3]
    for i in range(1500):
        size = rng.choice((0, 1, 4, 20, 40, 50, 60, 80))
        value = "".join(rng.choices(chars, weights, k=size))
        name = rng.choice(("Subject", "Comments", "X-Test", "To", "Date"))
        try:
            out = render_header(name, value)
        except MessageError as exc:
            out = f"error {exc.reason!r} {exc.field!r}".encode()
        yield f"header{i}", out
    pieces = ["", "a", "b c", " ", "\t", ".", "From ", "From", "é", "x" * 70, "y" * 38, "\r"]
    weights = [2, 10, 10, 2, 1, 2, 1, 1, 0.5, 2, 3, 0.5]
    for i in range(600):
        text = "\n".join(
            "".join(rng.choices(pieces, weights, k=rng.choice((1, 2, 3))))
            for _ in range(rng.choice((1, 2, 5)))
        )
        msg = Message(
            sender="a@b.org", to="c@d.org", text=text, date=DATES[0], message_id="f@b.org"
        )
        yield f"text{i}", build_payload(msg, hp=None)


GROUPS = {
    "payloads": _payloads,
    "addresses": _addresses,
    "headers": _headers,
    "wire": _wire,
    "fuzz": _fuzz,
}


def _digest(group: str) -> str:
    total = hashlib.sha256()
    for key, value in GROUPS[group]():
        total.update(key.encode() + b"\0" + hashlib.sha256(value).digest())
    return total.hexdigest()


GOLDEN = {
    "payloads": "3d174af8b28c6018302e7cfe1b8ef8c505365c7381695c5dc2f630be2d4e1ec1",
    "addresses": "0861a4c2a4bc376d162ba2fb9c7b29829d8ced1458abbf51a4ee4da9a4756c2e",
    "headers": "3a8ca6f240a6df68b7af6cab3dd8c39228a6e8b172273318619160d0cb4381cc",
    "wire": "c1e9c66cfbd1beb93603c21efc1894b4900b7a8be4ec34612b44b6353540125e",
    "fuzz": "4e21732f6d11c0405e431e2606f93f0e2a171ac50ed11ac4661340b8e4a56812",
}


@pytest.fixture
def fixed_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    boundaries = _boundaries()
    monkeypatch.setattr(message_module, "new_boundary", lambda: next(boundaries))


@pytest.mark.usefixtures("fixed_boundaries")
@pytest.mark.parametrize("group", sorted(GOLDEN))
def test_output_is_what_the_general_path_made(group: str) -> None:
    assert _digest(group) == GOLDEN[group]


def _address_texts() -> Iterator[str]:
    yield from ADDRESSES
    rng = random.Random(11)
    for _ in range(3000):
        yield _fuzz_address(rng)


def test_a_plain_addr_spec_is_judged_as_the_general_checks_judge_it() -> None:
    plain = 0
    for text in _address_texts():
        fast = message_module._plain_addr_spec(text)
        if fast is not None:
            plain += 1
            assert message_module._check_addr_spec(text) == fast, text
    assert plain > 500  # the corpus exercises the fast path, not only the general one
    assert message_module._plain_addr_spec("Alice.B+x@Mail.Example.ORG") == (
        "Alice.B+x@mail.example.org"
    )
    for text in ("a@b.org ", "<a@b.org>", "a@[1.2.3.4]", "a@b.123", "a@bücher.example"):
        assert message_module._plain_addr_spec(text) is None


def test_the_date_is_written_as_format_datetime_writes_it() -> None:
    zones: list[datetime.tzinfo] = [*ZONES]
    for minutes in range(-1439, 1440, 7):
        zones.append(datetime.timezone(datetime.timedelta(minutes=minutes)))
    zones.append(datetime.timezone(datetime.timedelta(hours=-2, seconds=-1)))
    zones.append(datetime.timezone(datetime.timedelta(microseconds=1)))
    zones.append(datetime.timezone(-datetime.timedelta(microseconds=1)))
    try:
        import zoneinfo

        for key in ("Europe/Berlin", "America/St_Johns", "Asia/Kathmandu", "Pacific/Chatham"):
            zones.append(zoneinfo.ZoneInfo(key))
    except (ImportError, zoneinfo.ZoneInfoNotFoundError):
        pass  # no time zone database here: the fixed offsets still cover the arithmetic
    rng = random.Random(5)
    seconds = int(datetime.timedelta(days=3_600_000).total_seconds())
    start = datetime.datetime(1, 1, 2)
    for zone in zones:
        for _ in range(40):
            moment = start + datetime.timedelta(seconds=rng.randrange(seconds))
            date = moment.replace(tzinfo=zone)
            assert message_module._date_text(date) == email.utils.format_datetime(date)


def _header_pairs() -> Iterator[tuple[object, object]]:
    yield from HEADERS
    yield from ((1, "v"), ("X-A", 1), (b"X-A", "v"), ("X-A", b"v"))
    rng = random.Random(13)
    chars = ["a", "b", " ", "  ", ":", "\t", "\x7f", "\x00", "é", "=?", "\r\n", "x" * 20]
    for _ in range(3000):
        name = rng.choice(("Subject", "subject", "Comments", "X-Test", "To", "X:Y", "X Y", ""))
        if rng.random() < 0.1:
            name = "N" * rng.choice((60, 75, 76, 77))
        value = "".join(
            rng.choices(chars, [30, 30, 12, 1, 1, 1, 1, 1, 1, 1, 1, 4], k=rng.randrange(40))
        )
        yield name, value


def test_a_one_line_header_is_what_the_general_path_writes() -> None:
    fast_count = 0
    for name, value in _header_pairs():
        try:
            message_module._check_header(name, value)  # type: ignore[arg-type]
            general: bytes | str = (
                "\r\n".join(message_module._header_lines(name, value)) + "\r\n"  # type: ignore[arg-type]
            ).encode("ascii")
        except MessageError as exc:
            general = f"error {exc.reason!r} {exc.field!r}"
        try:
            rendered: bytes | str = render_header(name, value)  # type: ignore[arg-type]
        except MessageError as exc:
            rendered = f"error {exc.reason!r} {exc.field!r}"
        assert rendered == general, (name, value)
        if isinstance(name, str) and isinstance(value, str):
            fast = message_module._one_line_header(name, value)
            if fast is not None:
                fast_count += 1
                assert fast == general, (name, value)
    assert fast_count > 300
    assert message_module._one_line_header("Subject", "Hello there") == b"Subject: Hello there\r\n"


def _old_wire_check(data: bytes) -> None:
    """check_wire_safe as it was written before its bare CR/LF scan was made cheaper (three
    counts, then one alternation for the offset): the reference for the fast scan."""
    if b"\0" in data:
        raise MessageError(f"NUL byte at offset {data.index(0)}", field="message")
    if not data.isascii():
        raise MessageError("8-bit", field="message")
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        bare = re.search(rb"\r(?!\n)|(?<!\r)\n", data)
        offset = bare.start() if bare else -1
        raise MessageError(f"bare CR or LF at offset {offset}", field="message")
    if any(len(line) > 998 for line in data.split(b"\r\n")):
        raise MessageError("long", field="message")


def test_the_wire_check_refuses_what_it_refused() -> None:
    rng = random.Random(17)
    pieces = [b"a", b"bc", b"\r", b"\n", b"\r\n", b"\r\n", b"x" * 300, b"\x00", b"\x80", b"."]
    weights = [20, 20, 2, 2, 10, 10, 3, 0.2, 0.2, 2]
    seen = set()
    for _ in range(4000):
        data = b"".join(rng.choices(pieces, weights, k=rng.randrange(1, 30)))
        try:
            _old_wire_check(data)
            expected = "ok"
        except MessageError as exc:
            expected = exc.reason
        try:
            check_wire_safe(data)
            got = "ok"
        except MessageError as exc:
            got = exc.reason
        if expected in ("8-bit", "long"):
            assert got.startswith(("8-bit byte", "a line of")), data
        else:
            assert got == expected, data
        seen.add(got.partition(" at ")[0])
    assert {"ok", "bare CR or LF", "NUL byte"} <= seen


def test_a_message_s_header_fields_are_worked_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A send makes the payload (with its HP-Outer record of the outer fields) and the outer
    head of one message: the Date is written once and the outer fields made once."""
    calls: dict[str, int] = {"date": 0, "outer": 0, "protected": 0}

    def counted(name: str, function: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object) -> object:
            calls[name] += 1
            return function(*args)

        return wrapper

    for name, attribute in (
        ("date", "_date_text"),
        ("outer", "_make_outer_fields"),
        ("protected", "_make_protected_fields"),
    ):
        monkeypatch.setattr(
            message_module, attribute, counted(name, getattr(message_module, attribute))
        )
    msg = Message(sender="alice@example.org", to="bob@example.net", subject="s", text="t")
    final = msg.finalized()
    payload = build_payload(final, hp=HP.CIPHER)
    head = message_head(final, hp=HP.CIPHER)
    build_payload(final, hp=HP.CIPHER, extra_fields=GOSSIP)
    assert calls == {"date": 1, "outer": 1, "protected": 1}
    assert b"HP-Outer: Subject: [...]\r\n" in payload and b"Subject: [...]\r\n" in head
    # The same message signed only: its own outer fields (the Subject is not hidden).
    assert b"Subject: s\r\n" in message_head(final, hp=HP.CLEAR)
    assert calls == {"date": 1, "outer": 2, "protected": 1}


def test_what_is_worked_out_once_follows_the_message() -> None:
    """Every message renders its own fields: a finalized copy, a replaced one, and one whose
    Date or Message-ID was set anew after it was rendered."""
    import dataclasses

    first = Message(
        sender="alice@example.org",
        to="bob@example.net",
        subject="first",
        date=DATES[0],
        message_id="one@example.org",
    )
    assert b"Subject: first\r\n" in message_head(first, hp=HP.CLEAR)
    second = dataclasses.replace(first, subject="second", message_id="two@example.org")
    head = message_head(second, hp=HP.CLEAR)
    assert b"Subject: second\r\n" in head and b"<two@example.org>" in head
    assert b"Subject: first\r\n" in message_head(first, hp=HP.CLEAR)
    # finalized() fills in what is missing on a copy: the copy renders its own values.
    partial = dataclasses.replace(first, message_id=None)
    final = partial.finalized()
    assert final.message_id != "one@example.org"
    assert f"<{final.message_id}>".encode() in message_head(final, hp=None)
    # Date and Message-ID are what the rendered fields were made for: set anew (as only
    # finalized() does, on its copy), they are rendered anew.
    object.__setattr__(final, "date", DATES[1])
    object.__setattr__(final, "message_id", "three@example.org")
    head = message_head(final, hp=None)
    assert b"Date: Fri, 31 Dec 1999 23:59:59 +0000\r\n" in head
    assert b"<three@example.org>" in head


# -- Review findings (rev5-t) ------------------------------------------------------------------

_FIXED_DATE = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


class _Subject(str, __import__("enum").Enum):  # a way programs keep subjects as constants
    REPORT = "Monthly report"


class _Shown(str):
    """A str whose __str__ (what an f-string writes) is not its characters."""

    def __str__(self) -> str:
        return "hi\r\nBcc: spy@evil.example"


class _EvilName(str):
    def __str__(self) -> str:
        return "X-A: v\r\nBcc: spy@evil.example\r\nX-B"


def test_a_str_subclass_is_written_as_its_characters_never_as_its_str() -> None:
    assert render_header("Subject", _Subject.REPORT) == b"Subject: Monthly report\r\n"
    assert render_header("X-Tag", _Shown("hello")) == b"X-Tag: hello\r\n"
    assert render_header(_EvilName("X-A"), "v") == b"X-A: v\r\n"
    assert message_module._hp_outer("X-Tag", _Shown("hello")) == b"HP-Outer: X-Tag: hello\r\n"
    m = Message(
        sender="a@b.org",
        to=["c@d.org"],
        subject=_Shown("hello"),
        text="x",
        headers=[("X-Tag", _Shown("hello")), (_EvilName("X-A"), "v")],
        date=_FIXED_DATE,
        message_id="m@b.org",
    )
    assert type(m.subject) is str and all(type(n) is str and type(v) is str for n, v in m.headers)
    for hp in (None, HP.CLEAR, HP.CIPHER):
        assert b"Bcc" not in message_head(m, hp=hp)
        assert b"Bcc" not in build_payload(m, hp=HP.CLEAR if hp is None else hp)
    assert b"Subject: Monthly report\r\n" in message_head(
        Message(sender="a@b.org", to=["c@d.org"], subject=_Subject.REPORT, text="x").finalized(),
        hp=None,
    )


def test_a_rendered_message_pickles_and_copies_without_its_worked_out_fields() -> None:
    import copy
    import pickle

    m = Message(
        sender="a@b.org", to=["c@d.org"], subject="Hi", text="x", date=_FIXED_DATE,
        message_id="m@b.org",
    )  # fmt: skip
    head = message_head(m, hp=HP.CIPHER)
    assert "_fields" in vars(m)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        again = pickle.loads(pickle.dumps(m, protocol=protocol))
        assert again == m and "_fields" not in vars(again)
        assert message_head(again, hp=HP.CIPHER) == head
    for made in (copy.copy(m), copy.deepcopy(m)):
        assert "_fields" not in vars(made) and message_head(made, hp=HP.CIPHER) == head


def test_an_overlong_address_is_refused_before_the_plain_pattern_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Refuse:
        def fullmatch(self, text: str) -> None:
            raise AssertionError("the plain-address pattern ran over an overlong text")

    monkeypatch.setattr(message_module, "_PLAIN_ADDR", Refuse())
    with pytest.raises(MessageError):
        Address.parse("a" * 300 + "@b.org")
    with pytest.raises(MessageError):
        Address.parse("a." * 50_000 + "!")
