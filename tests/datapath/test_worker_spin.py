"""The worker's bounded watch of a drained ring (worker._Spin), with a fake clock."""

from __future__ import annotations

import trio

from trio_vhost.worker import SPIN_MAX, _Spin


class FakeClock:
    """perf_counter stand-in: each reading advances by ``step`` seconds."""

    def __init__(self, step: float = 1e-6) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def spin_with(clock: FakeClock) -> _Spin:
    spin = _Spin()
    spin._clock = clock  # type: ignore[misc]
    return spin


async def test_catches_buffers_within_the_window() -> None:
    clock = FakeClock()
    spin = spin_with(clock)
    polls = iter([False] * 5 + [True])
    assert spin.spin(lambda: next(polls))
    spin.woke()  # a caught gap teaches nothing
    assert spin.window == SPIN_MAX


async def test_gives_up_after_the_window() -> None:
    clock = FakeClock()
    spin = spin_with(clock)
    start = clock.now
    assert not spin.spin(lambda: False)
    assert SPIN_MAX <= clock.now - start <= SPIN_MAX + 3 * clock.step


def gap(spin: _Spin, clock: FakeClock, answer: float) -> bool:
    """One drained ring: the driver refills it ``answer`` seconds after the spin starts.

    Returns whether the spin caught it; if not, the worker sleeps until then.
    """
    start = clock.now
    caught = spin.spin(lambda: clock.now - start >= answer)
    if not caught:
        clock.now = max(clock.now, start + answer)
        spin.woke()
    return caught


async def test_window_shrinks_to_nothing_for_a_slow_driver_and_grows_back() -> None:
    clock = FakeClock()
    spin = spin_with(clock)
    for _ in range(8):  # the driver answers after 1 ms: spinning never pays
        assert not gap(spin, clock, 1e-3)
    assert spin.window == 0.0
    assert not spin.spin(lambda: True), "a zero window does not spin"
    # now it answers within SPIN_MAX, after 60 us: the window grows until it catches that
    caught = [gap(spin, clock, 60e-6) for _ in range(10)]
    assert not caught[0]
    assert caught[-3:] == [True] * 3
    assert 60e-6 <= spin.window <= SPIN_MAX


async def test_a_refill_before_sleeping_teaches_nothing() -> None:
    spin = spin_with(FakeClock())
    spin.spin(lambda: False)
    spin.skip()
    spin.woke()
    assert spin.window == SPIN_MAX


async def test_never_spins_while_another_task_is_runnable() -> None:
    spin = spin_with(FakeClock())
    polled = []

    async def other() -> None:
        await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # runnable until it gets its turn
        assert not spin.spin(lambda: polled.append(1) or False)
    assert not polled
