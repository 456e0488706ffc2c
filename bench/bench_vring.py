"""End-to-end vring throughput: our ``serve()`` in one process, the Python driver in another.

The backend process (this file with ``--role backend``) serves the benchmark devices with the
real :func:`trio_vhost.serve`, one unix socket each; this process plays the guest with
``Frontend`` + ``DriverQueue`` and keeps the ring full. Devices: ``null`` (completes with
nothing written), ``copy64`` (writes a 64-byte frame into each chain's writable buffer, tuned
memoryview stores) and ``copy64-writer`` (the same with ``ChainWriter``). Paths: ``batched``
(the worker as it is) and ``naive`` (the worker with ``max_batch=1``, set through
``run_vring.__kwdefaults__`` in the backend process: Session gives no way to pass it, and
``DEFAULT_MAX_BATCH`` is bound as the default when ``run_vring`` is defined). ``--profile``
times the drain loop's stages in the backend instead. Details and results: bench/README.md.

Run: ``.venv/bin/python bench/bench_vring.py [--rounds N] [--quick] [--profile]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, ParamSpec, TypedDict, TypeVar

import numpy as np
import trio

# Submodule imports: they work even from an editable install made before the package had
# an __init__ (which then resolves ``trio_vhost`` as a namespace package).
from trio_vhost.device import Device, QueueContext
from trio_vhost.frontend import DriverVring, Frontend
from trio_vhost.mem.guest import GuestRam
from trio_vhost.mem.table import MemoryTable
from trio_vhost.proto.constants import VirtioFeature
from trio_vhost.server import serve
from trio_vhost.vring.batch import ChainBatch
from trio_vhost.vring.chain import ChainWriter, DescriptorChain
from trio_vhost.vring.driver import DriverQueue

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from trio_vhost.device import Completion

P = ParamSpec("P")
R = TypeVar("R")

FRAME: Final = bytes(range(64))
_FRAME_ARRAY: Final = np.frombuffer(FRAME, dtype=np.uint8)
BUFFER_LEN: Final = 64
STALL_SECONDS: Final = 5.0
TARGETS: Final = {"null": 2e6, "copy64": 1e6}
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


# -- devices ------------------------------------------------------------------------------


_FRAME_COLUMNS: Final = np.arange(64, dtype=np.intp)


class NullDevice(Device):
    """Complete every chain with nothing written."""

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        return [(c.head, 0) for c in chains]


class Copy64Device(Device):
    """Write a 64-byte frame into each chain's writable buffer (net RX of small frames)."""

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        memory = queue.memory
        regions = memory.regions
        if len(regions) != 1:
            return write_frames(memory, chains)
        # pop_batch checked every buffer against the table: with one region each lies in it.
        base = regions[0].gpa
        ram = regions[0].view.data
        frame = FRAME
        done: list[Completion] = []
        append = done.append
        for c in chains:
            writable = c.writable
            if len(writable) == 1 and writable[0][1] >= 64:
                offset = writable[0][0] - base
                ram[offset : offset + 64] = frame
                append((c.head, 64))
            else:
                writer = ChainWriter(memory, c)
                append((c.head, writer.write(frame)))
        return done


class Copy64WriterDevice(Device):
    """The copy64 device written with the library's per-chain :class:`ChainWriter`."""

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        return write_frames(queue.memory, chains)


def write_frames(memory: MemoryTable, chains: Sequence[DescriptorChain]) -> list[Completion]:
    """Write :data:`FRAME` into every chain with a :class:`ChainWriter`."""
    done: list[Completion] = []
    for c in chains:
        writer = ChainWriter(memory, c)
        writer.write(FRAME)
        done.append((c.head, writer.written))
    return done


class NullArraysDevice(Device):
    """The null device on the array path (:attr:`Device.uses_arrays`)."""

    uses_arrays = True

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> int:
        return 0


class Copy64ArraysDevice(Device):
    """The copy64 device on the array path: one vectorised scatter per batch."""

    uses_arrays = True

    def process_arrays(self, queue: QueueContext, batch: ChainBatch) -> int | NDArray[np.uint32]:
        regions = batch.table.regions
        if (
            batch.all_simple
            and len(regions) == 1
            and bool(np.all(batch.writable))
            and bool(np.all(batch.length >= len(FRAME)))
        ):
            rows = batch.offset.astype(np.intp)[:, None] + _FRAME_COLUMNS
            regions[0].view[rows] = _FRAME_ARRAY
            return len(FRAME)
        return super().process_arrays(queue, batch)

    def process_batch(
        self, queue: QueueContext, chains: Sequence[DescriptorChain]
    ) -> Sequence[Completion]:
        return write_frames(queue.memory, chains)


DEVICES: Final[dict[str, type[Device]]] = {
    "null": NullDevice,
    "null-arrays": NullArraysDevice,
    "copy64": Copy64Device,
    "copy64-arrays": Copy64ArraysDevice,
    "copy64-writer": Copy64WriterDevice,
}


# -- backend process ------------------------------------------------------------------------


class StageReport(TypedDict):
    ns: dict[str, int]
    calls: dict[str, int]
    chains: int
    wall_ns: int
    cpu_s: float
    timer_ns: float
    chain_build_ns: float


class Stages:
    """Wall-time totals of wrapped functions in the backend (``--profile``)."""

    def __init__(self) -> None:
        self.ns: defaultdict[str, int] = defaultdict(int)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.chains = 0
        self.first_pop_ns = 0
        self.last_pop_ns = 0
        self.cpu_at_first_pop = 0.0

    def sync(self, name: str, fn: Callable[P, R]) -> Callable[P, R]:
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                ns[name] += clock() - t0
                calls[name] += 1

        return timed

    def aio(self, name: str, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        async def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            t0 = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                ns[name] += clock() - t0
                calls[name] += 1

        return timed

    def install(self, devices: Sequence[Device]) -> None:
        """Wrap the drain loop's pieces (library objects are patched in this process only)."""
        import trio_vhost.worker as worker_mod
        from trio_vhost._io.eventfd import EventFd
        from trio_vhost.vring.split import SplitQueue

        pop = SplitQueue.pop_batch

        def pop_batch(queue: SplitQueue, max_chains: int) -> list[DescriptorChain]:
            t0 = time.perf_counter_ns()
            chains = pop(queue, max_chains)
            t1 = time.perf_counter_ns()
            self.ns["pop_batch"] += t1 - t0
            self.calls["pop_batch"] += 1
            if chains:
                if not self.chains:
                    self.first_pop_ns = t0
                    self.cpu_at_first_pop = _self_cpu()
                self.chains += len(chains)
                self.calls["batches"] += 1
                self.last_pop_ns = t1
            return chains

        setattr(SplitQueue, "pop_batch", pop_batch)  # noqa: B010 (a method on a final class)
        for method in (
            "add_used_batch",
            "needs_notification",
            "enable_notifications",
            "disable_notifications",
        ):
            setattr(SplitQueue, method, self.sync(method, getattr(SplitQueue, method)))
        setattr(EventFd, "write", self.sync("eventfd write", EventFd.write))  # noqa: B010
        setattr(worker_mod, "_publish", self.sync("_publish", worker_mod._publish))  # noqa: B010
        wait = worker_mod._wait_for_kick
        setattr(worker_mod, "_wait_for_kick", self.aio("wait for kick", wait))  # noqa: B010
        checkpoint = trio.lowlevel.checkpoint
        setattr(trio.lowlevel, "checkpoint", self.aio("checkpoint", checkpoint))  # noqa: B010
        gc_start = [0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_start[0] = time.perf_counter_ns()
            else:
                self.ns["gc"] += time.perf_counter_ns() - gc_start[0]
                self.calls["gc"] += 1

        gc.callbacks.append(on_gc)
        for device in devices:
            device.process_batch = self.sync("process_batch", device.process_batch)  # type: ignore[method-assign]

    def report(self) -> StageReport:
        """Return the totals plus calibrations taken in this process."""
        return {
            "ns": dict(self.ns),
            "calls": dict(self.calls),
            "chains": self.chains,
            "wall_ns": self.last_pop_ns - self.first_pop_ns,
            "cpu_s": _self_cpu() - self.cpu_at_first_pop,
            "timer_ns": _timer_overhead_ns(),
            "chain_build_ns": _chain_build_ns(),
        }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timer_overhead_ns() -> float:
    """Cost of one wrapped call over a bare call, in this process."""

    def nothing() -> None:
        return None

    wrapped = Stages().sync("x", nothing)
    best = []
    for fn in (nothing, wrapped):
        t0 = time.perf_counter_ns()
        for _ in range(100_000):
            fn()
        best.append((time.perf_counter_ns() - t0) / 100_000)
    return best[1] - best[0]


def _chain_build_ns() -> float:
    """Replay pop_batch's per-chain step for 256 chains: tolist+zip+DescriptorChain+append."""
    heads = np.arange(256, dtype=np.uint16)
    addrs = np.arange(256, dtype=np.uint64) * 64
    lens = np.full(256, 64, dtype=np.uint32)
    writes = np.zeros(256, dtype=np.uint16)
    samples = []
    for _ in range(300):
        t0 = time.perf_counter_ns()
        chains: list[DescriptorChain] = []
        append = chains.append
        for h, a, ln, w in zip(
            heads.tolist(), addrs.tolist(), lens.tolist(), writes.tolist(), strict=True
        ):
            if w:
                append(DescriptorChain(h, (), ((a, ln),), 0, ln))
            else:
                append(DescriptorChain(h, ((a, ln),), (), ln, 0))
        samples.append((time.perf_counter_ns() - t0) / 256)
    return statistics.median(samples)


async def _serve_all(directory: str, devices: dict[str, Device]) -> None:
    async with trio.open_nursery() as nursery:
        for name, device in devices.items():
            await nursery.start(serve, device, os.path.join(directory, f"{name}.sock"))
        print("ready", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def backend_main(args: argparse.Namespace) -> None:
    """Serve every benchmark device until SIGTERM (the ``--role backend`` process)."""
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    if args.max_batch:
        import trio_vhost.worker as worker_mod

        defaults = worker_mod.run_vring.__kwdefaults__
        assert defaults is not None
        assert "max_batch" in defaults
        defaults["max_batch"] = args.max_batch
    devices = {name: cls() for name, cls in DEVICES.items()}
    stages = Stages() if args.stages else None
    if stages is not None:
        stages.install(list(devices.values()))
    trio.run(_serve_all, args.socket_dir, devices)
    if stages is not None:
        print("STAGES " + json.dumps(stages.report()), flush=True)


# -- driver side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    device: str
    size: int
    path: str  # "batched" | "naive"
    event_idx: bool


@dataclass(frozen=True)
class Sample:
    chains_per_s: float
    backend_cpu_per_m: float  # backend CPU seconds per million chains
    backend_util: float  # backend CPU seconds per wall second
    driver_util: float
    kicks_per_m: float
    calls_per_m: float


@dataclass
class Backend:
    proc: subprocess.Popen[str]
    directory: tempfile.TemporaryDirectory[str]

    def socket(self, device: str) -> str:
        return os.path.join(self.directory.name, f"{device}.sock")

    def stop(self) -> str:
        """Stop the process (SIGTERM, it exits cleanly) and return what it printed after ready."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.directory.cleanup()
        return out


def start_backend(max_batch: int, cpu: int, *, stages: bool = False) -> Backend:
    directory = tempfile.TemporaryDirectory(prefix="bench-vring-")
    argv = [sys.executable, os.path.abspath(__file__), "--role", "backend"]
    argv += ["--socket-dir", directory.name, "--max-batch", str(max_batch), "--cpu", str(cpu)]
    if stages:
        argv.append("--stages")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"backend failed to start (exit {proc.wait()})")
    return Backend(proc, directory)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Counters:
    chains: int = 0
    kicks: int = 0
    calls: int = 0

    def snapshot(self, pid: int) -> tuple[float, int, int, int, float, float]:
        return (
            time.perf_counter(),
            self.chains,
            self.kicks,
            self.calls,
            proc_cpu_seconds(pid),
            time.process_time(),
        )


async def pump(vring: DriverVring, write: bool, pid: int, warmup: float, duration: float) -> Sample:
    """Keep the ring full for ``warmup + duration`` seconds; measure the last ``duration``."""
    queue, kick, call = vring.queue, vring.kick, vring.call
    n = Counters()
    queue.add_batch(queue.size, BUFFER_LEN, write=write)
    queue.publish()
    if queue.kick_needed():
        kick.write(1)
        n.kicks += 1
    now = time.perf_counter()
    mark, end = now + warmup, now + warmup + duration
    start: tuple[float, int, int, int, float, float] | None = None
    while True:
        used = queue.consume_used()
        if used:
            n.chains += used
            queue.add_batch(used, BUFFER_LEN, write=write)
            queue.publish()
            if queue.kick_needed():
                kick.write(1)
                n.kicks += 1
            now = time.perf_counter()
            if start is None:
                if now >= mark:
                    start = n.snapshot(pid)
            elif now >= end:
                break
            continue
        if queue.enable_interrupts():
            continue
        with trio.fail_after(STALL_SECONDS):
            await call.wait()
        n.calls += 1
        queue.disable_interrupts()
    if vring.err.read_nowait():
        raise RuntimeError("the backend broke the ring")
    stop = n.snapshot(pid)
    assert start is not None
    wall = stop[0] - start[0]
    chains = stop[1] - start[1]
    per_m = 1e6 / chains
    return Sample(
        chains_per_s=chains / wall,
        backend_cpu_per_m=(stop[4] - start[4]) * per_m,
        backend_util=(stop[4] - start[4]) / wall,
        driver_util=(stop[5] - start[5]) / wall,
        kicks_per_m=(stop[2] - start[2]) * per_m,
        calls_per_m=(stop[3] - start[3]) * per_m,
    )


async def drive(path: str, cfg: Config, pid: int, warmup: float, duration: float) -> Sample:
    """Connect to the backend like QEMU, start vring 0 and pump it; a checkpoint."""
    with GuestRam.create(4 << 20) as ram:
        async with await Frontend.connect(path) as frontend:
            mask = -1 if cfg.event_idx else ~int(VirtioFeature.RING_EVENT_IDX)
            acked = await frontend.negotiate(features=mask)
            event_idx = bool(acked & VirtioFeature.RING_EVENT_IDX)
            assert event_idx == cfg.event_idx
            await frontend.set_mem_table([ram])
            queue = DriverQueue.create(ram, cfg.size, event_idx=event_idx, pool_size=4096)
            vring = await frontend.start_vring(0, queue)
            try:
                write = cfg.device != "null"
                return await pump(vring, write, pid, warmup, duration)
            finally:
                vring.close()


def run_one(backends: dict[str, Backend], cfg: Config, warmup: float, duration: float) -> Sample:
    backend = backends[cfg.path]
    socket = backend.socket(cfg.device)
    return trio.run(drive, socket, cfg, backend.proc.pid, warmup, duration)


# -- orchestration --------------------------------------------------------------------------


def machine_line(cpus: tuple[int, int] | None) -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    pin = f"backend CPU{cpus[0]}, driver CPU{cpus[1]}" if cpus else "not pinned"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {model}, {os.cpu_count()} CPUs ({pin}); load avg {load}; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"numpy {np.__version__}, trio {trio.__version__}, {platform.machine()}"
    )


def configurations(quick: bool) -> list[Config]:
    sizes = (256, 1024)
    configs: list[Config] = []
    for size in sizes:
        configs.extend(
            Config(device, size, path, event_idx)
            for device in ("null", "copy64")
            for path in ("batched", "naive")
            for event_idx in ((True,) if quick else (True, False))
        )
        configs.extend(
            Config(device, size, "batched", True) for device in ("null-arrays", "copy64-arrays")
        )
        if not quick:
            configs.append(Config("copy64-writer", size, "batched", True))
    return configs


def pick_cpus(pin: bool) -> tuple[int, int] | None:
    allowed = sorted(os.sched_getaffinity(0))
    if not pin or len(allowed) < 2:
        return None
    return allowed[0], allowed[1]


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.3f} M" if x >= 1e5 else f"{x / 1e3:.1f} k"


def print_table(configs: list[Config], results: dict[Config, list[Sample]]) -> None:
    head = (
        f"{'device':<14}{'N':>5} {'evidx':<6}{'path':<8}{'chains/s':>11} {'(min-max)':<17}"
        f"{'be CPU s/M':>10}{'be CPU%':>8}{'drv CPU%':>9}{'kicks/M':>9}{'calls/M':>9}"
    )
    print(head)
    print("-" * len(head))
    for cfg in configs:
        samples = results[cfg]

        def med(attr: str, samples: list[Sample] = samples) -> float:
            return float(statistics.median(getattr(s, attr) for s in samples))

        rates = [s.chains_per_s for s in samples]
        spread = f"({fmt_rate(min(rates))}-{fmt_rate(max(rates)).strip()})"
        print(
            f"{cfg.device:<14}{cfg.size:>5} {'on' if cfg.event_idx else 'off':<6}{cfg.path:<8}"
            f"{fmt_rate(med('chains_per_s')):>11} {spread:<17}"
            f"{med('backend_cpu_per_m'):>10.2f}{100 * med('backend_util'):>8.0f}"
            f"{100 * med('driver_util'):>9.0f}{med('kicks_per_m'):>9.0f}{med('calls_per_m'):>9.0f}"
        )


def summary_line(results: dict[Config, list[Sample]]) -> str:
    parts = []
    for device, label in (("null", "null"), ("copy64", "64B copy")):
        b = Config(device, 1024, "batched", True)
        nv = Config(device, 1024, "naive", True)
        if b not in results:
            continue
        rate = statistics.median(s.chains_per_s for s in results[b])
        text = f"{label} N=1024: {rate / 1e6:.2f} M chains/s batched"
        if nv in results:
            naive = statistics.median(s.chains_per_s for s in results[nv])
            text += f" ({rate / naive:.1f}x naive)"
        arrays = Config(f"{device}-arrays", 1024, "batched", True)
        if arrays in results:
            fast = statistics.median(s.chains_per_s for s in results[arrays])
            text += f", {fast / 1e6:.2f} M/s on the array path"
            rate = max(rate, fast)
        target = TARGETS[device]
        verdict = "met" if rate >= target else f"short, {100 * rate / target:.0f}%"
        parts.append(f"{text}, target {target / 1e6:.0f} M/s {verdict}")
    return "SUMMARY vring (EVENT_IDX, median) " + "; ".join(parts)


def bench(args: argparse.Namespace) -> None:
    cpus = pick_cpus(args.pin)
    print(machine_line(cpus))
    warmup, duration = (0.2, 0.5) if args.quick else (args.warmup, args.duration)
    rounds = 1 if args.quick else args.rounds
    configs = configurations(args.quick)
    print(
        f"{len(configs)} configurations x {rounds} rounds, {warmup} s warm-up + {duration} s"
        f" each, interleaved; 64-byte single-descriptor chains; medians over rounds"
    )
    backends: dict[str, Backend] = {}
    results: dict[Config, list[Sample]] = defaultdict(list)
    try:
        backends["batched"] = start_backend(0, cpus[0] if cpus else -1)
        backends["naive"] = start_backend(1, cpus[0] if cpus else -1)
        if cpus:
            os.sched_setaffinity(0, {cpus[1]})
        for r in range(rounds):
            for cfg in configs if r % 2 == 0 else reversed(configs):
                results[cfg].append(run_one(backends, cfg, warmup, duration))
    finally:
        for backend in backends.values():
            backend.stop()
    print_table(configs, results)
    print(
        "be CPU s/M: backend CPU seconds per million chains; kicks/M, calls/M: kicks sent and"
        " call wakeups of the driver per million chains"
    )
    print(summary_line(results))


# -- profile ----------------------------------------------------------------------------------


def profile(args: argparse.Namespace) -> None:
    cpus = pick_cpus(args.pin)
    print(machine_line(cpus))
    duration = 1.0 if args.quick else args.duration
    for device in ("null", "copy64"):
        cfg = Config(device, 1024, "batched", True)
        backend = start_backend(0, cpus[0] if cpus else -1, stages=True)
        try:
            if cpus:
                os.sched_setaffinity(0, {cpus[1]})
            sample = run_one({"batched": backend}, cfg, args.warmup, duration)
        finally:
            out = backend.stop()
        line = next(x for x in out.splitlines() if x.startswith("STAGES "))
        report: StageReport = json.loads(line[len("STAGES ") :])
        print_profile(cfg, sample, report)


def print_profile(cfg: Config, sample: Sample, report: StageReport) -> None:
    ns, calls, chains, wall = report["ns"], report["calls"], report["chains"], report["wall_ns"]
    batches = max(calls.get("batches", 0), 1)
    build = report["chain_build_ns"]
    inner = sum(ns.get(k, 0) for k in ("add_used_batch", "needs_notification", "eventfd write"))
    ns["_publish"] = ns.get("_publish", 0) - inner
    ns["enable_notifications"] = ns.get("enable_notifications", 0) + ns.pop(
        "disable_notifications", 0
    )
    ns["chain list"], calls["chain list"] = int(build * chains), batches
    labels = {
        "pop_batch": "pop_batch (all calls)",
        "chain list": "  of which DescriptorChain list (replayed)",
        "gc": "gc collections (inside the stages)",
        "process_batch": "process_batch (device)",
        "_publish": "_publish: completion check",
        "add_used_batch": "_publish: add_used_batch",
        "needs_notification": "_publish: needs_notification",
        "eventfd write": "_publish: call eventfd write",
        "checkpoint": "trio checkpoint",
        "enable_notifications": "enable+disable_notifications",
        "wait for kick": "wait for kick (incl. sleep)",
    }
    rows = [(label, ns.get(key, 0), calls.get(key, 0)) for key, label in labels.items()]
    named = sum(r[1] for r in rows if not r[0].startswith(("  ", "gc")))
    rows.append(("loop rest (wall - named)", wall - named, 0))
    print(
        f"\nPROFILE {cfg.device} N={cfg.size} batched EVENT_IDX: {chains} chains in"
        f" {batches} batches (mean {chains / batches:.0f}/batch), {fmt_rate(sample.chains_per_s)}"
        f" chains/s while profiled; backend wall {wall / chains:.0f} ns/chain,"
        f" CPU {1e9 * report['cpu_s'] / chains:.0f} ns/chain;"
        f" timer overhead ~{report['timer_ns']:.0f} ns per wrapped call"
    )
    print(f"{'stage':<44}{'ns/chain':>9}{'us/batch':>9}{'share':>7}{'calls/batch':>12}")
    for name, total, count in rows:
        print(
            f"{name:<44}{total / chains:>9.0f}{total / batches / 1e3:>9.2f}"
            f"{100 * total / wall:>6.0f}%{count / batches:>12.2f}"
        )


def main() -> None:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run")
    parser.add_argument("--profile", action="store_true", help="stage breakdown instead")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--role", choices=("driver", "backend"), default="driver")
    parser.add_argument("--socket-dir", help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "backend":
        backend_main(args)
    elif args.profile:
        profile(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
