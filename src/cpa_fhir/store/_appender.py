"""`SqlRepository.append` done by a child process, for a server on an event loop.

Recording a disclosure (its AuditEvent's search index and the rows it adds)
costs as much interpreter time as serving the read it records. The child
process does that work on another core, with its own connection: the server
only serialises the records and waits, on its event loop, for the child to say
they are committed.

Each request's records go to the child at once, as one length-prefixed JSON
frame over a socket pair; the child commits everything it has been sent by the
time it is free in one transaction (group commit, with no waiting on the
server's side) and answers with one result per request, in the order sent:

    server -> child   {"url": ..., "schema": ...}              (once, first)
    child  -> server  {"ready": true} | {"error": "..."}
    server -> child   {"at": ISO instant, "resources": [...]}  (one per request)
                    | {"index": true}                         (before a search)
    child  -> server  {"results": [n | {"error": "..."}, ...]}  (one per transaction)

A transaction that fails is retried one request at a time, so one bad request
fails alone. The records' search-index rows, most of what a commit writes, follow
in a transaction of their own once the child has answered and no request waits
(or many records await them) (`SqlRepository.append_indexing_later`): a disclosure
waits only for its record. (One transaction for both costs less work in all, on
PostgreSQL a third less, but every disclosure then waits for its index rows too,
and under load that costs more throughput than the work saves.)
An `index` request is answered once every record sent before it is indexed, and
every record another writer (another server's child) committed and has not yet
indexed: the server makes one before a search that could find such records.
Records a child committed but did not index before it stopped are indexed by the
next child. On SQLite the child commits durably (synchronous=FULL): an answer
means the records are on disk. The child stamps meta.lastUpdated with the
server's `at` (the latest of the transaction's), so records read the same
whichever process stored them. If the child dies, every request it had not
answered fails (the server cannot know whether they were committed) and the next
request starts a new child.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from cpa_fhir.fhir import jsonio

_LENGTH = struct.Struct("!I")
_STARTUP_SECONDS = 60.0
# Records the child commits together at most: a transaction stays short even when
# many requests wait.
MAX_RECORDS = 500
# Index rows are written when no request waits, and, should requests never stop
# coming, once this many records await them: a search waits for them all.
INDEX_BATCH = 128
# Run by import, not `-m`: the package imports this module before `-m` would run it.
_CHILD = "import sys; from cpa_fhir.store._appender import run_child; run_child(int(sys.argv[1]))"


class AppendFailed(Exception):
    """The records may or may not be stored: the child could not say (it stopped)."""


class AppendRejected(Exception):
    """The child rolled the records back: nothing of them is stored."""


class _Channel:
    """The server's end of one child's socket. Frames go out as requests come, from
    any thread or event loop, in order; each result goes, in the same order, to the
    event loop of the request waiting for it.

    Replies are read on the event loop the channel is attached to (`attach`: the
    server's, for as long as it serves), as the socket becomes readable: a thread
    of its own would contend with that loop for the interpreter lock and wake it
    through its self-pipe for every reply, which cost about a tenth of a
    consent-filtered read. Unattached (or once detached), a reader thread reads
    them, for requests from any loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # A child that takes nothing in for this long is stuck: a send fails rather
        # than hold the event loop it is made on.
        seconds, fraction = divmod(_STARTUP_SECONDS, 1)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", int(seconds), max(1, int(fraction * 1_000_000))),
        )
        self.broken: str | None = None
        # Guards `_waiting` (whose order is the order on the wire) and who reads.
        self._lock = threading.Lock()
        self._waiting: collections.deque[asyncio.Future[int]] = collections.deque()
        self._frames = _Frames(sock)
        self._ready = False
        self._deadline = time.monotonic() + _STARTUP_SECONDS
        self._loop: asyncio.AbstractEventLoop | None = None  # reading, when attached
        self._startup: asyncio.TimerHandle | None = None
        self._reader: threading.Thread | None = None
        self._closed = False

    # -- who reads ---------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Read replies on `loop`, the caller's, until `detach` (called on it too);
        False if a reader thread already reads them."""
        with self._lock:
            if self._reader is not None or self._loop is not None or self._closed:
                return self._loop is loop
            self._loop = loop
            loop.add_reader(self.sock.fileno(), self._on_readable)
            if not self._ready:
                delay = max(0.0, self._deadline - time.monotonic())
                self._startup = loop.call_later(delay, self._fail, "it did not start")
        return True

    def detach(self) -> None:
        """Stop reading on the attached loop (the caller's); a reader thread takes over
        for whatever still waits and comes."""
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None:
                return
            self._unwatch(loop)
            if self.broken is None and not self._closed:
                self._start_reader()

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """(under the lock, on `loop` or with it stopped)"""
        if self._startup is not None:
            self._startup.cancel()
            self._startup = None
        if not loop.is_closed():
            loop.remove_reader(self.sock.fileno())

    def _start_reader(self) -> None:
        """(under the lock)"""
        if self._reader is None and not self._closed:
            self._reader = threading.Thread(
                target=self._read, name="cpa-fhir-audit-replies", daemon=True
            )
            self._reader.start()

    # -- requests --------------------------------------------------------------------

    def send(self, payload: bytes) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        failed = None
        with self._lock:
            if self.broken is None:
                loop = self._loop
                if loop is not None and not loop.is_running():
                    # It stopped without detaching (a server that did not shut down
                    # cleanly): a thread reads from now on.
                    self._loop = None
                    self._unwatch(loop)
                if self._loop is None:
                    self._start_reader()
                try:
                    self.sock.sendall(_frame(payload))
                    self._waiting.append(future)
                    return future
                except OSError as exc:
                    # Part of a frame may be on the wire: nothing after it is in step.
                    failed = f"it cannot be written to ({exc})"
        if failed is not None:
            self._fail(failed)
        future.set_exception(AppendFailed(f"the audit writer failed: {self.broken}"))
        return future

    # -- replies ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        """On the attached loop: settle what the replies that have arrived answer."""
        try:
            while (frame := self._frames.next(wait=False)) is not None:
                self._take(frame)
            if self._frames.ended:
                raise OSError("the audit writer closed its end")
        except (AppendFailed, OSError, ValueError) as exc:
            self._stopped(exc)

    def _read(self) -> None:
        """The reader thread: the same, blocking."""
        try:
            if not self._ready:
                self.sock.settimeout(max(0.001, self._deadline - time.monotonic()))
                try:
                    frame = self._frames.next()
                except TimeoutError:
                    raise AppendFailed("it did not start") from None
                self.sock.settimeout(None)
                if frame is not None:
                    self._take(frame)
            while (frame := self._frames.next()) is not None:
                self._take(frame)
            raise OSError("the audit writer closed its end")
        except (AppendFailed, OSError, ValueError) as exc:
            self._stopped(exc)

    def _stopped(self, exc: Exception) -> None:
        """Reading ended on `exc`: what waits fails with its reason."""
        self._fail(str(exc) if isinstance(exc, AppendFailed) else f"it stopped ({exc})")

    def _take(self, frame: bytes) -> None:
        """Settle the requests one reply answers; ValueError for a reply out of step."""
        reply = orjson.loads(frame)
        if not isinstance(reply, dict):
            raise ValueError("a reply is not an object")
        if not self._ready:
            if "error" in reply:
                raise AppendFailed(f"it could not start: {reply['error']}")
            if reply.get("ready") is not True:
                raise ValueError("an answer came before the writer said it was ready")
            self._ready = True
            with self._lock:
                if self._startup is not None:
                    self._startup.cancel()
                    self._startup = None
            return
        results = reply.get("results")
        if not isinstance(results, list) or not all(
            isinstance(r, int) or (isinstance(r, dict) and "error" in r) for r in results
        ):
            raise ValueError("a reply's results are unreadable")
        with self._lock:
            if len(results) > len(self._waiting):
                raise ValueError("a reply answers more requests than were sent")
            answered = [(self._waiting.popleft(), r) for r in results]
        _settle(answered)

    def _fail(self, why: str) -> bool:
        """Fail every request not answered; reading stops. True if the attached loop,
        running in another thread, is yet to stop watching the socket."""
        deferred = False
        with self._lock:
            self.broken = self.broken or why
            failed = [(f, {"failed": self.broken}) for f in self._waiting]
            self._waiting.clear()
            loop, self._loop = self._loop, None
            if loop is not None:
                if _running_on(loop) or not loop.is_running():
                    self._unwatch(loop)
                else:
                    try:
                        loop.call_soon_threadsafe(self._unwatch_later, loop)
                        deferred = True
                    except RuntimeError:  # it closed meanwhile: nothing watches
                        pass
        _settle(failed)
        return deferred

    def _unwatch_later(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._unwatch(loop)
            if self._closed:
                self.sock.close()

    def close(self) -> None:
        """The child reads end-of-file and exits; any request still waiting fails."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self._closed = True
            reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=10)  # it reads end-of-file and fails what waits
        # An attached loop in another thread stops watching first and then closes the
        # socket, so that its descriptor is not reused while still watched.
        if not self._fail("it was closed"):
            self.sock.close()


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _settle(answered: list[tuple[asyncio.Future[int], Any]]) -> None:
    """Give each waiting request its result on its own event loop: at once on this
    one, with one wake-up on each other."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], Any]]] = {}
    for future, result in answered:
        by_loop.setdefault(future.get_loop(), []).append((future, result))
    for loop, items in by_loop.items():
        if _running_on(loop):
            _settle_here(items)
            continue
        try:
            loop.call_soon_threadsafe(_settle_here, items)
        except RuntimeError:  # that loop has closed: nobody waits there any more
            pass


def _settle_here(items: list[tuple[asyncio.Future[int], Any]]) -> None:
    for future, result in items:
        if future.done():  # its request was cancelled; the records were committed
            continue
        if isinstance(result, int):
            future.set_result(result)
        elif "failed" in result:
            future.set_exception(AppendFailed(f"the audit writer failed: {result['failed']}"))
        else:
            future.set_exception(AppendRejected(str(result["error"])))


class ProcessAppender:
    """Appends records through a child process (see the module docstring). Calls may
    overlap, from any event loop: each is answered once the child has committed, or
    failed, its records."""

    def __init__(self, url: str, schema: str | None) -> None:
        self._config = orjson.dumps({"url": url, "schema": schema})
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: _Channel | None = None
        self._attached: asyncio.AbstractEventLoop | None = None

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
                self._channel = _Channel(ours)

    async def append(self, resources: Sequence[dict[str, Any]], at: datetime) -> int:
        """Store the records in one transaction in the child; how many were stored."""
        payload = jsonio.dumps({"at": at.isoformat(), "resources": resources})
        return await self._open().send(payload)

    async def index(self) -> None:
        """Return once the index rows of every record sent before are written (the
        child writes them after the commit it answers, when it is idle): a search
        then finds them."""
        await self._open().send(orjson.dumps({"index": True}))

    def attach(self) -> None:
        """Read the child's replies on the running event loop (the server's), with no
        thread of their own, until `detach` (on the same loop): call both there."""
        self._attached = asyncio.get_running_loop()
        self._open().attach(self._attached)

    def detach(self) -> None:
        self._attached = None
        channel = self._channel
        if channel is not None:
            channel.detach()

    def _open(self) -> _Channel:
        channel = self._channel
        if channel is not None and channel.broken is not None:
            self._stop()  # a child that failed: this request starts another
            channel = None
        if channel is None:
            self.start()
            channel = self._channel
            assert channel is not None
            if self._attached is not None and _running_on(self._attached):
                channel.attach(self._attached)
        return channel

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            process, channel = self._process, self._channel
            self._process = self._channel = None
        if channel is not None:
            channel.close()
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


# -- the child --------------------------------------------------------------------------


class _Frames:
    """Frames off a blocking socket, and those already sent without waiting."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._ended = False

    def next(self, *, wait: bool = True) -> bytes | None:
        """The next frame; None at end of input or, with `wait=False`, if none has
        fully arrived yet."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                end = _LENGTH.size + _LENGTH.unpack_from(self._buffer)[0]
                if len(self._buffer) >= end:
                    frame = bytes(self._buffer[_LENGTH.size : end])
                    del self._buffer[:end]
                    return frame
            if self._ended:
                return None
            try:
                part = self._sock.recv(1 << 20, 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not part:
                self._ended = True
            self._buffer += part

    @property
    def ended(self) -> bool:
        """Whether the other end has closed (once `next` returns None, nothing is left)."""
        return self._ended

    def waiting(self) -> bool:
        """Whether more input has arrived (a frame, or part of one)."""
        if self._buffer or self._ended:
            return True
        return bool(select.select([self._sock], [], [], 0)[0])


class _Backlog:
    """Index rows still to write: those of the records this child committed, and,
    until it has read them, those of records an earlier child committed and did not
    index (read from the store)."""

    def __init__(self, repo: Any) -> None:
        self.repo = repo
        self.records: list[Any] = []
        self.complete = False  # whether `records` holds every record still pending

    def __bool__(self) -> bool:
        return bool(self.records) or not self.complete

    def write_all(self) -> dict[str, str] | None:
        """`write`, then the rows of records other writers committed and have not
        indexed yet (read from the store): a search waits for those too."""
        error = self.write()
        if error is None:
            try:
                others = self.repo.any_pending()  # seldom: read them only then
            except Exception as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
            if others:
                self.complete = False
                error = self.write()
        return error

    def write(self) -> dict[str, str] | None:
        """Write them all; the error, if that failed (they stay, to be tried again)."""
        try:
            if not self.complete:
                self.records = self.repo.pending_records()  # this child's among them
                self.complete = True
            if self.records:
                self.repo.index_appended(self.records)
        except Exception as exc:  # rolled back: tried again when next asked, or idle
            return {"error": f"{type(exc).__name__}: {exc}"}
        self.records = []
        return None


def _store(
    repo: Any, stamp: list[datetime], requests: list[dict[str, Any]], unindexed: list[Any]
) -> list[Any]:
    """Commit the requests' records together (else each alone), their index rows left
    in `unindexed` for later; a result per request."""
    stamp[:] = [max(datetime.fromisoformat(r["at"]) for r in requests)]
    committed: list[Any] = []
    try:
        repo.append_indexing_later(
            [record for r in requests for record in r["resources"]], committed
        )
        unindexed += committed
        return [len(r["resources"]) for r in requests]
    except Exception as exc:  # rolled back
        if len(requests) == 1:
            return [{"error": f"{type(exc).__name__}: {exc}"}]
    return [result for r in requests for result in _store(repo, stamp, [r], unindexed)]


def serve(sock: socket.socket) -> None:
    """Answer requests until the server closes its end."""
    from cpa_fhir.store._engine import create_store_engine
    from cpa_fhir.store._repository import SqlRepository

    frames = _Frames(sock)
    config = frames.next()
    if config is None:
        return
    try:
        settings = orjson.loads(config)
        url, schema = settings["url"], settings["schema"]
        # A disclosure leaves once its AuditEvent is committed: committed means on disk,
        # surviving a power cut, not only a crash of this process. The wait for the
        # disk also lets more requests gather into each commit.
        engine = create_store_engine(url, schema=schema, durable=True)
        repo = SqlRepository(url, schema=schema, migrate=False, engine=engine)
    except Exception as exc:  # reported to the server, which fails the requests
        sock.sendall(_frame(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})))
        return
    stamp: list[datetime] = []
    repo.clock = lambda: stamp[0]
    backlog = _Backlog(repo)
    backlog.write()  # what an earlier child left; if this fails, tried again later
    sock.sendall(_frame(orjson.dumps({"ready": True})))
    try:
        while (frame := frames.next()) is not None:
            requests: list[dict[str, Any]] = []
            records = 0
            while frame is not None:
                try:
                    request = jsonio.loads(frame)
                    if not request.get("index"):
                        datetime.fromisoformat(request["at"])
                        records += len(request["resources"])
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    request = {"error": f"unreadable request: {exc}"}
                requests.append(request)
                frame = frames.next(wait=False) if records < MAX_RECORDS else None
            appends = [r for r in requests if "error" not in r and not r.get("index")]
            results = iter(_store(repo, stamp, appends, backlog.records) if appends else [])
            # Asked to bring the index up to date (before a search of these records):
            # after this group's own records, so that it covers all sent before it,
            # and with what other writers left (a search on one server must find
            # another's AuditEvents as soon as they are committed).
            indexed = None
            if any(r.get("index") for r in requests if "error" not in r):
                indexed = backlog.write_all()
            reply = [
                r if "error" in r else (indexed or 0) if r.get("index") else next(results)
                for r in requests
            ]
            sock.sendall(_frame(orjson.dumps({"results": reply})))
            if backlog and (not frames.waiting() or len(backlog.records) >= INDEX_BATCH):
                backlog.write()  # idle (or put off long enough): not in a request's way
    finally:
        if backlog:
            backlog.write()
        repo.close()


def run_child(fd: int) -> None:
    """The child's entry point, on the socket end it was given."""
    # The server's Ctrl-C reaches its whole process group: the child stops when the
    # server closes its end (or exits), after the requests in hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=fd) as channel:
        channel.setblocking(True)
        try:
            serve(channel)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server has gone (it stopped, or never began to serve): none to answer
