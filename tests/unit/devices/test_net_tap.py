"""TapDevice against a real kernel TAP interface.

The host side of the TAP is reached with an AF_PACKET socket bound to the interface: a frame
the socket sends comes out of the TAP's file descriptor, and a frame written to the file
descriptor arrives at the socket. Each test creates its own non-persistent interface
(``tvh%d``), which the kernel deletes when the device is closed.

These tests need CAP_NET_ADMIN and ``/dev/net/tun``. Where the machine has neither, they skip
with the kernel's exact refusal. Frames use the local experimental EtherType 0x88b5 and a
per-test marker, so anything else the kernel sends on the link is ignored.

Rules: no sleeps; every async test runs under a trio-clock ``fail_after``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from trio_vhost.devices import tap as tap_module
from trio_vhost.devices.net_frames import Frames
from trio_vhost.devices.net_switch import PortQueue, Switch
from trio_vhost.devices.tap import TapDevice, TapError, TapFailure, open_tap
from trio_vhost.errors import DeviceError

ETHERTYPE = b"\x88\xb5"
BROADCAST = b"\xff" * 6
GUEST_MAC = bytes.fromhex("020000000001")
HOST_MAC = bytes.fromhex("020000000002")
ETH_P_ALL = 0x0003


def _quiet(ifname: str) -> None:
    """Keep the kernel from sending its own IPv6 frames (DAD, router solicitations)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


@pytest.fixture
def tap() -> Iterator[TapDevice]:
    """A fresh TAP interface, link up; skips with the kernel's reason if not allowed."""
    try:
        device = open_tap("tvh%d")
    except TapError as exc:
        pytest.skip(f"cannot create a tap device here: {exc}")
    try:
        _quiet(device.ifname)
        try:
            device.set_link_up()
        except OSError as exc:
            pytest.skip(f"cannot set {device.ifname} up here: {exc}")
        yield device
    finally:
        device.close()


@pytest.fixture
def host(tap: TapDevice) -> Iterator[socket.socket]:
    """An AF_PACKET socket on the TAP interface: the host's end of the wire."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind((tap.ifname, 0))
        yield sock
    finally:
        sock.close()


def ours(data: bytes, marker: bytes) -> bool:
    return data[12:14] == ETHERTYPE and data[14:].startswith(marker)


def test_open_tap_creates_a_named_interface_that_goes_away_on_close() -> None:
    try:
        device = open_tap("tvh%d")
    except TapError as exc:
        pytest.skip(f"cannot create a tap device here: {exc}")
    with device:
        assert device.ifname.startswith("tvh")
        assert device.ifname != "tvh%d"
        assert device.name == f"tap:{device.ifname}"
        assert Path(f"/sys/class/net/{device.ifname}/tun_flags").exists()
        assert device.fileno() >= 0
        assert device.ifname in repr(device)
    assert device.closed
    assert "closed" in repr(device)
    assert not Path(f"/sys/class/net/{device.ifname}").exists()
    device.close()  # idempotent


async def test_host_frames_are_forwarded_into_the_switch(
    tap: TapDevice, host: socket.socket
) -> None:
    switch = Switch()
    guest = PortQueue("guest")
    switch.add_port(tap)
    switch.add_port(guest)
    sent = BROADCAST + HOST_MAC + ETHERTYPE + b"from-host" + bytes(40)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tap.run, switch)
            host.send(sent)
            while True:
                await guest.wait_frames()
                got = guest.get_nowait()
                if ours(got, b"from-host"):
                    break
            nursery.cancel_scope.cancel()
    assert got == sent
    assert switch.lookup(HOST_MAC) is tap
    assert switch.statistics().port(tap.name).rx_frames >= 1


async def test_switch_frames_reach_the_host(tap: TapDevice, host: socket.socket) -> None:
    switch = Switch()
    guest = PortQueue("guest")
    switch.add_port(tap)
    switch.add_port(guest)
    sent = BROADCAST + GUEST_MAC + ETHERTYPE + b"from-guest" + bytes(40)
    receiver = trio.socket.from_stdlib_socket(host)
    with trio.fail_after(10):
        switch.forward(guest, sent)
        while True:
            data = await receiver.recv(65536)
            if ours(data, b"from-guest"):
                break
    assert data == sent
    assert switch.statistics().port(tap.name).tx_frames == 1


async def test_a_batch_from_the_switch_reaches_the_host(
    tap: TapDevice, host: socket.socket
) -> None:
    switch = Switch()
    guest = PortQueue("guest")
    switch.add_port(tap)
    switch.add_port(guest)
    sent = [BROADCAST + GUEST_MAC + ETHERTYPE + b"batch-%d" % n + bytes(n) for n in range(5)]
    lengths = np.array([len(f) for f in sent], dtype=np.intp)
    receiver = trio.socket.from_stdlib_socket(host)
    with trio.fail_after(10):
        switch.forward_frames(guest, Frames.concatenated(b"".join(sent), lengths))
        got: list[bytes] = []
        while len(got) < len(sent):
            data = await receiver.recv(65536)
            if ours(data, b"batch-"):
                got.append(data)
    assert got == sent
    stats = switch.statistics().port(tap.name)
    assert (stats.tx_frames, stats.tx_bytes) == (5, sum(map(len, sent)))


def test_a_batch_to_a_closed_tap_is_dropped(tap: TapDevice) -> None:
    switch = Switch()
    guest = PortQueue("guest")
    switch.add_port(tap)
    switch.add_port(guest)
    tap.close()
    one = BROADCAST + GUEST_MAC + ETHERTYPE + bytes(50)
    switch.forward_frames(guest, Frames.concatenated(one * 3, np.full(3, len(one))))
    assert switch.statistics().port(tap.name).tx_dropped == 3


async def test_a_burst_larger_than_one_batch_arrives_whole(
    tap: TapDevice, host: socket.socket
) -> None:
    switch = Switch()
    guest = PortQueue("guest", capacity=1000)
    switch.add_port(tap)
    switch.add_port(guest)
    count = 200  # more than one read batch: run() must yield and come back
    wanted = {b"burst-%03d" % n for n in range(count)}
    seen: set[bytes] = set()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tap.run, switch)
            for marker in sorted(wanted):
                host.send(BROADCAST + HOST_MAC + ETHERTYPE + marker)
            while seen != wanted:
                await guest.wait_frames()
                while len(guest):
                    data = guest.get_nowait()
                    if data[12:14] == ETHERTYPE:
                        seen.add(data[14:])
            nursery.cancel_scope.cancel()


async def test_close_ends_run(tap: TapDevice) -> None:
    switch = Switch()
    switch.add_port(tap)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tap.run, switch)
            await trio.testing.wait_all_tasks_blocked()
            tap.close()
    assert tap.closed
    assert not tap.deliver(BROADCAST + GUEST_MAC + ETHERTYPE)


async def test_run_on_a_closed_device_returns(tap: TapDevice) -> None:
    tap.close()
    with trio.fail_after(10), trio.testing.assert_checkpoints():
        await tap.run(Switch())


async def test_run_twice_at_once_is_refused(tap: TapDevice) -> None:
    switch = Switch()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tap.run, switch)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await tap.run(switch)
            nursery.cancel_scope.cancel()
    # and after the first run was cancelled, it may run again
    with trio.move_on_after(0):
        await tap.run(switch)


async def test_a_port_that_closes_the_tap_mid_batch_ends_run(
    tap: TapDevice, host: socket.socket
) -> None:
    class Closer:
        name = "closer"

        def deliver(self, frame: bytes) -> bool:
            tap.close()
            return True

    switch = Switch()
    switch.add_port(tap)
    switch.add_port(Closer())
    for n in range(3):
        host.send(BROADCAST + HOST_MAC + ETHERTYPE + b"%d" % n)
    with trio.fail_after(10):
        await tap.run(switch)
    assert tap.closed


def test_deliver_to_a_down_link_is_refused_and_counted(tap: TapDevice) -> None:
    tap.set_link_up(False)
    assert not tap.deliver(BROADCAST + GUEST_MAC + ETHERTYPE)
    assert not tap.deliver(BROADCAST + GUEST_MAC + ETHERTYPE)
    assert tap.write_errors == 2
    tap.set_link_up(True)
    assert tap.deliver(BROADCAST + GUEST_MAC + ETHERTYPE)


def test_switch_counts_a_down_tap_as_a_drop(tap: TapDevice) -> None:
    switch = Switch()
    guest = PortQueue("guest")
    switch.add_port(tap)
    switch.add_port(guest)
    tap.set_link_up(False)
    switch.forward(guest, BROADCAST + GUEST_MAC + ETHERTYPE)
    assert switch.statistics().port(tap.name).tx_dropped == 1


# -- errors -----------------------------------------------------------------------------------


def test_attaching_twice_is_busy(tap: TapDevice) -> None:
    with pytest.raises(TapError) as info:
        open_tap(tap.ifname)
    assert info.value.reason is TapFailure.BUSY
    assert info.value.errno == errno.EBUSY
    assert info.value.filename == tap.ifname
    assert "already attached" in str(info.value)


def test_a_name_that_is_not_a_tap_is_refused(tap: TapDevice) -> None:
    # tap fixture: proves this machine allows taps at all
    with pytest.raises(TapError) as info:
        open_tap("lo")
    assert info.value.reason is TapFailure.NOT_A_TAP
    assert info.value.errno == errno.EINVAL


def test_missing_tun_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tap_module, "TUN_PATH", str(tmp_path / "no-such-tun"))
    with pytest.raises(TapError) as info:
        open_tap("tvh%d")
    assert info.value.reason is TapFailure.NO_TUN_DEVICE
    assert info.value.errno == errno.ENOENT
    assert "modprobe tun" in str(info.value)
    assert isinstance(info.value, OSError)
    assert isinstance(info.value, DeviceError)


def test_without_cap_net_admin_is_permission_denied(tap: TapDevice) -> None:
    """A real unprivileged process: a forked child drops to nobody (when root) and tries."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, always _exit
        status = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                open_tap("tvhperm%d").close()
            except TapError as exc:
                os.write(write_end, f"{exc.reason.name} {exc.errno}".encode())
            else:
                os.write(write_end, b"OPENED")
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    if answer == "OPENED":
        pytest.skip("this unprivileged user may create taps: nothing to refuse")
    assert answer.split() == ["PERMISSION", str(errno.EPERM)]


@pytest.mark.parametrize("ifname", ["", "x" * 16, "a/b", "a:b", "a b", ".", ".."])
def test_bad_interface_names(ifname: str) -> None:
    with pytest.raises(ValueError, match="bad interface name"):
        open_tap(ifname)


def test_open_failure_leaks_no_fd(tap: TapDevice) -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(TapError):
            open_tap(tap.ifname)
    assert set(os.listdir("/proc/self/fd")) <= before


async def test_run_fails_when_the_interface_is_deleted_under_it(tap: TapDevice) -> None:
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("needs the ip command to delete the interface")
    switch = Switch()
    switch.add_port(tap)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_expect_ebadfd, tap, switch)
            await trio.testing.wait_all_tasks_blocked()
            await trio.run_process([ip, "link", "del", tap.ifname])
    assert not tap.deliver(BROADCAST + GUEST_MAC + ETHERTYPE)


async def _expect_ebadfd(tap: TapDevice, switch: Switch) -> None:
    with pytest.raises(OSError, match="bad state") as info:
        await tap.run(switch)
    assert info.value.errno == errno.EBADFD
