"""grpclib plumbing in one place: the pass-through codec and the server's HTTP/2 settings."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import grpclib.server
from grpclib.encoding.base import CodecBase
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes

if TYPE_CHECKING:
    from grpclib._typing import IServable
    from grpclib.config import Configuration

__all__ = ["GrpcServer", "PassThroughCodec"]

log = logging.getLogger(__name__)


class PassThroughCodec(CodecBase):
    """Protobuf codec that sends ``bytes`` as they are, so an event is encoded only once."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        if not isinstance(message, message_type):
            raise TypeError(f"Message must be of type {message_type!r}, not {type(message)!r}")
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return message_type.FromString(data)


class _Protocol(H2Protocol):
    """grpclib's protocol with a raised MAX_CONCURRENT_STREAMS and a registry of live peers."""

    max_streams: int = 100
    registry: set[_Protocol]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # h2 advertises 100 by default: a client's 101st stream on one connection would hang.
        self.connection._connection.update_settings(
            {SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams}
        )
        self.connection.flush()
        self.registry.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.registry.discard(self)
        super().connection_lost(exc)

    def goaway(self) -> None:
        """Tell the peer no new streams will be accepted, then close the connection."""
        if self.connection.is_closing():
            return
        self.connection._connection.close_connection()
        self.connection.flush()
        self.connection.close()


class GrpcServer(grpclib.server.Server):
    """A grpclib ``Server`` that advertises ``max_streams`` and can close its connections."""

    def __init__(
        self,
        handlers: Collection[IServable],
        *,
        max_streams: int,
        config: Configuration | None = None,
    ) -> None:
        super().__init__(handlers, codec=PassThroughCodec(), config=config)
        self._max_streams = max_streams
        self._protocols: set[_Protocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        base = super()._protocol_factory()
        proto = _Protocol(base.handler, base.config, base.h2_config)
        proto.max_streams = self._max_streams
        proto.registry = self._protocols
        return proto

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._protocols)

    def goaway_all(self) -> None:
        """Send GOAWAY on and close every open connection."""
        for proto in list(self._protocols):
            proto.goaway()
