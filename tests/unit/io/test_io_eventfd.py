"""EventFd: waiting, reading and signalling eventfds, blocking or not.

Rules: synchronise with ``wait_all_tasks_blocked``, never sleeps; every test runs under a
trio-clock ``fail_after``. Calls that would hang the whole thread if the code under test
were wrong (a read or write on a *blocking* fd) run in a worker thread, so a bug fails
the test instead of freezing the suite.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import pytest
import trio
import trio.testing

from trio_vhost._fd import OwnedFd
from trio_vhost._io import EventFd, UnixTransport
from trio_vhost._io.eventfd import MAX_COUNTER

P = ParamSpec("P")
T = TypeVar("T")


def fail_after(
    seconds: float = 10,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, Awaitable[None]]]:
    """Fail a trio test that runs longer than ``seconds`` on the trio clock."""

    def decorate(fn: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            with trio.fail_after(seconds):
                await fn(*args, **kwargs)

        return wrapper

    return decorate


def blocking_eventfd() -> EventFd:
    """An eventfd WITHOUT O_NONBLOCK, like one a frontend may pass us."""
    return EventFd(OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)))


async def in_thread(fn: Callable[[], T], release: Callable[[], object]) -> T:
    """Run a call that must not block in a thread; a wrongly blocking call times out.

    On a timeout ``release`` unblocks the abandoned thread before the test fails.
    """
    try:
        with trio.fail_after(2):
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
    except trio.TooSlowError:
        release()
        raise


@fail_after()
async def test_write_then_read_nowait_sums_the_counter() -> None:
    with EventFd.create() as efd:
        assert fcntl.fcntl(efd.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with trio.testing.assert_no_checkpoints():
            assert efd.read_nowait() == 0
            efd.write()
            efd.write(41)
            assert efd.read_nowait() == 42
            assert efd.read_nowait() == 0
    with EventFd.create(3) as efd:
        assert efd.read_nowait() == 3


@fail_after()
async def test_wait_returns_a_pending_value_and_always_checkpoints() -> None:
    with EventFd.create() as efd:
        efd.write(2)
        with trio.testing.assert_checkpoints():
            assert await efd.wait() == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(efd.wait)
            await trio.testing.wait_all_tasks_blocked()
            efd.write()
        assert efd.read_nowait() == 0


@fail_after()
async def test_a_thread_wakes_a_waiter() -> None:
    with EventFd.create() as efd:
        got: list[int] = []

        async def waiter() -> None:
            got.append(await efd.wait())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await trio.to_thread.run_sync(os.eventfd_write, efd.fd, 7)
        assert got == [7]


@fail_after()
async def test_another_process_wakes_a_waiter() -> None:
    with EventFd.create() as efd:
        got: list[int] = []

        async def waiter() -> None:
            got.append(await efd.wait())

        code = "import os, sys; os.eventfd_write(int(sys.argv[1]), 5)"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await trio.run_process([sys.executable, "-c", code, str(efd.fd)], pass_fds=[efd.fd])
        assert got == [5]


@fail_after()
async def test_the_backend_gets_a_dup_over_scm_rights() -> None:
    frontend_side, backend_side = UnixTransport.socketpair()
    async with frontend_side, backend_side:
        kick = EventFd.create()
        await frontend_side.send(b"kick".ljust(12, b"\0"), [kick.fd])
        _, fds = await backend_side.receive_header()
        with EventFd(fds[0]) as backend_kick:
            assert backend_kick.fd != kick.fd
            kick.write(3)
            assert await backend_kick.wait() == 3
            backend_kick.write()  # and the other way round, like a call fd
            assert kick.read_nowait() == 1
        kick.close()


@fail_after()
async def test_close_under_a_waiter_raises_closed() -> None:
    efd = EventFd.create()

    async def waiter() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await efd.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        efd.close()
    efd.close()  # idempotent
    assert efd.closed
    with pytest.raises(trio.ClosedResourceError):
        await efd.wait()
    with pytest.raises(trio.ClosedResourceError):
        efd.read_nowait()
    with pytest.raises(trio.ClosedResourceError):
        efd.write()
    with pytest.raises(trio.ClosedResourceError):
        efd.fileno()


@fail_after()
async def test_two_waiters_conflict() -> None:
    with EventFd.create() as efd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(efd.wait)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await efd.wait()
            efd.write()


@fail_after()
async def test_a_cancelled_wait_loses_no_signal() -> None:
    with EventFd.create() as efd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(efd.wait)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        efd.write(4)
        with trio.CancelScope() as scope:
            scope.cancel()
            await efd.wait()  # cancelled before reading anything
        assert await efd.wait() == 4


@fail_after()
async def test_a_spurious_wakeup_keeps_waiting() -> None:
    with EventFd.create() as efd:
        stolen: list[int] = []
        got: list[int] = []

        async def waiter() -> None:
            got.append(await efd.wait())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            efd.write()
            stolen.append(os.eventfd_read(efd.fd))  # empty again before the waiter runs
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            efd.write(9)
        assert (stolen, got) == ([1], [9])


@fail_after()
async def test_a_blocking_eventfd_works_and_keeps_its_flags() -> None:
    with blocking_eventfd() as efd:
        flags = fcntl.fcntl(efd.fd, fcntl.F_GETFL)
        assert not flags & os.O_NONBLOCK
        release = functools.partial(os.eventfd_write, efd.fd, 1)
        assert await in_thread(efd.read_nowait, release) == 0
        efd.write(2)
        assert await in_thread(efd.read_nowait, release) == 2
        got: list[int] = []

        async def waiter() -> None:
            got.append(await efd.wait())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            efd.write(6)
        assert got == [6]
        assert fcntl.fcntl(efd.fd, fcntl.F_GETFL) == flags


@fail_after()
async def test_a_full_counter_counts_as_signalled() -> None:
    for efd in (blocking_eventfd(), EventFd.create()):
        with efd:
            os.eventfd_write(efd.fd, MAX_COUNTER)
            release = functools.partial(os.eventfd_read, efd.fd)
            await in_thread(efd.write, release)  # would block (or EAGAIN): dropped instead
            assert efd.read_nowait() == MAX_COUNTER
            with pytest.raises(ValueError, match="out of range"):
                efd.write(MAX_COUNTER + 1)
            with pytest.raises(ValueError, match="out of range"):
                efd.write(-1)


def test_close_outside_trio() -> None:
    efd = EventFd.create()
    fd = efd.fd
    efd.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    assert efd.closed
    assert "closed" in repr(efd)
