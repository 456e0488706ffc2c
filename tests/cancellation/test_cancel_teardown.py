"""Cancel the server mid-reply, mid-flight and mid-memory-swap: nothing may outlive it.

Right after the cancelled ``serve_connection`` returns, every fd the server held is closed
(``os.fstat`` -> EBADF, and ``/proc/self/fd`` is back to the frontend's own), and no mapping
of the guest memfd is left but the frontend's. The cyclic garbage collector is off during
each test, so only prompt, reference-counted release counts.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import termios
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from vhost_dp_harness import (
    AsyncRecordingDevice,
    Park,
    RecordingDevice,
    Rig,
    fail_after,
    fd_numbers,
    guarded_ram,
    is_closed,
    memfd_mappings,
    small_socketpair,
)

from trio_vhost import ConnectionClosed, Frontend, FrontendReq, GuestRam, server
from trio_vhost._io.transport import UnixTransport
from trio_vhost.proto.frontend_codec import encode_request
from trio_vhost.session import Session

Prepare = Callable[[Rig, trio.Nursery], Awaitable[None]]
EXTRA_GPA = 0x2_0000_0000


def unread(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def session_fds(session: Session) -> set[int]:
    fds = {session.transport.fileno()}
    for slot in session.slots:
        for efd in (slot.kick, slot.call, slot.err):
            if efd is not None and not efd.closed:
                fds.add(efd.fd)
    return fds


async def cancel_server_after(
    device: RecordingDevice,
    sessions: list[Session],
    prepare: Prepare,
    *,
    pair: Callable[[], tuple[UnixTransport, UnixTransport]] = UnixTransport.socketpair,
    extra: GuestRam | None = None,
) -> None:
    """Set up a session, let ``prepare`` bring it somewhere, cancel the server, check.

    ``extra`` is a second guest RAM that ``prepare`` may hand to the server too.
    """
    with guarded_ram() as ram:
        rams = [ram] if extra is None else [ram, extra]
        maps_before = [memfd_mappings(r) for r in rams]
        fds_before = fd_numbers()
        backend, front = pair()
        server_scope = trio.CancelScope()
        server_done = trio.Event()

        async def run_server() -> None:
            with server_scope:
                await serve_connection_checked()
            server_done.set()

        async def serve_connection_checked() -> None:
            await server.serve_connection(device, backend)

        frontend = Frontend(front)
        rig = Rig(frontend, ram, device, size=16, indirect=(False, True))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_server)
                await frontend.negotiate()
                await rig.set_mem_table()
                await rig.start_all()
                await prepare(rig, nursery)
                await trio.testing.wait_all_tasks_blocked()

                (session,) = sessions
                frontend_fds = fds_before | {front.fileno()}
                for vring in rig.vrings:
                    assert vring is not None
                    frontend_fds |= {vring.kick.fd, vring.call.fd, vring.err.fd}
                held = (fd_numbers() - frontend_fds) | session_fds(session)
                assert held, "the server holds no fds?"
                assert memfd_mappings(ram) > maps_before[0], "the server maps no guest memory?"

                server_scope.cancel()
                await server_done.wait()
                still_open = sorted(fd for fd in held if not is_closed(fd))
                assert not still_open, f"fds the server held are still open: {still_open}"
                assert fd_numbers() == frontend_fds
                maps_after = [memfd_mappings(r) for r in rams]
                assert maps_after == maps_before, "a guest mapping outlived the server"
                nursery.cancel_scope.cancel()  # the frontend's own pending request, if any
        finally:
            rig.close()
            await frontend.aclose()
        assert fd_numbers() == fds_before


@pytest.mark.usefixtures("no_cyclic_gc")
@fail_after(20)
async def test_cancel_mid_reply(sessions: list[Session]) -> None:
    """The control task is blocked sending a reply the frontend does not read."""
    flood_blocked = trio.Event()

    async def prepare(rig: Rig, nursery: trio.Nursery) -> None:
        frame = encode_request(FrontendReq.GET_FEATURES)

        async def flood() -> None:
            # one frame per send: a send blocked before its first byte cancels cleanly
            with contextlib.suppress(ConnectionClosed):  # the server goes away
                for _ in range(100_000):
                    await rig.frontend.transport.send(frame)
                flood_blocked.set()  # pragma: no cover - the buffers are far smaller

        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        # replies are waiting unread and the flood is stuck: the server is blocked in a send
        assert unread(rig.frontend.transport.fileno()) > 0
        assert not flood_blocked.is_set()

    await cancel_server_after(RecordingDevice(), sessions, prepare, pair=small_socketpair)


@pytest.mark.usefixtures("no_cyclic_gc")
@fail_after(20)
async def test_cancel_mid_flight(sessions: list[Session]) -> None:
    """A worker is inside an async batch (and the other ring has completed I/O)."""
    device = AsyncRecordingDevice()
    park = device.park_at(0, 1, forever=True)

    async def prepare(rig: Rig, nursery: trio.Nursery) -> None:
        rig.add(1, body=b"done")
        await rig.wait_done(1, 1)
        rig.add(0, body=b"first")
        await rig.wait_done(0, 1)
        rig.add(0, body=b"stuck", split=True)
        await park.parked.wait()

    await cancel_server_after(device, sessions, prepare)
    assert sorted(device.stopped) == [0, 1]


SWAPS = ["SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG", "GET_VRING_BASE", "SLEEP"]


@pytest.mark.usefixtures("no_cyclic_gc")
@pytest.mark.parametrize("request_code", SWAPS)
@fail_after(20)
async def test_cancel_mid_swap(sessions: list[Session], request_code: str) -> None:
    """The control task waits for a parked worker to stop (memory swaps, stops)."""
    device = AsyncRecordingDevice()
    park: Park = device.park_at(0, 0)
    with GuestRam.create(64 * 1024, gpa=EXTRA_GPA) as extra:

        async def prepare(rig: Rig, nursery: trio.Nursery) -> None:
            if request_code == "REM_MEM_REG":
                await rig.frontend.add_mem_region(extra)
            rig.add(0, body=b"parked")
            await park.parked.wait()

            async def stop() -> None:
                with contextlib.suppress(ConnectionClosed):  # the server goes away
                    if request_code == "SET_MEM_TABLE":
                        await rig.set_mem_table()  # maps the region anew, then stops rings
                    elif request_code == "ADD_MEM_REG":
                        await rig.frontend.add_mem_region(extra)
                    elif request_code == "REM_MEM_REG":
                        await rig.frontend.remove_mem_region(extra)
                    elif request_code == "GET_VRING_BASE":
                        await rig.get_vring_base(0)
                    else:
                        await rig.sleep()

            nursery.start_soon(stop)

        await cancel_server_after(device, sessions, prepare, extra=extra)
    assert not park.release.is_set()
