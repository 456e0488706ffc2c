"""Interop harness: real QEMU guests and DPDK testpmd against vhost-user backends.

Everything a test in tests/interop needs, and nothing it should not: locating the tools and
the guest images that ``scripts/setup-interop.sh`` prepared, QEMU command lines, processes
with hard timeouts and guaranteed cleanup, the guest's serial-console markers, the blk image
layout both sides agree on, and testpmd in interactive mode (commands through stdin, output
polled from its log file).

Backends are plain functions returning an async context manager that yields once the backend
listens on its socket(s) and stops it on exit (see :class:`BlkBackendStart` and
:class:`NetBackendStart`). ``BLK_BACKENDS`` / ``NET_BACKENDS`` list them; the tests are
parametrised over those tables, so adding trio_vhost's own devices is one entry each.

Environment:
    CI=true                          missing tools/images FAIL the tests instead of skipping
    TRIO_VHOST_INTEROP_DIR           cache dir of setup-interop.sh (default <repo>/var/interop)
    TRIO_VHOST_INTEROP_ACCEL         tcg (default) | kvm
    TRIO_VHOST_INTEROP_TIMEOUT_SCALE multiply every timeout (slow machines), default 1
    TRIO_VHOST_INTEROP_KEEP=1        keep each test's work dir (logs, image) under /tmp
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import trio

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = Path(__file__).resolve().parent / "guest"
SETUP_SCRIPT = REPO / "scripts" / "setup-interop.sh"
SETUP_HINT = "run `bash scripts/setup-interop.sh` (as root) first"
MARKER_RE = re.compile(r"TVH-(BOOT|INFO|OK|SKIP|FAIL|END)\b ?(.*)")
FIELD_RE = re.compile(r"([A-Za-z_][\w-]*)=(\S*)")
TESTPMD_PROMPT = "testpmd> "
MIB = 1 << 20


# ---------------------------------------------------------------------------- environment


def in_ci() -> bool:
    """True when running under CI (env CI set to a true value)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def interop_dir() -> Path:
    env = os.environ.get("TRIO_VHOST_INTEROP_DIR")
    return Path(env).resolve() if env else REPO / "var" / "interop"


def timeout_scale() -> float:
    try:
        return max(0.1, float(os.environ.get("TRIO_VHOST_INTEROP_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


def scaled(seconds: float) -> float:
    return seconds * timeout_scale()


def accel() -> str:
    value = os.environ.get("TRIO_VHOST_INTEROP_ACCEL", "tcg").strip().lower() or "tcg"
    if value not in {"tcg", "kvm"}:
        raise ValueError(f"TRIO_VHOST_INTEROP_ACCEL must be tcg or kvm, not {value!r}")
    return value


class Unavailable(Exception):
    """A tool or artefact the test needs is missing; str(exc) says what and how to fix it."""


def _which(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise Unavailable(f"`{name}` not found on PATH; {SETUP_HINT}")
    return Path(found)


@dataclasses.dataclass(frozen=True)
class QemuTools:
    qemu_system: Path
    qemu_storage_daemon: Path


def find_qemu() -> QemuTools:
    return QemuTools(_which("qemu-system-x86_64"), _which("qemu-storage-daemon"))


@dataclasses.dataclass(frozen=True)
class DpdkTools:
    testpmd: Path
    stdbuf: Path  # testpmd's printf output is block-buffered on a pipe: run it with -oL


def find_dpdk() -> DpdkTools:
    testpmd = _which("dpdk-testpmd")
    pmds = ("librte_net_vhost.so", "librte_net_virtio.so", "librte_mempool_ring.so")
    lib_dirs = list(Path("/usr/lib").glob("*/dpdk/pmds-*")) + list(
        Path("/usr/lib").glob("dpdk/pmds-*")
    )
    for pmd in pmds:
        if not any(next(d.glob(pmd + "*"), None) for d in lib_dirs):
            raise Unavailable(f"DPDK plugin {pmd} not found under /usr/lib/*/dpdk; {SETUP_HINT}")
    return DpdkTools(testpmd, _which("stdbuf"))


@dataclasses.dataclass(frozen=True)
class GuestImages:
    kernel: Path
    kernel_package: str
    initramfs: Mapping[str, Path]  # role -> image

    def for_role(self, role: str) -> Path:
        try:
            return self.initramfs[role]
        except KeyError:
            raise Unavailable(f"no initramfs for guest role {role!r}; {SETUP_HINT}") from None


def guest_roles() -> list[str]:
    return sorted(p.stem for p in GUEST_SRC.glob("*.sh"))


def _initramfs_fingerprint(role: str, cache: Path) -> str:
    """Same text as setup-interop.sh writes to <role>.inputs."""

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    lines = [
        f"{sha(GUEST_SRC / 'init')}  init",
        f"{sha(GUEST_SRC / f'{role}.sh')}  {role}.sh",
        sha(Path("/bin/busybox")),
        (cache / "kernel" / "package").read_text().strip(),
        # the modules in the image, one line, space-separated (as setup-interop.sh writes)
        " ".join((cache / "kernel" / "modules.order").read_text().split()),
    ]
    return "\n".join(lines)


def _stale_roles(cache: Path) -> list[str]:
    stale = []
    for role in guest_roles():
        image = cache / "initramfs" / f"{role}.cpio.gz"
        stamp = cache / "initramfs" / f"{role}.inputs"
        if (
            not image.is_file()
            or not stamp.is_file()
            or stamp.read_text().strip() != _initramfs_fingerprint(role, cache)
        ):
            stale.append(role)
    return stale


def find_guest_images(*, rebuild_stale: bool = True) -> GuestImages:
    """Kernel + per-role initramfs from the cache; rebuilds images whose guest script changed.

    The rebuild runs ``setup-interop.sh --initramfs-only`` (no root, no network, ~1 s).
    """
    cache = interop_dir()
    kernel = cache / "kernel" / "vmlinuz"
    package = cache / "kernel" / "package"
    if not kernel.is_file() or not package.is_file():
        raise Unavailable(f"no guest kernel in {cache / 'kernel'}; {SETUP_HINT}")
    if not Path("/bin/busybox").is_file():
        raise Unavailable(f"/bin/busybox (busybox-static) missing; {SETUP_HINT}")
    stale = _stale_roles(cache)
    if stale and rebuild_stale:
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT), "--initramfs-only"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise Unavailable(
                f"rebuilding the initramfs for {stale} failed:\n{proc.stdout}{proc.stderr}"
            )
        stale = _stale_roles(cache)
    if stale:
        raise Unavailable(f"initramfs for guest roles {stale} missing or stale; {SETUP_HINT}")
    images = {role: cache / "initramfs" / f"{role}.cpio.gz" for role in guest_roles()}
    return GuestImages(kernel, package.read_text().strip(), images)


# ---------------------------------------------------------------------------- work dir


class Workdir:
    """A short per-test directory (unix socket paths must stay < 108 bytes) plus the list
    of logs to show when the test fails."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.logs: dict[str, Path] = {}

    @classmethod
    def create(cls) -> Workdir:
        return cls(Path(tempfile.mkdtemp(prefix="tvh-", dir="/tmp")))

    def file(self, name: str) -> Path:
        return self.path / name

    def sock(self, name: str) -> Path:
        return self.path / f"{name}.sock"

    def log(self, name: str) -> Path:
        """Path for a log file that will be attached to the test report on failure."""
        path = self.path / f"{name}.log"
        self.logs[name] = path
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def tail(path: Path, limit: int = 12000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<{exc}>"
    text = data[-limit:].decode("utf-8", "replace").replace("\r\n", "\n")
    cut = f"[... {len(data) - limit} bytes cut ...]\n" if len(data) > limit else ""
    return cut + text


# ---------------------------------------------------------------------------- processes


class ProcessFailed(AssertionError):
    pass


@dataclasses.dataclass
class Managed:
    """A child process whose stdout+stderr go to ``log``."""

    name: str
    process: trio.Process
    log: Path

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def alive(self) -> bool:
        return self.process.returncode is None

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise ProcessFailed(
                f"{self.name} exited with status {self.process.returncode}; "
                f"log {self.log}:\n{tail(self.log, 4000)}"
            )

    async def wait(self, timeout: float) -> int:
        """Wait for the exit; raises trio.TooSlowError after ``timeout`` seconds."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    def _signal_group(self, sig: int) -> None:
        # The child leads its own session/process group (start_new_session), which also
        # holds the command under the `timeout` wrapper: signal them all.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Signal the process group, wait ``grace`` seconds, then SIGKILL it. Safe to
        call twice; shielded from cancellation."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self._signal_group(sig)
                with trio.move_on_after(grace):
                    await self.process.wait()
            self._signal_group(signal.SIGKILL)  # stragglers, even if the leader is gone
            if self.process.returncode is None:
                await self.process.wait()
            if self.process.stdin is not None:
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await self.process.stdin.aclose()


@contextlib.asynccontextmanager
async def spawn(
    argv: Sequence[str | Path],
    *,
    name: str,
    log: Path,
    stdin_pipe: bool = False,
    stop_signal: int = signal.SIGTERM,
    grace: float = 5.0,
    lifetime: float = 600.0,
) -> AsyncIterator[Managed]:
    """Start ``argv`` (stdout+stderr appended to ``log``); stop it on exit, even when the
    block is cancelled or fails. ``timeout`` caps its life at ``lifetime`` (scaled) seconds
    so that nothing outlives a test run that was itself killed."""
    cap = ["timeout", "-k", "5", str(round(scaled(lifetime)))]
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(str(a) for a in argv)}\n".encode())
        out.flush()
        process = await trio.lowlevel.open_process(
            cap + [str(a) for a in argv],
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on the test run is ours to handle, not theirs
        )
    managed = Managed(name, process, log)
    try:
        yield managed
    finally:
        await managed.stop(stop_signal, grace)


async def wait_for_path(path: Path, *, timeout: float, procs: Iterable[Managed] = ()) -> None:
    """Poll until ``path`` exists (e.g. a backend's listening socket)."""
    watched = list(procs)
    with trio.fail_after(timeout):
        while not path.exists():
            for proc in watched:
                proc.check_alive()
            await trio.sleep(0.05)


async def wait_for_text(
    path: Path,
    pattern: str | re.Pattern[str],
    *,
    timeout: float,
    procs: Iterable[Managed] = (),
    start: int = 0,
) -> re.Match[str]:
    """Poll ``path`` (a log) until ``pattern`` matches its text after byte ``start``."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    watched = list(procs)
    with trio.fail_after(timeout):
        while True:
            with contextlib.suppress(FileNotFoundError):
                with open(path, "rb") as f:
                    f.seek(start)
                    text = f.read().decode("utf-8", "replace")
                match = regex.search(text)
                if match:
                    return match
            for proc in watched:
                proc.check_alive()
            await trio.sleep(0.1)


# ---------------------------------------------------------------------------- serial log


@dataclasses.dataclass(frozen=True)
class Marker:
    kind: str  # BOOT INFO OK SKIP FAIL END
    name: str  # first word (check name), "" for BOOT/END
    fields: Mapping[str, str]
    text: str


@dataclasses.dataclass(frozen=True)
class GuestReport:
    name: str
    serial: str
    markers: tuple[Marker, ...]
    exit_status: int | None
    wall_s: float
    firmware: str = ""  # SeaBIOS debug console, when GuestSpec.firmware_log

    @classmethod
    def parse(
        cls, name: str, serial: str, exit_status: int | None, wall_s: float, firmware: str = ""
    ) -> GuestReport:
        markers = []
        for raw in serial.replace("\r", "").splitlines():
            m = MARKER_RE.search(raw)
            if not m:
                continue
            kind, rest = m.group(1), m.group(2).strip()
            first = "" if kind in {"BOOT", "END"} else rest.split(" ", 1)[0]
            markers.append(Marker(kind, first, dict(FIELD_RE.findall(rest)), rest))
        return cls(name, serial, tuple(markers), exit_status, wall_s, firmware)

    def _of(self, kind: str) -> list[Marker]:
        return [m for m in self.markers if m.kind == kind]

    @property
    def booted(self) -> bool:
        return bool(self._of("BOOT"))

    @property
    def end_rc(self) -> int | None:
        ends = self._of("END")
        return int(ends[-1].fields.get("rc", "-1")) if ends else None

    @property
    def failures(self) -> list[Marker]:
        return self._of("FAIL")

    def ok(self, name: str) -> Marker | None:
        return next((m for m in self._of("OK") if m.name == name), None)

    def skipped(self, name: str) -> Marker | None:
        return next((m for m in self._of("SKIP") if m.name == name), None)

    def info(self, name: str) -> Marker | None:
        return next((m for m in self._of("INFO") if m.name == name), None)

    def field(self, name: str, key: str) -> str:
        marker = self.ok(name)
        if marker is None or key not in marker.fields:
            raise AssertionError(f"{self.name}: no TVH-OK {name} with {key}=\n{self.describe()}")
        return marker.fields[key]

    def describe(self, serial_chars: int = 6000) -> str:
        head = (
            f"guest {self.name}: qemu exit={self.exit_status} wall={self.wall_s:.1f}s "
            f"booted={self.booted} end_rc={self.end_rc}"
        )
        return f"{head}\n--- serial (tail) ---\n{self.serial[-serial_chars:]}"

    def check(self, required: Iterable[str] = (), optional: Iterable[str] = ()) -> None:
        """Assert the role finished cleanly: TVH-END rc=0, no TVH-FAIL, every ``required``
        check OK, every ``optional`` check OK or SKIP."""
        problems = [f"FAIL {m.text}" for m in self.failures]
        if not self.booted:
            problems.append("the guest never reached /init (no TVH-BOOT)")
        elif self.end_rc != 0:
            problems.append(f"TVH-END rc={self.end_rc}")
        problems += [f"missing TVH-OK {n}" for n in required if self.ok(n) is None]
        problems += [
            f"missing TVH-OK/SKIP {n}"
            for n in optional
            if self.ok(n) is None and self.skipped(n) is None
        ]
        if self.exit_status not in (0, None):
            problems.append(f"QEMU exit status {self.exit_status}")
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.describe())


# ---------------------------------------------------------------------------- QEMU


@dataclasses.dataclass(frozen=True)
class BlkDisk:
    """A ``vhost-user-blk-pci`` device on a backend socket."""

    socket: Path
    num_queues: int = 1
    reconnect: int | None = None  # chardev reconnect=N seconds
    extra: str = ""  # more -device properties, e.g. "config-wce=off"


@dataclasses.dataclass(frozen=True)
class Nic:
    """A ``virtio-net-pci`` device backed by ``-netdev vhost-user``."""

    socket: Path
    mac: str
    queues: int = 1
    reconnect: int | None = None
    # QEMU 7.2 under TCG segfaults when virtio-net-pci with vhost-user uses MSI-X (the guest
    # driver's DRIVER_OK unmasks a vector): vectors=0 (legacy INTx) avoids it.
    msix: bool = False
    extra: str = ""


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    name: str
    role: str
    params: Mapping[str, str | int] = dataclasses.field(default_factory=dict)  # tvh.K=V
    blk: Sequence[BlkDisk] = ()
    nics: Sequence[Nic] = ()
    mem_mib: int = 512
    smp: int = 1
    extra_args: Sequence[str] = ()
    # capture SeaBIOS's debug output (QEMU's isa-debugcon on port 0x402) in GuestReport.firmware
    firmware_log: bool = False


def _chardev(ident: str, socket: Path, reconnect: int | None) -> str:
    value = f"socket,id={ident},path={socket}"
    return value + (f",reconnect={reconnect}" if reconnect is not None else "")


def qemu_command(
    tools: QemuTools,
    images: GuestImages,
    spec: GuestSpec,
    serial_log: Path,
    firmware_log: Path | None = None,
) -> list[str]:
    """The full command line (-nodefaults: no stray e1000/user networking)."""
    if accel() == "kvm":
        cpu = ["-accel", "kvm", "-cpu", "host"]
    else:
        cpu = ["-accel", f"tcg,thread={'multi' if spec.smp > 1 else 'single'}", "-cpu", "max"]
    params = " ".join(f"tvh.{k}={v}" for k, v in spec.params.items())
    for k, v in spec.params.items():
        if re.search(r"\s", f"{k}{v}"):
            raise ValueError(f"guest parameter {k}={v!r} must not contain whitespace")
    append = f"console=ttyS0 panic=-1 loglevel=4 mitigations=off {params}".strip()
    mem = f"{spec.mem_mib}M"
    argv = [
        str(tools.qemu_system),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-name", spec.name,
        "-machine", "q35,memory-backend=mem", *cpu,
        "-smp", str(spec.smp), "-m", mem,
        # vhost-user backends mmap guest RAM: it must be a shared, fd-backed region
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-kernel", str(images.kernel), "-initrd", str(images.for_role(spec.role)),
        "-append", append,
        "-serial", f"file:{serial_log}",
    ]  # fmt: skip
    for i, disk in enumerate(spec.blk):
        dev = f"vhost-user-blk-pci,chardev=blk{i},num-queues={disk.num_queues}"
        argv += ["-chardev", _chardev(f"blk{i}", disk.socket, disk.reconnect)]
        argv += ["-device", dev + (f",{disk.extra}" if disk.extra else "")]
    for i, nic in enumerate(spec.nics):
        dev = f"virtio-net-pci,netdev=net{i},mac={nic.mac}"
        dev += "" if nic.msix else ",vectors=0"
        argv += ["-chardev", _chardev(f"net{i}", nic.socket, nic.reconnect)]
        argv += ["-netdev", f"vhost-user,id=net{i},chardev=net{i},queues={nic.queues}"]
        argv += ["-device", dev + (f",{nic.extra}" if nic.extra else "")]
    if firmware_log is not None:
        argv += ["-chardev", f"file,id=fwlog,path={firmware_log}"]
        argv += ["-device", "isa-debugcon,iobase=0x402,chardev=fwlog"]
    return argv + list(spec.extra_args)


async def run_guest(
    tools: QemuTools,
    images: GuestImages,
    spec: GuestSpec,
    workdir: Workdir,
    *,
    timeout: float = 120.0,
    watch: Iterable[Managed] = (),
) -> GuestReport:
    """Boot the guest, wait (at most ``timeout`` scaled s) until it powers off, return the
    parsed serial log. The backends must already listen (QEMU is the socket client).
    Guest-side failures are not raised: assert on the report (``report.check(...)``).
    Raises AssertionError, with the serial log, if the guest does not power off in time or
    one of the ``watch`` processes (the backends) dies first; QEMU is stopped either way."""
    serial = workdir.log(f"serial-{spec.name}")
    serial.touch()
    firmware = workdir.log(f"firmware-{spec.name}") if spec.firmware_log else None
    if firmware is not None:
        firmware.touch()
    argv = qemu_command(tools, images, spec, serial, firmware)
    watched = list(watch)
    t0 = trio.current_time()
    status: int | None = None
    qemu_log = workdir.log(f"qemu-{spec.name}")
    async with spawn(argv, name=f"qemu {spec.name}", log=qemu_log, lifetime=timeout + 30) as q:
        with trio.move_on_after(scaled(timeout)):
            while q.alive() and all(b.alive() for b in watched):
                await trio.sleep(0.1)
            status = q.returncode
        wall = trio.current_time() - t0
    text = serial.read_bytes().decode("utf-8", "replace")
    fw_text = firmware.read_bytes().decode("utf-8", "replace") if firmware else ""
    report = GuestReport.parse(spec.name, text, status, wall, fw_text)
    if status is None:
        dead = [b.name for b in watched if not b.alive()]
        why = f"backend(s) {dead} exited" if dead else f"no poweroff within {scaled(timeout):.0f} s"
        raise AssertionError(f"guest {spec.name} did not power off: {why}\n{report.describe()}")
    return report


# ---------------------------------------------------------------------------- blk image


@dataclasses.dataclass(frozen=True)
class BlkLayout:
    """Where each side reads and writes; matches tests/interop/guest/blk.sh (tvh.* names)."""

    size: int = 64 * MIB
    hoff: int = 0  # host-written random bytes, checked by the guest
    hlen: int = MIB
    goff: int = 2 * MIB  # guest-written random bytes, checked by the host
    glen: int = MIB
    boff: int = 4 * MIB  # bulk: host fills with 0xA5, guest overwrites with zeros
    bmib: int = 16
    doff: int = 4 * MIB  # discarded by the guest (inside the bulk region)
    dlen: int = MIB

    def guest_params(self, host_md5: str) -> dict[str, str | int]:
        names = ("size", "hoff", "hlen", "goff", "glen", "boff", "bmib", "doff", "dlen")
        return {**{n: getattr(self, n) for n in names}, "hmd5": host_md5}


def seed_image(path: Path, layout: BlkLayout, seed: int = 1) -> str:
    """Create the raw image (sparse) with the host region and the bulk filler; returns the
    md5 of the host region."""
    host = random.Random(seed).randbytes(layout.hlen)
    with open(path, "wb") as f:
        f.truncate(layout.size)
        f.seek(layout.hoff)
        f.write(host)
        f.seek(layout.boff)
        f.write(b"\xa5" * (layout.bmib * MIB))
    return hashlib.md5(host).hexdigest()


SWAP_PAGE = 4096  # x86-64 guests


def write_swap_area(path: Path, pages: int, filler: int = 0x5A) -> None:
    """Make the first ``pages`` pages of the image a Linux swap area, as mkswap would (v1
    header in page 0, signature at the end of the page), with ``filler`` bytes in the data
    pages: a discard or write that the device wrongly carried out shows up as changed
    bytes."""
    header = bytearray(SWAP_PAGE)
    # struct swap_header.info at byte 1024: version, last_page, nr_badpages, uuid, label
    header[1024:1036] = (1).to_bytes(4, "little") + (pages - 1).to_bytes(4, "little") + bytes(4)
    header[1036:1052] = hashlib.md5(str(path).encode()).digest()
    header[1052:1068] = b"tvh-ro".ljust(16, b"\0")
    header[SWAP_PAGE - 10 :] = b"SWAPSPACE2"
    with open(path, "r+b") as f:
        f.write(header)
        f.write(bytes([filler]) * (SWAP_PAGE * (pages - 1)))


def file_digest(path: Path) -> str:
    """sha256 of a whole file (to prove a read-only image came back unchanged)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def verify_image(path: Path, layout: BlkLayout, host_md5: str, guest_md5: str) -> None:
    """After the guest ran: host region intact, guest region = what the guest reported,
    bulk region all zeros, size unchanged."""
    problems = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != layout.size:
            problems.append(f"size {size} != {layout.size}")
        f.seek(layout.hoff)
        if (got := hashlib.md5(f.read(layout.hlen)).hexdigest()) != host_md5:
            problems.append(f"host region md5 {got} != {host_md5}")
        f.seek(layout.goff)
        if (got := hashlib.md5(f.read(layout.glen)).hexdigest()) != guest_md5:
            problems.append(f"guest region md5 {got} != {guest_md5} (reported by the guest)")
        f.seek(layout.boff)
        bulk = f.read(layout.bmib * MIB)
        if bulk.count(0) != len(bulk):
            first = next(i for i, b in enumerate(bulk) if b != 0)
            problems.append(f"bulk region not zero at offset {layout.boff + first}")
    if problems:
        raise AssertionError(f"image {path}: " + "; ".join(problems))


# ---------------------------------------------------------------------------- backends


@dataclasses.dataclass
class RunningBackend:
    """What a started backend hands back to the test."""

    name: str
    procs: list[Managed] = dataclasses.field(default_factory=list)  # watched while guests run
    # net only: per-port packet counters of the backend, when it can tell (testpmd can)
    port_stats: Callable[[], Awaitable[dict[int, PortStats]]] | None = None


class BlkBackendStart(Protocol):
    """Start a vhost-user-blk backend listening on ``socket`` serving the raw ``image``
    with ``num_queues`` queues, read-write, or read-only when ``read_only`` (the device
    offers VIRTIO_BLK_F_RO and fails every write); yield once it listens, stop it on exit."""

    def __call__(
        self,
        *,
        socket: Path,
        image: Path,
        num_queues: int,
        workdir: Workdir,
        read_only: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[RunningBackend]: ...


class NetBackendStart(Protocol):
    """Start a vhost-user-net backend listening on every path of ``sockets``; frames
    received on port i are forwarded to port i^1 (0<->1, 2<->3...), counted or not. Yield
    once all sockets listen; stop it on exit."""

    def __call__(
        self, *, sockets: Sequence[Path], workdir: Workdir
    ) -> contextlib.AbstractAsyncContextManager[RunningBackend]: ...


@dataclasses.dataclass(frozen=True)
class BlkBackend:
    name: str
    start: BlkBackendStart
    check: Callable[[], None]  # raises Unavailable when it cannot run here
    discard: bool = False  # offers VIRTIO_BLK_F_DISCARD: the guest's blkdiscard must work


@dataclasses.dataclass(frozen=True)
class NetBackend:
    name: str
    start: NetBackendStart
    check: Callable[[], None]


@contextlib.asynccontextmanager
async def qsd_blk_backend(
    *, socket: Path, image: Path, num_queues: int, workdir: Workdir, read_only: bool = False
) -> AsyncIterator[RunningBackend]:
    """qemu-storage-daemon's vhost-user-blk export (the reference backend)."""
    tools = find_qemu()
    ro = "on" if read_only else "off"
    argv: list[str | Path] = [
        tools.qemu_storage_daemon,
        "--blockdev", f"driver=file,node-name=disk0,filename={image},read-only={ro}",
        "--export",
        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
        f"addr.path={socket},writable={'off' if read_only else 'on'},num-queues={num_queues}",
    ]  # fmt: skip
    async with spawn(argv, name="qemu-storage-daemon", log=workdir.log("qsd")) as proc:
        await wait_for_path(socket, timeout=scaled(20), procs=[proc])
        yield RunningBackend("qemu-storage-daemon", [proc])


@contextlib.asynccontextmanager
async def testpmd_net_backend(
    *, sockets: Sequence[Path], workdir: Workdir
) -> AsyncIterator[RunningBackend]:
    """DPDK testpmd with one vhost PMD port per socket, io forwarding (paired ports)."""
    tools = find_dpdk()
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(sockets)]
    async with start_testpmd(
        tools, workdir, name="testpmd-backend", vdevs=vdevs, forward_mode="io", cpu=backend_cpu()
    ) as pmd:
        for s in sockets:
            await wait_for_path(s, timeout=scaled(20), procs=[pmd.proc])
        await pmd.command("start")
        yield RunningBackend("testpmd vhost PMD", [pmd.proc], port_stats=pmd.port_stats)


@contextlib.asynccontextmanager
async def trio_vhost_blk_backend(
    *,
    socket: Path,
    image: Path,
    num_queues: int,
    workdir: Workdir,
    read_only: bool = False,
    debug: bool = False,
) -> AsyncIterator[RunningBackend]:
    """Our own ``trio-vhost blk``, run exactly as a user runs it (a separate process).
    ``debug`` runs it with ``-v -v``: one log line per vhost-user request (its log is
    ``workdir.logs["trio-vhost-blk"]``)."""
    argv: list[str | Path] = [
        sys.executable, "-m", "trio_vhost.cli", "-v", *(["-v"] if debug else []), "blk",
        "--socket", socket, "--image", image, "--queues", str(max(num_queues, 2)),
        *(["--read-only"] if read_only else []),
    ]  # fmt: skip
    async with spawn(argv, name="trio-vhost-blk", log=workdir.log("trio-vhost-blk")) as proc:
        await wait_for_path(socket, timeout=scaled(20), procs=[proc])
        yield RunningBackend("trio-vhost blk", [proc])


@contextlib.asynccontextmanager
async def trio_vhost_net_backend(
    *, sockets: Sequence[Path], workdir: Workdir
) -> AsyncIterator[RunningBackend]:
    """Our own ``trio-vhost net``: one switch port per socket (with two ports a learning
    switch forwards i -> i^1, as the tests expect)."""
    argv: list[str | Path] = [sys.executable, "-m", "trio_vhost.cli", "-v", "net"]
    for path in sockets:
        argv += ["--socket", path]
    async with spawn(argv, name="trio-vhost-net", log=workdir.log("trio-vhost-net")) as proc:
        for path in sockets:
            await wait_for_path(path, timeout=scaled(20), procs=[proc])
        yield RunningBackend("trio-vhost net", [proc])


def _need_qemu() -> None:
    find_qemu()


def _need_dpdk() -> None:
    find_dpdk()


# The backends the interop tests run against; trio_vhost's own devices get an entry here.
BLK_BACKENDS: dict[str, BlkBackend] = {
    "qsd": BlkBackend("qsd", qsd_blk_backend, check=_need_qemu, discard=True),
    "trio-vhost": BlkBackend("trio-vhost", trio_vhost_blk_backend, check=_need_qemu, discard=True),
}
NET_BACKENDS: dict[str, NetBackend] = {
    "testpmd": NetBackend("testpmd", testpmd_net_backend, check=_need_dpdk),
    "trio-vhost": NetBackend("trio-vhost", trio_vhost_net_backend, check=_need_dpdk),
}


# ---------------------------------------------------------------------------- trio-vhost log

CONNECTION_END = "<connection end>"
_SESSION_LINE_RE = re.compile(
    r"^[A-Z]+ trio_vhost\.(?:session|server): (?:request (?P<request>[A-Z_0-9]+)\b"
    r"|(?P<end>frontend closed the connection|frontend disconnected|frontend protocol error"
    r"|session failed|session crashed))",
    re.M,
)


def vhost_user_requests(log_text: str, keep: Iterable[str]) -> list[str]:
    """From a ``trio-vhost -v -v`` log (``debug=True``): the vhost-user requests named in
    ``keep``, in arrival order, with :data:`CONNECTION_END` wherever a session ended (the
    frontend closed the connection, went away, or was dropped)."""
    wanted = set(keep)
    out = []
    for m in _SESSION_LINE_RE.finditer(log_text):
        if m["end"]:
            out.append(CONNECTION_END)
        elif m["request"] in wanted:
            out.append(m["request"])
    return out


# ---------------------------------------------------------------------------- DPDK testpmd


@dataclasses.dataclass(frozen=True)
class PortStats:
    """One port of testpmd's ``show port stats`` (ethdev counters since start)."""

    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0


_PORT_BLOCK_RE = re.compile(r"NIC statistics for port (\d+)\s*#+\n(.*?)\n\s*#{20,}", re.S)
_COUNTER_RE = re.compile(r"([RT]X-[a-z]+):\s+(\d+)")


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse every ``NIC statistics for port N`` block; a later block wins."""
    names = {f.name for f in dataclasses.fields(PortStats)}
    out: dict[int, PortStats] = {}
    for block in _PORT_BLOCK_RE.finditer(text):
        values = {
            key.lower().replace("-", "_"): int(val) for key, val in _COUNTER_RE.findall(block[2])
        }
        port = int(block[1])
        out[port] = PortStats(port, **{k: v for k, v in values.items() if k in names})
    return out


_prefix_counter = itertools.count()


def backend_cpu() -> int:
    """CPU for the backend's busy-polling lcore (the first allowed one)."""
    return min(os.sched_getaffinity(0))


def frontend_cpu() -> int:
    """CPU for frontends (the last allowed one; equal to backend_cpu() on 1 CPU)."""
    return max(os.sched_getaffinity(0))


def dpdk_runtime_dir(prefix: str) -> Path:
    base = "/var/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / prefix


def sweep_dpdk_runtime_dirs() -> None:
    """Remove EAL runtime dirs of earlier runs whose pytest process is gone (a SIGKILLed run
    cannot clean up after itself). Only our own ``tvh<pid>x<n>`` prefixes are touched."""
    base = dpdk_runtime_dir("x").parent
    for entry in base.glob("tvh*x*"):
        m = re.fullmatch(r"tvh(\d+)x\d+", entry.name)
        if m and int(m[1]) != os.getpid() and not Path(f"/proc/{m[1]}").exists():
            shutil.rmtree(entry, ignore_errors=True)


class Testpmd:
    """An interactive ``dpdk-testpmd -i``: commands go to stdin, answers are read back from
    its log file up to the next prompt."""

    __test__ = False  # not a pytest class

    def __init__(self, proc: Managed) -> None:
        self.proc = proc
        self._lock = trio.Lock()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await wait_for_text(
            self.proc.log, re.escape(TESTPMD_PROMPT), timeout=scaled(timeout), procs=[self.proc]
        )

    async def command(self, cmd: str, timeout: float = 20.0) -> str:
        """Run one command; returns its output (without the echo and the next prompt)."""
        async with self._lock:
            self.proc.check_alive()
            start = self.proc.log.stat().st_size
            stdin = self.proc.process.stdin
            assert stdin is not None
            await stdin.send_all(cmd.encode() + b"\n")
            match = await wait_for_text(
                self.proc.log,
                re.compile(r"(.*?)" + re.escape(TESTPMD_PROMPT), re.S),
                timeout=scaled(timeout),
                procs=[self.proc],
                start=start,
            )
            out = match.group(1)
            first, _, rest = out.partition("\n")
            return rest if first.strip() == cmd.strip() else out

    async def port_stats(self) -> dict[int, PortStats]:
        return parse_port_stats(await self.command("show port stats all"))

    async def send_bursts(self, bursts: int) -> None:
        """Send ``bursts`` bursts (of --burst packets) with the txonly engine, then keep
        forwarding in the configured mode (``start tx_first N``)."""
        await self.command("stop")
        await self.command(f"start tx_first {bursts}")

    async def quit(self, timeout: float = 15.0) -> None:
        if not self.proc.alive():
            return
        stdin = self.proc.process.stdin
        assert stdin is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stdin.send_all(b"quit\n")
        with trio.move_on_after(scaled(timeout)):
            await self.proc.process.wait()


@contextlib.asynccontextmanager
async def start_testpmd(
    tools: DpdkTools,
    workdir: Workdir,
    *,
    name: str,
    vdevs: Sequence[str],
    forward_mode: str,
    cpu: int,
    extra: Sequence[str] = (),
    mem_mib: int = 256,
) -> AsyncIterator[Testpmd]:
    """Interactive testpmd without hugepages or PCI; main and forwarding lcore share ``cpu``
    (the forwarding lcore busy-polls it). Quits (then SIGTERM/SIGKILL) on exit and removes
    its EAL runtime dir."""
    sweep_dpdk_runtime_dirs()
    prefix = f"tvh{os.getpid()}x{next(_prefix_counter)}"
    argv: list[str | Path] = [
        tools.stdbuf, "-oL", "-eL", tools.testpmd,
        "--lcores", f"0@{cpu},1@{cpu}", "--no-huge", "-m", str(mem_mib), "--no-pci",
        "--no-shconf", "--file-prefix", prefix, "--log-level", "lib.eal:warning",
    ]  # fmt: skip
    for vdev in vdevs:
        argv += ["--vdev", vdev]
    argv += ["--", "-i", f"--forward-mode={forward_mode}", "--nb-cores=1"]
    argv += ["--total-num-mbufs=8192", *extra]
    try:
        async with spawn(argv, name=name, log=workdir.log(name), stdin_pipe=True) as proc:
            pmd = Testpmd(proc)
            try:
                await pmd.wait_ready()
                yield pmd
            finally:
                with trio.CancelScope(shield=True):
                    await pmd.quit()
    finally:
        shutil.rmtree(dpdk_runtime_dir(prefix), ignore_errors=True)


def virtio_user_vdev(socket: Path, *, mac: str, queue_size: int = 256, extra: str = "") -> str:
    """A DPDK virtio_user frontend port (client of ``socket``)."""
    return f"virtio_user0,path={socket},queues=1,queue_size={queue_size},mac={mac}{extra}"


@contextlib.asynccontextmanager
async def virtio_user_frontend(
    tools: DpdkTools,
    workdir: Workdir,
    *,
    name: str,
    socket: Path,
    mac: str,
    peer_mac: str,
    burst: int = 32,
    pktlen: int = 64,
    server: bool = False,
) -> AsyncIterator[Testpmd]:
    """testpmd as a virtio_user frontend in rxonly mode, already forwarding (counting what
    it receives); ``send_bursts(n)`` transmits n * ``burst`` frames from ``mac`` to
    ``peer_mac``. With ``server`` the frontend listens on ``socket`` (``server=1``) and the
    backend must connect to it: testpmd's start-up waits for that connection."""
    extra = [
        "--port-topology=loop", f"--eth-peer=0,{peer_mac}", f"--burst={burst}",
        f"--txpkts={pktlen}", "--rxd=256", "--txd=256",
    ]  # fmt: skip
    async with start_testpmd(
        tools,
        workdir,
        name=name,
        vdevs=[virtio_user_vdev(socket, mac=mac, extra=",server=1" if server else "")],
        forward_mode="rxonly",
        cpu=frontend_cpu(),
        extra=extra,
    ) as pmd:
        await pmd.command("start")
        yield pmd
