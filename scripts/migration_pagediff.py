"""Find stale pages after a live migration of a guest doing blk I/O (issue #5 item 5).

Runs the scenario of tests/interop/test_blk_migration.py N times and, each time, compares
the guest RAM of the paused source with that of the destination, which ``-S`` keeps
paused once the incoming migration is complete (before its backend has run): a page that
differs arrived stale. Then the destination is continued and watched: does the guest
oops, does the stream finish, is every block on the image?

    .venv/bin/python scripts/migration_pagediff.py --runs 20             # trio-vhost blk
    .venv/bin/python scripts/migration_pagediff.py --runs 20 --plain     # QEMU's virtio-blk
    .venv/bin/python scripts/migration_pagediff.py --runs 20 --ram 256M  # QEMU < 9.0 bug

``--plain`` is the control: QEMU's own virtio-blk on the same image, no vhost-user and no
dirty log of ours. ``--ram 256M`` brings back the TCG dirty-tracking bug the test avoids
(see RAM in the test). Each run writes result.json (stale pages and the bytes that differ
in each, migration events on CLOCK_MONOTONIC) in its work dir, which is kept when the run
went wrong (--keep: always). To see whose write a stale page was, run the backends with a
trace of every guest write and every mark (a private debug patch; see the issue) and
intersect.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.interop import harness
from tests.interop.test_blk_migration import (
    CHUNKS,
    MIGRATE_AFTER,
    RAM,
    backend_argv,
    block,
    connect_hmp,
    guest_ram,
    guest_specs,
    stale_pages,
    wait_migrated,
    with_ram,
)


def plain_disk(argv: list[str], image: Path) -> list[str]:
    """Replace the vhost-user-blk disk of ``argv`` with QEMU's own virtio-blk."""
    out: list[str] = []
    skip = 0
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if arg in ("-chardev", "-device") and argv[i + 1].startswith(
            ("socket,id=blk", "vhost-user-blk-pci")
        ):
            skip = 1
            continue
        out.append(arg)
    drive = f"file={image},format=raw,if=none,id=d0,file.locking=off"
    return [*out, "-drive", drive, "-device", "virtio-blk-pci,drive=d0"]


async def one_run(args: argparse.Namespace) -> dict[str, object]:
    tools, images = harness.find_qemu(), harness.find_guest_images()
    wd = harness.Workdir.create()
    image = wd.file("disk.img")
    image.touch()
    os.truncate(image, 64 * harness.MIB)
    src, dst = guest_specs(wd)
    s_ser, d_ser = wd.log("serial-mig-src"), wd.log("serial-mig-dst")
    s_ser.touch()
    d_ser.touch()
    argvs = []
    for spec, serial in ((dst, d_ser), (src, s_ser)):
        argv = with_ram(harness.qemu_command(tools, images, spec, serial), args.ram)
        argvs.append(plain_disk(argv, image) if args.plain else argv)
    events: dict[str, float] = {}
    result: dict[str, object] = {"workdir": str(wd.path), "events": events}
    with trio.fail_after(180):
        async with (
            harness.spawn(backend_argv(wd.sock("blk-a"), image), name="a", log=wd.log("blk-a")),
            harness.spawn(
                backend_argv(wd.sock("blk-b"), image), name="b", log=wd.log("blk-b")
            ) as back_b,
        ):
            await harness.wait_for_path(wd.sock("blk-a"), timeout=20)
            await harness.wait_for_path(wd.sock("blk-b"), timeout=20)
            async with (
                harness.spawn(argvs[0], name="qd", log=wd.log("qemu-mig-dst"), lifetime=170) as qd,
                harness.spawn(argvs[1], name="qs", log=wd.log("qemu-mig-src"), lifetime=170) as qs,
            ):
                await harness.wait_for_text(
                    s_ser, rf"TVH-INFO blk-stream-chunk n={MIGRATE_AFTER} ", timeout=120
                )
                hs = await connect_hmp(str(wd.sock("mon")))
                hd = await connect_hmp(str(wd.sock("mon-dst")))
                events["migrate"] = time.monotonic()
                await hs.command(f"migrate -d unix:{wd.sock('mig')}")
                await wait_migrated(hs, hd, [qs, qd, back_b])
                events["loaded"] = time.monotonic()
                stale = stale_pages(guest_ram(qs), guest_ram(qd))
                result["stale"] = {hex(gpa): n for gpa, n in sorted(stale.items())}
                await hs.stream.send_all(b"quit\n")
                events["cont"] = time.monotonic()
                await hd.command("cont")
                with trio.move_on_after(40):
                    await qd.process.wait()
                result["powered_off"] = not qd.alive()
    after = d_ser.read_text(errors="replace")
    result["stream_ok"] = "TVH-OK blk-stream" in after
    result["oops"] = any(word in after for word in ("BUG", "Oops", "corruption"))
    data = image.read_bytes()
    result["bad_blocks"] = sum(
        data[i * 4096 : (i + 1) * 4096] != block(i) for i in range(CHUNKS * 256)
    )
    (wd.path / "result.json").write_text(json.dumps(result, indent=1))
    if not args.keep and not result["stale"] and result["stream_ok"]:
        shutil.rmtree(wd.path, ignore_errors=True)
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--plain", action="store_true", help="QEMU's virtio-blk (control)")
    parser.add_argument("--ram", default=RAM, help=f"guest RAM (default {RAM})")
    parser.add_argument("--keep", action="store_true", help="keep every work dir")
    args = parser.parse_args()
    stale_runs = 0
    for run in range(1, args.runs + 1):
        r = await one_run(args)
        stale = r["stale"]
        assert isinstance(stale, dict)
        stale_runs += bool(stale)
        print(
            f"run {run}: {len(stale)} stale pages, oops={r['oops']}, stream_ok={r['stream_ok']},"
            f" bad_blocks={r['bad_blocks']}" + (f" -> {r['workdir']}" if stale else ""),
            flush=True,
        )
    print(f"{stale_runs} of {args.runs} runs had stale pages")
    return 1 if stale_runs else 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
