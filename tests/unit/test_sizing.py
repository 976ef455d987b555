"""The adaptive task size: damped convergence toward the target task time."""

from __future__ import annotations

import random

import pytest

from orchestrator.scheduler.sizing import Sizer


def simulate(sizer: Sizer, seconds_per_unit: float, tasks: int, *, noise: float = 0.0, lag: int = 1,
             seed: int = 1) -> list[float]:
    """Run ``tasks`` tasks through a node whose time is proportional to size (with
    multiplicative noise); ``lag`` tasks are cut before the first result comes back,
    as with a port's pipeline. Returns each task's elapsed time."""
    rng = random.Random(seed)
    queue = [sizer.size for _ in range(lag)]
    times = []
    for _ in range(tasks):
        size = queue.pop(0)
        elapsed = size * seconds_per_unit * (1 + rng.uniform(-noise, noise))
        sizer.observe(size, elapsed)
        times.append(elapsed)
        queue.append(sizer.size)
    return times


@pytest.mark.parametrize(("seconds_per_unit", "start"), [
    (10.0, 1e-6),    # a slow node: the full task takes 10 s
    (0.5, 1e-4),     # a fast node from a tiny start
    (100.0, 1.0),    # starting far too big
    (2.0, 0.05),
])
@pytest.mark.parametrize("lag", [1, 2])
def test_each_node_reaches_the_target_within_20_percent_after_20_tasks(seconds_per_unit: float, start: float,
                                                                       lag: int) -> None:
    target = 0.1
    sizer = Sizer(target=target, min_size=1e-6, initial=start)
    times = simulate(sizer, seconds_per_unit, 40, noise=0.1, lag=lag)
    late = times[20:]
    assert all(abs(t - target) / target <= 0.2 for t in late), [round(t, 4) for t in late]


def test_one_odd_task_does_not_swing_the_size() -> None:
    sizer = Sizer(target=0.1, min_size=1e-6, initial=0.01)
    simulate(sizer, 10.0, 30)
    settled = sizer.size
    sizer.observe(settled, 0.1 * 50)  # a task 50x slower than usual (a stall)
    assert sizer.size >= settled * 0.25
    assert sizer.size < settled


def test_a_fixed_size_never_moves() -> None:
    sizer = Sizer(target=0.1, min_size=1e-6, fixed=0.5)
    simulate(sizer, 10.0, 10)
    assert sizer.size == 0.5
    assert sizer.expected_seconds() == pytest.approx(5.0)


def test_sizes_stay_within_bounds() -> None:
    fast = Sizer(target=1.0, min_size=1e-3, initial=0.5)
    simulate(fast, 0.001, 50)
    assert fast.size == 1.0
    slow = Sizer(target=0.001, min_size=1e-3, initial=0.5)
    simulate(slow, 1000.0, 50)
    assert slow.size == 1e-3


def test_a_node_that_cannot_meet_the_target_at_the_smallest_size_is_reported() -> None:
    sizer = Sizer(target=0.01, min_size=0.1, initial=0.1)
    simulate(sizer, 10.0, 4)  # 1 s per task at the smallest size: 100x the target
    assert not sizer.slow  # not after a few tasks: one streak
    simulate(sizer, 10.0, 4)
    assert sizer.slow
    simulate(sizer, 0.01, 1)  # it recovered
    assert not sizer.slow


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": 0, "min_size": 0.1}, "target"),
    ({"target": 1, "min_size": 0}, "min_size"),
    ({"target": 1, "min_size": 0.5, "max_size": 0.2}, "min_size"),
])
def test_bad_parameters_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sizer(**kwargs)
