"""Errors raised by longlived.

::

    LonglivedError
    ├── ConfigError          invalid settings (names the variable and what is allowed)
    ├── ListenError          a listener (gRPC or metrics) cannot start; also an OSError
    ├── SubscriptionClosed   the server ended the stream with a status that is not retried
    ├── PublishRefused       the server refused a publish with a status that is not retried
    ├── ResumeExpired        the server could not resume: events were lost, resync (RESET)
    ├── TlsError             the server's certificate failed verification (not retried)
    ├── RetriesExhausted     the client or publisher gave up retrying (``backoff.max_attempts``
    │                        failures, or a publish's retries outlasting ``publish.dedup_window``)
    ├── LogUnavailable       the shared event log (Redis) cannot be reached right now
    └── StateFull            a put of a new key would exceed ``state.max_keys``
"""

from __future__ import annotations

import os

__all__ = [
    "ConfigError",
    "ListenError",
    "LogUnavailable",
    "LonglivedError",
    "PublishRefused",
    "ResumeExpired",
    "RetriesExhausted",
    "StateFull",
    "SubscriptionClosed",
    "TlsError",
]


class LonglivedError(Exception):
    """Base class of every error longlived raises."""


class ConfigError(LonglivedError, ValueError):
    """A setting has a value that is not allowed; the message names it."""


class ListenError(LonglivedError, OSError):
    """A listener could not start (its port is in use, say): ``SubscriptionManager.start``
    raises it, naming the address and which listener; ``errno`` is the original's.

    Attributes:
        address: the ``host:port`` it could not listen on.
        listener: which one: ``"gRPC"`` or ``"metrics"``.
    """

    def __init__(self, address: str, listener: str, cause: OSError) -> None:
        reason = os.strerror(cause.errno).lower() if cause.errno else str(cause)
        super().__init__(cause.errno, f"cannot listen on {address} ({listener}): {reason}")
        self.address = address
        self.listener = listener

    def __str__(self) -> str:
        return str(self.strerror)


class SubscriptionClosed(LonglivedError):
    """The server ended a subscription with a status the client does not retry.

    Attributes:
        status: the gRPC status name (for example ``"PERMISSION_DENIED"``).
        detail: the status message the server sent, if any.
    """

    def __init__(self, status: str, detail: str | None = None) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {detail}" if detail else status)


class PublishRefused(LonglivedError):
    """The server refused a publish with a status that resending it cannot change.

    For example ``PERMISSION_DENIED`` (the caller is not in ``auth.publishers``),
    ``UNAUTHENTICATED``, ``INVALID_ARGUMENT`` (the message names the problem),
    ``RESOURCE_EXHAUSTED`` marked not to be retried (the event exceeds
    ``limits.max_event_size``) or ``UNIMPLEMENTED`` (a server without the Publish RPC, such
    as the original example's). The refused attempt emitted nothing (an earlier attempt of
    the same publish, whose answer was lost on the way, may have).

    Attributes:
        status: the gRPC status name (for example ``"PERMISSION_DENIED"``).
        detail: the status message the server sent, if any.
    """

    def __init__(self, status: str, detail: str | None = None) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {detail}" if detail else status)


class ResumeExpired(LonglivedError):
    """The server sent RESET: events this subscriber should have received are gone.

    The resume position was older than the server's history, malformed or from before a
    server restart, or events were dropped because the subscriber was too slow (``drop``
    policy). The app must resync its state (re-read whatever the events describe), then
    iterate the client again: it carries on from ``token`` with live events.

    Attributes:
        token: the position the subscription continues from.
        reason: why the server could not deliver the missed events.
    """

    def __init__(self, token: str, reason: str) -> None:
        self.token = token
        self.reason = reason
        super().__init__(f"resync needed: {reason}")


class RetriesExhausted(LonglivedError):
    """The client or publisher failed ``attempts`` times in a row and stopped retrying.

    Attributes:
        attempts: how many attempts failed.
        last: the failure of the last one.
    """

    def __init__(self, attempts: int, last: BaseException | None) -> None:
        self.attempts = attempts
        self.last = last
        super().__init__(f"gave up after {attempts} failed attempts: {last!r}")


class TlsError(LonglivedError):
    """TLS verification failed (wrong CA, wrong name, expired certificate): not retried."""


class LogUnavailable(LonglivedError):
    """The shared event log (Redis) cannot be reached right now.

    A publish that raised it may have been appended anyway (a command that timed out after
    Redis took it): retry it with the same idempotency key, which emits it once.
    """


class StateFull(LonglivedError):
    """A put of a new key was refused: the keyed state holds ``state.max_keys`` keys.

    Nothing was emitted. Delete keys, or raise the limit.
    """
