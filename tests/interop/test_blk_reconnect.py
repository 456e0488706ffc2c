"""A trio-vhost blk backend SIGKILLed in the middle of the guest's writes, then restarted.

QEMU (``reconnect=1``) connects to the new process, hands it the in-flight region it got
from the first one (INFLIGHT_SHMFD) and restarts the rings; the guest's writes go on. Every
block the guest wrote must be on the image, in its place. Guest role:
tests/interop/guest/blk-stream.sh.
"""

from __future__ import annotations

import signal

import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

CHUNKS = 48  # MiB written by the guest, 256 blocks of 4 KiB each
KILL_AFTER = 4  # chunks done before the backend is killed
BLOCK = 4096


def block(i: int) -> bytes:
    return b"B%014d\n" % i + b"x" * (BLOCK - 16)


async def test_backend_killed_mid_stream_and_restarted(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    workdir: harness.Workdir,
) -> None:
    image = workdir.file("disk.img")
    with open(image, "wb") as f:
        f.truncate(64 * harness.MIB)
    sock = workdir.sock("blk")
    spec = harness.GuestSpec(
        name="blk-stream",
        role="blk-stream",
        params={"chunks": CHUNKS},
        blk=[harness.BlkDisk(sock, num_queues=1, reconnect=1)],
    )
    serial = workdir.log(f"serial-{spec.name}")
    restarted = workdir.log("trio-vhost-blk")  # the second process's log (same name)
    killed_at: str = ""

    async def kill_and_restart(task_status: trio.TaskStatus[None]) -> None:
        nonlocal killed_at
        async with harness.trio_vhost_blk_backend(
            socket=sock, image=image, num_queues=1, workdir=workdir, debug=True
        ) as first:
            task_status.started()
            await harness.wait_for_text(
                serial, rf"TVH-INFO blk-stream-chunk n={KILL_AFTER} ", timeout=harness.scaled(90)
            )
            first.procs[0]._signal_group(signal.SIGKILL)
            await first.procs[0].wait(harness.scaled(10))
            killed_at = serial.read_text(errors="replace")
        async with harness.trio_vhost_blk_backend(
            socket=sock, image=image, num_queues=1, workdir=workdir, debug=True
        ):
            await trio.sleep_forever()

    with trio.fail_after(harness.scaled(240)):
        async with trio.open_nursery() as nursery:
            await nursery.start(kill_and_restart)
            report = await harness.run_guest(qemu_tools, guest_images, spec, workdir, timeout=200)
            nursery.cancel_scope.cancel()

    assert killed_at, "the backend was never killed"
    assert "TVH-OK blk-stream" not in killed_at, "the stream ended before the kill"
    report.check(required=["blk-stream"])
    data = image.read_bytes()
    bad = [i for i in range(CHUNKS * 256) if data[i * BLOCK : (i + 1) * BLOCK] != block(i)]
    assert not bad, f"{len(bad)} blocks wrong, first {bad[:8]}"
    log = restarted.read_text(errors="replace")
    resubmitted = "resubmitting" in log
    print(
        f"blk reconnect: {report.wall_s:.1f}s; killed after chunk {KILL_AFTER}; "
        f"in-flight chains resubmitted by the new backend: {resubmitted}"
    )
