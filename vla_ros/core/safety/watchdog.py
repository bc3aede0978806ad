"""Input freshness: when each input was last seen, and the rule for what is too old.

An input's time is the *older* of its header stamp and its receipt, so neither a slow transport
nor a stale source looks fresh. A stamp further ahead of the receipt than ``max_stamp_ahead``, or
a zero stamp, is not a time at all: :func:`stamped_time` refuses it and the caller drops the
input with the reason. :class:`Watchdogs` holds the times and says why the arm must stop
(``''`` when every input it needs is fresh).
"""

from __future__ import annotations

import math

from vla_ros.core.safety.config import SafetyConfig

__all__ = ['Watchdogs', 'stamped_time']


def stamped_time(stamp: object, now: float, max_ahead: float) -> tuple[float | None, str]:
    """Return ``(min(stamp, now), '')``, or ``(None, why)`` for a zero, bad or future stamp."""
    try:
        s = float(stamp)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None, f'bad stamp {stamp!r}'
    if not math.isfinite(s):
        return None, f'bad stamp {s}'
    if s == 0.0:
        return None, 'zero stamp (unstamped)'
    if s > now + max_ahead:
        return None, (f'stamp {s - now:.3f} s ahead of the local clock (max_stamp_ahead '
                      f'{max_ahead} s)')
    return min(s, now), ''


class Watchdogs:
    """Times of the newest action, camera frame, VLA heartbeat, joint state and enable."""

    def __init__(self, config: SafetyConfig, needs_joint_state: bool) -> None:
        """Start with nothing received."""
        self.config = config
        self.needs_joint_state = needs_joint_state
        self.action: float | None = None  #: receipt of the action in force
        self.camera: float | None = None
        self.heartbeat: float | None = None
        self.joint_state: float | None = None
        self.enable: float | None = None  #: newest enable=true (None after a release)

    def forget(self) -> None:
        """Forget every input time (after a clock jump they lie in the future)."""
        self.action = self.camera = self.heartbeat = self.joint_state = self.enable = None

    def ages(self, now: float) -> dict[str, float]:
        """Return the ages [s] of every input (-1 = never / invalidated)."""
        def age(t: float | None) -> float:
            """Return the age of an input seen at ``t``."""
            return -1.0 if t is None else max(0.0, now - t)
        return {'action': age(self.action), 'camera': age(self.camera),
                'joint_state': age(self.joint_state), 'vla': age(self.heartbeat),
                'enable': age(self.enable)}

    def check(self, now: float, *, action: bool) -> str:
        """Return why the arm must stop now ('' when fresh); ``action``: check the held one."""
        c = self.config
        if action and self.action is not None:
            age = now - self.action
            if age > c.action_timeout:
                return f'action stale: age {age:.3f} s > action_timeout {c.action_timeout} s'
        if self.camera is None:
            return 'no camera frame received'
        age = now - self.camera
        if age > c.camera_timeout:
            return f'camera stale: frame age {age:.3f} s > camera_timeout {c.camera_timeout} s'
        if self.heartbeat is None:
            return 'VLA node silent: no heartbeat or action received'
        age = now - self.heartbeat
        if age > c.vla_heartbeat_timeout:
            return (f'VLA node silent for {age:.3f} s > vla_heartbeat_timeout '
                    f'{c.vla_heartbeat_timeout} s')
        if self.needs_joint_state:
            if self.joint_state is None:
                return 'no valid joint state'
            age = now - self.joint_state
            if age > c.joint_state_timeout:
                return (f'joint state stale: age {age:.3f} s > joint_state_timeout '
                        f'{c.joint_state_timeout} s')
        if c.deadman_timeout > 0.0:
            if self.enable is None:
                return 'deadman released: no enable'
            age = now - self.enable
            if age > c.deadman_timeout:
                return (f'deadman silent: enable age {age:.3f} s > deadman_timeout '
                        f'{c.deadman_timeout} s')
        return ''
