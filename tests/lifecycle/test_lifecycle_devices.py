"""Device state (Device.save_state / load_state) of the base class, blk and net.

Unit checks of each device's bytes, then blk over the wire: the write-cache mode survives
SNAPSHOT/RESTORE, and a blk guest's I/O stream survives a DEVICE_STATE migration (save
on A after GET_VRING_BASE, load on B, rings set up again from their bases).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _lifecycle_rig import ALL_PROTOCOL, connected

from trio_vhost import Device, DriverQueue, GuestRam
from trio_vhost.device import LIBRARY_PROTOCOL_FEATURES
from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver
from trio_vhost.devices.blk_spec import WRITEBACK_OFFSET
from trio_vhost.devices.net import NetPort
from trio_vhost.devices.net_switch import Switch
from trio_vhost.errors import DeviceError
from trio_vhost.frontend import QEMU_PROTOCOL_MASK, RequestNacked
from trio_vhost.proto.constants import ProtocolFeature as P
from trio_vhost.proto.constants import VirtioFeature as V
from trio_vhost.snapshot import StateSnapshot

# -- feature offers --------------------------------------------------------------------------


def test_device_state_is_offered_beyond_qemu_7_2s_mask() -> None:
    assert LIBRARY_PROTOCOL_FEATURES & P.DEVICE_STATE
    assert not P.DEVICE_STATE & QEMU_PROTOCOL_MASK
    assert Device().offered_protocol_features() & P.DEVICE_STATE


def test_status_is_an_opt_in(image_fd: int) -> None:
    assert not Device().offered_protocol_features() & P.STATUS
    assert not NetPort(Switch(), "p").offered_protocol_features() & P.STATUS
    assert BlkDevice(image_fd).offered_protocol_features() & P.STATUS

    class WithStatus(Device):
        offers_status = True

    assert WithStatus().offered_protocol_features() & P.STATUS


# -- the base class --------------------------------------------------------------------------


def test_default_device_state_is_empty() -> None:
    device = Device()
    assert device.save_state() == b""
    device.load_state(b"")
    with pytest.raises(DeviceError):
        device.load_state(b"\0")


# -- blk ---------------------------------------------------------------------------------------


def test_blk_state_carries_the_write_cache_mode(image_fd: int) -> None:
    source = BlkDevice(image_fd, num_queues=2, serial="disk")
    source.write_config(WRITEBACK_OFFSET, b"\0", 0)
    target = BlkDevice(image_fd, num_queues=2, serial="disk")
    assert target.writeback
    target.load_state(source.save_state())
    assert not target.writeback
    source.write_config(WRITEBACK_OFFSET, b"\1", 0)
    target.load_state(source.save_state())
    assert target.writeback


@pytest.mark.parametrize(
    "other",
    [
        {"num_queues": 1},
        {"serial": "other"},
        {"read_only": True},
        {"size": 2},
    ],
    ids=["queues", "serial", "read_only", "capacity"],
)
def test_blk_state_refused_by_a_different_device(
    other: dict[str, object], image_fd: int, tmp_path: Path
) -> None:
    source = BlkDevice(image_fd, num_queues=2, serial="disk")
    source.write_config(WRITEBACK_OFFSET, b"\0", 0)
    size = os.fstat(image_fd).st_size * int(other.pop("size", 1))  # type: ignore[call-overload]
    path = tmp_path / "other.img"
    with open(path, "wb") as image:
        image.truncate(size)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        kwargs: dict[str, object] = {"num_queues": 2, "serial": "disk", **other}
        target = BlkDevice(fd, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(DeviceError):
            target.load_state(source.save_state())
        assert target.writeback  # unchanged
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "data",
    [b"", b"\1", bytes(32), b"\2" + bytes(31), b"\1\4" + bytes(30)],
    ids=["empty", "short", "zero_version", "version_2", "unknown_flag"],
)
def test_blk_state_malformed(data: bytes, image_fd: int) -> None:
    device = BlkDevice(image_fd)
    assert len(device.save_state()) == 32
    with pytest.raises(DeviceError):
        device.load_state(data)


# -- net ---------------------------------------------------------------------------------------


def test_net_state_takes_over_the_mac_and_counters() -> None:
    switch = Switch()
    source = NetPort(switch, "a", pairs=2, mtu=9000)
    source.rx_too_small = 7
    target = NetPort(switch, "b", pairs=2, mtu=9000)
    assert target.mac != source.mac  # both random
    target.load_state(source.save_state())
    assert target.mac == source.mac
    assert target.read_config(0, 6) == source.mac
    assert target.config_space == source.config_space
    assert target.rx_too_small == 7


@pytest.mark.parametrize(("pairs", "mtu"), [(1, 9000), (2, 1500)])
def test_net_state_refused_by_a_different_port(pairs: int, mtu: int) -> None:
    switch = Switch()
    source = NetPort(switch, "a", pairs=2, mtu=9000)
    target = NetPort(switch, "b", pairs=pairs, mtu=mtu)
    mac = target.mac
    with pytest.raises(DeviceError):
        target.load_state(source.save_state())
    assert target.mac == mac
    for bad in (b"", source.save_state()[:-1], b"\2" + source.save_state()[1:]):
        with pytest.raises(DeviceError):
            source.load_state(bad)


# -- blk over the wire -----------------------------------------------------------------------


async def test_blk_write_cache_mode_survives_snapshot_and_restore(image_fd: int) -> None:
    with GuestRam.create(1 << 20) as ram:
        source = BlkDevice(image_fd, num_queues=2, serial="disk")
        async with connected(source) as fe:
            await fe.negotiate(protocol_features=ALL_PROTOCOL)
            await fe.set_mem_table([ram])
            await fe.set_config(WRITEBACK_OFFSET, b"\0")
            await fe.sleep()
            data = await fe.snapshot()
        assert StateSnapshot.decode(data).device_state[1] & 1 == 0
        target = BlkDevice(image_fd, num_queues=2, serial="disk")
        async with connected(target) as fe:
            await fe.negotiate(protocol_features=ALL_PROTOCOL)
            await fe.set_mem_table([ram])
            await fe.restore(data)
            await fe.wake()
            assert await fe.get_config(WRITEBACK_OFFSET, 1) == b"\0"
        stranger = BlkDevice(image_fd, num_queues=2, serial="stranger")
        async with connected(stranger) as fe:
            await fe.negotiate(protocol_features=ALL_PROTOCOL)
            await fe.set_mem_table([ram])
            with pytest.raises(RequestNacked):
                await fe.restore(data)
            with pytest.raises(RequestNacked):
                await fe.load_device_state(data)
            assert stranger.writeback


async def test_blk_io_stream_survives_a_device_state_migration(image_fd: int) -> None:
    with GuestRam.create(2 << 20) as ram:
        source = BlkDevice(image_fd, num_queues=1, serial="disk")
        block = bytes(range(256)) * 4
        async with connected(source) as fe:
            acked = await fe.negotiate(protocol_features=ALL_PROTOCOL)
            queue = DriverQueue.create(
                ram, 64, event_idx=bool(acked & V.RING_EVENT_IDX), indirect=True
            )
            await fe.set_mem_table([ram])
            vring = await fe.start_vring(0, queue)
            try:
                blk = BlkDriver(vring)
                await blk.write(8, block)
                await fe.set_config(WRITEBACK_OFFSET, b"\0")
                await blk.write(16, block)  # write-through now
                base = await fe.get_vring_base(0)
                assert base == 2
                state = await fe.save_device_state()
            finally:
                vring.close()
        target = BlkDevice(image_fd, num_queues=1, serial="disk")
        async with connected(target) as fe:
            await fe.negotiate(protocol_features=ALL_PROTOCOL)
            await fe.load_device_state(state)
            assert not target.writeback
            await fe.set_mem_table([ram])
            vring = await fe.start_vring(0, queue, base=base)
            try:
                blk = BlkDriver(vring)
                assert await blk.read(8, len(block)) == block
                assert await blk.read(16, len(block)) == block
                assert await fe.get_vring_base(0) == 4
            finally:
                vring.close()
