"""No lost notifications: a driver thread and a device thread race on one ring.

Both sides sleep only when the other side must wake them (kick / call, modelled with
semaphores like eventfd counters) and follow the suppression protocol: disable, drain,
re-enable, fence, re-check. If either side ever decided to sleep while the other believed it
need not notify, a wait would time out: that is the failure this test looks for. Waits are
bounded (a lost notification fails the test instead of hanging it), nothing sleeps to
synchronise, and the GIL switch interval is shortened to make the sides interleave often.

Under the GIL the two threads cannot reorder each other's stores, so this checks the
protocol logic (the re-check after re-enabling), not the hardware fence itself.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import warnings

import pytest

TOTAL = 30_000
WAIT = 10.0  # seconds: only reached if a notification is lost


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


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
                while chains := queue.pop_batch(16):
                    queue.add_used_batch([(c.head, 1) for c in chains])
                    served += len(chains)
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
        for _ in range(10 * TOTAL):  # bounded
            if done == TOTAL:
                return
            n = min(driver.num_free, TOTAL - sent, 1 + sent % 5)
            if n:
                driver.add_batch(n, 16, write=True)
                sent += n
                driver.publish()
                if driver.kick_needed():
                    counts["kicks"] += 1
                    kick.release()
            used = driver.get_used()
            done += len(used)
            if used or (driver.num_free and sent < TOTAL):
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
@pytest.mark.parametrize("size", [4, 64])
def test_no_lost_notification(make_ring, fast_switching, event_idx, size):
    ring = make_ring(size, event_idx=event_idx)
    kick, call = threading.Semaphore(0), threading.Semaphore(0)
    errors: list[str] = []
    counts = {"kicks": 0, "calls": 0}
    threads = [
        threading.Thread(target=run_device, args=(ring.queue, kick, call, errors)),
        threading.Thread(target=run_driver, args=(ring.driver, kick, call, errors, counts)),
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
    assert ring.queue.next_used == TOTAL & 0xFFFF
    assert ring.driver.last_used == TOTAL & 0xFFFF
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
def test_no_lost_notification_across_processes(make_ring, event_idx):
    """The same race with the driver in a forked process: real parallelism, real fences."""
    ring = make_ring(8, event_idx=event_idx)
    kick, call = EventFd(), EventFd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the driver (guest) side
        status = 1
        try:
            errors: list[str] = []
            run_driver(ring.driver, kick, call, errors, {"kicks": 0, "calls": 0})
            status = 0 if not errors else 2
            if errors:
                os.write(2, f"{errors}\n".encode())
        finally:
            os._exit(status)
    errors = []
    try:
        run_device(ring.queue, kick, call, errors)
    finally:
        if errors:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kick.close()
        call.close()
    assert errors == []
    assert os.waitstatus_to_exitcode(status) == 0
    assert ring.queue.next_used == TOTAL & 0xFFFF
