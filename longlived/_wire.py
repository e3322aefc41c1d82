"""The wire format: encoding responses, and checking requests before they touch the hub."""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from longlived._proto.longlived import Request, Response, ResponseKind
from longlived.hub import Kind, Position

__all__ = ["MAX_TOKEN_LENGTH", "MAX_TOPICS", "MAX_TOPIC_LENGTH", "check_request", "encode_message"]

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


def check_request(request: Request) -> None:
    """Raise INVALID_ARGUMENT, naming the problem, for a request no subscriber may make."""
    if request.id < 0:
        raise GRPCError(Status.INVALID_ARGUMENT, f"id must be >= 0, got {request.id}")
    if len(request.topics) > MAX_TOPICS:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"too many topics: {len(request.topics)} (at most {MAX_TOPICS})",
        )
    for topic in request.topics:
        if not 0 < len(topic) <= MAX_TOPIC_LENGTH:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"topic {topic[:40]!r} must be 1-{MAX_TOPIC_LENGTH} characters long",
            )
    if len(request.resume_token) > MAX_TOKEN_LENGTH:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"resume_token is {len(request.resume_token)} characters (at most {MAX_TOKEN_LENGTH})",
        )
