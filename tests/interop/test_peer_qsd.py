"""A real Linux guest (QEMU 7.2, TCG) doing block I/O through a vhost-user-blk backend.

The backend is the ``blk_backend`` fixture, parametrised over ``harness.BLK_BACKENDS``:
today qemu-storage-daemon (which proves the harness itself), later trio_vhost's own blk
device. The guest role is tests/interop/guest/blk.sh; the image layout is harness.BlkLayout.
"""

from __future__ import annotations

import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REQUIRED = ["blk-size", "blk-read", "blk-write", "blk-readback", "blk-bulk-write", "blk-bulk-read"]


@pytest.mark.parametrize("num_queues", [1, 2])
async def test_guest_block_io(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    blk_backend: harness.BlkBackend,
    workdir: harness.Workdir,
    num_queues: int,
) -> None:
    layout = harness.BlkLayout()
    image = workdir.file("disk.img")
    host_md5 = harness.seed_image(image, layout)
    sock = workdir.sock("blk")
    spec = harness.GuestSpec(
        name="blk",
        role="blk",
        params=layout.guest_params(host_md5),
        blk=[harness.BlkDisk(sock, num_queues=num_queues)],
        smp=num_queues,  # Linux uses min(num-queues, CPUs) queues
    )
    with trio.fail_after(harness.scaled(180)):
        async with blk_backend.start(
            socket=sock, image=image, num_queues=num_queues, workdir=workdir
        ) as backend:
            report = await harness.run_guest(
                qemu_tools, guest_images, spec, workdir, timeout=120, watch=backend.procs
            )

    required = REQUIRED + (["blk-discard"] if blk_backend.discard else [])
    report.check(required=required, optional=["blk-discard"])
    dev = report.info("blk-dev")
    assert dev is not None, report.describe()
    assert dev.fields.get("queues") == str(num_queues), report.describe()
    harness.verify_image(image, layout, host_md5, report.field("blk-write", "md5"))
    print(
        f"{blk_backend.name} q={num_queues}: boot-to-poweroff {report.wall_s:.1f}s, "
        f"bulk write {report.field('blk-bulk-write', 'MiBps')} MiB/s, "
        f"read {report.field('blk-bulk-read', 'MiBps')} MiB/s"
    )
