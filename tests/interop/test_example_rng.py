"""examples/virtio_rng.py, run as its docstring says, is a QEMU guest's hardware RNG.

QEMU 7.2's ``vhost-user-rng-pci`` connects to it; the guest's virtio_rng driver becomes the
current hw_random source and /dev/hwrng delivers the device's bytes. Guest role:
tests/interop/guest/rng.sh.
"""

from __future__ import annotations

import sys

import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu]

EXAMPLE = harness.REPO / "examples" / "virtio_rng.py"


async def test_example_rng_device_feeds_the_guest_hwrng(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    workdir: harness.Workdir,
) -> None:
    sock = workdir.sock("rng")
    spec = harness.GuestSpec(
        name="rng",
        role="rng",
        params={"bytes": 4096},
        extra_args=[
            "-chardev", f"socket,id=rng0,path={sock}",
            "-device", "vhost-user-rng-pci,chardev=rng0",
        ],
    )  # fmt: skip
    with trio.fail_after(harness.scaled(120)):
        argv = [sys.executable, EXAMPLE, sock]
        async with harness.spawn(argv, name="virtio-rng", log=workdir.log("virtio-rng")) as proc:
            await harness.wait_for_path(sock, timeout=harness.scaled(20), procs=[proc])
            report = await harness.run_guest(
                qemu_tools, guest_images, spec, workdir, timeout=90, watch=[proc]
            )
    report.check(required=["rng-device", "rng-read"])
    assert report.field("rng-read", "bytes") == "4096"
