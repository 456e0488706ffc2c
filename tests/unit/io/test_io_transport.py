"""UnixTransport and the unix listener over real AF_UNIX sockets.

Rules: loopback sockets only; synchronise with ``wait_all_tasks_blocked``, never sleeps;
every test runs under a trio-clock ``fail_after`` so a hang fails with its logs.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import ParamSpec

import pytest
import trio
import trio.testing

from trio_vhost._fd import close_all
from trio_vhost._io import UnixTransport, open_unix_connection, open_unix_listener
from trio_vhost.errors import ClientExit, Disconnect, LocalProtocolError, RemoteProtocolError

TIMEOUT = 10


P = ParamSpec("P")


def fail_after(
    seconds: float = TIMEOUT,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, Awaitable[None]]]:
    """Fail a trio test that runs longer than ``seconds`` on the trio clock."""

    def decorate(fn: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            with trio.fail_after(seconds):
                await fn(*args, **kwargs)

        return wrapper

    return decorate


def header(code: int, size: int, flags: int = 1) -> bytes:
    return struct.pack("=III", code, flags, size)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def scm(fds: list[int]) -> list[tuple[int, int, array.array[int]]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


@pytest.fixture
def pair() -> Iterator[tuple[UnixTransport, socket.socket]]:
    """A transport (backend side) and a blocking stdlib socket (the raw frontend)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = UnixTransport.from_socket(ours)
    yield transport, theirs
    transport.close()
    theirs.close()


@pytest.fixture
def tpair() -> Iterator[tuple[UnixTransport, UnixTransport]]:
    left, right = UnixTransport.socketpair()
    yield left, right
    left.close()
    right.close()


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# -- receiving --------------------------------------------------------------------------


@fail_after()
async def test_header_brings_its_fds_cloexec(pair: tuple[UnixTransport, socket.socket]) -> None:
    transport, peer = pair
    efds = [os.eventfd(0) for _ in range(3)]  # inheritable on purpose
    try:
        peer.sendmsg([header(5, 4), b"body"], scm(efds))
        data, fds = await transport.receive_header()
        assert data == header(5, 4)
        assert len(fds) == 3
        for sent, got in zip(efds, fds, strict=True):
            assert fcntl.fcntl(got.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert same_file(sent, got.fd)
        assert await transport.receive_exactly(4) == b"body"
        close_all(fds)
    finally:
        for fd in efds:
            os.close(fd)


@fail_after()
async def test_back_to_back_messages_do_not_merge(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    efd = os.eventfd(0)
    messages = [(1, b"", 2), (2, b"abcdefgh", 0), (3, b"x" * 40, 1), (4, b"", 0), (5, b"yy", 3)]
    for code, body, nfds in messages:
        peer.sendmsg([header(code, len(body)), body], scm([efd] * nfds) if nfds else [])
    os.close(efd)
    for code, body, nfds in messages:
        data, fds = await transport.receive_header()
        assert data == header(code, len(body))
        assert len(fds) == nfds
        assert await transport.receive_exactly(len(body)) == body
        close_all(fds)


@fail_after()
async def test_header_and_body_sent_byte_by_byte(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    efd = os.eventfd(0)
    message = header(7, 6) + b"sixsix"
    result: list[object] = []

    async def receiver() -> None:
        data, fds = await transport.receive_header()
        result.extend([data, len(fds), await transport.receive_exactly(6)])
        close_all(fds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        for i in range(len(message)):
            await trio.testing.wait_all_tasks_blocked()
            peer.sendmsg([message[i : i + 1]], scm([efd]) if i == 0 else [])
    os.close(efd)
    assert result == [header(7, 6), 1, b"sixsix"]


@fail_after()
async def test_too_many_fds_is_ctrunc_and_leaks_nothing(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    before = open_fd_count()
    efd = os.eventfd(0)
    many = [os.dup(efd) for _ in range(64)]
    peer.sendmsg([header(5, 0)], scm(many))
    for fd in [efd, *many]:
        os.close(fd)
    with pytest.raises(RemoteProtocolError, match="MSG_CTRUNC"):
        await transport.receive_header()
    assert open_fd_count() == before
    with pytest.raises(trio.BrokenResourceError):
        await transport.receive_header()


@fail_after()
async def test_fds_with_the_body_are_closed_and_refused(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    before = open_fd_count()
    efd = os.eventfd(0)
    peer.sendmsg([header(1, 8)])
    peer.sendmsg([b"12345678"], scm([efd, efd]))
    os.close(efd)
    data, fds = await transport.receive_header()
    assert (data, fds) == (header(1, 8), [])
    with pytest.raises(RemoteProtocolError, match="body"):
        await transport.receive_exactly(8)
    assert open_fd_count() == before
    with pytest.raises(trio.BrokenResourceError):
        await transport.receive_header()


@fail_after()
async def test_fds_on_a_header_continuation_are_refused(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    before = open_fd_count()
    efd = os.eventfd(0)
    message = header(5, 0)

    async def receiver() -> None:
        with pytest.raises(RemoteProtocolError, match="after the first 4"):
            await transport.receive_header()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        peer.sendmsg([message[:4]])
        await trio.testing.wait_all_tasks_blocked()
        peer.sendmsg([message[4:]], scm([efd]))
    os.close(efd)
    assert open_fd_count() == before


@fail_after()
async def test_eof_before_a_header_is_client_exit(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.close()
    with pytest.raises(ClientExit):
        await transport.receive_header()


@fail_after()
async def test_eof_inside_a_header_is_disconnect(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    efd = os.eventfd(0)
    peer.sendmsg([header(1, 0)[:5]], scm([efd]))
    peer.close()
    before = open_fd_count()  # the fd in flight is installed by recvmsg
    with pytest.raises(Disconnect, match="5 of 12"):
        await transport.receive_header()
    assert open_fd_count() == before  # the fd that came with the 5 bytes is closed
    os.close(efd)
    with pytest.raises(trio.BrokenResourceError):
        await transport.receive_header()


@fail_after()
async def test_eof_inside_a_body_is_disconnect(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.sendall(header(1, 8) + b"1234")
    peer.close()
    await transport.receive_header()
    with pytest.raises(Disconnect, match="4 of 8"):
        await transport.receive_exactly(8)


@fail_after()
async def test_connection_reset_is_disconnect(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    await transport.send(b"unread by the peer")
    peer.close()  # closing with unread data resets the connection
    with pytest.raises(Disconnect):
        await transport.receive_header()


@fail_after()
async def test_receive_checkpoints_and_rejects_bad_sizes(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.sendall(header(1, 3) + b"abc")
    with trio.testing.assert_checkpoints():
        await transport.receive_header()
    with trio.testing.assert_checkpoints():
        assert await transport.receive_exactly(3) == b"abc"
    with trio.testing.assert_checkpoints():
        assert await transport.receive_exactly(0) == b""
    with pytest.raises(ValueError, match="negative"):
        await transport.receive_exactly(-1)


@fail_after()
async def test_cancelled_receive_before_any_byte_can_be_retried(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    with trio.CancelScope() as scope:
        scope.cancel()
        await transport.receive_header()
    peer.sendall(header(2, 0))
    data, _ = await transport.receive_header()
    assert data == header(2, 0)


@fail_after()
async def test_cancel_inside_a_header_breaks_the_stream(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.receive_header)
        await trio.testing.wait_all_tasks_blocked()
        peer.sendall(header(1, 0)[:3])
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.BrokenResourceError, match="inside a header"):
        await transport.receive_header()


@fail_after()
async def test_two_receivers_conflict(pair: tuple[UnixTransport, socket.socket]) -> None:
    transport, _ = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.receive_header)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await transport.receive_header()
        nursery.cancel_scope.cancel()


@fail_after()
async def test_close_wakes_a_blocked_receiver(pair: tuple[UnixTransport, socket.socket]) -> None:
    transport, _ = pair
    async with trio.open_nursery() as nursery:

        async def receiver() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await transport.receive_header()

        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        await transport.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await transport.receive_header()
    with pytest.raises(trio.ClosedResourceError):
        await transport.send(header(1, 0))
    await transport.aclose()  # idempotent
    assert transport.closed


# -- sending ----------------------------------------------------------------------------


@fail_after()
async def test_large_body_with_fds(tpair: tuple[UnixTransport, UnixTransport]) -> None:
    backend, frontend = tpair
    body = bytes(range(256)) * 4096  # 1 MiB: many partial writes
    efd = os.eventfd(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(frontend.send, header(5, len(body)) + body, [efd, efd])
        data, fds = await backend.receive_header()
        assert data == header(5, len(body))
        assert len(fds) == 2
        assert all(same_file(efd, f.fd) for f in fds)
        assert await backend.receive_exactly(len(body)) == body
    close_all(fds)
    os.close(efd)


@fail_after()
async def test_concurrent_senders_do_not_interleave(
    tpair: tuple[UnixTransport, UnixTransport],
) -> None:
    backend, frontend = tpair
    size = 300_000
    senders = 6

    async with trio.open_nursery() as nursery:
        for code in range(1, senders + 1):
            msg = header(code, size) + bytes([code]) * size
            nursery.start_soon(frontend.send, msg)
        seen = set()
        for _ in range(senders):
            data, _fds = await backend.receive_header()
            code, _, n = struct.unpack("=III", data)
            assert await backend.receive_exactly(n) == bytes([code]) * n
            seen.add(code)
    assert seen == set(range(1, senders + 1))


@fail_after()
async def test_cancelled_send_is_never_half_written(
    tpair: tuple[UnixTransport, UnixTransport],
) -> None:
    backend, frontend = tpair
    big = header(1, 4 << 20) + b"B" * (4 << 20)  # far beyond the socket buffer
    done: list[str] = []

    async def sender(msg: bytes, scope: trio.CancelScope, name: str) -> None:
        with scope:
            await frontend.send(msg)
            done.append(name)
            await trio.sleep_forever()

    writer, waiter = trio.CancelScope(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, big, writer, "big")
        await trio.testing.wait_all_tasks_blocked()  # big is half-way, holding the lock
        nursery.start_soon(sender, header(2, 0), waiter, "small")
        await trio.testing.wait_all_tasks_blocked()  # small waits for the lock
        writer.cancel()
        waiter.cancel()
        data, _ = await backend.receive_header()
        assert data == header(1, 4 << 20)
        assert await backend.receive_exactly(4 << 20) == b"B" * (4 << 20)
    assert done == ["big"]  # the small one was cancelled before writing anything
    await frontend.send(header(3, 0))
    assert (await backend.receive_header())[0] == header(3, 0)


@fail_after()
async def test_close_aborts_a_stuck_send(tpair: tuple[UnixTransport, UnixTransport]) -> None:
    _, frontend = tpair

    async def sender() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await frontend.send(b"x" * (4 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        frontend.close()


@fail_after()
async def test_send_to_a_closed_peer_is_disconnect(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.close()
    with pytest.raises(Disconnect):
        await transport.send(header(1, 0))


@fail_after()
async def test_send_checks_fds_and_checkpoints(
    pair: tuple[UnixTransport, socket.socket],
) -> None:
    transport, peer = pair
    with pytest.raises(LocalProtocolError, match="at most 8"):
        await transport.send(header(5, 0), list(range(9)))
    with pytest.raises(LocalProtocolError, match="data byte"):
        await transport.send(b"", [0])
    with trio.testing.assert_checkpoints():
        await transport.send(memoryview(header(1, 0)))
    assert peer.recv(100) == header(1, 0)


# -- construction, listening, connecting ------------------------------------------------


def test_close_outside_trio_and_wrong_socket_type() -> None:
    left, right = UnixTransport.socketpair()
    left.close()
    right.close()
    right.close()
    assert left.closed
    assert right.fileno() == -1
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram, pytest.raises(ValueError):
        UnixTransport.from_socket(dgram)


@fail_after()
async def test_listener_accepts_and_removes_its_file(tmp_path: Path) -> None:
    path = str(tmp_path / "vhost.sock")
    listener = await open_unix_listener(path)
    async with listener:
        client = await open_unix_connection(path)
        server = await listener.accept()
        await client.send(header(3, 0))
        assert (await server.receive_header())[0] == header(3, 0)
        await client.aclose()
        with pytest.raises(ClientExit):
            await server.receive_header()
        await server.aclose()
    assert not os.path.exists(path)
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


@fail_after()
async def test_listener_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "vhost.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound, never listening: like a crashed server's leftover
    dead.close()
    assert os.path.exists(path)
    async with (
        await open_unix_listener(path) as listener,
        await open_unix_connection(path) as client,
        await listener.accept() as server,
    ):
        await client.send(header(1, 0))
        assert (await server.receive_header())[0] == header(1, 0)


@fail_after()
async def test_listener_refuses_a_live_server_and_non_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "vhost.sock")
    async with await open_unix_listener(path, backlog=1):
        with pytest.raises(OSError, match="already listening") as info:
            await open_unix_listener(path)
        assert info.value.errno == errno.EADDRINUSE
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket") as info:
        await open_unix_listener(str(plain))
    assert info.value.errno == errno.EADDRINUSE
    assert plain.read_text() == "not a socket"


@fail_after()
async def test_abstract_socket_listener() -> None:
    name = f"\0trio_vhost-test-{os.getpid()}"
    async with (
        await open_unix_listener(name) as listener,
        await open_unix_connection(name) as client,
        await listener.accept() as server,
    ):
        assert listener.path == name
        await server.send(header(9, 0))
        assert (await client.receive_header())[0] == header(9, 0)


@fail_after()
async def test_connect_to_nothing_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await open_unix_connection(str(tmp_path / "absent.sock"))
