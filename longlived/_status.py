"""Call outcomes without gRPC types: the status codes, and the error that carries one.

The core and the call layer speak these; the transport turns them into grpclib's.
"""

from __future__ import annotations

import enum

__all__ = ["CallError", "Code"]


class Code(enum.IntEnum):
    """gRPC status codes (the values are the wire's)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class CallError(Exception):
    """A call refused or ended with ``code`` and a message that names the problem.

    Attributes:
        code: the status.
        message: what is wrong, for the peer and the log.
        final: sending the same request again can never succeed (the peer is told not to).
    """

    def __init__(self, code: Code, message: str, *, final: bool = False) -> None:
        self.code = code
        self.message = message
        self.final = final
        super().__init__(f"{code.name}: {message}")
