"""No lost notifications on a packed ring: a driver and a device race on one ring.

The split ring's race test (test_vring_race.py), for packed rings: both sides sleep only
when the other must wake them (kick / call) and follow the suppression protocol: disable,
drain, re-enable, fence, re-check. A lost notification makes a bounded wait time out. The
driver posts lists of one to three descriptors, so used descriptors skip slots. In the
forked variant the two sides run truly in parallel on shared pages, which also exercises
the read order (flags, then the descriptor) and the first-flags-last publication: a torn
read would show up as a chain that does not match what the driver posted.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import warnings

import pytest

from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring.packed import PackedQueue
from trio_vhost.vring.packed_driver import PackedDriverQueue

TOTAL = 6_000
WAIT = 10.0  # seconds: only reached if a notification is lost


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def make_pair():
    made = []

    def make(size, *, event_idx):
        ram = GuestRam.create(1 << 21, gpa=0x4000_0000)
        table = MemoryTable.from_regions([ram.backend_region()])
        driver = PackedDriverQueue.create(ram, size, event_idx=event_idx, pool_size=256 * size)
        queue = PackedQueue(table, driver.queue_state())
        made.append((ram, table))
        return driver, queue

    yield make
    for ram, table in made:
        table.close()
        ram.close()


def shape(n):
    """The lists the driver posts, in a fixed cycle: readable payload = n's 4 bytes."""
    payload = n.to_bytes(4, "little")
    return [[payload], [payload[:2], payload[2:]], [payload, b""]][n % 3]


def run_device(queue, kick, call, errors):
    served = 0
    try:
        pending = queue.enable_notifications()
        while served < TOTAL:
            if not pending and not kick.acquire(timeout=WAIT):
                errors.append(f"device: lost kick after {served} chains")
                return
            while True:
                queue.disable_notifications()
                while chains := queue.pop_batch(8):
                    completions = []
                    for chain in chains:
                        data = b"".join(
                            bytes(queue.table.read(gpa, length)) for gpa, length in chain.readable
                        )
                        if int.from_bytes(data, "little") != served:
                            errors.append(f"device: chain {served} carried {data!r}")
                            return
                        served += 1
                        completions.append((chain.head, 0))
                    queue.add_used_batch(completions[::-1])  # out of order
                    if queue.needs_notification():
                        call.release()
                if not queue.enable_notifications():
                    break
            pending = False
    except Exception as exc:  # pragma: no cover - reported by the test
        errors.append(f"device: {exc!r}")


def run_driver(driver, kick, call, errors, counts):
    sent = done = 0
    try:
        driver.disable_interrupts()
        for _ in range(20 * TOTAL):  # bounded
            if done == TOTAL:
                return
            added = 0
            while sent < TOTAL and added < 1 + sent % 4:
                lst = shape(sent)
                if len(lst) > driver.num_free or driver.in_flight == driver.size:
                    break
                driver.add(lst)
                sent += 1
                added += 1
            if added:
                driver.publish()
                if driver.kick_needed():
                    counts["kicks"] += 1
                    kick.release()
            used = driver.get_used()
            done += len(used)
            if used or (added and sent < TOTAL):
                continue
            if driver.enable_interrupts():  # a completion arrived while enabling
                driver.disable_interrupts()
                continue
            if not call.acquire(timeout=WAIT):
                errors.append(f"driver: lost call with {sent - done} chains in flight")
                return
            counts["calls"] += 1
            driver.disable_interrupts()
        errors.append("driver: did not finish")
    except Exception as exc:  # pragma: no cover - reported by the test
        errors.append(f"driver: {exc!r}")


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("size", [3, 64])
def test_no_lost_notification(make_pair, fast_switching, event_idx, size):
    driver, queue = make_pair(size, event_idx=event_idx)
    kick, call = threading.Semaphore(0), threading.Semaphore(0)
    errors: list[str] = []
    counts = {"kicks": 0, "calls": 0}
    threads = [
        threading.Thread(target=run_device, args=(queue, kick, call, errors)),
        threading.Thread(target=run_driver, args=(driver, kick, call, errors, counts)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * WAIT)
    if any(t.is_alive() for t in threads):
        kick.release(TOTAL)  # unblock, then fail
        call.release(TOTAL)
        for t in threads:
            t.join(timeout=WAIT)
        pytest.fail(f"a side hung: {errors}")
    assert errors == []
    assert queue.in_flight == 0
    assert (queue.next_used, queue.used_wrap) == (driver.next_used, driver.used_wrap)
    assert counts["kicks"] > 0


class EventFd:
    """A counting notifier between processes, with bounded waits (an eventfd)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)

    def release(self) -> None:
        os.eventfd_write(self.fd, 1)

    def acquire(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        os.eventfd_read(self.fd)
        return True

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_notification_across_processes(make_pair, event_idx):
    """The same race with the driver in a forked process: real parallelism, real fences."""
    driver, queue = make_pair(8, event_idx=event_idx)
    kick, call = EventFd(), EventFd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the driver (guest) side
        status = 1
        try:
            errors: list[str] = []
            run_driver(driver, kick, call, errors, {"kicks": 0, "calls": 0})
            status = 0 if not errors else 2
            if errors:
                os.write(2, f"{errors}\n".encode())
        finally:
            os._exit(status)
    errors = []
    try:
        run_device(queue, kick, call, errors)
    finally:
        if errors:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kick.close()
        call.close()
    assert errors == []
    assert os.waitstatus_to_exitcode(status) == 0
    assert queue.in_flight == 0
