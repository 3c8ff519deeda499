"""The server's end of the audit child's socket (`_Channel`), against a fake child.

Whoever reads the replies (the event loop the channel is attached to, or a reader
thread), every request hears its own result in order, or fails: a reply out of
step, a child that never starts, or a close, never leaves a request waiting.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from cpa_fhir.store import _appender
from cpa_fhir.store._appender import AppendFailed, AppendRejected, _Channel, _frame

pytestmark = pytest.mark.skipif(not _appender.ProcessAppender.supported(), reason="needs POSIX")

READY = _frame(orjson.dumps({"ready": True}))


def reply(*results: object) -> bytes:
    return _frame(orjson.dumps({"results": list(results)}))


@pytest.fixture
def pair() -> Iterator[tuple[_Channel, socket.socket]]:
    ours, child = socket.socketpair()
    channel = _Channel(ours)
    yield channel, child
    channel.close()
    child.close()


def outcome(result: object) -> object:
    return type(result).__name__ if isinstance(result, BaseException) else result


async def heard(futures: list[asyncio.Future[int]]) -> list[object]:
    """What each request heard, within 5 s: its result or its exception's name."""
    results = await asyncio.gather(
        *(asyncio.wait_for(f, 5) for f in futures), return_exceptions=True
    )
    return [outcome(r) for r in results]


@pytest.mark.parametrize("attached", [True, False], ids=["on-the-loop", "reader-thread"])
def test_each_request_hears_its_own_result_in_order(
    pair: tuple[_Channel, socket.socket], attached: bool
) -> None:
    channel, child = pair

    async def main() -> list[object]:
        if attached:
            assert channel.attach(asyncio.get_running_loop())
        sent = [channel.send(b"{}") for _ in range(3)]
        child.sendall(READY + reply(2) + reply(1, {"error": "taken"}))
        results = await heard(sent)
        # Attached, the loop reads the replies: no thread contends for the interpreter.
        assert (channel._reader is None) is attached
        return results

    assert asyncio.run(main()) == [2, 1, AppendRejected.__name__]


@pytest.mark.parametrize("attached", [True, False], ids=["on-the-loop", "reader-thread"])
@pytest.mark.parametrize(
    "bad",
    [
        READY + reply(1, 2, 3),
        READY + reply("x", 2),
        READY + _frame(b"[1]"),
        READY + _frame(b"not json"),
        reply(2) + reply(1),
    ],
    ids=["too-many-results", "unreadable-result", "not-an-object", "not-json", "before-ready"],
)
def test_a_reply_out_of_step_fails_every_waiting_request(
    pair: tuple[_Channel, socket.socket], attached: bool, bad: bytes
) -> None:
    channel, child = pair

    async def main() -> list[object]:
        if attached:
            channel.attach(asyncio.get_running_loop())
        sent = [channel.send(b"{}"), channel.send(b"{}")]
        child.sendall(bad)
        return await heard(sent)

    assert asyncio.run(main()) == [AppendFailed.__name__] * 2
    assert channel.broken is not None


def test_requests_from_another_loop_are_answered_through_the_attached_one(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, child = pair
    attached, done = threading.Event(), threading.Event()
    results: list[object] = []

    async def server() -> None:
        channel.attach(asyncio.get_running_loop())
        attached.set()
        while not done.is_set():
            await asyncio.sleep(0.01)

    async def elsewhere() -> None:
        future = channel.send(b"{}")
        child.sendall(READY + reply(4))
        results.append(await asyncio.wait_for(future, 5))

    thread = threading.Thread(target=asyncio.run, args=(server(),))
    thread.start()
    try:
        assert attached.wait(5)
        asyncio.run(elsewhere())
    finally:
        done.set()
        thread.join(5)
    assert results == [4]


def test_detaching_hands_waiting_requests_to_a_reader_thread(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, child = pair
    sent: list[asyncio.Future[int]] = []
    detached = threading.Event()

    async def server() -> None:
        channel.attach(asyncio.get_running_loop())
        sent.append(channel.send(b"{}"))
        await asyncio.sleep(0.05)
        channel.detach()  # the server stops; its request still waits
        detached.set()
        child.sendall(READY + reply(3))
        assert await asyncio.wait_for(sent[0], 5) == 3

    asyncio.run(server())
    assert detached.is_set() and channel._reader is not None

    async def later() -> object:  # from a loop never attached: the thread reads
        future = channel.send(b"{}")
        child.sendall(reply(5))
        return await asyncio.wait_for(future, 5)

    assert asyncio.run(later()) == 5


@pytest.mark.parametrize("attached", [True, False], ids=["on-the-loop", "reader-thread"])
def test_a_child_that_never_starts_fails_its_requests(
    monkeypatch: pytest.MonkeyPatch, attached: bool
) -> None:
    monkeypatch.setattr(_appender, "_STARTUP_SECONDS", 0.3)
    ours, child = socket.socketpair()
    channel = _Channel(ours)

    async def main() -> object:
        if attached:
            channel.attach(asyncio.get_running_loop())
        future = channel.send(b"{}")
        try:
            return outcome(await asyncio.wait_for(future, 5))
        except AppendFailed as exc:
            return str(exc)

    try:
        started = time.monotonic()
        assert "did not start" in str(asyncio.run(main()))
        assert time.monotonic() - started < 3
    finally:
        channel.close()
        child.close()


def test_close_from_another_thread_fails_what_waits_without_stalling(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, child = pair
    closed = threading.Event()
    results: list[object] = []

    async def server() -> None:
        channel.attach(asyncio.get_running_loop())
        future = channel.send(b"{}")
        child.sendall(READY)

        def close_elsewhere() -> None:
            started = time.monotonic()
            channel.close()
            results.append(time.monotonic() - started)
            closed.set()

        threading.Thread(target=close_elsewhere).start()
        try:
            await asyncio.wait_for(future, 5)
        except AppendFailed:
            results.append("failed")
        while not closed.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the loop stops watching, then the socket closes

    asyncio.run(server())
    assert results[0] == "failed" or results[1] == "failed"
    assert min(r for r in results if isinstance(r, float)) < 2
    assert channel.sock.fileno() == -1  # closed, once no longer watched


@pytest.mark.parametrize("attached", [True, False], ids=["on-the-loop", "reader-thread"])
def test_a_send_the_child_cannot_take_fails_every_waiting_request(
    pair: tuple[_Channel, socket.socket], attached: bool
) -> None:
    channel, child = pair

    async def main() -> list[object]:
        if attached:
            channel.attach(asyncio.get_running_loop())
        first = channel.send(b"{}")
        child.close()  # the child died before answering
        second = channel.send(b"x" * 1_000_000)  # cannot be written
        if attached:
            channel.detach()  # whatever reads next must still hear of the failure
        return await heard([first, second])

    assert asyncio.run(main()) == [AppendFailed.__name__] * 2


@pytest.mark.parametrize("attached", [True, False], ids=["on-the-loop", "reader-thread"])
def test_a_child_that_takes_nothing_in_does_not_hold_the_sender(
    monkeypatch: pytest.MonkeyPatch, attached: bool
) -> None:
    monkeypatch.setattr(_appender, "_STARTUP_SECONDS", 0.3)
    ours, child = socket.socketpair()
    channel = _Channel(ours)

    async def main() -> tuple[set[object], float]:
        if attached:
            channel.attach(asyncio.get_running_loop())
        started = time.monotonic()
        sent = [channel.send(b"x" * 100_000) for _ in range(100)]  # far past any buffer
        return set(await heard(sent)), time.monotonic() - started

    try:
        kinds, took = asyncio.run(main())
        assert kinds == {AppendFailed.__name__}
        assert took < 3
    finally:
        channel.close()
        child.close()


def test_a_loop_that_ended_without_detaching_leaves_the_reading_to_a_thread(
    pair: tuple[_Channel, socket.socket],
) -> None:
    channel, child = pair

    async def server() -> object:
        channel.attach(asyncio.get_running_loop())
        future = channel.send(b"{}")
        child.sendall(READY + reply(1))
        return await asyncio.wait_for(future, 5)  # and it ends, never detaching

    assert asyncio.run(server()) == 1

    async def later() -> object:
        future = channel.send(b"{}")
        child.sendall(reply(6))
        return await asyncio.wait_for(future, 5)

    assert asyncio.run(later()) == 6
