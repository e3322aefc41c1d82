"""How the client side reaches a server: its channel, its credentials, what is worth retrying.

Shared by ``ResilientClient`` and ``Publisher``, so both connect, authenticate, retry and
describe failures the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from longlived._transport import ResilientChannel, grpc_config
from longlived.settings import Settings, parse_address
from longlived.tls import client_context

__all__ = [
    "RETRYABLE_ERRORS",
    "RETRYABLE_STATUSES",
    "call_metadata",
    "describe",
    "open_channel",
    "pause",
]

RETRYABLE_STATUSES = frozenset({Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED})
"""Statuses after which a call is made again instead of given up (``RESOURCE_EXHAUSTED``
only without the server's no-retry trailer)."""

RETRYABLE_ERRORS = (StreamTerminatedError, ProtocolError, OSError, TimeoutError)
"""Failures of the connection or of an attempt's time limit: worth another attempt."""


def open_channel(settings: Settings) -> ResilientChannel:
    """A channel to ``settings.address`` with its TLS and keepalive settings."""
    host, port = parse_address(settings.address)
    return ResilientChannel(
        host,
        port,
        ssl=client_context(settings.tls),
        config=grpc_config(settings.keepalive, server_name=settings.tls.server_name),
    )


def call_metadata(settings: Settings, metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` plus the bearer token of ``settings.auth.token`` (unless it has one)."""
    result = dict(metadata or {})
    if settings.auth.token is not None:
        result.setdefault("authorization", f"Bearer {settings.auth.token}")
    return result


async def pause(
    sleep: Callable[[float], Awaitable[object]], delay: float, stop: asyncio.Event
) -> None:
    """``sleep(delay)``, or less if ``stop`` is set meanwhile."""
    sleeper = asyncio.ensure_future(sleep(delay))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        stopper.cancel()


def describe(error: BaseException) -> str:
    """A failure in a few words, for a log line."""
    if isinstance(error, GRPCError):
        return f"stream ended with {error.status.name} ({error.message})"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
