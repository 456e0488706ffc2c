"""vhost-user-net backends against DPDK's virtio_user frontend and against real guests.

The backend is the ``net_backend`` fixture, parametrised over ``harness.NET_BACKENDS``:
today DPDK testpmd's vhost PMD in io mode (which proves the harness), later trio_vhost's
own net device. Contract: frames received on port i leave on port i^1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from . import harness

MAC_A = "02:74:76:68:00:0a"
MAC_B = "02:74:76:68:00:0b"
BURST = 32  # frames per burst (testpmd --burst)
ROUNDS = 4  # rounds of: A sends A_BURSTS bursts, pause, B sends B_BURSTS bursts, pause
A_BURSTS = 3
B_BURSTS = 2
PAUSE_S = 0.1  # keeps the rate modest: at most 96 frames in flight per 100 ms


async def _settle(
    a: harness.Testpmd, b: harness.Testpmd, want_a_rx: int, want_b_rx: int, timeout: float
) -> tuple[harness.PortStats, harness.PortStats]:
    """Poll both frontends' counters until they received what was sent (or time out)."""
    with trio.move_on_after(harness.scaled(timeout)):
        while True:
            sa, sb = (await a.port_stats())[0], (await b.port_stats())[0]
            if sa.rx_packets >= want_a_rx and sb.rx_packets >= want_b_rx:
                break
            await trio.sleep(0.2)
    await trio.sleep(0.3)  # anything extra (duplicates) would show up now
    return (await a.port_stats())[0], (await b.port_stats())[0]


@pytest.mark.dpdk
async def test_virtio_user_counted_bursts(
    dpdk_tools: harness.DpdkTools, net_backend: harness.NetBackend, workdir: harness.Workdir
) -> None:
    """Two testpmd virtio_user frontends (rxonly, sending counted txonly bursts) on ports 0
    and 1 of the backend: every frame A sends must reach B and vice versa, exactly once."""
    socks = [workdir.sock("vhost0"), workdir.sock("vhost1")]
    a_sent, b_sent = ROUNDS * A_BURSTS * BURST, ROUNDS * B_BURSTS * BURST
    with trio.fail_after(harness.scaled(120)):
        async with (
            net_backend.start(sockets=socks, workdir=workdir) as backend,
            harness.virtio_user_frontend(
                dpdk_tools, workdir, name="frontend-a", socket=socks[0], mac=MAC_A,
                peer_mac=MAC_B, burst=BURST,
            ) as a,
            harness.virtio_user_frontend(
                dpdk_tools, workdir, name="frontend-b", socket=socks[1], mac=MAC_B,
                peer_mac=MAC_A, burst=BURST,
            ) as b,
        ):  # fmt: skip
            for _ in range(ROUNDS):
                await a.send_bursts(A_BURSTS)
                await trio.sleep(PAUSE_S)
                await b.send_bursts(B_BURSTS)
                await trio.sleep(PAUSE_S)
            sa, sb = await _settle(a, b, want_a_rx=b_sent, want_b_rx=a_sent, timeout=15)
            be = await backend.port_stats() if backend.port_stats else None

    print(f"A: {sa}\nB: {sb}\nbackend: {be}")
    assert (sa.tx_packets, sb.tx_packets) == (a_sent, b_sent), "frontends did not send it all"
    assert (sa.tx_errors, sb.tx_errors) == (0, 0)
    assert sb.rx_packets == a_sent, f"A->B: sent {a_sent}, B received {sb.rx_packets}"
    assert sa.rx_packets == b_sent, f"B->A: sent {b_sent}, A received {sa.rx_packets}"
    assert sb.rx_bytes == sa.tx_bytes
    assert sa.rx_bytes == sb.tx_bytes
    if be is not None:
        assert (be[0].rx_packets, be[1].tx_packets) == (a_sent, a_sent), be
        assert (be[1].rx_packets, be[0].tx_packets) == (b_sent, b_sent), be


@pytest.mark.qemu
@pytest.mark.dpdk
@pytest.mark.slow
async def test_two_guests_ping(
    qemu_tools: harness.QemuTools,
    guest_images: harness.GuestImages,
    net_backend: harness.NetBackend,
    workdir: harness.Workdir,
) -> None:
    """Two TCG guests, one per backend port, ping each other (guest role net.sh)."""
    socks = [workdir.sock("vhost0"), workdir.sock("vhost1")]
    count = 5
    guests = [
        ("a", socks[0], "52:54:00:74:76:0a", "10.77.0.1/24", "10.77.0.2"),
        ("b", socks[1], "52:54:00:74:76:0b", "10.77.0.2/24", "10.77.0.1"),
    ]
    reports: dict[str, harness.GuestReport] = {}
    errors: list[BaseException] = []
    with trio.fail_after(harness.scaled(240)):
        async with net_backend.start(sockets=socks, workdir=workdir) as backend:

            async def boot(name: str, sock: Path, mac: str, ip: str, peer: str) -> None:
                spec = harness.GuestSpec(
                    name=name,
                    role="net",
                    params={"ip": ip, "peer": peer, "count": count, "wait": 90},
                    nics=[harness.Nic(sock, mac=mac)],
                )
                try:
                    reports[name] = await harness.run_guest(
                        qemu_tools, guest_images, spec, workdir, timeout=200, watch=backend.procs
                    )
                except AssertionError as exc:  # one clear error instead of an ExceptionGroup
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for guest in guests:
                    nursery.start_soon(boot, *guest)
            be = await backend.port_stats() if backend.port_stats else None

    if errors:
        raise errors[0]
    for name in ("a", "b"):
        reports[name].check(
            required=["net-link", "net-first-reply", "net-ping", "net-peer-pinged-us"]
        )
    print(
        "guests: "
        + ", ".join(f"{n} {r.wall_s:.1f}s {r.field('net-ping', 'rtt_min_avg_max')}"
                    for n, r in reports.items())
        + f"\nbackend: {be}"
    )  # fmt: skip
    if be is not None:
        # Each way: at least the final `count` echo requests plus `count` replies to the
        # peer's. Not equality: frames a guest sends before the other one's rx ring is
        # ready (IPv6 DAD/ND, the first ARP) are dropped by the backend, legitimately.
        for rx, tx in ((0, 1), (1, 0)):
            assert be[rx].rx_packets >= be[tx].tx_packets >= 2 * count, be
