"""``trio-vhost net --client`` against DPDK virtio_user frontends that listen (``server=1``).

The role reversal DPDK documents for surviving backend restarts: the frontend owns the
socket, the backend connects to it, and after the backend dies a new backend process
connects again and traffic resumes without restarting the frontends.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio

from . import harness

MAC_A = "02:74:76:68:01:0a"
MAC_B = "02:74:76:68:01:0b"
BURST = 32
BURSTS = 4


def backend_argv(socks: list[Path]) -> list[str | Path]:
    argv: list[str | Path] = [sys.executable, "-m", "trio_vhost.cli", "-v", "net", "--client"]
    for sock in socks:
        argv += ["--socket", sock]
    return argv


async def exchange(a: harness.Testpmd, b: harness.Testpmd, timeout: float) -> None:
    """A sends BURSTS bursts to B and B as many to A; wait until each side got them all."""
    a0, b0 = (await a.port_stats())[0], (await b.port_stats())[0]
    sent = BURSTS * BURST
    await a.send_bursts(BURSTS)
    await b.send_bursts(BURSTS)
    with trio.move_on_after(harness.scaled(timeout)):
        while True:
            sa, sb = (await a.port_stats())[0], (await b.port_stats())[0]
            if sa.rx_packets - a0.rx_packets >= sent and sb.rx_packets - b0.rx_packets >= sent:
                break
            await trio.sleep(0.2)
    await trio.sleep(0.3)  # duplicates would show up now
    sa, sb = (await a.port_stats())[0], (await b.port_stats())[0]
    assert sb.rx_packets - b0.rx_packets == sent, f"A->B: sent {sent}, got {sb} (was {b0})"
    assert sa.rx_packets - a0.rx_packets == sent, f"B->A: sent {sent}, got {sa} (was {a0})"


@pytest.mark.dpdk
async def test_backend_connects_to_listening_frontends_and_comes_back(
    dpdk_tools: harness.DpdkTools, workdir: harness.Workdir
) -> None:
    socks = [workdir.sock("vu0"), workdir.sock("vu1")]
    log = workdir.log("trio-vhost-net")
    with trio.fail_after(harness.scaled(120)):
        # The backend starts first and waits for the sockets; each testpmd's start-up
        # waits until the backend has connected to it.
        async with (
            harness.spawn(backend_argv(socks), name="trio-vhost-net", log=log) as first,
            harness.virtio_user_frontend(
                dpdk_tools, workdir, name="frontend-a", socket=socks[0], mac=MAC_A,
                peer_mac=MAC_B, burst=BURST, server=True,
            ) as a,
            harness.virtio_user_frontend(
                dpdk_tools, workdir, name="frontend-b", socket=socks[1], mac=MAC_B,
                peer_mac=MAC_A, burst=BURST, server=True,
            ) as b,
        ):  # fmt: skip
            await exchange(a, b, timeout=15)
            # The backend dies; a new one connects to the same listening frontends.
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
            async with harness.spawn(backend_argv(socks), name="trio-vhost-net-2", log=log):
                await exchange(a, b, timeout=30)
