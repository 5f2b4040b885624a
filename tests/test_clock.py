"""rescue._clock.RunClock: trio's time, read in compiled code, the same value as the clock's own."""

from __future__ import annotations

import trio
import trio.testing

from rescue._clock import RunClock, run_clock


async def test_trio_s_own_clock_is_read_directly_and_agrees_with_it() -> None:
    clock = trio.lowlevel.current_clock()
    fast = RunClock(clock)
    assert fast.direct  # pytest-trio runs on trio's SystemClock
    for _ in range(100):
        before = clock.current_time()
        now = fast.now()
        after = clock.current_time()
        assert before <= now <= after  # the same clock: monotonic between two of its own reads
    assert abs(fast.now() - trio.current_time()) < 0.01


def test_any_other_clock_is_asked_as_it_is() -> None:
    async def main() -> tuple[bool, float, float, float]:
        fast = RunClock(trio.lowlevel.current_clock())
        start = fast.now()
        await trio.sleep(12.5)
        return fast.direct, fast.now(), trio.current_time(), fast.now() - start

    direct, now, trio_now, elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not direct
    assert now == trio_now  # virtual time, exactly what the clock says
    assert elapsed == 12.5


def test_a_clock_that_only_looks_like_trio_s_is_not_believed() -> None:
    class SystemClock(trio.abc.Clock):  # the name, and an offset that does not add up
        offset = 1000.0

        def start_clock(self) -> None:
            pass

        def current_time(self) -> float:
            return 42.0

        def deadline_to_sleep_time(self, deadline: float) -> float:
            return deadline - 42.0

    fast = RunClock(SystemClock())
    assert not fast.direct
    assert fast.now() == 42.0


async def test_sessions_of_one_run_share_one_run_clock() -> None:
    clock = trio.lowlevel.current_clock()
    assert run_clock(clock) is run_clock(clock)
    other = trio.testing.MockClock()
    assert run_clock(other) is not run_clock(clock)
