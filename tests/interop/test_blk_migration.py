"""Live migration of a QEMU 7.2 guest doing blk I/O through trio-vhost (LOG_SHMFD).

Two ``trio-vhost blk`` processes serve the same image on two sockets. The source QEMU
boots a guest that streams self-describing 4 KiB blocks to the disk
(tests/interop/guest/blk-stream.sh); a destination QEMU waits with ``-incoming`` and
``-S``. In the middle of the stream the source is migrated over a unix socket (HMP
``migrate -d``, polled with ``info migrate``). Without LOG_SHMFD QEMU would refuse (a
migration blocker); with it, the backend logs its writes to guest memory (status bytes,
used ring, notification words) in the shared bitmap, and QEMU sends those pages again.

The check that proves the logging: once the migration is complete, the source is paused
for good and the destination (``-S``) is paused with the RAM it received, before its own
backend has run. Every page of the two guest RAMs must be equal; a page that differs
arrived stale, whoever wrote it last. Only then is the destination continued; the guest
must finish the stream there and every block must be on the image in its place.

Guest RAM is 256 MiB + 8 KiB, deliberately not a multiple of 256 KiB: QEMU before 9.0
under TCG loses guest-CPU writes during migration (see :data:`RAM`), which once made this
test fail in 1 run in 3 to 1 in 8 with nothing of ours involved.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

CHUNKS = 48  # MiB written by the guest, 256 blocks of 4 KiB each
MIGRATE_AFTER = 3  # chunks done before the migration starts
BLOCK = 4096
PAGE = 4096
#: Guest RAM size. Not a multiple of 256 KiB (64 pages, one word of QEMU's dirty bitmap)
#: on purpose: QEMU < 9.0 syncs the migration bitmap of a RAMBlock that starts and ends
#: on such a boundary a word at a time (cpu_physical_memory_sync_dirty_bitmap's fast path)
#: and forgets to re-arm TCG's TLB "not dirty" traps for the pages it clears, so later
#: guest-CPU stores through a cached TLB entry set no dirty bit and the page is never sent
#: again. Fixed upstream by 03bfc2188f ("physmem: Fix migration dirty bitmap coherency with
#: TCG memory access", QEMU 9.0); Debian 12's QEMU 7.2 evidently lacks it. Here it showed as
#: 2 to 30 stale guest-kernel pages (slab, lists: the destination oopsed with list
#: corruption) in 16 of 96 migrations, also with QEMU's own virtio-blk and no vhost-user
#: at all, and never on a page our backend wrote. An odd size sends the sync through the
#: page-by-page path, which does re-arm the traps. It changes nothing on the vhost side:
#: the backend's writes are tracked only through our log, whatever the RAM size.
RAM = "262152K"
#: Hard cap on the whole test, scaled (a run takes about 7 s on 2 cores under TCG).
TEST_TIMEOUT = 120


def block(i: int) -> bytes:
    return b"B%014d\n" % i + b"x" * (BLOCK - 16)


class Hmp:
    """A minimal HMP client on a unix monitor socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _prompt(self) -> str:
        while b"(qemu) " not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise AssertionError(f"monitor closed: {self.buf!r}")
            self.buf += data
        text, _, self.buf = self.buf.partition(b"(qemu) ")
        return text.decode("utf-8", "replace")

    async def command(self, line: str) -> str:
        await self.stream.send_all(line.encode() + b"\n")
        return await self._prompt()


async def connect_hmp(path: str) -> Hmp:
    with trio.fail_after(harness.scaled(20)):
        while True:
            try:
                stream = await trio.open_unix_socket(path)
                break
            except OSError:
                await trio.sleep(0.1)
    hmp = Hmp(stream)
    await hmp._prompt()  # the banner
    return hmp


def backend_argv(sock: object, image: object) -> list[str]:
    return [
        sys.executable, "-m", "trio_vhost.cli", "-v", "blk",
        "--socket", str(sock), "--image", str(image), "--queues", "2",
    ]  # fmt: skip


def with_ram(argv: list[str], size: str) -> list[str]:
    """``argv`` from :func:`harness.qemu_command` with guest RAM of ``size``."""
    out = list(argv)
    at = out.index("-m")
    backend = [i for i, a in enumerate(out) if a.startswith("memory-backend-memfd,id=mem,")]
    assert len(backend) == 1, f"no memory backend to resize in {argv}"
    out[at + 1] = size
    out[backend[0]] = re.sub(r"size=[^,]+", f"size={size}", out[backend[0]])
    return out


def qemu_pid(proc: harness.Managed) -> int:
    """The QEMU process under harness.spawn's ``timeout`` wrapper."""
    wrapper = proc.process.pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rpartition(")")[2].split()[1]) == wrapper:
            return int(entry.name)
    raise AssertionError(f"{proc.name}: no QEMU under pid {wrapper}")


def guest_ram(proc: harness.Managed) -> bytes:
    """The guest RAM of a paused QEMU: its memory-backend-memfd, read via /proc."""
    pid = qemu_pid(proc)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:memory-backend-memfd"):
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                return f.read()
    raise AssertionError(f"{proc.name}: no memory-backend-memfd among its fds")


def stale_pages(src: bytes, dst: bytes) -> dict[int, int]:
    """Guest-physical address -> differing bytes, for every page that differs.

    The RAM block is mapped at guest-physical 0 (q35, less than 2 GiB), so a memfd offset
    is a guest-physical address.
    """
    assert len(src) == len(dst), (len(src), len(dst))
    a = np.frombuffer(src, dtype=np.uint8)
    b = np.frombuffer(dst, dtype=np.uint8)
    stale: dict[int, int] = {}
    step = 16 << 20
    for start in range(0, len(a), step):
        pa = a[start : start + step]
        pb = b[start : start + step]
        whole = len(pa) // PAGE * PAGE
        pages = (pa[:whole] != pb[:whole]).reshape(-1, PAGE)
        for p in np.flatnonzero(pages.any(axis=1)):
            stale[start + int(p) * PAGE] = int(pages[p].sum())
        if whole < len(pa) and (pa[whole:] != pb[whole:]).any():
            stale[start + whole] = int((pa[whole:] != pb[whole:]).sum())
    return stale


async def wait_migrated(src: Hmp, dst: Hmp, procs: list[harness.Managed]) -> None:
    """Poll until the source reports completion and the destination (-S) has loaded."""
    while True:
        info = await src.command("info migrate")
        if "Migration status: completed" in info:
            break
        assert "Migration status: failed" not in info, info
        for proc in procs:
            proc.check_alive()
        await trio.sleep(0.1)
    while True:
        status = await dst.command("info status")
        # "paused (inmigrate)" while loading; "paused (prelaunch)" or "paused" after.
        if "VM status: paused" in status and "inmigrate" not in status:
            return
        assert "VM status: running" not in status, status
        for proc in procs:
            proc.check_alive()
        await trio.sleep(0.1)


def guest_specs(workdir: harness.Workdir) -> tuple[harness.GuestSpec, harness.GuestSpec]:
    """The source guest, and the destination waiting for it (``-incoming`` and ``-S``)."""
    params = {"chunks": CHUNKS}
    src = harness.GuestSpec(
        name="mig-src",
        role="blk-stream",
        params=params,
        blk=[harness.BlkDisk(workdir.sock("blk-a"), num_queues=1)],
        extra_args=["-monitor", f"unix:{workdir.sock('mon')},server=on,wait=off"],
    )
    incoming = ["-incoming", f"unix:{workdir.sock('mig')}", "-S"]
    dst = harness.GuestSpec(
        name="mig-dst",
        role="blk-stream",
        params=params,
        blk=[harness.BlkDisk(workdir.sock("blk-b"), num_queues=1)],
        extra_args=[*incoming, "-monitor", f"unix:{workdir.sock('mon-dst')},server=on,wait=off"],
    )
    return src, dst


async def migrate(
    workdir: harness.Workdir,
    q_src: harness.Managed,
    q_dst: harness.Managed,
    back_b: harness.Managed,
) -> dict[int, int]:
    """Migrate, compare the two paused guest RAMs, then let the destination finish.

    Returns the stale pages; with any, the destination is not continued.
    """
    hmp_src = await connect_hmp(str(workdir.sock("mon")))
    hmp_dst = await connect_hmp(str(workdir.sock("mon-dst")))
    reply = await hmp_src.command(f"migrate -d unix:{workdir.sock('mig')}")
    assert "blocker" not in reply.lower(), reply
    assert "error" not in reply.lower(), reply
    await wait_migrated(hmp_src, hmp_dst, [q_src, q_dst, back_b])
    # Both paused: the source for good (its rings were stopped before the last dirty
    # sync), the destination before its backend has started.
    ram_src, ram_dst = guest_ram(q_src), guest_ram(q_dst)
    stale = await trio.to_thread.run_sync(stale_pages, ram_src, ram_dst)
    del ram_src, ram_dst
    await hmp_src.stream.send_all(b"quit\n")  # no prompt follows: QEMU exits
    await hmp_src.stream.aclose()
    if not stale:
        # The guest goes on on the destination and powers off when it is done.
        await hmp_dst.command("cont")
        with trio.move_on_after(harness.scaled(45)):
            while q_dst.alive():
                back_b.check_alive()
                await trio.sleep(0.2)
        assert not q_dst.alive(), "the destination guest did not power off"
    await hmp_dst.stream.aclose()
    return stale


async def test_live_migration_with_blk_io(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    workdir: harness.Workdir,
) -> None:
    image = workdir.file("disk.img")
    with open(image, "wb") as f:
        f.truncate(64 * harness.MIB)
    sock_a, sock_b = workdir.sock("blk-a"), workdir.sock("blk-b")
    src, dst = guest_specs(workdir)
    src_serial, dst_serial = workdir.log("serial-mig-src"), workdir.log("serial-mig-dst")
    src_serial.touch()
    dst_serial.touch()
    dst_argv = with_ram(harness.qemu_command(qemu_tools, guest_images, dst, dst_serial), RAM)
    src_argv = with_ram(harness.qemu_command(qemu_tools, guest_images, src, src_serial), RAM)
    life = TEST_TIMEOUT + 20
    with trio.fail_after(harness.scaled(TEST_TIMEOUT)):
        async with (
            harness.spawn(
                backend_argv(sock_a, image), name="trio-vhost-blk-a", log=workdir.log("blk-a")
            ) as back_a,
            harness.spawn(
                backend_argv(sock_b, image), name="trio-vhost-blk-b", log=workdir.log("blk-b")
            ) as back_b,
        ):
            await harness.wait_for_path(sock_a, timeout=harness.scaled(20), procs=[back_a])
            await harness.wait_for_path(sock_b, timeout=harness.scaled(20), procs=[back_b])
            async with (
                harness.spawn(
                    dst_argv, name="qemu mig-dst", log=workdir.log("qemu-mig-dst"), lifetime=life
                ) as q_dst,
                harness.spawn(
                    src_argv, name="qemu mig-src", log=workdir.log("qemu-mig-src"), lifetime=life
                ) as q_src,
            ):
                await harness.wait_for_text(
                    src_serial,
                    rf"TVH-INFO blk-stream-chunk n={MIGRATE_AFTER} ",
                    timeout=harness.scaled(90),
                )
                back_a.check_alive()
                stale = await migrate(workdir, q_src, q_dst, back_b)

    listed = ", ".join(f"{gpa:#x} ({n} B)" for gpa, n in sorted(stale.items())[:16])
    assert not stale, (
        f"{len(stale)} guest pages arrived stale on the destination: {listed}; a write "
        "escaped the dirty log (scripts/migration_pagediff.py helps to find whose)"
    )
    before = src_serial.read_text(errors="replace")
    after = dst_serial.read_text(errors="replace")
    assert "TVH-OK blk-stream" not in before, "the stream ended before the migration"
    assert "blk-stream-chunk" in after, "no block was written on the destination"
    report = harness.GuestReport.parse("mig-dst", before + after, q_dst.returncode, 0.0, "")
    report.check(required=["blk-stream"])
    assert "dirty log set" in workdir.log("blk-a").read_text(errors="replace")
    data = image.read_bytes()
    bad = [i for i in range(CHUNKS * 256) if data[i * BLOCK : (i + 1) * BLOCK] != block(i)]
    assert not bad, f"{len(bad)} blocks wrong, first {bad[:8]}"
    moved = before.count("blk-stream-chunk")
    print(f"blk migration: {moved} of {CHUNKS} chunks written on the source, the rest after")
