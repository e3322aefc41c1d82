"""The wire format: encoding responses, and checking requests before they touch the hub."""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived._proto.longlived import Request, Response, ResponseKind
from longlived.events import Kind, Position

__all__ = [
    "HEARTBEAT_HEADER",
    "MAX_TOKEN_LENGTH",
    "MAX_TOPICS",
    "MAX_TOPIC_LENGTH",
    "NO_RETRY_HEADER",
    "check_request",
    "check_topics",
    "encode_message",
]

HEARTBEAT_HEADER = "longlived-heartbeat-ms"
"""Initial-metadata key: the heartbeat period the server granted, in milliseconds."""

NO_RETRY_HEADER = "longlived-no-retry"
"""Trailing-metadata key on a refusal that resending the same request cannot overcome."""

MAX_TOPICS = 256
MAX_TOPIC_LENGTH = 256
MAX_TOKEN_LENGTH = 256


def encode_message(kind: Kind, position: Position, data: str, topic: str) -> bytes:
    """One wire ``Response``: DATA, HEARTBEAT or RESET at ``position``."""
    return bytes(
        Response(
            data=data,
            seq=position.seq,
            token=position.token,
            kind=ResponseKind(kind.value),
            topic=topic,
        )
    )


def check_topics(topics: list[str]) -> str | None:
    """What is wrong with ``topics``, or None."""
    if len(topics) > MAX_TOPICS:
        return f"too many topics: {len(topics)} (at most {MAX_TOPICS})"
    for topic in topics:
        if not 0 < len(topic) <= MAX_TOPIC_LENGTH:
            return f"topic {topic[:40]!r} must be 1-{MAX_TOPIC_LENGTH} characters long"
    return None


_FIELD_TYPES: dict[str, type] = {
    "id": int,
    "resume_token": str,
    "heartbeat_ms": int,
    "accept_control": bool,
}


def _check_types(request: Request) -> None:
    # The decoder is lenient: bytes with the wrong wire type for a field can decode to a
    # value of the wrong Python type (a list for ``id``, None, ...).
    for name, kind in _FIELD_TYPES.items():
        value = getattr(request, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"malformed Request message: {name} is {value!r}"
            )
    topics = request.topics
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise GRPCError(Status.INVALID_ARGUMENT, "malformed Request message: topics")


def check_request(request: Request) -> None:
    """Raise INVALID_ARGUMENT, naming the problem, for a request no subscriber may make."""
    _check_types(request)
    if request.id < 0:
        raise GRPCError(Status.INVALID_ARGUMENT, f"id must be >= 0, got {request.id}")
    problem = check_topics(request.topics)
    if problem:
        raise GRPCError(Status.INVALID_ARGUMENT, problem)
    if request.heartbeat_ms < 0:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"heartbeat_ms must be >= 0, got {request.heartbeat_ms}"
        )
    if len(request.resume_token) > MAX_TOKEN_LENGTH:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"resume_token is {len(request.resume_token)} characters (at most {MAX_TOKEN_LENGTH})",
        )
