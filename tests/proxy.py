"""A loopback TCP proxy for client tests: it holds new connections and cuts open ones."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

CHUNK = 65_536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side, and the server's once it is open."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    armed: bool = False
    """Cut at the next chunk the server sends."""
    muted: bool = False
    """Drop what the server sends instead of forwarding it."""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        """Drop both sides at once, unsent bytes and all, as a failing network does."""
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``.

    ``freeze()`` stops reading from the server until ``thaw()``. ``hold()`` keeps new
    connections accepted but unforwarded until ``release()`` (a client
    then waits in its connect, as behind a TLS server that is slow to answer); ``cut()``
    cuts every open connection in the middle of the next chunk the server sends on it:
    part of the chunk is forwarded, then both sides are aborted, so the client is left
    with a partial HTTP/2 frame. ``mute()`` drops whatever the server sends on the open
    connections from then on, as answers lost on the way are.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.accepted = 0
        """Connections accepted from clients."""
        self.cuts = 0
        """Connections cut mid-chunk."""
        self._links: set[_Link] = set()
        self._released = asyncio.Event()
        self._released.set()
        self._changed = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def hold(self) -> None:
        """Accept new connections but forward nothing until ``release()``."""
        self._released.clear()

    def release(self) -> None:
        """Forward held and new connections."""
        self._released.set()

    async def until(self, *, accepted: int = 0, cuts: int = 0) -> None:
        """Wait until at least ``accepted`` connections were accepted and ``cuts`` cut."""
        while self.accepted < accepted or self.cuts < cuts:
            self._changed.clear()
            await self._changed.wait()

    async def cut(self) -> None:
        """Cut every open connection at the next chunk from the server; wait for a cut."""
        for link in self._links:
            link.armed = True
        await self.until(cuts=self.cuts + 1)

    def freeze(self) -> None:
        """Stop reading what the server sends (as a client whose process is stopped): its
        writes back up into the socket buffers and then its flow-control windows."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward what the server sends again."""
        self._flowing.set()

    def mute(self) -> None:
        """Forward nothing more the server sends on the open connections (new ones are not
        muted): requests still reach the server, its answers never reach the client."""
        for link in self._links:
            link.muted = True

    def abort_all(self) -> None:
        """Drop every connection."""
        for link in self._links:
            link.abort()

    async def wait_closed(self) -> None:
        """Wait until every connection has been closed."""
        for link in list(self._links):
            await link.done.wait()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one client connection until either side closes it or it is cut."""
        link = _Link(writer)
        self._links.add(link)
        self.accepted += 1
        self._changed.set()
        try:
            await self._released.wait()
            up_reader, link.server = await asyncio.open_connection(*self.upstream)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._up(reader, link))
                tasks.create_task(self._down(up_reader, link))
        except* OSError:
            pass  # a reset: the connection is gone either way
        finally:
            link.abort()
            self._links.discard(link)
            link.done.set()
            self._changed.set()

    async def _up(self, reader: asyncio.StreamReader, link: _Link) -> None:
        assert link.server is not None
        while chunk := await reader.read(CHUNK):
            link.server.write(chunk)
            await link.server.drain()
        link.abort()  # one side closed: the other read ends too

    async def _down(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while (await self._flowing.wait()) and (chunk := await reader.read(CHUNK)):
            if link.muted:
                continue
            if link.armed:
                # never the whole chunk, and a different share each time: 1/3, 2/3, all but
                # the last byte (the last frame is then always incomplete)
                keep = (len(chunk) - 1) * (self.cuts % 3 + 1) // 3
                link.client.transport.set_write_buffer_limits(high=0)
                link.client.write(chunk[:keep])
                await link.client.drain()  # into the socket: the abort would discard it
                self.cuts += 1
                break
            link.client.write(chunk)
            await link.client.drain()
        link.abort()


@contextlib.asynccontextmanager
async def proxy_to(upstream: tuple[str, int]) -> AsyncIterator[tuple[Proxy, int]]:
    """A running ``Proxy`` to ``upstream`` and the loopback port it listens on."""
    proxy = Proxy(upstream)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = await asyncio.start_server(proxy.handle, sock=sock)
    try:
        yield proxy, port
    finally:
        server.close()
        proxy.release()
        proxy.abort_all()
        async with asyncio.timeout(5):
            await proxy.wait_closed()
            await server.wait_closed()
