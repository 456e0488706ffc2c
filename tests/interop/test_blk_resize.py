"""The image grows under a running guest: ``trio-vhost blk`` announces the new capacity.

SIGHUP makes the backend read the image size again; it then sends CONFIG_CHANGE_MSG on the
back-end channel (BACKEND_REQ), QEMU reads the config space again (GET_CONFIG on the main
connection, before it acknowledges) and interrupts the guest, whose virtio_blk driver
updates the disk size. Guest role: tests/interop/guest/blk-resize.sh.
"""

from __future__ import annotations

import signal

import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu]

OLD_SIZE = 8 * harness.MIB
NEW_SIZE = 9 * harness.MIB
MARKER = "TVH-RESIZED-0123456789"


async def test_image_grown_and_announced_to_a_running_guest(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    workdir: harness.Workdir,
) -> None:
    image = workdir.file("disk.img")
    with open(image, "wb") as f:
        f.truncate(OLD_SIZE)
    sock = workdir.sock("blk")
    spec = harness.GuestSpec(
        name="blk-resize",
        role="blk-resize",
        params={"marker": MARKER, "wait": 60},
        blk=[harness.BlkDisk(sock, num_queues=1)],
    )
    serial = workdir.log(f"serial-{spec.name}")

    async def grow_when_ready(backend: harness.RunningBackend) -> None:
        await harness.wait_for_text(
            serial, r"TVH-INFO blk-resize-ready ", timeout=harness.scaled(90)
        )
        with open(image, "r+b") as f:
            f.truncate(NEW_SIZE)
            f.seek(NEW_SIZE - 512)
            f.write(MARKER.encode().ljust(512, b"\0"))
        backend.procs[0]._signal_group(signal.SIGHUP)

    with trio.fail_after(harness.scaled(180)):
        async with (
            harness.trio_vhost_blk_backend(
                socket=sock, image=image, num_queues=1, workdir=workdir, debug=True
            ) as backend,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(grow_when_ready, backend)
            report = await harness.run_guest(
                qemu_tools, guest_images, spec, workdir, timeout=150, watch=backend.procs
            )
            nursery.cancel_scope.cancel()

    report.check(required=["blk-resize", "blk-resize-read"])
    assert report.field("blk-resize", "to") == str(NEW_SIZE // 512)
    log = workdir.logs["trio-vhost-blk"].read_text(errors="replace")
    assert "back-end request CONFIG_CHANGE_MSG" in log, "the backend did not announce it"
    assert "the frontend was told" in log, "QEMU did not acknowledge CONFIG_CHANGE_MSG"
