"""A clock tests move by hand, for everything that takes an injectable clock."""

from __future__ import annotations


class FakeClock:
    """Seconds that move only when the test calls :meth:`advance`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
