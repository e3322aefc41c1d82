"""The orchestrator's side of a child process: start it, step it, always clean it up."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.sharedctypes
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["SLACK", "Child", "ChildError", "children", "shared_counter"]

SLACK = 10.0
"""Extra seconds the orchestrator waits beyond a child's own timeout before giving up."""

_CONTEXT = multiprocessing.get_context("spawn")
_LIVE: set[Child] = set()


class ChildError(RuntimeError):
    """A child failed, exited, or did not answer in time."""


class Child:
    """A child process and the orchestrator's end of its pipe.

    The child's first message is ``("hello", setup)``: what pinning and limits it achieved.
    """

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.counter: Any = None
        """Shared memory a server child keeps its last published index in (reconnect)."""
        self.conn, child_end = _CONTEXT.Pipe()
        self.process: BaseProcess = _CONTEXT.Process(
            target=target, args=(child_end, *args), name=f"bench-{name}", daemon=True
        )
        self.process.start()
        _LIVE.add(self)
        child_end.close()
        (self.setup,) = self.expect("hello", 60.0)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, *command: object) -> None:
        try:
            self.conn.send(command)
        except OSError as exc:
            raise ChildError(f"{self.name}: cannot send {command[0]!r}: {exc}") from exc

    def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        """The answer ``kind`` with its values; raises on timeout, error or anything else."""
        try:
            ready = self.conn.poll(timeout)
        except OSError as exc:
            raise ChildError(f"{self.name}: pipe closed ({exc})") from None
        if not ready:
            raise ChildError(f"{self.name}: no {kind!r} within {timeout:.0f}s")
        try:
            message: tuple[Any, ...] = self.conn.recv()
        except EOFError:
            raise ChildError(f"{self.name} exited (code {self.process.exitcode})") from None
        if message[0] == "error":
            raise ChildError(f"{self.name} failed:\n{message[1]}")
        if message[0] != kind:
            raise ChildError(f"{self.name}: expected {kind!r}, got {message!r}")
        return message[1:]

    def ask(self, kind: str, timeout: float, *command: object) -> tuple[Any, ...]:
        """Send ``command`` and wait for the answer ``kind``."""
        self.send(*command)
        return self.expect(kind, timeout)

    def kill(self) -> float:
        """kill -9, as a crash would; returns when it died (``time.monotonic()``)."""
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10.0)
        died = time.monotonic()
        self.close()
        return died

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; terminate (then kill) it if it does not."""
        _LIVE.discard(self)
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):  # the child may have closed its end
                self.conn.send(("exit",))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()


def shared_counter() -> Any:
    """An integer in shared memory: a server child keeps its last published index there."""
    return _CONTEXT.Value("q", 0, lock=False)


@contextlib.contextmanager
def children() -> Iterator[None]:
    """Close every child started inside, whatever happens (errors, Ctrl-C)."""
    try:
        yield
    finally:
        for child in list(_LIVE):
            child.close(timeout=5.0)
