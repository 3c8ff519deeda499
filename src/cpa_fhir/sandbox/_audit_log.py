"""The server's own AuditEvents, written by group commit.

Every disclosure to a partner is recorded before its response leaves: the request
waits until its AuditEvents are committed, and if they cannot be, it shares
nothing. Many requests arrive together, so their AuditEvents are committed
together, in one transaction: each request still waits for its own commit, but
the database does one write transaction per batch, not one per request.

Two ways in: `AuditLog.record` blocks a thread until its events are committed (a
writer thread gathers the batches); `AuditBatcher` does the same for coroutines
on an event loop, its batches written through a blocking call (on a worker
thread, or inline), or each request's events sent at once to a child process
(`AuditLog.child_appender`), which indexes and stores them on another core while
the event loop serves requests, committing together all that reach it while it
is busy.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cpa_fhir.store import SqlRepository
from cpa_fhir.store._appender import ProcessAppender

MAX_BATCH = 500
Events = list[dict[str, Any]]


class AuditWriteFailed(Exception):
    """The AuditEvents of a disclosure could not be stored."""


@dataclass
class _Pending:
    events: Events
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


_STOP = _Pending([])


class AuditLog:
    """Stores AuditEvents through `SqlRepository.append`, batching concurrent writers."""

    def __init__(self, repo: SqlRepository, *, max_batch: int = MAX_BATCH) -> None:
        self.repo = repo
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._children: list[ProcessAppender] = []

    def write(self, batches: Sequence[Events]) -> list[BaseException | None]:
        """Commit several requests' events in one transaction; per request, the error
        that stopped its events being stored, or None."""
        try:
            self.repo.append([e for events in batches for e in events])
            return [None] * len(batches)
        except Exception:
            # One request's events must not fail the others': retry each alone.
            errors: list[BaseException | None] = []
            for events in batches:
                try:
                    self.repo.append(events)
                    errors.append(None)
                except Exception as exc:
                    errors.append(exc)
            return errors

    def record(self, events: Events) -> None:
        """Return once `events` are committed; AuditWriteFailed if they could not be."""
        if not events:
            return
        pending = _Pending(events)
        self._ensure_writer()
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise AuditWriteFailed(str(pending.error)) from pending.error

    def child_appender(self) -> ProcessAppender | None:
        """A child process that stores AuditEvents (`ProcessAppender`), started now; or,
        where no child can serve this store, None (see `SqlRepository.child_appender`).
        `close()` stops it."""
        appender = self.repo.child_appender()
        if appender is None:
            return None
        appender.start()
        with self._lock:
            self._children.append(appender)
        return appender

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
            children, self._children = self._children, []
        if writer is not None:
            self._queue.put(_STOP)
            writer.join()
        for child in children:
            child.close()

    def _ensure_writer(self) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._run, name="cpa-fhir-audit", daemon=True
                )
                self._writer.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            try:
                for p, error in zip(batch, self.write([p.events for p in batch]), strict=True):
                    p.error = error
            except BaseException as exc:
                # Whatever stopped the write, no waiting request may think it committed.
                for p in batch:
                    p.error = exc
                if not isinstance(exc, Exception):
                    stop = True
            finally:
                for p in batch:
                    p.done.set()
            if stop:
                return


class AuditBatcher:
    """`AuditLog.record` for coroutines on one event loop: the events of requests that
    arrive while a batch is being committed go together in the next. With a child
    process (`AuditLog.child_appender`) each request's events go to it at once, and
    the child does the batching."""

    def __init__(
        self,
        log: AuditLog,
        run_in_thread: Callable[..., Any],
        child: ProcessAppender | None = None,
    ) -> None:
        self.log = log
        # e.g. anyio.to_thread.run_sync: awaits a blocking call made on a worker thread
        self._run_in_thread = run_in_thread
        self._child = child
        self._waiting: list[tuple[Events, asyncio.Future[None]]] = []
        self._flushing = False

    async def record(self, events: Events) -> None:
        """Return once `events` are committed; AuditWriteFailed if they could not be."""
        if not events:
            return
        if self._child is not None:
            try:
                await self._child.append(events, self.log.repo.clock())
            except Exception as exc:  # whatever the cause, the disclosure must not go
                raise AuditWriteFailed(str(exc)) from exc
            return
        committed = asyncio.get_running_loop().create_future()
        self._waiting.append((events, committed))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await committed

    def attach(self) -> None:
        """Hear the child's answers on the running event loop (the server's), until
        `detach` there (see `ProcessAppender.attach`)."""
        if self._child is not None:
            self._child.attach()

    def detach(self) -> None:
        if self._child is not None:
            self._child.detach()

    async def index(self) -> None:
        """Return once the AuditEvents already recorded can be found by search (the
        child writes their index rows after their commit); AuditWriteFailed if they
        cannot be. Without a child they are indexed as they are stored."""
        if self._child is None:
            return
        try:
            await self._child.index()
        except Exception as exc:
            raise AuditWriteFailed(str(exc)) from exc

    async def _flush(self) -> None:
        try:
            # Let the requests already read off their connections reach this batch too.
            await asyncio.sleep(0)
            while self._waiting:
                size = self.log.max_batch
                batch, self._waiting = self._waiting[:size], self._waiting[size:]
                try:
                    batches = [e for e, _ in batch]
                    errors = await self._run_in_thread(self.log.write, batches)
                except Exception as exc:  # the batch's fate is unknown: none of it shares
                    errors = [exc] * len(batch)
                for (_, committed), error in zip(batch, errors, strict=True):
                    if committed.done():
                        continue
                    if error is None:
                        committed.set_result(None)
                    else:
                        committed.set_exception(AuditWriteFailed(str(error)))
        finally:
            self._flushing = False
