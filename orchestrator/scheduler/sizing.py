"""Task sizes that adapt to each node (CloudI's dynamic task size).

A task's *size* in (0, 1] is its share of the work module's largest task.  Each node
gets the size that makes its tasks take about the job's target time: after every task,
``ideal = size * target / elapsed`` (time is taken as proportional to size), and the
node's size moves 30 % of the way there on a log scale (``size *= (ideal/size) ** 0.3``),
by at most a factor of 4 per task, clamped to [min_size, 1].  Slow and damped on purpose: one odd task
(a cold cache, a page fault storm) must not swing the size.

Pure: no clocks, no I/O; the scheduler feeds it the elapsed times the ports measured.
"""

from __future__ import annotations

SMOOTHING = 0.3
"""How far the size moves toward the ideal after each task (0: never, 1: at once)."""
MAX_STEP = 4.0
"""The most one task can grow or shrink the size by (a factor)."""
SLOW_MARGIN = 1.2
SLOW_STREAK = 5


class Sizer:
    """One node's task size."""

    __slots__ = ("_slow_streak", "elapsed", "fixed", "max_size", "min_size", "observed", "size", "slow", "target")

    def __init__(self, *, target: float, min_size: float, initial: float | None = None,
                 fixed: float | None = None, max_size: float = 1.0) -> None:
        if target <= 0:
            raise ValueError("target task time must be > 0")
        if not 0 < min_size <= max_size <= 1:
            raise ValueError(f"need 0 < min_size {min_size} <= max_size {max_size} <= 1")
        self.target = target
        self.min_size = min_size
        self.max_size = max_size
        self.fixed = fixed
        start = fixed if fixed is not None else (initial if initial is not None else min_size)
        self.size = min(max(start, min_size), max_size)
        self.elapsed = 0.0
        """Smoothed seconds per task at recent sizes (for pipelining depth)."""
        self.observed = 0
        self.slow = False
        """The node cannot meet the target even at the smallest size."""
        self._slow_streak = 0

    def observe(self, size: float, elapsed: float) -> None:
        """A task of ``size`` took ``elapsed`` seconds on this node."""
        self.observed += 1
        self.elapsed = elapsed if self.observed == 1 else self.elapsed + SMOOTHING * (elapsed - self.elapsed)
        if self.fixed is not None:
            return
        if size <= self.min_size and elapsed > self.target * SLOW_MARGIN:
            self._slow_streak += 1
            self.slow = self._slow_streak >= SLOW_STREAK
        else:
            self._slow_streak = 0
            self.slow = False
        # The size that would have taken the target time; a task cut before the size last
        # moved still gives a true estimate, since it is scaled by its own size.
        ideal = size * self.target / elapsed if elapsed > 0 else self.size * MAX_STEP
        # Smoothed in log space: too big and too small are corrected equally fast.
        step = (ideal / self.size) ** SMOOTHING
        moved = self.size * min(max(step, 1 / MAX_STEP), MAX_STEP)
        self.size = min(max(moved, self.min_size), self.max_size)

    def expected_seconds(self) -> float:
        """How long a task at the current size should take (0 before any task)."""
        return self.elapsed
