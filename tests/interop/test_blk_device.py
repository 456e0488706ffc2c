"""vhost-user-blk device life: a read-only export, and one connection that outlives several
device start/stop cycles (SeaBIOS, then Linux, then a driver rebind).

The read-only test runs against every ``blk_backend`` (qemu-storage-daemon is the
reference); the start/stop test reads trio-vhost's own debug log, so it runs against
trio-vhost only. Guest roles: tests/interop/guest/blk-ro.sh and blk.sh (tvh.rebind=1).
"""

from __future__ import annotations

import re

import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

KICK, BASE, OWNER = "SET_VRING_KICK", "GET_VRING_BASE", "SET_OWNER"
SWAP_PAGES = 1024  # 4 MiB swap area at the start of the read-only image
HOLD_S = 1  # /init waits this long after TVH-BOOT before it loads virtio_pci/virtio_blk


async def test_read_only_image(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    blk_backend: harness.BlkBackend,
    workdir: harness.Workdir,
) -> None:
    """The backend serves the image read-only: the guest reads the host's bytes, sees the
    disk read-only, cannot write to it even when it forces the block layer to send a write
    (the device must answer it with an I/O error), and the image stays byte-for-byte the
    same."""
    # swap area (the guest's way to force requests to the device) at 0, host bytes at 8 MiB
    mib = harness.MIB
    layout = harness.BlkLayout(size=16 * mib, hoff=8 * mib, boff=12 * mib, bmib=1)
    image = workdir.file("disk.img")
    host_md5 = harness.seed_image(image, layout)
    harness.write_swap_area(image, pages=SWAP_PAGES)
    before = harness.file_digest(image)
    sock = workdir.sock("blk")
    spec = harness.GuestSpec(
        name="blk-ro",
        role="blk-ro",
        params={"hoff": layout.hoff, "hlen": layout.hlen, "hmd5": host_md5, "swap": 1},
        blk=[harness.BlkDisk(sock)],
    )
    with trio.fail_after(harness.scaled(150)):
        async with blk_backend.start(
            socket=sock, image=image, num_queues=1, workdir=workdir, read_only=True
        ) as backend:
            report = await harness.run_guest(
                qemu_tools, guest_images, spec, workdir, timeout=100, watch=backend.procs
            )

    report.check(
        required=[
            "blk-ro-flag", "blk-ro-read", "blk-ro-write-refused", "blk-ro-forced-write",
            "blk-ro-reread",
        ],
        optional=["blk-ro-discard"],
    )  # fmt: skip
    after = harness.file_digest(image)
    assert after == before, f"read-only image changed: sha256 {before} -> {after}"
    assert image.stat().st_size == layout.size
    forced = report.ok("blk-ro-forced-write")
    discard = report.ok("blk-ro-discard") or report.skipped("blk-ro-discard")
    print(
        f"{blk_backend.name} read-only: {report.wall_s:.1f}s; forced write: "
        f"{forced.text if forced else '?'}; discard: {discard.text if discard else '?'}"
    )


async def test_one_connection_seabios_then_linux(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    workdir: harness.Workdir,
) -> None:
    """SeaBIOS initialises the virtio-blk disk (its ring 0 is started), Linux resets it
    (stopped) and initialises it again (started), and the guest then unbinds and rebinds
    virtio_blk (stopped, started): all on the one vhost-user connection QEMU opened at
    start-up. Proven from trio-vhost's own ``-v -v`` log; the guest's I/O before and after
    the last restart must be correct."""
    layout = harness.BlkLayout(size=16 * harness.MIB, bmib=4)
    image = workdir.file("disk.img")
    host_md5 = harness.seed_image(image, layout)
    sock = workdir.sock("blk")
    # one queue and one vCPU: every SET_VRING_KICK / GET_VRING_BASE is about ring 0
    spec = harness.GuestSpec(
        name="blk",
        role="blk",
        params={**layout.guest_params(host_md5), "rebind": 1, "hold": HOLD_S},
        blk=[harness.BlkDisk(sock, num_queues=1)],
        firmware_log=True,
    )
    serial_log = workdir.log(f"serial-{spec.name}")
    backend_log = workdir.log("trio-vhost-blk")
    at_init: list[str] | None = None

    async def snapshot_at_init() -> None:
        # /init prints TVH-BOOT, then waits HOLD_S before it loads virtio_pci and virtio_blk
        # (modules in this kernel): the ring events up to then are SeaBIOS's, which
        # finished seconds earlier, while Linux cannot have touched the device yet.
        nonlocal at_init
        with trio.move_on_after(harness.scaled(60)):
            await harness.wait_for_text(serial_log, r"TVH-BOOT", timeout=1e9)
            at_init = harness.vhost_user_requests(backend_log.read_text(), (KICK, BASE))

    with trio.fail_after(harness.scaled(150)):
        async with (
            harness.trio_vhost_blk_backend(
                socket=sock, image=image, num_queues=1, workdir=workdir, debug=True
            ) as backend,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(snapshot_at_init)
            report = await harness.run_guest(
                qemu_tools, guest_images, spec, workdir, timeout=100, watch=backend.procs
            )
            nursery.cancel_scope.cancel()

    report.check(required=["blk-read", "blk-write", "blk-readback", "blk-rebind", "blk-rebind-io"])
    harness.verify_image(image, layout, host_md5, report.field("blk-write", "md5"))

    found = re.search(r"found virtio-blk at (\S+)", report.firmware)
    assert found, "SeaBIOS did not report probing the virtio-blk disk\n" + report.firmware[-3000:]

    events = harness.vhost_user_requests(backend_log.read_text(), (OWNER, KICK, BASE))
    shown = " ".join(e.replace("SET_VRING_", "").replace("GET_VRING_", "") for e in events)
    end = harness.CONNECTION_END
    assert events.count(end) <= 1, f"more than one connection: {shown}"
    conn = events[: events.index(end)] if end in events else events
    assert events[len(conn) :] in ([], [end]), f"requests after the connection ended: {shown}"
    assert conn[:1] == [OWNER], f"the connection did not start with SET_OWNER: {shown}"
    assert conn.count(OWNER) == 1, f"SET_OWNER twice: a second connection? {shown}"
    ring = conn[1:]
    # SeaBIOS start, Linux reset + start, unbind (reset) + bind (start), then QEMU may stop
    # the ring once more when the guest powers off
    expected = [KICK, BASE, KICK, BASE, KICK]
    why = f"ring 0 was not started/stopped/started/stopped/started on one connection: {shown}"
    assert ring[:5] == expected, why
    assert ring[5:] in ([], [BASE]), why
    assert at_init == [KICK], (
        f"when /init started (before virtio_pci was loaded) ring 0 should have been started "
        f"once, by SeaBIOS, and not stopped; events then: {at_init}; all: {shown}"
    )
    print(
        f"trio-vhost one connection: {report.wall_s:.1f}s; SeaBIOS found virtio-blk at "
        f"{found[1]}; session events: {shown}"
    )
