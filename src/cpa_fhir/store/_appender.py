"""`SqlRepository.append` done by a child process, for a server on an event loop.

Recording a disclosure (its AuditEvent's search index and the rows it adds)
costs as much interpreter time as serving the read it records. The child
process does that work on another core, with its own connection: the server
only serialises the records and waits, on its event loop, for the child to say
they are committed. Batches go one at a time over a socket pair, each a
length-prefixed JSON frame:

    server -> child   {"url": ..., "schema": ...}              (once, first)
    child  -> server  {"ready": true} | {"error": "..."}
    server -> child   {"at": ISO instant, "resources": [...]}  (one transaction)
    child  -> server  {"stored": n} | {"error": "..."}

The child stamps meta.lastUpdated with the server's `at`, so records read the
same whichever process stored them. If the child dies, the batch in flight
fails (the server cannot know whether it was committed) and the next batch
starts a new child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

_LENGTH = struct.Struct("!I")
_STARTUP_SECONDS = 60.0
# Run by import, not `-m`: the package imports this module before `-m` would run it.
_CHILD = "import sys; from cpa_fhir.store._appender import run_child; run_child(int(sys.argv[1]))"


class AppendFailed(Exception):
    """The batch may or may not be stored: the child could not say (it stopped)."""


class AppendRejected(Exception):
    """The child rolled the batch back: nothing of it is stored."""


class ProcessAppender:
    """Appends batches of new records through a child process (see the module docstring).

    One batch is in flight at a time: callers serialise their calls (the audit
    batcher flushes one batch after another).
    """

    def __init__(self, url: str, schema: str | None) -> None:
        self._config = orjson.dumps({"url": url, "schema": schema})
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._ready = False

    @staticmethod
    def supported() -> bool:
        return os.name == "posix"

    def start(self) -> None:
        """Start the child now (it starts on first use otherwise)."""
        with self._lock:
            if self._process is None:
                ours, theirs = socket.socketpair()
                try:
                    self._process = subprocess.Popen(
                        [sys.executable, "-c", _CHILD, str(theirs.fileno())],
                        pass_fds=(theirs.fileno(),),
                        stdin=subprocess.DEVNULL,
                    )
                finally:
                    theirs.close()
                ours.sendall(_frame(self._config))
                ours.setblocking(False)
                self._socket = ours
                self._ready = False

    async def append(self, resources: Sequence[dict[str, Any]], at: datetime) -> int:
        """Store the records in one transaction in the child; how many were stored."""
        self.start()
        sock = self._socket
        assert sock is not None
        try:
            if not self._ready:
                reply = await asyncio.wait_for(_receive(sock), _STARTUP_SECONDS)
                if "error" in reply:
                    raise AppendFailed(f"the audit writer could not start: {reply['error']}")
                self._ready = True
            payload = orjson.dumps({"at": at.isoformat(), "resources": resources})
            await asyncio.get_running_loop().sock_sendall(sock, _frame(payload))
            reply = await _receive(sock)
        except AppendFailed:
            self._stop()
            raise
        except (TimeoutError, OSError, asyncio.CancelledError, ValueError) as exc:
            # The exchange broke off part-way: the channel cannot be trusted again.
            self._stop()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise AppendFailed(f"the audit writer stopped: {exc or type(exc).__name__}") from exc
        if "error" in reply:
            raise AppendRejected(str(reply["error"]))
        return int(reply["stored"])

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            process, sock = self._process, self._socket
            self._process = self._socket = None
        if sock is not None:
            sock.close()  # the child reads end-of-file and exits
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


async def _receive(sock: socket.socket) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    header = await _exactly(loop, sock, _LENGTH.size)
    body = await _exactly(loop, sock, _LENGTH.unpack(header)[0])
    reply = orjson.loads(body)
    if not isinstance(reply, dict):
        raise ValueError("the audit writer's reply is not an object")
    return reply


async def _exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    parts: list[bytes] = []
    while size:
        part = await loop.sock_recv(sock, min(size, 1 << 20))
        if not part:
            raise OSError("the audit writer closed its end")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


# -- the child --------------------------------------------------------------------------


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts: list[bytes] = []
    while size:
        part = sock.recv(min(size, 1 << 20))
        if not part:
            return None
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _read_frame(sock: socket.socket) -> bytes | None:
    header = _read_exactly(sock, _LENGTH.size)
    return None if header is None else _read_exactly(sock, _LENGTH.unpack(header)[0])


def serve(sock: socket.socket) -> None:
    """Answer batches until the server closes its end."""
    from cpa_fhir.store._repository import SqlRepository

    config = _read_frame(sock)
    if config is None:
        return
    try:
        settings = orjson.loads(config)
        repo = SqlRepository(settings["url"], schema=settings["schema"], migrate=False)
    except Exception as exc:  # reported to the server, which fails the batch
        sock.sendall(_frame(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})))
        return
    stamp: list[datetime] = []
    repo.clock = lambda: stamp[0]
    sock.sendall(_frame(orjson.dumps({"ready": True})))
    try:
        while (frame := _read_frame(sock)) is not None:
            try:
                batch = orjson.loads(frame)
                stamp[:] = [datetime.fromisoformat(batch["at"])]
                reply: dict[str, Any] = {"stored": repo.append(batch["resources"])}
            except Exception as exc:  # rolled back; the server retries or fails the batch
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sock.sendall(_frame(orjson.dumps(reply)))
    finally:
        repo.close()


def run_child(fd: int) -> None:
    """The child's entry point, on the socket end it was given."""
    # The server's Ctrl-C reaches its whole process group: the child stops when the
    # server closes its end (or exits), after the batch in hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=fd) as channel:
        channel.setblocking(True)
        serve(channel)
