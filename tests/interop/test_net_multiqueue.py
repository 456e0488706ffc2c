"""virtio-net multiqueue against trio-vhost net: two 2-vCPU guests with 2 queue pairs each.

QEMU runs one vhost device per queue pair over the same socket (vrings 0-1 and 2-3); the
guest driver turns the second pair on through the control queue (handled inside QEMU),
which QEMU passes on as SET_VRING_ENABLE. The guests must ping each other, and the
backend's log must show all four rings of each port started.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

from . import harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


async def test_two_guests_ping_with_two_queue_pairs(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    workdir: harness.Workdir,
) -> None:
    socks = [workdir.sock("mq0"), workdir.sock("mq1")]
    argv: list[str | Path] = [sys.executable, "-m", "trio_vhost.cli", "-v", "net", "--queues", "2"]
    for sock in socks:
        argv += ["--socket", sock]
    guests = [
        ("a", socks[0], "52:54:00:74:77:0a", "10.78.0.1/24", "10.78.0.2"),
        ("b", socks[1], "52:54:00:74:77:0b", "10.78.0.2/24", "10.78.0.1"),
    ]
    reports: dict[str, harness.GuestReport] = {}
    errors: list[BaseException] = []
    log = workdir.log("trio-vhost-net-mq")
    with trio.fail_after(harness.scaled(240)):
        async with harness.spawn(argv, name="trio-vhost-net", log=log) as proc:
            for sock in socks:
                await harness.wait_for_path(sock, timeout=harness.scaled(20), procs=[proc])

            async def boot(name: str, sock: Path, mac: str, ip: str, peer: str) -> None:
                spec = harness.GuestSpec(
                    name=name,
                    role="net",
                    params={"ip": ip, "peer": peer, "count": 5, "wait": 90},
                    nics=[harness.Nic(sock, mac=mac, queues=2, extra="mq=on")],
                    smp=2,
                )
                try:
                    reports[name] = await harness.run_guest(
                        qemu_tools, guest_images, spec, workdir, timeout=200, watch=[proc]
                    )
                except AssertionError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for guest in guests:
                    nursery.start_soon(boot, *guest)
    if errors:
        raise errors[0]
    for report in reports.values():
        report.check(required=["net-link", "net-first-reply", "net-ping", "net-peer-pinged-us"])
    started = set(re.findall(r"vring (\d) started", log.read_text()))
    assert started == {"0", "1", "2", "3"}, harness.tail(log)
