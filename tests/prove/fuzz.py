"""Hostile input against the port: seeded random cases, each on a connection of its own,
against a server process, while a canary subscriber receives a numbered sequence.

Each case checks the answer the protocol has for it:

- ``garbage`` (bytes that are not HTTP/2), ``frame-garbage`` (random bytes after a valid
  preface), ``mutated`` (a valid call with bytes flipped, inserted or cut out) and
  ``truncated`` (a valid call cut short): the server closes the connection once the peer
  has finished sending (a GOAWAY first where it found an error);
- ``bad-frame``: frames HTTP/2 defines as connection errors get GOAWAY with the RFC 9113
  error code; frames it says to ignore (unknown types, PRIORITY, unknown settings) leave
  the connection working (a PING is answered);
- ``message``: Subscribe, Unsubscribe and Publish with random, mutated, compressed,
  oversized, truncated, missing or valid bodies get exactly the status of the README's
  "Limits and bad input" table (a valid Subscribe opens);
- ``metadata``: up to 2 MB of request metadata: within the limit the call opens, over it
  RESOURCE_EXHAUSTED, over the 1 MiB HPACK cannot skip the connection is dropped; and
  malformed headers (bad ``grpc-timeout``, content-type, ``te``, method, path) get the
  HTTP or gRPC status gRPC defines for them;
- ``abandon``: up to 150 streams opened and left without their request, then the
  connection aborted, closed or every stream reset: past ``max_pending_streams`` (100) the
  streams are refused at once with RESOURCE_EXHAUSTED;
- ``rapid-reset``: streams opened and reset at once, thousands of them (GOAWAY
  ENHANCE_YOUR_CALM) or a few (the connection carries on).

After every batch: the server process is alive, a fresh subscription on a new connection
receives, the canary has every number so far with no gap, and the server holds no more
tasks, file descriptors, subscribers or connections than before the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import betterproto2
from grpclib.client import Channel

from longlived import Request, Settings
from longlived._proto.longlived import PublishRequest
from longlived._status import CallError, Code
from longlived._wire import check_publish, check_request, decode_request
from longlived.settings import LimitSettings
from tests.chaos.harness import Child
from tests.h2peer import (
    CONTINUATION,
    DATA,
    END_STREAM,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    RawPeer,
    frame,
    header_frames,
    request_headers,
)
from tests.helpers import Subscription, receive, subscription
from tests.prove.probe import WAIT, Resources, sample, server, settle

__all__ = ["KINDS", "Fuzz", "fuzz"]

CANARY, PROBE = 2_000_000_000, 2_000_000_001
"""Subscriber ids of the canary and of the fresh subscription after each batch."""
RESERVED = {CANARY, PROBE}
TOPIC = "canary"
TICK = 0.01
"""Seconds between two numbers of the canary's sequence."""

ANSWER = 20.0
"""Bound on the server's answer to one case (it may be busy with the previous one)."""

LIMITS = LimitSettings()
METADATA_LIMIT = LIMITS.max_metadata_size
HARD_LIMIT = 1 << 20
"""Decoded header block size at which the server drops the connection."""

# RFC 9113 error codes
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x1, 0x3, 0x6
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB


class Broken(AssertionError):
    """The server did not answer the way the protocol says."""


# ---------------------------------------------------------------------------- helpers


def _ending(peer: RawPeer) -> str:
    goaway = peer.goaway()
    return f"GOAWAY {goaway.error_code:#x}" if goaway is not None else "closed"


async def _closes(peer: RawPeer) -> str:
    """Finish sending; the server must close the connection."""
    peer.half_close()
    async with asyncio.timeout(ANSWER):
        await peer.until(lambda _: False)
    return _ending(peer)


async def _answered(peer: RawPeer, done: Callable[[RawPeer], bool], what: str) -> None:
    try:
        async with asyncio.timeout(ANSWER):
            if not await peer.until(done):
                raise Broken(f"{what}: the connection closed first ({_ending(peer)})")
    except TimeoutError:
        raise Broken(f"{what}: no answer within {ANSWER:g}s") from None


async def _alive(peer: RawPeer, what: str) -> None:
    """The connection still works: two PINGs, one after the other, are answered (h2 answers
    a PING before grpclib handles the frames that came with it)."""
    for opaque in (b"first   ", b"second  "):
        peer.write(frame(PING, 0, opaque))
        await _answered(peer, lambda p, opaque=opaque: p.pinged(opaque), what)  # type: ignore[misc]  # bound default
    if peer.goaway() is not None:
        raise Broken(f"{what}: GOAWAY {peer.goaway()}")


def _call(method: str, body: bytes | None, *, stream_id: int = 1, **extra: str) -> bytes:
    """HEADERS of a call to ``method`` and its body, the stream ended after it."""
    headers = header_frames(stream_id, request_headers(method, **extra), end_stream=body is None)
    if body is None:
        return headers
    return headers + frame(DATA, stream_id, body, flags=END_STREAM)


def _prefixed(data: bytes, *, compressed: bool = False, size: int | None = None) -> bytes:
    return struct.pack(">?I", compressed, len(data) if size is None else size) + data


def _text(rng: random.Random, most: int) -> str:
    alphabet = "abcxyz019:-_ /é\u2603\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, most)))


def _request(rng: random.Random) -> Request:
    """A Subscribe/Unsubscribe request: valid or not, as chance has it."""
    return Request(
        id=rng.choice([rng.randint(0, 2**31 - 1), rng.randint(0, 99), -rng.randint(1, 9)]),
        resume_token=rng.choice(
            ["", _text(rng, 30), f"{rng.getrandbits(64):x}:{rng.randint(0, 9)}", "x" * 300]
        ),
        topics=[_text(rng, 12) for _ in range(rng.choice([0, 0, 1, 3, 300]))],
        heartbeat_ms=rng.choice([0, 0, 50, rng.randint(1, 2**32 - 1)]),
        accept_control=rng.random() < 0.5,
        snapshot=rng.random() < 0.2,
    )


def _publish(rng: random.Random) -> PublishRequest:
    return PublishRequest(
        data=_text(rng, 40),
        topic=rng.choice(["", "fuzz", _text(rng, 10), "t" * 300]),
        to=rng.choice([None, None, rng.randint(-3, 2**31 - 1)]),
        idempotency_key=rng.choice(["", _text(rng, 20), "k" * 300]),
        key=rng.choice(["", "", _text(rng, 8)]),
        delete=rng.random() < 0.1,
    )


Oracle = tuple[type[Any], int, Callable[[Any], None]]
"""A method's request type, its size limit and its request check."""

METHODS: dict[str, Oracle] = {
    "/longlived.Longlived/Subscribe": (Request, LIMITS.max_message_size, check_request),
    "/protos.Longlived/Subscribe": (Request, LIMITS.max_message_size, check_request),
    "/longlived.Longlived/Unsubscribe": (Request, LIMITS.max_message_size, check_request),
    "/longlived.Longlived/Publish": (PublishRequest, LIMITS.max_event_size, check_publish),
}


def expected(method: str, body: bytes | None) -> tuple[str, betterproto2.Message | None]:
    """What the server answers ``body`` on ``method`` (a status name, or ``open`` for a
    subscription it starts), and the request it reads, if it reads one."""
    message_type, limit, check = METHODS[method]
    if not body:
        return "INVALID_ARGUMENT", None  # no message
    if len(body) < 5:
        return "INVALID_ARGUMENT", None  # truncated prefix
    compressed, size = struct.unpack(">?I", body[:5])
    if compressed:
        return "UNIMPLEMENTED", None
    if size > limit:
        return "RESOURCE_EXHAUSTED", None
    if len(body) - 5 < size:
        return "INVALID_ARGUMENT", None  # truncated request
    try:
        request = decode_request(body[5 : 5 + size], message_type, max_size=limit)
        check(request)
    except CallError as exc:
        return exc.code.name, None
    if method.endswith("Subscribe"):
        return "open", request
    return ("NOT_FOUND" if method.endswith("Unsubscribe") else "OK"), request


def _harmless(request: betterproto2.Message | None) -> bool:
    """Whether a request the server accepts leaves the canary and the probe alone."""
    if isinstance(request, Request):
        return request.id not in RESERVED and TOPIC not in request.topics
    if isinstance(request, PublishRequest):
        return request.to not in RESERVED and request.topic != TOPIC
    return True


# ------------------------------------------------------------------------------ cases


async def garbage(settings: Settings, rng: random.Random) -> str:
    peer = await RawPeer.connect(settings, preface=False)
    try:
        data = bytearray(rng.randbytes(rng.randint(1, 4096)))
        if data[:1] == b"P":  # not the start of the preface
            data[0] = 0
        peer.write(bytes(data))
        return await _closes(peer)
    finally:
        peer.close()


async def frame_garbage(settings: Settings, rng: random.Random) -> str:
    peer = await RawPeer.connect(settings)
    try:
        peer.write(rng.randbytes(rng.randint(1, 4096)))
        return await _closes(peer)
    finally:
        peer.close()


def _valid_call(rng: random.Random) -> bytes:
    request = _request(rng)
    while not _harmless(request):
        request = _request(rng)
    return frame(SETTINGS) + _call("/longlived.Longlived/Subscribe", _prefixed(bytes(request)))


async def mutated(settings: Settings, rng: random.Random) -> str:
    data = bytearray(_valid_call(rng))
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        how = rng.choice(["flip", "insert", "cut"])
        if how == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif how == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[at : at + rng.randint(1, 16)]
    peer = await RawPeer.connect(settings, preface=False)
    try:
        peer.write(PREFACE + bytes(data))
        ending = await _closes(peer)
        return ending + (", a status" if peer.status(1) is not None else "")
    finally:
        peer.close()


async def truncated(settings: Settings, rng: random.Random) -> str:
    data = _valid_call(rng)
    peer = await RawPeer.connect(settings, preface=False)
    try:
        peer.write(PREFACE + data[: rng.randrange(len(data))])
        return await _closes(peer)
    finally:
        peer.close()


def _settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, b"".join(struct.pack(">HI", key, value) for key, value in pairs))


WINDOW_UPDATE, PRIORITY, PUSH_PROMISE, ALTSVC = 0x8, 0x2, 0x5, 0xA

# fmt: off
CONNECTION_ERRORS: list[tuple[str, bytes, int]] = [
    ("INITIAL_WINDOW_SIZE over 2^31-1", _settings((0x4, 2**31)), FLOW_CONTROL_ERROR),
    ("MAX_FRAME_SIZE under 16384", _settings((0x5, 100)), PROTOCOL_ERROR),
    ("MAX_FRAME_SIZE over 2^24-1", _settings((0x5, 2**24)), PROTOCOL_ERROR),
    ("ENABLE_PUSH 2", _settings((0x2, 2)), PROTOCOL_ERROR),
    ("SETTINGS of 5 bytes", frame(SETTINGS, 0, bytes(5)), FRAME_SIZE_ERROR),
    ("SETTINGS on a stream", frame(SETTINGS, 1, b""), PROTOCOL_ERROR),
    ("WINDOW_UPDATE of 0", frame(WINDOW_UPDATE, 0, struct.pack(">I", 0)), PROTOCOL_ERROR),
    ("connection window past 2^31-1", frame(WINDOW_UPDATE, 0, struct.pack(">I", 2**31 - 1)),
     FLOW_CONTROL_ERROR),
    ("DATA on stream 0", frame(DATA, 0, b"abc"), PROTOCOL_ERROR),
    ("PING of 7 bytes", frame(PING, 0, bytes(7)), FRAME_SIZE_ERROR),
    ("PING on a stream", frame(PING, 1, bytes(8)), PROTOCOL_ERROR),
    ("PUSH_PROMISE from a client", frame(PUSH_PROMISE, 1, bytes(4), flags=0x4), PROTOCOL_ERROR),
    ("CONTINUATION without HEADERS", frame(CONTINUATION, 1, b"", flags=0x4), PROTOCOL_ERROR),
    ("HEADERS on an even stream", header_frames(2, request_headers()), PROTOCOL_ERROR),
    ("DATA on an idle stream", frame(DATA, 7, b"abc"), PROTOCOL_ERROR),
    ("RST_STREAM on an idle stream", frame(RST_STREAM, 5, struct.pack(">I", 0)), PROTOCOL_ERROR),
    ("a frame over MAX_FRAME_SIZE", frame(DATA, 1, bytes(16_385)), FRAME_SIZE_ERROR),
]
# fmt: on
"""Frames RFC 9113 makes connection errors, and the GOAWAY error code it gives each."""


def _ignored(rng: random.Random) -> tuple[str, bytes]:
    """A frame RFC 9113 says to ignore (or to take without complaint)."""
    kind = rng.choice([0x0C, 0x10, rng.randint(0x0B, 0xFF)])  # ORIGIN, PRIORITY_UPDATE, any
    return rng.choice([
        (f"unknown frame type {kind:#x}",
         frame(kind, rng.choice([0, 1, 3]), rng.randbytes(rng.randint(0, 64)),
               flags=rng.getrandbits(8))),
        ("PRIORITY", frame(PRIORITY, rng.choice([1, 3, 9]), struct.pack(">IB", 0, 15))),
        ("unknown SETTINGS", _settings((rng.randint(0x10, 0xFFFF), rng.getrandbits(32)))),
        ("ALTSVC", frame(ALTSVC, 0, b"\x00\x00h2=\":1\"")),
    ])  # fmt: skip


async def bad_frame(settings: Settings, rng: random.Random) -> str:
    peer = await RawPeer.connect(settings)
    try:
        if rng.random() < 0.5:
            name, data, code = rng.choice(CONNECTION_ERRORS)
            peer.write(data)
            await _answered(peer, lambda p: p.goaway() is not None, name)
            goaway = peer.goaway()
            assert goaway is not None
            if goaway.error_code != code:
                raise Broken(f"{name}: GOAWAY {goaway.error_code:#x}, not {code:#x}")
            await _closes(peer)
            return f"{name}: GOAWAY"
        name, data = _ignored(rng)
        peer.write(data)
        await _alive(peer, name)
        return "ignored"
    finally:
        peer.close()


def _body(rng: random.Random, method: str) -> bytes | None:
    """A request body for ``method``, of one of the kinds the server must tell apart."""
    limit = METHODS[method][1]
    valid = bytes(_publish(rng) if method.endswith("Publish") else _request(rng))
    kind = rng.choice(["random", "mutated", "compressed", "oversized", "short", "prefix",
                       "none", "valid", "valid", "trailing"])  # fmt: skip
    if kind == "random":
        return _prefixed(rng.randbytes(rng.randint(0, 512)))
    if kind == "mutated":
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.getrandbits(8)
        return _prefixed(bytes(data))
    if kind == "compressed":
        return _prefixed(valid, compressed=True)
    if kind == "oversized":  # judged from the prefix: the body need not come
        return _prefixed(valid, size=rng.randint(limit + 1, 2**32 - 1))
    if kind == "short":
        return _prefixed(valid, size=len(valid) + rng.randint(1, 100))
    if kind == "prefix":
        return _prefixed(valid)[: rng.randint(1, 4)]
    if kind == "none":
        return None
    if kind == "trailing":  # one request, then bytes no call reads
        return _prefixed(valid) + rng.randbytes(rng.randint(1, 64))
    return _prefixed(valid)


async def message(settings: Settings, rng: random.Random) -> str:
    method = rng.choice(list(METHODS))
    body = _body(rng, method)
    answer, request = expected(method, body)
    while not _harmless(request):
        body = _body(rng, method)
        answer, request = expected(method, body)
    peer = await RawPeer.connect(settings)
    try:
        peer.write(_call(method, body))
        what = f"{method} {body[:40] if body else body!r}"
        if answer == "open":
            await _answered(peer, lambda p: 1 in p.headers, what)
            status = peer.status(1)
            if status is not None:
                raise Broken(f"{what}: {Code(status).name}, expected it to open")
            peer.write(frame(RST_STREAM, 1, struct.pack(">I", CANCEL)))
            return f"{method.rsplit('/', 1)[1]} open"
        await _answered(peer, lambda p: p.status(1) is not None, what)
        got = Code(peer.status(1) or 0).name
        allowed = {answer, "OK"} if answer == "NOT_FOUND" else {answer}  # a fuzzed id may be open
        if got not in allowed:
            raise Broken(f"{what}: {got}, expected {answer}")
        return f"{method.rsplit('/', 1)[1]} {got}"
    finally:
        peer.close()


BAD_HEADERS: list[tuple[str, dict[str, str | None], tuple[str, str]]] = [
    ("grpc-timeout garbage", {"grpc-timeout": "soon"}, ("grpc-status", "2")),
    ("content-type text/html", {"content-type": "text/html"}, (":status", "415")),
    ("no content-type", {"content-type": None}, (":status", "415")),
    ("no te", {"te": None}, (":status", "400")),
    ("GET", {":method": "GET"}, (":status", "405")),
    ("unknown path", {":path": "/no.Such/Method"}, ("grpc-status", "12")),
    ("empty path", {":path": ""}, ("grpc-status", "12")),
    ("path ending in a space", {":path": "/longlived.Longlived/Subscribe "}, ("grpc-status", "12")),
]
"""Malformed request headers, and the field of the answer gRPC (or grpclib) gives each."""


def _headers(changes: dict[str, str | None]) -> list[tuple[str, str]]:
    headers = dict(request_headers())
    headers.update({name: value for name, value in changes.items() if value is not None})
    return [(name, value) for name, value in headers.items() if changes.get(name, "") is not None]


def _metadata_size(headers: list[tuple[str, str]]) -> int:
    return sum(len(name) + len(value) + 32 for name, value in headers)  # RFC 7541 4.1


async def metadata(settings: Settings, rng: random.Random) -> str:
    body = _prefixed(bytes(Request(id=rng.randint(0, 99))))
    peer = await RawPeer.connect(settings)
    try:
        if rng.random() < 0.3:
            name, changes, (field_, value) = rng.choice(BAD_HEADERS)
            peer.write(header_frames(1, _headers(changes)) + frame(DATA, 1, body, flags=END_STREAM))
            await _answered(peer, lambda p: 1 in p.headers, name)
            got = peer.headers[1].get(field_.encode(), b"").decode()
            if got != value:
                raise Broken(f"{name}: {field_} {got!r}, expected {value!r} ({peer.headers[1]})")
            return name
        while True:  # a size clear of the two limits' edges
            size = int(2 ** rng.uniform(7, 21))
            if abs(size - METADATA_LIMIT) > 512 and abs(size - HARD_LIMIT) > 65_536:
                break
        count = max(1, min(rng.choice([1, 10, 1000]), size // 64))
        headers = request_headers() + [(f"x-m{n}", "v" * (size // count)) for n in range(count)]
        total = _metadata_size(headers)
        peer.write(header_frames(1, headers) + frame(DATA, 1, body, flags=END_STREAM))
        if total > HARD_LIMIT:
            await _closes(peer)
            return "over 1 MiB: dropped"
        await _answered(peer, lambda p: 1 in p.headers, f"{total} bytes of metadata")
        status = peer.status(1)
        if total > METADATA_LIMIT:
            if status != Code.RESOURCE_EXHAUSTED.value:
                raise Broken(f"{total} bytes of metadata: status {status}, not RESOURCE_EXHAUSTED")
            return "over the limit: RESOURCE_EXHAUSTED"
        if status is not None:
            raise Broken(f"{total} bytes of metadata: status {status}, expected it to open")
        return "within the limit: open"
    finally:
        peer.close()


async def abandon(settings: Settings, rng: random.Random) -> str:
    """Streams left without their request; past the pending limit they are refused."""
    count = rng.randint(1, 150)
    peer = await RawPeer.connect(settings)
    try:
        ids = [2 * n + 1 for n in range(count)]
        for stream_id in ids:
            part = _prefixed(bytes(Request(id=rng.randint(0, 99))))[: rng.randint(0, 4)]
            peer.write(header_frames(stream_id, request_headers()))
            if part:
                peer.write(frame(DATA, stream_id, part))  # a start, never the end
        refused = ids[LIMITS.max_pending_streams :]
        if refused:
            await _answered(peer, lambda p: all(p.status(i) is not None for i in refused),
                            f"{count} streams awaiting their request")  # fmt: skip
            codes = {peer.status(i) for i in refused}
            if codes != {Code.RESOURCE_EXHAUSTED.value}:
                raise Broken(f"{count} pending streams: the ones past the limit got {codes}")
        held = [i for i in ids if peer.status(i) is not None and i not in refused]
        if held:
            raise Broken(f"streams within the pending limit were answered: {held[:5]}")
        ending = rng.choice(["abort", "close", "reset"])
        if ending == "reset":
            peer.write(b"".join(frame(RST_STREAM, i, struct.pack(">I", CANCEL)) for i in ids))
        if ending != "abort":
            await _closes(peer)
        return f"{ending}, " + ("those past the limit refused" if refused else "within the limit")
    finally:
        peer.close()


async def rapid_reset(settings: Settings, rng: random.Random) -> str:
    """Streams opened and reset at once: thousands get GOAWAY, a few do not. The server's
    answers are read while the resets go out, and the resets stop at its GOAWAY: a server
    that closes a socket with unread bytes in it resets the connection, and a reset
    discards what the peer had not read yet."""
    many = rng.random() < 0.5
    count = rng.randint(2_500, 4_000) if many else rng.randint(1, 200)
    peer = await RawPeer.connect(settings)
    try:
        async with asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(peer.until(lambda p: p.goaway() is not None))
            stream_id = 1
            with contextlib.suppress(ConnectionError):
                while stream_id < 2 * count and not reading.done():
                    chunk = []
                    for _ in range(min(100, count - stream_id // 2)):
                        chunk.append(header_frames(stream_id, request_headers()))
                        chunk.append(frame(RST_STREAM, stream_id, struct.pack(">I", CANCEL)))
                        stream_id += 2
                    peer.write(b"".join(chunk))
                    await peer.writer.drain()
            if not many:
                reading.cancel()
            else:
                async with asyncio.timeout(ANSWER):
                    await reading
        if not many:
            await _alive(peer, f"{count} resets")
            return "a few: carries on"
        goaway = peer.goaway()
        if goaway is None:
            if not peer.reset_by_server:
                raise Broken(f"{count} resets: closed without GOAWAY")
            return "thousands: reset before its GOAWAY was read"
        if goaway.error_code != ENHANCE_YOUR_CALM:
            raise Broken(f"{count} resets: GOAWAY {goaway.error_code:#x}")
        return "thousands: GOAWAY ENHANCE_YOUR_CALM"
    finally:
        peer.close()


Case = Callable[[Settings, random.Random], Awaitable[str]]

KINDS: dict[str, tuple[Case, int]] = {
    "garbage": (garbage, 3),
    "frame-garbage": (frame_garbage, 3),
    "mutated": (mutated, 6),
    "truncated": (truncated, 3),
    "bad-frame": (bad_frame, 5),
    "message": (message, 12),
    "metadata": (metadata, 5),
    "abandon": (abandon, 2),
    "rapid-reset": (rapid_reset, 1),
}
"""Each kind of case and its weight."""


# ------------------------------------------------------------------------------- a run


@dataclass
class Canary:
    """A subscriber on a connection of its own that must get every number, once, in order."""

    stream: Subscription
    last: int = -1
    received: int = 0
    gaps: list[str] = field(default_factory=list)
    longest: float = 0.0
    """The longest time between two numbers, seconds."""

    async def run(self) -> None:
        previous = time.monotonic()
        while (response := await self.stream.recv_message()) is not None:
            n = int(response.data)
            now = time.monotonic()
            if self.last >= 0 and n != self.last + 1:
                self.gaps.append(f"{n} after {self.last}")
            if self.last >= 0:
                self.longest = max(self.longest, now - previous)
            self.last, previous = n, now
            self.received += 1
        self.gaps.append(f"the stream ended after {self.last}")


@dataclass
class Fuzz:
    """A whole run."""

    seed: int
    cases: int = 0
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    baseline: Resources | None = None
    after: Resources | None = None
    canary: Canary | None = None
    rss_kb: list[int] = field(default_factory=list)
    """The server's RSS after each batch."""
    objects: list[int] = field(default_factory=list)
    ticked: int = 0
    seconds: float = 0.0

    def problems(self) -> list[str]:
        found = list(self.failures)
        if self.canary is not None:
            found += [f"canary: {gap}" for gap in self.canary.gaps]
            if self.canary.last != self.ticked - 1:
                found.append(f"canary: last {self.canary.last}, {self.ticked} ticked")
        return found


async def _check(
    child: Child, settings: Settings, canary: Canary, baseline: Resources
) -> Resources:
    """After a batch: alive, a fresh call works, the canary moves, nothing is held."""
    if child.proc.returncode is not None:
        raise Broken(f"the server exited with {child.proc.returncode}")
    seen = canary.received
    channel = Channel(settings.host, settings.port)
    try:
        async with subscription(channel, Request(id=PROBE, topics=[TOPIC])) as probe:
            await receive(probe, 1, timeout=WAIT)
    finally:
        channel.close()
    async with asyncio.timeout(WAIT):
        while canary.received <= seen and not canary.gaps:  # noqa: ASYNC110  # its own clock
            await asyncio.sleep(TICK)
    if canary.gaps:
        raise Broken(f"canary: {canary.gaps[0]}")
    return await settle(child, baseline)


async def fuzz(*, cases: int = 20_000, seed: int = 1, batch: int = 50, only: str = "") -> Fuzz:
    """One run of ``cases`` cases; see the module docstring."""
    run = Fuzz(seed)
    rng = random.Random(seed)
    kinds = [name for name in KINDS if only in name]
    weights = [KINDS[name][1] for name in kinds]
    async with server() as (child, settings):
        channel = Channel(settings.host, settings.port)
        try:
            async with (
                subscription(channel, Request(id=CANARY, topics=[TOPIC])) as stream,
                asyncio.TaskGroup() as tasks,
            ):
                await child.ask("tick", topic=TOPIC, interval=TICK)
                canary = run.canary = Canary(stream)
                listening = tasks.create_task(canary.run())
                await receive_first(canary)
                run.baseline = await sample(child)
                start = time.monotonic()
                for n in range(cases):
                    kind = rng.choices(kinds, weights)[0]
                    case_seed = rng.getrandbits(32)
                    try:
                        async with asyncio.timeout(ANSWER * 2):
                            label = await KINDS[kind][0](settings, random.Random(case_seed))
                    except (Broken, TimeoutError, OSError) as exc:
                        run.failures.append(f"{kind} (case seed {case_seed}): {exc!r}")
                        label = "FAILED"
                    run.outcomes.setdefault(kind, Counter())[label] += 1
                    run.cases += 1
                    if n % batch == batch - 1 or n == cases - 1:
                        checked = await _check(child, settings, canary, run.baseline)
                        run.rss_kb.append(checked.rss_kb)
                        run.objects.append(checked.objects)
                run.seconds = time.monotonic() - start
                run.ticked = int(str((await child.ask("untick"))["ticked"]))
                with contextlib.suppress(TimeoutError):  # a short canary is reported
                    async with asyncio.timeout(WAIT):
                        while canary.last < run.ticked - 1:  # noqa: ASYNC110  # its own clock
                            await asyncio.sleep(TICK)
                listening.cancel()
            run.after = await sample(child)
        finally:
            channel.close()
    return run


async def receive_first(canary: Canary) -> None:
    async with asyncio.timeout(WAIT):
        while not canary.received:  # noqa: ASYNC110  # the ticker is another process's clock
            await asyncio.sleep(TICK)
