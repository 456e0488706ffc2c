"""Fixtures for the interop tests (real QEMU guests, DPDK testpmd).

Missing tools or guest images: the test is skipped with the reason and the fix, except
under CI=true, where it fails (CI installs everything with scripts/setup-interop.sh, so a
skip there would hide a broken setup). On failure, every log a test registered in its
Workdir (guest serial consoles, QEMU, backends, testpmd) is attached to the report. The
terminal summary lists each interop test's wall time (setup + call + teardown).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import pytest

from . import harness

T = TypeVar("T")
WORKDIR_KEY = pytest.StashKey[harness.Workdir]()
# nodeid -> (wall seconds, outcome), summed over setup/call/teardown; shown at the end
_WALL: dict[str, tuple[float, str]] = {}


def unavailable(reason: str) -> NoReturn:
    if harness.in_ci():
        pytest.fail(f"CI=true and the interop environment is incomplete: {reason}", pytrace=False)
    pytest.skip(reason)


def need(what: Callable[[], T]) -> T:
    try:
        return what()
    except harness.Unavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def qemu_tools() -> harness.QemuTools:
    return need(harness.find_qemu)


@pytest.fixture(scope="session")
def guest_images() -> harness.GuestImages:
    return need(harness.find_guest_images)


@pytest.fixture(scope="session")
def dpdk_tools() -> harness.DpdkTools:
    return need(harness.find_dpdk)


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[harness.Workdir]:
    """Short per-test dir for sockets, images and logs; removed afterwards (keep it with
    TRIO_VHOST_INTEROP_KEEP=1)."""
    wd = harness.Workdir.create()
    request.node.stash[WORKDIR_KEY] = wd
    yield wd
    if os.environ.get("TRIO_VHOST_INTEROP_KEEP") == "1":
        print(f"interop work dir kept: {wd.path}")
    else:
        wd.remove()


@pytest.fixture(params=sorted(harness.BLK_BACKENDS))
def blk_backend(request: pytest.FixtureRequest) -> harness.BlkBackend:
    backend = harness.BLK_BACKENDS[request.param]
    need(backend.check)
    return backend


@pytest.fixture(params=sorted(harness.NET_BACKENDS))
def net_backend(request: pytest.FixtureRequest) -> harness.NetBackend:
    backend = harness.NET_BACKENDS[request.param]
    need(backend.check)
    return backend


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "teardown" or not report.failed:
        return
    wd = item.stash.get(WORKDIR_KEY, None)
    if wd is None:
        return
    for name, path in wd.logs.items():
        report.sections.append((f"interop log {name} ({path.name})", harness.tail(path)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    wall, outcome = _WALL.get(report.nodeid, (0.0, "passed"))
    if outcome == "passed" and report.outcome != "passed":
        outcome = f"{report.outcome}" + ("" if report.when == "call" else f" ({report.when})")
    _WALL[report.nodeid] = (wall + report.duration, outcome)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _WALL:
        return
    terminalreporter.section("interop wall time per test")
    total = 0.0
    for nodeid, (wall, outcome) in _WALL.items():
        total += wall
        terminalreporter.write_line(f"{wall:7.1f}s  {outcome:8}  {nodeid}")
    terminalreporter.write_line(f"{total:7.1f}s  total ({len(_WALL)} tests)")
