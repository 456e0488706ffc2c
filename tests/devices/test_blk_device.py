"""virtio-blk through the real server and the Python frontend: every request type."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from trio_vhost.devices.blk import BlkDevice
from trio_vhost.devices.blk_driver import BlkDriver, BlkRequestFailed
from trio_vhost.devices.blk_spec import (
    CONFIG_SIZE,
    REQUEST_HEADER,
    SECTOR_SIZE,
    BlkFeature,
    RequestType,
    Status,
)
from trio_vhost.devices.blk_threaded import ThreadedBlkDevice
from trio_vhost.frontend import RequestNacked
from trio_vhost.testing import Harness, open_device

SECTORS = 2048


@pytest.fixture
def image(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SECTORS * SECTOR_SIZE)
    yield fd
    os.close(fd)


@pytest.fixture(params=[BlkDevice, ThreadedBlkDevice], ids=["inline", "thread"])
def device_class(request: pytest.FixtureRequest) -> type[BlkDevice]:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def blk(
    device_class: type[BlkDevice], image: int, **kwargs: object
) -> AsyncIterator[tuple[Harness, BlkDriver]]:
    device = device_class(image, serial="unit-serial", **kwargs)  # type: ignore[arg-type]
    with trio.fail_after(20):
        async with open_device(device) as harness:
            yield harness, BlkDriver(harness.vrings[0])


async def test_read_write_roundtrip(image: int, device_class: type[BlkDevice]) -> None:
    async with blk(device_class, image) as (_, driver):
        data = os.urandom(64 * 1024)
        await driver.write(100, data)
        assert os.pread(image, len(data), 100 * SECTOR_SIZE) == data
        assert await driver.read(100, len(data)) == data


async def test_last_sector_ok_and_past_end_is_ioerr(
    image: int, device_class: type[BlkDevice]
) -> None:
    async with blk(device_class, image) as (_, driver):
        await driver.write(SECTORS - 1, b"\x5a" * SECTOR_SIZE)
        with pytest.raises(BlkRequestFailed) as failed:
            await driver.write(SECTORS - 1, b"\x5a" * 2 * SECTOR_SIZE)
        assert failed.value.status == Status.IOERR
        with pytest.raises(BlkRequestFailed):
            await driver.read(SECTORS, SECTOR_SIZE)
        # A huge sector number must not wrap around into range.
        with pytest.raises(BlkRequestFailed):
            await driver.read(2**64 - 1, SECTOR_SIZE)


async def test_partial_sector_is_ioerr(image: int, device_class: type[BlkDevice]) -> None:
    async with blk(device_class, image) as (_, driver):
        with pytest.raises(BlkRequestFailed):
            await driver.write(0, b"x" * 100)


async def test_unknown_type_is_unsupp(image: int, device_class: type[BlkDevice]) -> None:
    async with blk(device_class, image) as (_, driver):
        with pytest.raises(BlkRequestFailed) as failed:
            await driver.call(RequestType.GET_LIFETIME, read_len=8)
        assert failed.value.status == Status.UNSUPP
        head = driver.vring.submit([REQUEST_HEADER.pack(77, 0, 0)], [1])
        used = await driver.vring.wait_used()
        assert used == [(head, 1)]  # only a status byte fits
        assert driver.result(*used[0])[0] == Status.UNSUPP


async def test_short_header_is_ioerr_and_no_status_room_completes_empty(
    image: int, device_class: type[BlkDevice]
) -> None:
    async with blk(device_class, image) as (_, driver):
        head = driver.vring.submit([b"\0" * 8], [1])
        used = await driver.vring.wait_used()
        assert driver.result(*used[0])[0] == Status.IOERR
        head = driver.vring.submit([REQUEST_HEADER.pack(RequestType.IN, 0, 0)], [])
        assert await driver.vring.wait_used() == [(head, 0)]


async def test_flush_get_id_discard_write_zeroes(image: int, device_class: type[BlkDevice]) -> None:
    async with blk(device_class, image) as (_, driver):
        await driver.write(8, b"\xff" * 8 * SECTOR_SIZE)
        await driver.flush()
        assert await driver.get_id() == b"unit-serial"
        await driver.discard(8, 4)
        assert os.pread(image, 4 * SECTOR_SIZE, 8 * SECTOR_SIZE) == bytes(4 * SECTOR_SIZE)
        await driver.write_zeroes(12, 2)
        await driver.write_zeroes(14, 2, unmap=True)
        assert os.pread(image, 4 * SECTOR_SIZE, 12 * SECTOR_SIZE) == bytes(4 * SECTOR_SIZE)
        with pytest.raises(BlkRequestFailed):
            await driver.discard(SECTORS - 1, 2)


async def test_read_only_refuses_writes_and_keeps_image(
    image: int, device_class: type[BlkDevice]
) -> None:
    os.pwrite(image, b"\x11" * SECTOR_SIZE, 0)
    async with blk(device_class, image, read_only=True) as (harness, driver):
        assert harness.acked & BlkFeature.RO
        for attempt in (driver.write(0, b"\x22" * SECTOR_SIZE), driver.discard(0, 1)):
            with pytest.raises(BlkRequestFailed) as failed:
                await attempt
            assert failed.value.status == Status.IOERR
        await driver.flush()
        assert await driver.read(0, SECTOR_SIZE) == b"\x11" * SECTOR_SIZE
    assert os.pread(image, SECTOR_SIZE, 0) == b"\x11" * SECTOR_SIZE


async def test_config_space_layout_and_writeback(image: int, device_class: type[BlkDevice]) -> None:
    async with blk(device_class, image) as (harness, _):
        frontend = harness.frontend
        config = await frontend.get_config(0, CONFIG_SIZE)
        assert len(config) == 60
        assert int.from_bytes(config[0:8], "little") == SECTORS
        assert int.from_bytes(config[20:24], "little") == SECTOR_SIZE
        assert config[32] == 1  # writeback by default
        assert int.from_bytes(config[34:36], "little") == 1
        await frontend.set_config(32, b"\x00")
        assert (await frontend.get_config(32, 1)) == b"\x00"
        assert harness.device.writeback is False  # type: ignore[attr-defined]
        await driver_write_through(harness)
        with pytest.raises(RequestNacked):
            await frontend.set_config(0, b"\x01")


async def driver_write_through(harness: Harness) -> None:
    driver = BlkDriver(harness.vrings[0])
    await driver.write(0, b"w" * SECTOR_SIZE)


async def test_scatter_gather_request_over_many_segments(
    image: int, device_class: type[BlkDevice]
) -> None:
    async with blk(device_class, image) as (_, driver):
        data = os.urandom(8 * SECTOR_SIZE)
        header = REQUEST_HEADER.pack(RequestType.OUT, 0, 40)
        pieces = [data[i : i + 700] for i in range(0, len(data), 700)]
        driver.vring.submit([header, *pieces], [1])
        await driver.vring.wait_used()
        head = driver.vring.submit(
            [REQUEST_HEADER.pack(RequestType.IN, 0, 40)], [1000, 3000, len(data) - 4000, 1]
        )
        used = await driver.vring.wait_used()
        assert used[0][0] == head
        status, read = driver.result(*used[0])
        assert status == Status.OK
        assert read == data
