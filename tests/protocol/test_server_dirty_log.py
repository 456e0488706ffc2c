"""SET_LOG_BASE / SET_LOG_FD on the wire: gating on LOG_SHMFD, sizes, fds, the reply."""

from __future__ import annotations

import os

import pytest
from _raw_frontend import RawFrontend, fail_after, negotiate

from trio_vhost.device import LIBRARY_FEATURES, LIBRARY_PROTOCOL_FEATURES
from trio_vhost.proto.constants import FrontendReq, ProtocolFeature, VirtioFeature
from trio_vhost.proto.messages import LogBase

P = ProtocolFeature


def test_log_features_are_offered() -> None:
    assert LIBRARY_PROTOCOL_FEATURES & P.LOG_SHMFD
    assert LIBRARY_FEATURES & VirtioFeature.LOG_ALL


def _memfd(size: int) -> int:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("protocol", [P.LOG_SHMFD, P.LOG_SHMFD | P.REPLY_ACK])
@fail_after()
async def test_set_log_base_replies_zero(blk_server: str, protocol: int) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=protocol)
        fd = _memfd(8192)
        try:
            await fe.request(FrontendReq.SET_LOG_BASE, LogBase(4096, 4096), fds=[fd])
        finally:
            os.close(fd)
        assert await fe.expect_u64(FrontendReq.SET_LOG_BASE) == 0
        # A second log replaces the first; the connection stays.
        fd = _memfd(4096)
        try:
            await fe.request(FrontendReq.SET_LOG_BASE, LogBase(4096, 0), fds=[fd])
        finally:
            os.close(fd)
        assert await fe.expect_u64(FrontendReq.SET_LOG_BASE) == 0
        await fe.request(FrontendReq.GET_FEATURES)
        assert await fe.expect_u64(FrontendReq.GET_FEATURES) & VirtioFeature.LOG_ALL


@pytest.mark.parametrize(
    ("size", "offset", "file_size"),
    [(8192, 0, 4096), (4096, 4096, 4096), (0, 0, 4096), (1 << 40, 0, 4096)],
    ids=["beyond_file", "offset_beyond_file", "empty", "huge"],
)
@fail_after()
async def test_set_log_base_bad_sizes_reply_non_zero(
    blk_server: str, size: int, offset: int, file_size: int
) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.LOG_SHMFD)
        fd = _memfd(file_size)
        try:
            await fe.request(FrontendReq.SET_LOG_BASE, LogBase(size, offset), fds=[fd])
        finally:
            os.close(fd)
        assert await fe.expect_u64(FrontendReq.SET_LOG_BASE) != 0
        await fe.request(FrontendReq.GET_FEATURES)
        await fe.expect_u64(FrontendReq.GET_FEATURES)


@fail_after()
async def test_set_log_base_needs_log_shmfd(blk_server: str) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.REPLY_ACK)
        fd = _memfd(4096)
        try:
            await fe.request(FrontendReq.SET_LOG_BASE, LogBase(4096, 0), fds=[fd])
        finally:
            os.close(fd)
        await fe.expect_closed()


@fail_after()
async def test_set_log_base_needs_its_fd(blk_server: str) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.LOG_SHMFD)
        await fe.request(FrontendReq.SET_LOG_BASE, LogBase(4096, 0))
        await fe.expect_closed()


@fail_after()
async def test_set_log_fd_takes_an_eventfd(blk_server: str) -> None:
    async with await RawFrontend.connect(blk_server) as fe:
        await negotiate(fe, protocol=P.LOG_SHMFD | P.REPLY_ACK)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            await fe.request(FrontendReq.SET_LOG_FD, fds=[efd], need_reply=True)
        finally:
            os.close(efd)
        assert await fe.expect_u64(FrontendReq.SET_LOG_FD) == 0
