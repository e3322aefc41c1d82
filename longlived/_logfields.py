"""Structured fields on log lines: ``log.info(..., extra=fields(subscriber=7, peer=...))``.

The library configures no logging. The fields become attributes of the ``LogRecord``, under
the same names everywhere, so a JSON formatter (the CLI's ``--log-format json``, or an app's
own) writes them as keys beside the message; plain text lines show only the message.
"""

from __future__ import annotations

__all__ = ["fields"]


def fields(
    *,
    subscriber: int | None = None,
    peer: str | None = None,
    status: str | None = None,
    token: str | None = None,
    delay: float | None = None,
) -> dict[str, object]:
    """``extra=`` for a log call: the fields given (None and "" are left out).

    Args:
        subscriber: the subscription id.
        peer: the other end's address (``host:port``).
        status: a gRPC status name (``UNAUTHENTICATED``).
        token: a position: where a stream resumes from, or what a RESET carried.
        delay: seconds until the next attempt.
    """
    given = {
        "subscriber": subscriber,
        "peer": peer or None,
        "status": status or None,
        "token": token or None,
        "delay": round(delay, 3) if delay is not None else None,
    }
    return {name: value for name, value in given.items() if value is not None}
