"""The gripper gate: hysteresis on the requested closedness and a minimum dwell time.

A requested closedness (0 open .. 1 closed) above ``close_above`` asks to close, below
``open_below`` to open, in between keeps the current command. A change is issued only when at
least ``min_dwell`` seconds have passed since the previous change, so that a flood of
contradicting actions cannot make the gripper chatter: at most one change per dwell time,
whatever the action rate. The first command is issued at once.
"""

from __future__ import annotations

import math

__all__ = ['GripperGate']


class GripperGate:
    """Hysteresis plus dwell time; ``update`` returns a new command (0.0 / 1.0) or None."""

    def __init__(self, close_above: float, open_below: float, min_dwell: float) -> None:
        """Start with no command issued."""
        self.close_above = close_above
        self.open_below = open_below
        self.min_dwell = min_dwell
        self.command: float | None = None  #: the command in effect (None before the first)
        self._changed_at = -math.inf

    def wanted(self, closedness: float) -> float | None:
        """Return the command ``closedness`` asks for (None inside the hysteresis band)."""
        if closedness > self.close_above:
            return 1.0
        if closedness < self.open_below:
            return 0.0
        return None

    def update(self, closedness: float, now: float) -> tuple[float | None, bool]:
        """Return ``(new command or None, change pending)`` for one finite request at ``now``.

        ``pending`` is true while the request differs from the command in effect but the dwell
        time has not passed yet.
        """
        want = self.wanted(closedness)
        if want is None or want == self.command:
            return None, False
        if now - self._changed_at < self.min_dwell:
            return None, True
        self.command = want
        self._changed_at = now
        return want, False

    def forget(self) -> None:
        """Forget the command in effect, so that the next request is commanded.

        For a new episode: the gripper may have been moved. The dwell time still counts from
        the last change.
        """
        self.command = None

    def rebase(self, now: float) -> None:
        """Forget the time of the last change when the clock base changed (a clock jump)."""
        if self._changed_at > now:
            self._changed_at = now
