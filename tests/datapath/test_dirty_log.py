"""Dirty-page logging (LOG_SHMFD + VHOST_F_LOG_ALL) through a real server.

The bitmap must mark exactly the pages the backend wrote: every byte it changed lies on
a marked page, and every marked page holds a writable buffer (up to its used length) or
the used ring. Also: a frontend fetch-and-clearing words concurrently never loses a bit.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from vhost_dp_harness import RecordingDevice, Rig, fail_after, open_rig

from trio_vhost import FrontendReq, QueueContext, VirtioFeature
from trio_vhost.dirty_tracking import DirtyTracking
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.mem.dirty import LOG_PAGE, DirtyLog
from trio_vhost.proto.messages import U64, LogBase, VringAddr
from trio_vhost.vring import DriverQueue, SplitQueue
from trio_vhost.vring.batch import ChainBatch
from trio_vhost.vring.layout import used_ring_size


class ArrayRecording(RecordingDevice):
    """RecordingDevice on the worker's array path (simple and complex chains)."""

    uses_arrays = True

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> NDArray[np.uint32]:
        written = np.zeros(batch.count, dtype=np.uint32)
        for i in range(batch.count):
            written[i] = self.handle_chain(queue, batch.chain(i))[1]
        return written


def make(kind: str) -> RecordingDevice:
    return ArrayRecording() if kind == "arrays" else RecordingDevice()


class DirtyMemfd:
    """The frontend's side of a log: a memfd covering guest addresses [0, ``limit``)."""

    def __init__(self, limit: int) -> None:
        self.size = (limit // LOG_PAGE + 7) // 8
        self.size = (self.size + 7) // 8 * 8  # whole u64 words, as QEMU allocates it
        self.fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        import mmap

        self.map = mmap.mmap(self.fd, self.size)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.words = np.frombuffer(self.map, dtype=np.uint64)

    def pages(self) -> set[int]:
        return {int(p) for p in np.flatnonzero(np.unpackbits(self.bytes, bitorder="little"))}

    def clear(self) -> None:
        self.bytes[:] = 0

    def close(self) -> None:
        del self.bytes, self.words
        self.map.close()
        os.close(self.fd)


async def set_log(rig: Rig, log: DirtyMemfd) -> None:
    reply = await rig.frontend.request(FrontendReq.SET_LOG_BASE, LogBase(log.size, 0), fds=[log.fd])
    assert reply == U64(0)


def pages_of(addr: int, length: int) -> set[int]:
    if length <= 0:
        return set()
    return set(range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1))


def backend_pages(rig: Rig, before: np.ndarray) -> set[int]:
    """The pages on which the backend changed a byte since ``before``."""
    mask = np.zeros(rig.ram.size, dtype=bool)
    areas = list(rig.writable)
    areas += [(q.used_gpa, used_ring_size(q.size)) for q in rig.queues if q is not None]
    for addr, length in areas:
        mask[addr - rig.ram.gpa : addr - rig.ram.gpa + length] = True
    changed = np.flatnonzero(before != rig.ram.view)
    # Only the backend's writes: the driver's own avail.flags / used_event words are not.
    changed = changed[mask[changed]]
    return {(rig.ram.gpa + int(o)) // LOG_PAGE for o in changed}


def allowed_pages(rig: Rig, used_gpas: dict[int, int]) -> set[int]:
    pages: set[int] = set()
    for addr, length in rig.writable:
        pages |= pages_of(addr, length)
    for index, queue in enumerate(rig.queues):
        if queue is not None:
            pages |= pages_of(used_gpas.get(index, queue.used_gpa), used_ring_size(queue.size))
    return pages


def round_of_writes(rig: Rig, rnd: random.Random, count: int) -> list[int]:
    heads = []
    for _ in range(count):
        index = rnd.randrange(2)
        body = rnd.randbytes(rnd.randrange(0, 3000))
        rig.add(index, body=body, extra=rnd.randrange(0, 3000), split=rnd.random() < 0.5)
        heads.append(index)
    return heads


@pytest.mark.parametrize("kind", ["chains", "arrays"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@fail_after(20)
async def test_bitmap_marks_exactly_the_pages_written(seed: int, kind: str) -> None:
    rnd = random.Random(seed)
    device = make(kind)
    async with open_rig(device, size=32) as rig:
        assert rig.frontend.acked_features & VirtioFeature.LOG_ALL
        log = DirtyMemfd(rig.ram.gpa + rig.ram.size)
        try:
            await set_log(rig, log)
            for _ in range(12):
                rig.writable.clear()
                before = rig.snapshot()
                log.clear()
                targets = round_of_writes(rig, rnd, rnd.randrange(1, 4))
                for index in (0, 1):
                    n = targets.count(index)
                    if n:
                        await rig.wait_done(index, n)
                marked = log.pages()
                written = backend_pages(rig, before)
                assert written <= marked, sorted(written - marked)
                beyond = marked - allowed_pages(rig, {})
                assert not beyond, sorted(beyond)
        finally:
            log.close()


@fail_after(20)
async def test_log_flag_moves_used_ring_logging_to_log_guest_addr() -> None:
    device = RecordingDevice()
    async with open_rig(device, size=16) as rig:
        log = DirtyMemfd(rig.ram.gpa + rig.ram.size)
        try:
            await set_log(rig, log)
            queue = rig.queue(0)
            elsewhere = rig.ram.gpa  # the guard zone: no ring and no buffer lives there
            await rig.frontend.request(
                FrontendReq.SET_VRING_ADDR,
                VringAddr(
                    0,
                    1,
                    queue.desc_uva,
                    queue.used_uva,
                    queue.avail_uva,
                    elsewhere,
                ),
            )
            log.clear()
            rig.writable.clear()
            rig.add(0, body=b"x" * 100)
            await rig.wait_done(0, 1)
            marked = log.pages()
            assert pages_of(elsewhere, used_ring_size(16)) <= marked
            assert marked <= allowed_pages(rig, {0: elsewhere})
            assert queue.used_gpa // LOG_PAGE not in marked or any(
                queue.used_gpa // LOG_PAGE in pages_of(a, n) for a, n in rig.writable
            )
        finally:
            log.close()


@fail_after(20)
async def test_log_fd_is_signalled_after_a_logged_batch() -> None:
    async with open_rig(RecordingDevice(), size=16) as rig:
        log = DirtyMemfd(rig.ram.gpa + rig.ram.size)
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            await rig.frontend.request(FrontendReq.SET_LOG_FD, fds=[efd])
            await set_log(rig, log)
            rig.add(0, body=b"z" * 10)
            await rig.wait_done(0, 1)
            assert os.eventfd_read(efd) >= 1
        finally:
            os.close(efd)
            log.close()


@fail_after(20)
async def test_no_marks_without_log_all() -> None:
    device = RecordingDevice()
    features = ~int(VirtioFeature.LOG_ALL)
    async with open_rig(device, size=16, features=features) as rig:
        log = DirtyMemfd(rig.ram.gpa + rig.ram.size)
        try:
            await set_log(rig, log)
            rig.add(0, body=b"y" * 5000)
            await rig.wait_done(0, 1)
            assert not log.pages()
        finally:
            log.close()


# -- a frontend fetch-and-clearing words while the worker marks -----------------------------

_XCHG_SRC = """
#include <stdint.h>
#include <stddef.h>
/* Take every word of the log with an atomic exchange, as QEMU does; OR into out. */
void take_all(uint64_t *log, uint64_t *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] |= __atomic_exchange_n(&log[i], 0, __ATOMIC_SEQ_CST);
}
"""


def _xchg_lib(tmp: Path) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the atomic-exchange helper")
    src = tmp / "xchg.c"
    src.write_text(_XCHG_SRC)
    lib = tmp / "xchg.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.take_all.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    dll.take_all.restype = None
    return dll


@pytest.mark.parametrize("kind", ["chains", "arrays"])
@fail_after(60)
async def test_concurrent_fetch_and_clear_loses_no_bit(tmp_path: Path, kind: str) -> None:
    dll = _xchg_lib(tmp_path)
    rnd = random.Random(7)
    device = make(kind)
    async with open_rig(device, size=32) as rig:
        log = DirtyMemfd(rig.ram.gpa + rig.ram.size)
        taken = np.zeros_like(log.words)
        stop = threading.Event()

        def frontend() -> None:
            while not stop.is_set():
                dll.take_all(log.words.ctypes.data, taken.ctypes.data, len(log.words))

        thread = threading.Thread(target=frontend, daemon=True)
        try:
            await set_log(rig, log)
            before = rig.snapshot()
            rig.writable.clear()
            thread.start()
            for _ in range(40):
                targets = round_of_writes(rig, rnd, rnd.randrange(1, 4))
                for index in (0, 1):
                    n = targets.count(index)
                    if n:
                        await rig.wait_done(index, n)
            stop.set()
            thread.join()
            dll.take_all(log.words.ctypes.data, taken.ctypes.data, len(log.words))
            got = {
                int(p)
                for p in np.flatnonzero(np.unpackbits(taken.view(np.uint8), bitorder="little"))
            }
            written = backend_pages(rig, before)
            assert written <= got, sorted(written - got)
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()
            log.close()


@fail_after(20)
async def test_write_beyond_the_log_stops_only_that_ring() -> None:
    from trio_vhost import VringFailed

    async with open_rig(RecordingDevice(), size=16) as rig:
        log = DirtyMemfd(rig.ram.gpa)  # covers nothing of guest RAM
        try:
            await set_log(rig, log)
            rig.add(0, body=b"q" * 10)
            with pytest.raises(VringFailed):
                await rig.vring(0).wait_used(1)
            assert not log.words.any()  # nothing written out of bounds (or in)
            assert await rig.get_features() & VirtioFeature.LOG_ALL  # the session serves on
        finally:
            log.close()


# -- log_arrays against log_chains, batch by batch --------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=st.lists(
        st.tuples(
            st.lists(st.integers(1, 3000), max_size=2),  # readable buffers
            st.lists(st.integers(1, 9000), min_size=1, max_size=3),  # writable buffers
            st.sampled_from([False] * 12 + [True]),  # indirect
            st.floats(0, 1.2),  # used length, as a share of the writable bytes
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_log_arrays_marks_what_log_chains_marks(chains) -> None:
    """The array path's dirty pages equal the chain path's for the same published batch:
    every writable buffer up to the chain's used length, and the used ring."""
    ram = GuestRam.create(8 << 20, gpa=0x10_0000)
    table = MemoryTable.from_regions([ram.backend_region()])
    try:
        driver = DriverQueue.create(ram, 256, indirect=True, pool_size=6 << 20)
        heads = [driver.add(list(r), list(w), indirect=ind) for r, w, ind, _ in chains]
        driver.publish()
        queue = SplitQueue(table, driver.queue_state())
        batch = queue.pop_arrays(256)
        assert batch.heads.tolist() == heads
        room = batch.writable_len.tolist()
        written = np.array(
            [min(int(share * n), 0xFFFF_FFFF) for (*_, share), n in zip(chains, room, strict=True)],
            dtype=np.uint32,
        )
        bitmaps = []
        for path in ("arrays", "chains"):
            tracking = DirtyTracking()
            bitmap = np.zeros((ram.gpa + ram.size) // LOG_PAGE // 8 + 8, dtype=np.uint8)
            tracking.set_log(DirtyLog(None, bitmap))
            tracking.set_log_all(True)
            if path == "arrays":
                tracking.log_arrays(batch, written, 0x12_3000, 100)
            else:
                completions = list(zip(heads, written.tolist(), strict=True))
                tracking.log_chains(batch.chains, completions, 0x12_3000, 100)
            bitmaps.append(bitmap)
        assert (bitmaps[0] == bitmaps[1]).all()
        event(f"walked {min(len(batch.walked), 2)}+, uniform {batch.segments.uniform}")
        del queue, batch
    finally:
        table.close()
        ram.close()
