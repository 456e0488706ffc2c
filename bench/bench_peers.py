"""Our backends side by side with the C peers: DPDK testpmd (net) and qemu-storage-daemon (blk).

Every comparison runs both sides alternately in the same invocation, several rounds; the
table shows medians (min-max over rounds) and the ratio ours/peer.

* **net**: two DPDK virtio_user frontends (testpmd ``txonly`` and ``rxonly``) attached to
  (a) ``trio-vhost net`` with two sockets (a two-port learning switch) and (b) testpmd's
  vhost PMD with two ports in ``io`` forwarding. Mpps received by the rxonly side over a
  fixed window, from its port counters. 64- and 1500-byte frames, 1 and 2 queue pairs.
* **blk**: this process is the guest (``Frontend`` + its own lean split-ring driver keeping
  QD requests in flight) against (a) ``trio-vhost blk`` and (b) qemu-storage-daemon's
  vhost-user-blk export of the same raw image (pre-written, so reads hit the page cache).
  4 KiB random reads and writes at QD 1/32/128, 1 MiB sequential reads, p50/p99 at QD1.
  Then the guest view: a QEMU guest (TCG) timing O_DIRECT dd through each backend
  (1 MiB writes and reads, 4 KiB reads at QD1; guest role tests/interop/guest/blk-dd.sh).
* **cost**: backend CPU seconds per million requests (``/proc/<pid>/stat``), peak RSS
  (``VmHWM``), 1 vs 2 queues.

The launchers, testpmd control and port statistics come from ``tests/interop/harness.py``.
Prerequisites (DPDK testpmd, qemu-storage-daemon, QEMU and the guest images) are checked,
never installed:
``bash scripts/setup-interop.sh`` installs them. Details and results: bench/README.md.

Run: ``.venv/bin/python bench/bench_peers.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import trio
from numpy.typing import NDArray

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.interop import harness as H  # noqa: E402
from trio_vhost.devices.blk_spec import RequestType  # noqa: E402
from trio_vhost.frontend import DriverVring, Frontend  # noqa: E402
from trio_vhost.mem.guest import GuestRam  # noqa: E402
from trio_vhost.proto.constants import VirtioFeature  # noqa: E402
from trio_vhost.vring.driver import DriverQueue  # noqa: E402
from trio_vhost.vring.layout import (  # noqa: E402
    DESC_DTYPE,
    USED_RING_OFFSET,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from trio_vhost.vring.split import vring_need_event  # noqa: E402

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
KIB: Final = 1 << 10
MIB: Final = 1 << 20
U16: Final = 0xFFFF
STALL_MS: Final = 5000
IMAGE_SIZE: Final = 256 * MIB
HDR_DTYPE: Final = np.dtype([("type", "<u4"), ("reserved", "<u4"), ("sector", "<u8")])
OURS: Final = "ours"
PEER: Final = "peer"
TX_MAC: Final = "02:74:76:68:01:0a"
RX_MAC: Final = "02:74:76:68:01:0b"
TARGETS: Final = {
    "net64_mpps": 1.0,
    "net64_ratio": 0.1,
    "net1500_ratio": 0.25,
    "blk_qd32_iops": 100e3,
    "blk_qd32_ratio": 0.5,
}


# -- small helpers ---------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` spent busy (anything but idle/iowait, incl. steal), /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(x) for x in line.split()[1:]]
                return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK
    return float("nan")


class Interference:
    """How much of the backend's CPU other tasks (or the host, as steal) took in a window.

    The machine is shared: a run whose window lost more than :attr:`redo_above` of the
    backend CPU to others is measured again (once), after waiting for a quiet CPU.
    """

    cpu = 0
    redo_above = 0.25
    quiet_wait = 3.0
    budget = 75.0  # seconds of waiting and redoing per invocation, then neither
    spent = 0.0
    shares: Final[list[float]] = []
    redone = 0

    @classmethod
    def redo(cls, other: float, attempt: int, run_seconds: float) -> bool:
        """Whether to measure a run again (and count it)."""
        if attempt or other <= cls.redo_above or cls.spent >= cls.budget:
            return False
        cls.redone += 1
        cls.spent += run_seconds
        return True

    @classmethod
    def start(cls, backend_cpu_s: float) -> tuple[float, float, float]:
        return time.perf_counter(), cpu_busy_seconds(cls.cpu), backend_cpu_s

    @classmethod
    def stop(cls, mark: tuple[float, float, float], backend_cpu_s: float) -> float:
        wall = time.perf_counter() - mark[0]
        busy = cpu_busy_seconds(cls.cpu) - mark[1]
        share = max(0.0, busy - (backend_cpu_s - mark[2])) / wall
        cls.shares.append(share)
        return share

    @classmethod
    async def wait_quiet(cls) -> None:
        """Wait (at most :attr:`quiet_wait` s) until the backend CPU is <10% busy."""
        t0 = time.perf_counter()
        deadline = t0 + min(cls.quiet_wait, max(0.0, cls.budget - cls.spent))
        try:
            while time.perf_counter() < deadline:
                b0 = cpu_busy_seconds(cls.cpu)
                await trio.sleep(0.2)
                if (cpu_busy_seconds(cls.cpu) - b0) / 0.2 < 0.1:
                    return
        finally:
            cls.spent += max(0.0, time.perf_counter() - t0 - 0.2)  # the first look is free

    @classmethod
    def describe(cls) -> str:
        if not cls.shares:
            return ""
        return (
            f"Other tasks on the backend CPU{cls.cpu} during the windows: median"
            f" {100 * statistics.median(cls.shares):.0f}%, max {100 * max(cls.shares):.0f}%;"
            f" {cls.redone} run(s) redone for taking >{100 * cls.redo_above:.0f}%,"
            f" {cls.spent:.0f} s spent waiting and redoing (budget {cls.budget:.0f} s)."
        )


def peak_rss_mib(pid: int) -> float:
    """``VmHWM`` (peak resident set) of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _program_child(top: int) -> int | None:
    """The child of ``top`` once it runs the real program (not a wrapper that will exec)."""
    try:
        with open(f"/proc/{top}/task/{top}/children") as f:
            children = f.read().split()
        if not children:
            return None
        exe = os.readlink(f"/proc/{children[0]}/exe")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if exe.endswith(("/taskset", "/stdbuf", "/timeout")) else int(children[0])


async def real_pid(proc: H.Managed) -> int:
    """The pid of the program ``harness.spawn`` runs under its ``timeout`` wrapper.

    ``timeout`` forks once; ``taskset`` and ``stdbuf`` exec, so its only child is the program.
    """
    with trio.fail_after(10):
        while (pid := _program_child(proc.process.pid)) is None:
            proc.check_alive()
            await trio.sleep(0.01)
    return pid


def pick_cpus(net_mode: str) -> list[int]:
    """Backend CPU, then the frontend/driver CPU (and, for pair mode, the rxonly one's)."""
    allowed = sorted(os.sched_getaffinity(0))
    if net_mode == "pair" and len(allowed) >= 3:
        return allowed[:3]
    return [allowed[0], allowed[-1]]


def machine_line(cpus: Sequence[int]) -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"machine: {model}, {os.cpu_count()} CPUs, {mem:.0f} GiB (backends on CPU{cpus[0]},"
        f" frontends/driver on CPU{','.join(map(str, cpus[1:]))}); load avg {load};"
        f" kernel {platform.release()};"
        f" {platform.python_implementation()} {platform.python_version()},"
        f" numpy {np.__version__}, trio {trio.__version__}; {tool_versions()}"
    )


def tool_versions() -> str:
    """Installed DPDK and QEMU package versions (from the dpkg database)."""
    try:
        status = Path("/var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        status = ""
    parts = []
    for name, pkg in (("dpdk", "dpdk-dev"), ("qemu", "qemu-system-common")):
        m = re.search(rf"^Package: {re.escape(pkg)}\n(?:[^\n]+\n)*?Version: (\S+)", status, re.M)
        parts.append(f"{name} {m.group(1) if m else '?'}")
    return ", ".join(parts)


def missing_prerequisites(net: bool, blk: bool) -> list[str]:
    """What this machine lacks for the selected parts (empty: all there)."""
    missing = [
        f"`{tool}` (coreutils/util-linux)"
        for tool in ("taskset", "timeout", "stdbuf")
        if shutil.which(tool) is None
    ]
    if net:
        try:
            H.find_dpdk()
        except H.Unavailable as exc:
            missing.append(f"DPDK for the net comparison: {str(exc).split(';')[0]}")
    if blk and shutil.which("qemu-storage-daemon") is None:
        missing.append("`qemu-storage-daemon` (package qemu-system-common) for the blk comparison")
    if blk:
        for find in (H.find_qemu, H.find_guest_images):
            try:
                find()
            except H.Unavailable as exc:
                missing.append(f"the blk guest view: {str(exc).split(';')[0]}")
    return missing


def fmt(x: float, digits: int = 3) -> str:
    if x != x:  # nan
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


# -- results ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One measured run of one side."""

    value: float  # the row's metric (Mpps, IOPS, MB/s, us)
    cpu_per_m: float = float("nan")  # backend CPU seconds per million packets/requests
    cpu_util: float = float("nan")  # backend CPU seconds per wall second
    note: float = float("nan")  # net: tx frontend Mpps; blk: driver CPU share
    other: float = 0.0  # share of the backend CPU other tasks took in the window


@dataclasses.dataclass
class Row:
    group: str
    label: str
    unit: str
    higher_is_better: bool = True
    samples: dict[str, list[Sample]] = dataclasses.field(
        default_factory=lambda: {OURS: [], PEER: []}
    )

    def median(self, side: str, attr: str = "value") -> float:
        values = [getattr(s, attr) for s in self.samples[side]]
        values = [v for v in values if v == v]
        return float(statistics.median(values)) if values else float("nan")

    def spread(self, side: str) -> str:
        values = [s.value for s in self.samples[side]]
        if len(values) < 2:
            return ""
        return f"({fmt(min(values))}-{fmt(max(values))})"

    def ratio(self) -> float:
        peer = self.median(PEER)
        return self.median(OURS) / peer if peer else float("nan")


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def row(self, key: str, group: str, label: str, unit: str, higher: bool = True) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(group, label, unit, higher)
        return self.rows[key]

    def get(self, key: str) -> Row | None:
        return self.rows.get(key)


def print_table(results: Results) -> None:
    head = (
        f"{'test':<30}{'unit':<7}{'ours (min-max)':<26}{'peer (min-max)':<26}{'ours/peer':>9}"
        f"{'CPU s/M ours':>13}{'peer':>7}{'CPU% ours':>10}{'peer':>6}{'other%':>7}  note"
    )
    print(head)
    print("-" * len(head))
    for row in results.rows.values():
        ours = f"{fmt(row.median(OURS))} {row.spread(OURS)}"
        peer = f"{fmt(row.median(PEER))} {row.spread(PEER)}"
        note = ""
        if row.group == "net":
            note = f"tx offered {fmt(row.median(OURS, 'note'))} / {fmt(row.median(PEER, 'note'))}"
        elif row.group == "blk" and row.unit in ("IOPS", "MB/s"):
            note = (
                f"driver CPU {100 * row.median(OURS, 'note'):.0f}% /"
                f" {100 * row.median(PEER, 'note'):.0f}%"
            )
        cpu_o, cpu_p = row.median(OURS, "cpu_per_m"), row.median(PEER, "cpu_per_m")
        util_o, util_p = row.median(OURS, "cpu_util"), row.median(PEER, "cpu_util")
        others = [s.other for side in (OURS, PEER) for s in row.samples[side]]
        rated = row.unit in ("Mpps", "IOPS", "MB/s")
        other = f"{100 * max(others):.0f}" if rated and others else "-"
        print(
            f"{row.group + ' ' + row.label:<30}{row.unit:<7}{ours:<26}{peer:<26}"
            f"{fmt(row.ratio(), 2):>9}{fmt(cpu_o, 3):>13}{fmt(cpu_p, 3):>7}"
            f"{'-' if util_o != util_o else f'{100 * util_o:.0f}':>10}"
            f"{'-' if util_p != util_p else f'{100 * util_p:.0f}':>6}{other:>7}  {note}"
        )


def summary_line(results: Results, rounds: int) -> str:
    parts: list[str] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "SHORT"

    net64 = results.get("net-64-1")
    if net64 is not None:
        ours, ratio = net64.median(OURS), net64.ratio()
        ok = ours >= TARGETS["net64_mpps"] and ratio >= TARGETS["net64_ratio"]
        parts.append(
            f"net 64B: {ours:.2f} Mpps = {ratio:.2f}x DPDK"
            f" (target >=1 Mpps and >=0.1x: {verdict(ok)})"
        )
    net1500 = results.get("net-1500-1")
    if net1500 is not None:
        ratio = net1500.ratio()
        parts.append(
            f"net 1500B: {net1500.median(OURS):.2f} Mpps = {ratio:.2f}x DPDK"
            f" (target >=0.25x: {verdict(ratio >= TARGETS['net1500_ratio'])})"
        )
    rr32 = results.get("blk-randread-32")
    if rr32 is not None:
        ours, ratio = rr32.median(OURS), rr32.ratio()
        ok = ours >= TARGETS["blk_qd32_iops"] and ratio >= TARGETS["blk_qd32_ratio"]
        parts.append(
            f"blk 4K randread QD32: {ours / 1e3:.0f}k IOPS = {ratio:.2f}x qsd"
            f" (target >=100k and >=0.5x: {verdict(ok)})"
        )
    return f"SUMMARY peers (median of {rounds} rounds, ours/peer): " + "; ".join(parts)


# -- net -------------------------------------------------------------------------------------


@dataclasses.dataclass
class NetSide:
    """One side of the net comparison: a backend and the frontend(s) attached to it.

    ``frontends`` is ``[txonly, rxonly]`` in pair mode and ``[flowgen]`` (both ports in one
    testpmd) in flowgen mode.
    """

    name: str
    backend_pid: int
    frontends: list[H.Testpmd]
    pmd_backend: H.Testpmd | None  # the DPDK side needs start/stop


def _log_size(path: Path) -> int:
    return path.stat().st_size


def _log_from(path: Path, start: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode("utf-8", "replace")


async def pmd_run(pmd: H.Testpmd, cmd: str) -> str:
    """Like ``Testpmd.command`` but polls the log every 2 ms (for timestamps)."""
    proc = pmd.proc
    stdin = proc.process.stdin
    assert stdin is not None
    start = _log_size(proc.log)
    await stdin.send_all(cmd.encode() + b"\n")
    with trio.fail_after(H.scaled(20)):
        while True:
            text = _log_from(proc.log, start)
            end = text.find(H.TESTPMD_PROMPT)
            if end >= 0:
                return text[:end]
            proc.check_alive()
            await trio.sleep(0.002)


async def timed_stats(pmd: H.Testpmd) -> tuple[float, dict[int, H.PortStats]]:
    """Counters of every port and the midpoint time of the query."""
    t0 = time.perf_counter()
    text = await pmd_run(pmd, "show port stats all")
    t1 = time.perf_counter()
    return (t0 + t1) / 2, H.parse_port_stats(text)


def virtio_user(index: int, sock: Path, mac: str, queues: int) -> str:
    # in_order=0: our backend does not offer IN_ORDER; keep both sides' frontends identical.
    return (
        f"virtio_user{index},path={sock},queues={queues},queue_size=256,mac={mac},"
        "in_order=0,mrg_rxbuf=1,packed_vq=0"
    )


def frontend_args(queues: int, peers: Sequence[str]) -> list[str]:
    args = ["--burst=32", "--txpkts=64", f"--rxq={queues}", f"--txq={queues}"]
    args += ["--rxd=256", "--txd=256"]
    return args + [f"--eth-peer={port},{mac}" for port, mac in enumerate(peers)]


@contextlib.asynccontextmanager
async def net_sides(
    workdir: H.Workdir, queues: int, mode: str, cpus: Sequence[int]
) -> AsyncIterator[dict[str, NetSide]]:
    """Start both backends and their frontends (forwarding stopped); stop them on exit.

    ``cpus``: backend CPU, then frontend CPU(s); pair mode puts the rxonly frontend on the
    third CPU when there is one.
    """
    tools = H.find_dpdk()
    async with contextlib.AsyncExitStack() as stack:
        ours_socks = [workdir.sock(f"tv{queues}q{i}") for i in range(2)]
        peer_socks = [workdir.sock(f"dp{queues}q{i}") for i in range(2)]
        argv: list[str | Path] = ["taskset", "-c", str(cpus[0]), sys.executable, "-m"]
        argv += ["trio_vhost.cli", "-q", "net", "--queues", str(queues)]
        for sock in ours_socks:
            argv += ["--socket", sock]
        ours_proc = await stack.enter_async_context(
            H.spawn(argv, name="trio-vhost-net", log=workdir.log(f"trio-vhost-net-{queues}q"))
        )
        vdevs = [f"net_vhost{i},iface={s},queues={queues}" for i, s in enumerate(peer_socks)]
        peer_be = await stack.enter_async_context(
            H.start_testpmd(
                tools, workdir, name=f"testpmd-backend-{queues}q", vdevs=vdevs,
                forward_mode="io", cpu=cpus[0], extra=[f"--rxq={queues}", f"--txq={queues}"],
            )
        )  # fmt: skip
        for sock in ours_socks + peer_socks:
            await H.wait_for_path(sock, timeout=H.scaled(20), procs=[ours_proc, peer_be.proc])
        sides: dict[str, NetSide] = {}
        for side, socks in ((OURS, ours_socks), (PEER, peer_socks)):
            pmds: list[H.Testpmd] = []
            if mode == "pair":
                for role, sock, mac in (("tx", socks[0], TX_MAC), ("rx", socks[1], RX_MAC)):
                    pmd = await stack.enter_async_context(
                        H.start_testpmd(
                            tools, workdir, name=f"{side}-{role}-{queues}q",
                            vdevs=[virtio_user(0, sock, mac, queues)],
                            forward_mode="txonly" if role == "tx" else "rxonly",
                            cpu=cpus[1] if role == "tx" else cpus[-1],
                            extra=["--port-topology=loop", *frontend_args(queues, [RX_MAC])],
                        )
                    )  # fmt: skip
                    pmds.append(pmd)
            else:
                pmd = await stack.enter_async_context(
                    H.start_testpmd(
                        tools, workdir, name=f"{side}-flowgen-{queues}q",
                        vdevs=[virtio_user(0, socks[0], TX_MAC, queues),
                               virtio_user(1, socks[1], RX_MAC, queues)],
                        forward_mode="flowgen", cpu=cpus[1],
                        extra=["--port-topology=paired", *frontend_args(queues, [RX_MAC, TX_MAC])],
                    )
                )  # fmt: skip
                pmds.append(pmd)
            pid = await real_pid(ours_proc if side == OURS else peer_be.proc)
            sides[side] = NetSide(side, pid, pmds, None if side == OURS else peer_be)
        yield sides


async def measure_net(
    side: NetSide, mode: str, pktlen: int, warmup: float, window: float
) -> Sample:
    """Forward for ``warmup + window`` seconds; Mpps received by the frontend side.

    pair: the txonly frontend sends into port 0, the rxonly frontend counts what port 1
    delivers. flowgen: one testpmd lcore drives both ports, sending into each as fast as
    it can and counting (then freeing) what each receives; the backend switches 0->1 and
    1->0. The value is the frames received, the note the frames sent into the backend.
    """
    rx_pmd = side.frontends[-1]
    tx_pmd = side.frontends[0]
    await pmd_run(tx_pmd, f"set txpkts {pktlen}")
    if rx_pmd is not tx_pmd:
        await pmd_run(rx_pmd, "start")
    if side.pmd_backend is not None:
        await pmd_run(side.pmd_backend, "start")
    await pmd_run(tx_pmd, "start")
    try:
        await trio.sleep(warmup)
        cpu0 = proc_cpu_seconds(side.backend_pid)
        noise = Interference.start(cpu0)
        t_rx0, rx0 = await timed_stats(rx_pmd)
        t_tx0, tx0 = (t_rx0, rx0) if rx_pmd is tx_pmd else await timed_stats(tx_pmd)
        await trio.sleep(window)
        t_rx1, rx1 = await timed_stats(rx_pmd)
        t_tx1, tx1 = (t_rx1, rx1) if rx_pmd is tx_pmd else await timed_stats(tx_pmd)
        cpu1 = proc_cpu_seconds(side.backend_pid)
        other = Interference.stop(noise, cpu1)
    finally:
        await pmd_run(tx_pmd, "stop")
        await trio.sleep(0.25)  # let the backend drain its rings
        if rx_pmd is not tx_pmd:
            await pmd_run(rx_pmd, "stop")
        if side.pmd_backend is not None:
            await pmd_run(side.pmd_backend, "stop")
    packets = sum(s.rx_packets for s in rx1.values()) - sum(s.rx_packets for s in rx0.values())
    sent = sum(s.tx_packets for s in tx1.values()) - sum(s.tx_packets for s in tx0.values())
    wall = t_rx1 - t_rx0
    cpu = cpu1 - cpu0
    return Sample(
        value=packets / wall / 1e6,
        cpu_per_m=cpu / packets * 1e6 if packets else float("nan"),
        cpu_util=cpu / wall,
        note=sent / (t_tx1 - t_tx0) / 1e6,
        other=other,
    )


@dataclasses.dataclass(frozen=True)
class NetSettings:
    mode: str  # "pair" | "flowgen"
    rounds: int
    warmup: float
    window: float


async def net_phase(
    results: Results,
    workdir: H.Workdir,
    queues: int,
    sizes: Sequence[int],
    cfg: NetSettings,
    cpus: Sequence[int],
) -> None:
    rows = {
        size: results.row(f"net-{size}-{queues}", "net", f"{size}B {queues}q", "Mpps")
        for size in sizes
    }
    async with net_sides(workdir, queues, cfg.mode, cpus) as sides:
        for r in range(cfg.rounds):
            for size in sizes if r % 2 == 0 else list(reversed(sizes)):
                order = (OURS, PEER) if r % 2 == 0 else (PEER, OURS)
                for name in order:
                    for attempt in range(2):
                        await Interference.wait_quiet()
                        sample = await measure_net(
                            sides[name], cfg.mode, size, cfg.warmup, cfg.window
                        )
                        if not Interference.redo(sample.other, attempt, cfg.window + 1.5):
                            break
                    rows[size].samples[name].append(sample)
                    progress(f"net {size}B {queues}q {name}: {sample.value:.3f} Mpps")
        for name, side in sides.items():
            rss = results.row(f"rss-net-{queues}", "cost", f"net backend {queues}q peak RSS", "MiB")
            rss.higher_is_better = False
            rss.samples[name].append(Sample(peak_rss_mib(side.backend_pid)))


# -- blk: a lean driver ----------------------------------------------------------------------

_FENCE_LOCK: Final = threading.Lock()


def fence() -> None:
    """Full barrier on x86-64 (a LOCK-prefixed RMW, see trio_vhost/vring/_fence.py)."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


class BlkRing:
    """One split ring driven like a virtio-blk guest with a fixed set of request slots.

    Slot ``i`` owns descriptors ``3i`` (16-byte header, device-readable), ``3i+1`` (data)
    and ``3i+2`` (status byte), laid out once: the Linux layout without indirect tables.
    Resubmitting a slot only stores its sector and an avail entry. The ``DriverQueue``
    lays the ring out and ``Frontend.start_vring`` starts it; after that this class owns
    the ring memory (no ``DriverQueue`` method is called on it again).
    """

    def __init__(
        self,
        ram: GuestRam,
        vring: DriverVring,
        *,
        depth: int,
        rtype: RequestType,
        block: int,
        sectors: NDArray[np.uint64],
    ) -> None:
        queue = vring.queue
        size = queue.size
        if 3 * depth > size:
            raise ValueError(f"QD{depth} needs a ring of at least {3 * depth}")
        self.vring = vring
        self.size = size
        self.mask = size - 1
        self.depth = depth
        self.event_idx = queue.event_idx
        self.kick_fd = vring.kick.fd
        self.call_fd = vring.call.fd
        view = ram.view
        d, a, u = (ram.offset(g) for g in (queue.desc_gpa, queue.avail_gpa, queue.used_gpa))
        desc = view[d : d + desc_table_size(size)].view(DESC_DTYPE)
        self.avail = view[a : a + avail_ring_size(size)].view("<u2")
        self.avail_ring = self.avail[2 : 2 + size]
        used = view[u : u + used_ring_size(size)]
        self.used_hdr = used[:USED_RING_OFFSET].view("<u2")
        ev = avail_event_offset(size)
        self.used_ring = used[USED_RING_OFFSET:ev].view("<u4").reshape(size, 2)
        self.avail_event = used[ev : ev + 2].view("<u2")
        # request buffers
        hdr_gpa = ram.alloc(HDR_DTYPE.itemsize * depth, 64)
        o = ram.offset(hdr_gpa)
        headers = view[o : o + HDR_DTYPE.itemsize * depth].view(HDR_DTYPE)
        headers["type"] = int(rtype)
        headers["reserved"] = 0
        self.header_sectors = headers["sector"]
        data_gpa = ram.alloc(block * depth, 4096)
        if rtype == RequestType.OUT:
            o = ram.offset(data_gpa)
            view[o : o + block * depth] = np.random.default_rng(7).integers(
                1, 255, block * depth, dtype=np.uint8
            )
        status_gpa = ram.alloc(depth, 64)
        o = ram.offset(status_gpa)
        self.status = view[o : o + depth]
        slots = np.arange(depth)
        rows = np.zeros(3 * depth, dtype=DESC_DTYPE)
        rows["addr"][0::3] = hdr_gpa + HDR_DTYPE.itemsize * slots
        rows["len"][0::3] = HDR_DTYPE.itemsize
        rows["flags"][0::3] = VIRTQ_DESC_F_NEXT
        rows["next"][0::3] = 3 * slots + 1
        rows["addr"][1::3] = data_gpa + block * slots
        rows["len"][1::3] = block
        data_flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if rtype == RequestType.IN else 0)
        rows["flags"][1::3] = data_flags
        rows["next"][1::3] = 3 * slots + 2
        rows["addr"][2::3] = status_gpa + slots
        rows["len"][2::3] = 1
        rows["flags"][2::3] = VIRTQ_DESC_F_WRITE
        desc[: 3 * depth] = rows
        self.sectors = sectors
        self.cursor = 0
        self.avail_idx = int(self.avail[1])
        self.kick_checked = self.avail_idx
        self.last_used = int(self.used_hdr[1])
        self.in_flight = 0
        self.kicks = 0
        self.submit_ns = [0] * depth
        self.recording = False  # record per-request latency (the QD1 path only)
        self.latencies: list[int] = []

    def _next_sectors(self, k: int) -> NDArray[np.uint64]:
        n, c = len(self.sectors), self.cursor
        self.cursor = (c + k) % n
        if c + k <= n:
            return self.sectors[c : c + k]
        return np.concatenate((self.sectors[c:], self.sectors[: c + k - n]))

    def submit(self, slots: NDArray[np.intp] | int) -> None:
        """Reissue requests in ``slots`` with fresh sectors, publish, kick if asked to."""
        idx = self.avail_idx
        if isinstance(slots, int):
            k = 1
            c = self.cursor
            self.header_sectors[slots] = self.sectors[c]
            self.cursor = (c + 1) % len(self.sectors)
            self.status[slots] = 0xFF
            self.avail_ring[idx & self.mask] = 3 * slots
            self.submit_ns[slots] = time.perf_counter_ns()
        else:
            k = len(slots)
            self.header_sectors[slots] = self._next_sectors(k)
            self.status[slots] = 0xFF
            start = idx & self.mask
            heads = 3 * slots
            if start + k <= self.size:
                self.avail_ring[start : start + k] = heads
            else:
                split = self.size - start
                self.avail_ring[start:] = heads[:split]
                self.avail_ring[: k - split] = heads[split:]
        self.avail_idx = new = (idx + k) & U16
        self.avail[1] = new  # publish (x86 TSO orders it after the ring stores)
        self.in_flight += k
        old, self.kick_checked = self.kick_checked, new
        fence()
        if self.event_idx:
            needed = vring_need_event(int(self.avail_event[0]), new, old)
        else:
            needed = not int(self.used_hdr[0]) & VIRTQ_USED_F_NO_NOTIFY
        if needed:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1

    def harvest(self) -> NDArray[np.intp] | int | None:
        """Consume used entries: the completed slots (an int when exactly one), or None."""
        used_idx = int(self.used_hdr[1])
        n = (used_idx - self.last_used) & U16
        if n == 0:
            return None
        start = self.last_used & self.mask
        self.last_used = used_idx
        self.in_flight -= n
        if n == 1:
            slot = int(self.used_ring[start, 0]) // 3
            if self.recording:
                self.latencies.append(time.perf_counter_ns() - self.submit_ns[slot])
            if self.status[slot]:
                raise RuntimeError(f"request failed with status {int(self.status[slot])}")
            return slot
        if start + n <= self.size:
            heads = self.used_ring[start : start + n, 0]
        else:
            heads = np.concatenate(
                (self.used_ring[start:, 0], self.used_ring[: start + n - self.size, 0])
            )
        slots = (heads // 3).astype(np.intp)
        if self.status[slots].any():
            raise RuntimeError("a request failed (non-zero status byte)")
        return slots

    def enable_interrupts(self) -> bool:
        """Ask for a call on the next used entry; True if entries are already there."""
        if self.event_idx:
            self.avail[2 + self.size] = self.last_used
        else:
            self.avail[0] = int(self.avail[0]) & ~VIRTQ_AVAIL_F_NO_INTERRUPT & U16
        fence()
        return int(self.used_hdr[1]) != self.last_used

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.avail[0] = int(self.avail[0]) | VIRTQ_AVAIL_F_NO_INTERRUPT


@dataclasses.dataclass(frozen=True)
class BlkWorkload:
    key: str
    label: str
    rtype: RequestType
    block: int
    depth: int  # per queue
    queues: int = 1
    sequential: bool = False

    @property
    def ring_size(self) -> int:
        return max(256, 1 << (3 * self.depth - 1).bit_length())


@dataclasses.dataclass
class BlkRun:
    requests: int
    wall: float
    backend_cpu: float
    driver_cpu: float
    latencies_ns: list[int]
    other: float


def drive_rings(rings: Sequence[BlkRing], pid: int, warmup: float, duration: float) -> BlkRun:
    """Keep every ring's slots in flight; measure ``duration`` s after ``warmup`` s; drain.

    Synchronous on purpose: when no ring has completions the driver re-enables interrupts,
    re-checks, and sleeps in poll(2) on the call eventfds, like a guest waiting for an
    interrupt (no trio in the data path, so driver wake-ups stay cheap).
    """
    poller = select.poll()
    for ring in rings:
        poller.register(ring.call_fd, select.POLLIN)
        ring.disable_interrupts()
        if ring.depth == 1:
            ring.submit(0)
        else:
            ring.submit(np.arange(ring.depth))
    now = time.perf_counter()
    mark, end = now + warmup, now + warmup + duration
    done = 0
    start: tuple[float, int, float, float] | None = None
    stop: tuple[float, int, float, float] | None = None
    draining = False
    while True:
        got = 0
        for ring in rings:
            slots = ring.harvest()
            if slots is None:
                continue
            got += 1 if isinstance(slots, int) else len(slots)
            if not draining:
                ring.submit(slots)
        if got:
            done += got
            now = time.perf_counter()
            if start is None:
                if now >= mark:
                    start = (now, done, proc_cpu_seconds(pid), time.process_time())
                    noise = Interference.start(start[2])
                    for ring in rings:
                        ring.recording = ring.depth == 1
            elif stop is None and now >= end:
                stop = (now, done, proc_cpu_seconds(pid), time.process_time())
                other = Interference.stop(noise, stop[2])
                for ring in rings:
                    ring.recording = False
                draining = True
            if draining and not any(ring.in_flight for ring in rings):
                break
            continue
        if any(ring.enable_interrupts() for ring in rings):
            continue
        if not poller.poll(STALL_MS):
            raise RuntimeError(f"no completion for {STALL_MS} ms: backend stalled")
        for ring in rings:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(ring.call_fd)
            ring.disable_interrupts()
    assert start is not None
    assert stop is not None
    for ring in rings:
        if ring.vring.err.read_nowait():
            raise RuntimeError("the backend signalled a vring error")
    latencies: list[int] = []
    for ring in rings:
        latencies.extend(ring.latencies)
    return BlkRun(
        requests=stop[1] - start[1],
        wall=stop[0] - start[0],
        backend_cpu=stop[2] - start[2],
        driver_cpu=stop[3] - start[3],
        latencies_ns=latencies,
        other=other,
    )


async def run_blk_workload(
    sock: Path, pid: int, wl: BlkWorkload, image_size: int, warmup: float, duration: float
) -> BlkRun:
    """Connect like QEMU, start ``wl.queues`` rings, drive them, disconnect; a checkpoint."""
    nblocks = image_size // wl.block
    per_block = wl.block // 512
    if wl.sequential:
        sectors = (np.arange(nblocks, dtype=np.uint64) * per_block).astype(np.uint64)
    else:
        rng = np.random.default_rng(12345)
        sectors = (rng.integers(0, nblocks, 1 << 16, dtype=np.uint64) * per_block).astype(np.uint64)
    ram_size = wl.queues * (wl.depth * wl.block + 2 * MIB) + 4 * MIB
    with GuestRam.create(ram_size) as ram:
        async with await Frontend.connect(str(sock)) as frontend:
            acked = await frontend.negotiate()
            event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
            await frontend.set_mem_table([ram])
            vrings: list[DriverVring] = []
            try:
                rings = []
                for q in range(wl.queues):
                    queue = DriverQueue.create(ram, wl.ring_size, event_idx=event_idx, pool_size=64)
                    vring = await frontend.start_vring(q, queue)
                    vrings.append(vring)
                    # each queue walks its own part of the sector list
                    shifted = np.roll(sectors, -q * (len(sectors) // max(wl.queues, 1)))
                    rings.append(
                        BlkRing(
                            ram, vring, depth=wl.depth, rtype=wl.rtype, block=wl.block,
                            sectors=shifted,
                        )
                    )  # fmt: skip
                return drive_rings(rings, pid, warmup, duration)
            finally:
                for vring in vrings:
                    vring.close()


def blk_workloads(quick: bool) -> list[BlkWorkload]:
    rr, rw = RequestType.IN, RequestType.OUT
    k4 = 4 * KIB
    all_ = [
        BlkWorkload("randread-1", "4K randread QD1", rr, k4, 1),
        BlkWorkload("randread-32", "4K randread QD32", rr, k4, 32),
        BlkWorkload("randread-128", "4K randread QD128", rr, k4, 128),
        BlkWorkload("randwrite-1", "4K randwrite QD1", rw, k4, 1),
        BlkWorkload("randwrite-32", "4K randwrite QD32", rw, k4, 32),
        BlkWorkload("randwrite-128", "4K randwrite QD128", rw, k4, 128),
        BlkWorkload("seqread-1M", "1M seqread QD8", rr, MIB, 8, sequential=True),
        BlkWorkload("randread-32-2q", "4K randread 2q x QD16", rr, k4, 16, queues=2),
    ]
    if quick:
        keep = {"randread-1", "randread-32", "randwrite-32", "seqread-1M"}
        return [w for w in all_ if w.key in keep]
    return all_


def prepare_image(path: Path, size: int) -> None:
    """A raw image full of non-zero data, written through the page cache (stays cached)."""
    chunk = np.random.default_rng(3).integers(1, 255, MIB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(chunk)
    with open(path, "rb") as f:  # touch it once more: every page resident
        while f.read(8 * MIB):
            pass


@contextlib.asynccontextmanager
async def blk_backends(
    workdir: H.Workdir, image: Path, cpus: Sequence[int]
) -> AsyncIterator[dict[str, tuple[Path, int]]]:
    """Both blk backends on the same image, 2 queues each; yields side -> (socket, pid)."""
    qsd = shutil.which("qemu-storage-daemon")
    assert qsd is not None
    ours_sock, peer_sock = workdir.sock("tvblk"), workdir.sock("qsdblk")
    pin = ["taskset", "-c", str(cpus[0])]
    ours_argv: list[str | Path] = [*pin, sys.executable, "-m", "trio_vhost.cli", "-q", "blk"]
    ours_argv += ["--socket", ours_sock, "--image", image, "--queues", "2"]
    # inline (default) or thread: where trio-vhost blk does its disk I/O (trio-vhost blk --io)
    ours_argv += ["--io", os.environ.get("TRIO_VHOST_BENCH_BLK_IO", "inline")]
    peer_argv: list[str | Path] = [
        *pin, qsd,
        "--blockdev", f"driver=file,node-name=disk0,filename={image},cache.direct=off",
        "--export",
        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
        f"addr.path={peer_sock},writable=on,num-queues=2",
    ]  # fmt: skip
    async with (
        H.spawn(ours_argv, name="trio-vhost-blk", log=workdir.log("trio-vhost-blk")) as ours,
        H.spawn(peer_argv, name="qemu-storage-daemon", log=workdir.log("qsd")) as peer,
    ):
        await H.wait_for_path(ours_sock, timeout=H.scaled(20), procs=[ours])
        await H.wait_for_path(peer_sock, timeout=H.scaled(20), procs=[peer])
        yield {OURS: (ours_sock, await real_pid(ours)), PEER: (peer_sock, await real_pid(peer))}


async def blk_phase(
    results: Results,
    workdir: H.Workdir,
    workloads: Sequence[BlkWorkload],
    rounds: int,
    warmup: float,
    duration: float,
    cpus: Sequence[int],
) -> None:
    image = workdir.file("disk.img")
    prepare_image(image, IMAGE_SIZE)
    rows: dict[str, Row] = {}
    for wl in workloads:
        unit = "MB/s" if wl.block >= MIB else "IOPS"
        rows[wl.key] = results.row(f"blk-{wl.key}", "blk", wl.label, unit)
        if wl.depth == 1 and wl.queues == 1:
            for pct in (50, 99):
                key = f"blk-{wl.key}-p{pct}"
                results.row(key, "blk", f"{wl.label} p{pct}", "us", higher=False)
    async with blk_backends(workdir, image, cpus) as backends:
        for r in range(rounds):
            for wl in workloads if r % 2 == 0 else list(reversed(workloads)):
                order = (OURS, PEER) if r % 2 == 0 else (PEER, OURS)
                for name in order:
                    sock, pid = backends[name]
                    for attempt in range(2):
                        await Interference.wait_quiet()
                        run = await run_blk_workload(sock, pid, wl, IMAGE_SIZE, warmup, duration)
                        if not Interference.redo(run.other, attempt, duration + warmup):
                            break
                    rate = run.requests / run.wall
                    value = rate * wl.block / 1e6 if wl.block >= MIB else rate
                    rows[wl.key].samples[name].append(
                        Sample(
                            value=value,
                            cpu_per_m=run.backend_cpu / run.requests * 1e6,
                            cpu_util=run.backend_cpu / run.wall,
                            note=run.driver_cpu / run.wall,
                            other=run.other,
                        )
                    )
                    if run.latencies_ns:
                        lat = np.array(run.latencies_ns) / 1e3
                        for pct in (50, 99):
                            row = results.rows[f"blk-{wl.key}-p{pct}"]
                            row.samples[name].append(Sample(float(np.percentile(lat, pct))))
                    progress(f"blk {wl.label} {name}: {value:,.0f} {rows[wl.key].unit}")
        await guest_view(results, workdir, backends, rounds)
        rss = results.row("rss-blk", "cost", "blk backend peak RSS", "MiB", higher=False)
        for name, (_sock, pid) in backends.items():
            rss.samples[name].append(Sample(peak_rss_mib(pid)))


#: The guest view: the region a TCG guest writes then reads with O_DIRECT dd (1 MiB
#: requests), and how many 4 KiB reads it times at queue depth 1 (role blk-dd).
GUEST_OFF: Final = 128 * MIB
GUEST_MIB: Final = 64
GUEST_N4K: Final = 2000
GUEST_ROWS: Final = (
    ("blk-dd-write", "MiBps", "dd 1M write", "MB/s", 1.048576),
    ("blk-dd-read", "MiBps", "dd 1M read", "MB/s", 1.048576),
    ("blk-dd-read4k", "iops", "dd 4K read QD1", "IOPS", 1.0),
)


async def guest_view(
    results: Results,
    workdir: H.Workdir,
    backends: dict[str, tuple[Path, int]],
    rounds: int,
) -> None:
    """A QEMU guest (TCG unless TRIO_VHOST_INTEROP_ACCEL=kvm) timing O_DIRECT dd through
    each backend in turn: what a guest sees, emulation cost included."""
    tools, images = H.find_qemu(), H.find_guest_images()
    rows = [results.row(f"guest-{m}", "guest", label, unit) for m, _, label, unit, _ in GUEST_ROWS]
    params = {"off": GUEST_OFF, "mib": GUEST_MIB, "n4k": GUEST_N4K}
    for r in range(rounds):
        for name in (OURS, PEER) if r % 2 == 0 else (PEER, OURS):
            sock, pid = backends[name]
            spec = H.GuestSpec(
                name=f"dd-{name}-{r}",
                role="blk-dd",
                params=params,
                blk=[H.BlkDisk(sock, num_queues=1)],
            )
            cpu0 = proc_cpu_seconds(pid)
            report = await H.run_guest(tools, images, spec, workdir, timeout=180)
            report.check(required=[m for m, *_ in GUEST_ROWS])
            cpu = proc_cpu_seconds(pid) - cpu0
            for row, (marker, key, _, _, scale) in zip(rows, GUEST_ROWS, strict=True):
                value = float(report.field(marker, key)) * scale
                row.samples[name].append(Sample(value))
            progress(f"guest dd {name}: {report.wall_s:.1f} s, backend CPU {cpu:.2f} s")


# -- orchestration ---------------------------------------------------------------------------

_VERBOSE = False


def progress(text: str) -> None:
    if _VERBOSE:
        print(f"  .. {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workdir_kept(keep: bool) -> Iterator[H.Workdir]:
    workdir = H.Workdir.create()
    try:
        yield workdir
    finally:
        if keep:
            print(f"logs kept in {workdir.path}", file=sys.stderr)
        else:
            workdir.remove()


def add_scaling_rows(results: Results) -> None:
    """Cost rows: 2 queues relative to 1 queue, per side (from rows already measured)."""
    pairs = [
        ("net-64-2", "net-64-1", "net 64B Mpps 2q/1q"),
        ("net-1500-2", "net-1500-1", "net 1500B Mpps 2q/1q"),
        ("blk-randread-32-2q", "blk-randread-32", "blk 4K rr 32 in flight 2q/1q"),
    ]
    for two, one, label in pairs:
        a, b = results.get(two), results.get(one)
        if a is None or b is None:
            continue
        row = results.row(f"scale-{two}", "cost", label, "x")
        for side in (OURS, PEER):
            row.samples[side].append(Sample(a.median(side) / b.median(side)))


async def bench(args: argparse.Namespace) -> int:
    do_net, do_blk = args.only in (None, "net"), args.only in (None, "blk")
    missing = missing_prerequisites(do_net, do_blk)
    if missing:
        print("bench_peers: missing prerequisites:", file=sys.stderr)
        for item in missing:
            print(f"  - {item}", file=sys.stderr)
        print(
            "`bash scripts/setup-interop.sh` (as root) installs them; this bench installs"
            " nothing itself.",
            file=sys.stderr,
        )
        return 2
    mode = args.net_mode
    if mode == "auto":
        mode = "pair" if len(os.sched_getaffinity(0)) >= 3 else "flowgen"
    cpus = pick_cpus(mode)
    print(machine_line(cpus))
    rounds = 1 if args.quick and args.rounds is None else (args.rounds or 3)
    if args.quick:
        plan: list[tuple[int, list[int]]] = [(1, [64, 1500])]
        net = NetSettings(mode, rounds, 0.5, 1.0)
        blk_warm, blk_win = 0.2, 0.6
        Interference.quiet_wait, Interference.budget = 1.0, 10.0
    else:
        plan = [(1, [64, 1500]), (2, [64, 1500])]
        net = NetSettings(mode, rounds, 1.0, 2.0)
        blk_warm, blk_win = 0.5, 2.0
    workloads = blk_workloads(args.quick)
    frontends = (
        "txonly -> port 0, rxonly <- port 1 (two testpmd)"
        if mode == "pair"
        else "one testpmd lcore sending into and receiving from both ports"
    )
    print(
        f"{rounds} round(s), sides alternated; net ({mode}: {frontends}): {net.warmup} s"
        f" warm-up + {net.window} s window, queue size 256; blk: {blk_warm} s + {blk_win} s"
        f" per run, {IMAGE_SIZE // MIB} MiB image in the page cache"
    )
    os.sched_setaffinity(0, {cpus[1]})
    Interference.cpu = cpus[0]
    results = Results()
    t0 = time.perf_counter()
    with workdir_kept(args.keep) as workdir:
        if do_net:
            for queues, sizes in plan:
                await net_phase(results, workdir, queues, sizes, net, cpus)
        if do_blk:
            await blk_phase(results, workdir, workloads, rounds, blk_warm, blk_win, cpus)
    add_scaling_rows(results)
    print_table(results)
    print(
        "ours = trio-vhost (-q), peer = DPDK testpmd vhost PMD (net) / qemu-storage-daemon"
        " (blk); CPU s/M: backend CPU seconds per million packets received / requests;"
        " CPU%: backend CPU per wall second; tx offered: Mpps the frontend(s) got into the"
        f" backend; driver CPU: this process; other%: the most any run of the row lost"
        " of the backend CPU to other tasks; us: microseconds."
        f" Wall {time.perf_counter() - t0:.0f} s."
        f" {Interference.describe()}"
    )
    print(summary_line(results, rounds))
    return 0


# -- profile (py-spy) -------------------------------------------------------------------------

_FRAME_RE: Final = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str, *, line: bool) -> str:
    m = _FRAME_RE.match(frame.strip())
    if m is None:
        return frame.strip()
    where = Path(m["file"]).name
    if line and m["line"]:
        where += f":{m['line']}"
    return f"{m['func']} ({where})"


#: Leaf functions where a sampled thread is waiting, not working: trio's epoll_wait and an
#: idle trio thread-cache worker (py-spy's idle detection does not catch them here).
IDLE_LEAVES: Final = frozenset({"EpollIOManager.get_events", "WorkerThread._work"})
#: Frames on (nearly) every stack: the entry point and the trio run loop.
BOILERPLATE: Final = frozenset(
    {
        "<module>", "_run_code", "_run_module_as_main", "main", "run", "unrolled_run",
        "_run_reporting_os_errors", "_run_blk", "_run_net", "_serve_until_signal",
        "_serve_ports_until_signal", "Thread.run", "Thread._bootstrap",
        "Thread._bootstrap_inner",
    }
)  # fmt: skip


def summarize_pyspy(path: Path, top: int = 14) -> str:
    """Self and inclusive shares per function from py-spy's ``--format raw`` output.

    Shares are of the busy samples: those whose leaf is an idle wait are counted apart.
    """
    own: defaultdict[str, int] = defaultdict(int)
    own_lines: defaultdict[str, int] = defaultdict(int)
    inclusive: defaultdict[str, int] = defaultdict(int)
    total = idle = 0
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += n
        leaf = _frame_name(frames[-1], line=False)
        if leaf.split(" (")[0] in IDLE_LEAVES:
            idle += n
            continue
        own[leaf] += n
        own_lines[_frame_name(frames[-1], line=True)] += n
        for name in {_frame_name(f, line=False) for f in frames}:
            if name.split(" (")[0] not in BOILERPLATE:
                inclusive[name] += n
    busy = total - idle
    if not busy:
        return "  (no busy samples)"
    out = [
        f"  {total} samples, {100 * idle / total:.0f}% in idle waits (epoll_wait, trio thread"
        f" cache); shares below are of the {busy} busy ones. Self time by function:"
    ]
    out += [f"    {100 * n / busy:5.1f}%  {k}" for k, n in _top(own, top)]
    out.append("  self time by line:")
    out += [f"    {100 * n / busy:5.1f}%  {k}" for k, n in _top(own_lines, 8)]
    out.append("  inclusive (function on the stack):")
    out += [f"    {100 * n / busy:5.1f}%  {k}" for k, n in _top(inclusive, top)]
    return "\n".join(out)


def _top(counts: dict[str, int], n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: -kv[1])[:n]


def pyspy_argv(pid: int, seconds: float, out: Path) -> list[str]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out),
    ]  # fmt: skip


async def profile(args: argparse.Namespace) -> int:
    """Run our backends alone under py-spy: net 64B 1q, blk 4K randread QD1 and QD32."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    missing = missing_prerequisites(args.only in (None, "net"), args.only in (None, "blk"))
    if not os.access(exe, os.X_OK):
        missing.append("py-spy (`.venv/bin/pip install py-spy`)")
    if missing:
        print("bench_peers --profile: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    cpus = pick_cpus("flowgen")
    print(machine_line(cpus))
    os.sched_setaffinity(0, {cpus[1]})
    seconds = 3.0 if args.quick else 8.0
    with workdir_kept(args.keep) as workdir:
        if args.only in (None, "net"):
            async with net_sides(workdir, 1, "flowgen", cpus) as sides:
                side = sides[OURS]
                pmd = side.frontends[0]
                await pmd_run(pmd, "set txpkts 64")
                await pmd_run(pmd, "start")
                await trio.sleep(1.0)
                out = workdir.file("pyspy-net.txt")
                t0, s0 = await timed_stats(pmd)
                await trio.run_process(
                    pyspy_argv(side.backend_pid, seconds, out), capture_stdout=True
                )
                t1, s1 = await timed_stats(pmd)
                await pmd_run(pmd, "stop")
            received = sum(p.rx_packets for p in s1.values()) - sum(
                p.rx_packets for p in s0.values()
            )
            print(
                f"\nPROFILE trio-vhost net, 64-byte frames, 1 queue pair, flowgen:"
                f" {received / (t1 - t0) / 1e6:.3f} Mpps received while profiled"
            )
            print(summarize_pyspy(out))
        if args.only in (None, "blk"):
            image = workdir.file("disk.img")
            prepare_image(image, IMAGE_SIZE)
            async with blk_backends(workdir, image, cpus) as backends:
                sock, pid = backends[OURS]
                for wl in blk_workloads(False)[:2]:
                    out = workdir.file(f"pyspy-{wl.key}.txt")
                    spy = await trio.lowlevel.open_process(
                        pyspy_argv(pid, seconds, out), stdout=subprocess.DEVNULL
                    )
                    run = await run_blk_workload(sock, pid, wl, IMAGE_SIZE, 0.3, seconds + 1.0)
                    await spy.wait()
                    print(
                        f"\nPROFILE trio-vhost blk, {wl.label}: {run.requests / run.wall:,.0f}"
                        f" IOPS, backend {1e6 * run.backend_cpu / run.requests:.1f} us CPU per"
                        " request while profiled"
                    )
                    print(summarize_pyspy(out))
    return 0


def main() -> None:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--only", choices=("net", "blk"), help="run one part only")
    parser.add_argument(
        "--net-mode",
        choices=("auto", "pair", "flowgen"),
        default="auto",
        help="net frontends: a txonly+rxonly testpmd pair (needs 3 CPUs to mean anything) or"
        " one flowgen testpmd on both ports (default auto: pair with >= 3 CPUs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy our backends instead (~40 s)"
    )
    args = parser.parse_args()
    global _VERBOSE
    _VERBOSE = args.verbose
    sys.exit(trio.run(profile if args.profile else bench, args))


if __name__ == "__main__":
    main()
