"""The safety limiter: a pure, fail-safe state machine between the policy's actions and the arm.

``SafetyLimiter`` turns each 7D policy action (dx dy dz [m], droll dpitch dyaw [rad], gripper) into
the base-frame twist the arm may execute, and decides when it must not move at all. It owns no
clock: every input carries its time ``now`` (float seconds; one clock for all calls, which the
stamps of actions and joint states share), so tests control time.

An action is accepted only when it belongs to the current episode (id and instruction, as the
episode's owner announced them), is expressed in ``frame_id``, is stamped neither before the
last accepted one nor ahead of the clock, is finite, confident enough and every input it needs is
fresh. It then passes the target stages (per-axis clamp, Cartesian speed) and becomes the held
target; every published command, the action's and each tick's, runs the output stages of
``vla_ros.core.safety.stages`` on it against the newest joint state (acceleration per second,
workspace, table plane, joints, predicted step) and is checked once more against the
acceleration bound. Every limit that acts is named in ``Decision.limits_applied``.

Stops: stale actions, camera frames or joint states, a silent VLA node, a released deadman, an
unconfirmed step, a command that cannot keep the acceleration bound, and bad input stop the arm
(controlled stop, zero output, until a fresh action); an e-stop or an external force beyond its
threshold latches (ESTOP) until ``reset``, which never resumes motion by itself; stop detection
and a step budget end the episode (DONE). Bad input never raises: it yields a zero twist and a
reason.
"""

from __future__ import annotations

import enum
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vla_ros.core.errors import ConfigError
from vla_ros.core.safety.config import SafetyConfig
from vla_ros.core.safety.gripper import GripperGate
from vla_ros.core.safety.stages import (
    AXES,
    OUTPUT_STAGES,
    TARGET_STAGES,
    Bounds,
    Context,
    JointView,
    run_stages,
)
from vla_ros.core.safety.watchdog import Watchdogs, stamped_time

if TYPE_CHECKING:  # keeps pinocchio out of a kinematics-free import
    from vla_ros.core.kinematics import ArmKinematics

__all__ = ['AXES', 'GRIPPER_UNKNOWN', 'Decision', 'SafetyLimiter', 'SafetyState']

logger = logging.getLogger(__name__)

_FIELDS7 = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')

#: Tolerance for clock jitter between callbacks: a ``now`` up to this much older than the newest
#: one seen is treated as the newest; further back is a clock jump and stops the arm.
CLOCK_JITTER_S = 1e-3

#: Relative slack of the final acceleration check (floating-point rounding only).
ACCEL_CHECK_REL = 1e-9

#: ``Decision.applied_delta[6]`` before any gripper command was issued.
GRIPPER_UNKNOWN = -1.0

#: Inputs whose decision the safety node publishes as a command (every other input only
#: changes the command when it stops the arm).
OUTPUT_EVENTS = frozenset({'action', 'tick', 'confirm', 'estop', 'halt', 'reset', 'episode'})

#: A contact event ends when the force falls below this fraction of ``max_contact_force``.
CONTACT_RELEASE = 0.5
#: During a contact event (after a reset) a force growing to this multiple of the one that
#: latched latches again.
CONTACT_RELATCH = 1.5

#: Prefix of the latch reason of a stop caused by an external force or effort.
PROTECTIVE = 'protective stop'


class SafetyState(enum.IntEnum):
    """Limiter states, numbered as the ``STATE_*`` constants of ``msg/SafetyStatus.msg``."""

    IDLE = 0  #: no instruction, or no action yet in this episode: zero output
    ACTIVE = 1  #: passing limited actions
    STOPPED = 2  #: controlled stop (watchdog, rejected input, after reset): until a fresh action
    DONE = 3  #: episode finished (stop detection or step budget) until a new instruction
    ESTOP = 4  #: latched emergency or protective stop: zero output until ``reset``


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


_ZERO6 = _frozen(np.zeros(6))


def _json_float(x: float) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return 'nan' if math.isnan(x) else ('inf' if x > 0 else '-inf')


@dataclass(frozen=True)
class Decision:
    """What the arm is commanded after one input, and why (immutable; arrays are read-only).

    Attributes:
        state: limiter state after the input.
        twist: ``(6,)`` vx vy vz [m/s], wx wy wz [rad/s] in the base frame; zero unless ACTIVE.
        applied_delta: ``(7,)`` the twist times ``action_period`` and the gripper command in
            effect (0 open, 1 closed, ``GRIPPER_UNKNOWN`` = -1 before the first command).
        requested: ``(7,)`` the requested delta (first six) and gripper closedness of this input
            (for ``tick``, of the held action); NaN where the input was not readable.
        gripper: a new gripper command (0.0 open, 1.0 closed), or None to hold the current one.
        limits_applied: names of the limits that changed this command, in pipeline order
            (``'per_axis_clamp:x'``, ``'speed:linear'``, ``'workspace:z_max'``, ...).
        reason: why the output is what it is ('' when passed unchanged).
        transition: whether this input changed the state.
        episode_id: the current episode (-1 before any).
        step_count: accepted actions in this episode.
        still_count: consecutive still actions so far.
        accepted: whether this input was an action that was accepted.
        event: which input produced it ('action', 'tick', 'episode', 'estop', ...).
        time: the ``now`` of the input [s].
        target: ``(6,)`` the held target twist (after per-axis and speed limits) that the output
            stages limited into ``twist``; zero when nothing is held.

    """

    state: SafetyState
    twist: np.ndarray
    applied_delta: np.ndarray
    requested: np.ndarray
    gripper: float | None
    limits_applied: tuple[str, ...]
    reason: str
    transition: bool
    episode_id: int
    step_count: int
    still_count: int
    accepted: bool = False
    event: str = ''
    time: float = math.nan
    target: np.ndarray = field(default_factory=lambda: _ZERO6)

    @property
    def linear_speed(self) -> float:
        """Return the commanded linear speed [m/s]."""
        tw = self.twist
        return math.sqrt(float(tw[:3] @ tw[:3]))

    @property
    def angular_speed(self) -> float:
        """Return the commanded angular speed [rad/s]."""
        tw = self.twist
        return math.sqrt(float(tw[3:] @ tw[3:]))

    def to_record(self) -> dict[str, Any]:
        """Return a JSON-serializable audit record: input, limits applied, output and state.

        Non-finite numbers are written as the strings ``'nan'``, ``'inf'`` and ``'-inf'`` so the
        record stays strict JSON.
        """
        return {
            'time': _json_float(self.time),
            'event': self.event,
            'state': self.state.name,
            'state_code': int(self.state),
            'transition': self.transition,
            'accepted': self.accepted,
            'reason': self.reason,
            'episode_id': self.episode_id,
            'step_count': self.step_count,
            'still_count': self.still_count,
            'input': {'requested': [_json_float(v) for v in self.requested]},
            'limits_applied': list(self.limits_applied),
            'output': {
                'twist': [_json_float(v) for v in self.twist],
                'applied_delta': [_json_float(v) for v in self.applied_delta],
                'gripper': self.gripper,
                'linear_speed': _json_float(self.linear_speed),
                'angular_speed': _json_float(self.angular_speed),
            },
        }


@dataclass
class _Pending:
    """An accepted action that waits for the operator's confirm (step mode)."""

    target: np.ndarray
    limits: list[str]
    gripper: float | None
    since: float
    step: int


def _vector7(value: object) -> np.ndarray | None:
    """Return ``value`` as 7 floats (any may be non-finite), or None when it is not 7 numbers."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return None
    return arr if arr.size == 7 else None


class SafetyLimiter:
    """The safety state machine; see the module docstring for the rules.

    Without ``kinematics`` the workspace, table and joint stages are skipped (no pose is known)
    and joint states are not required; with it, a fresh, valid joint state is required to move.
    Calls must be serialized (one thread at a time, ``now`` read under the same lock).
    """

    def __init__(self, config: SafetyConfig, kinematics: ArmKinematics | None = None) -> None:
        """Create an IDLE limiter.

        Raises:
            ConfigError: the joint position margin leaves no room inside some joint's range.

        """
        self.config = config
        self.kinematics = kinematics
        c = config
        if kinematics is not None:
            narrow = [n for n, lo, hi in zip(kinematics.joint_names, kinematics.lower,
                                              kinematics.upper, strict=True)
                      if not lo + c.joint_position_margin < hi - c.joint_position_margin]
            if narrow:
                raise ConfigError(
                    f'joint_position_margin={c.joint_position_margin} leaves no range for joints '
                    f'{narrow}')
        self._bounds = Bounds.build(c, kinematics)
        self._period = c.action_period
        self._hold = max(c.action_period, c.driver_command_timeout)  # a command stays in force
        self._tick_period = 1.0 / c.output_rate_hz
        self._wd = Watchdogs(c, needs_joint_state=kinematics is not None)
        self._gripper = GripperGate(c.gripper_close_above, c.gripper_open_below,
                                    c.gripper_min_dwell)
        self._state = SafetyState.IDLE
        self._reason = 'no instruction'
        self._instruction: str | None = None
        self._episode_id = -1
        self._episode_done = False
        self._last_now = -math.inf
        self._latch = ''
        self._reset_time: float | None = None
        self._episode_start: float | None = None  #: when the current episode began [s]
        self._last_stamp: float | None = None
        self._step_count = 0
        self._still_count = 0
        self._view: JointView | None = None
        self._held = _ZERO6  # target twist of the action in force (read-only)
        self._out = _ZERO6  # the twist last commanded (read-only, shared by decisions)
        self._out_time = -math.inf
        self._applied: tuple[np.ndarray, float | None, np.ndarray] | None = None
        self._requested = _frozen(np.full(7, math.nan))
        self._pending: _Pending | None = None
        self._unconfirmed = 0  # step mode: actions since the last confirm (0: the next waits)
        self._min_prob = math.nan  # of the newest action that carried token probabilities
        # a contact event: (unit force direction in the base frame or None, force that latched)
        self._contact: tuple[np.ndarray | None, float] | None = None
        self._effort_event: float | None = None  # the external effort that latched

    # ------------------------------------------------------------------ properties
    @property
    def state(self) -> SafetyState:
        """Return the current state."""
        return self._state

    @property
    def reason(self) -> str:
        """Return the reason for the latest state transition."""
        return self._reason

    @property
    def instruction(self) -> str | None:
        """Return the instruction of the current episode (None when there is none)."""
        return self._instruction

    @property
    def episode_id(self) -> int:
        """Return the current episode id (-1 before any)."""
        return self._episode_id

    @property
    def latched(self) -> str:
        """Return the reason of the latched e-stop or protective stop ('' when none)."""
        return self._latch if self._state is SafetyState.ESTOP else ''

    @property
    def waiting_confirm(self) -> bool:
        """Whether an action waits for the operator's confirm (step mode)."""
        return self._pending is not None

    @property
    def min_token_prob(self) -> float:
        """Return the least token probability of the newest action that carried them (NaN)."""
        return self._min_prob

    def ages(self, now: float) -> dict[str, float]:
        """Return ages [s] of the newest action, camera frame, joint state, ... (-1 = never)."""
        return self._wd.ages(now)

    # ------------------------------------------------------------------ helpers
    def _decision(self, event: str, now: float, prev: SafetyState, *, reason: str = '',
                  requested: np.ndarray | None = None, limits: Sequence[str] = (),
                  gripper: float | None = None, accepted: bool = False) -> Decision:
        if self._state is not SafetyState.ACTIVE:
            self._zero(now)
        if event in OUTPUT_EVENTS and math.isfinite(now):
            self._out_time = now  # the node publishes this command now
        twist = self._out
        grip = self._gripper.command
        cached = self._applied
        if cached is None or cached[0] is not twist or cached[1] != grip:
            applied = np.empty(7)
            applied[:6] = twist * self._period
            applied[6] = GRIPPER_UNKNOWN if grip is None else grip
            cached = self._applied = (twist, grip, _frozen(applied))
        return Decision(
            state=self._state, twist=twist, applied_delta=cached[2],
            requested=self._requested if requested is None else requested, gripper=gripper,
            limits_applied=tuple(limits), reason=reason, transition=self._state is not prev,
            episode_id=self._episode_id, step_count=self._step_count,
            still_count=self._still_count, accepted=accepted, event=event, time=now,
            target=self._held)

    def _zero(self, now: float) -> None:
        """Command zero (every state but ACTIVE)."""
        if self._out is not _ZERO6:
            self._out = _ZERO6
            self._out_time = now if math.isfinite(now) else self._last_now

    def _set_state(self, state: SafetyState, reason: str) -> None:
        if state is not self._state:
            logger.info('safety %s -> %s: %s', self._state.name, state.name, reason)
            self._reason = reason
        self._state = state
        if state is not SafetyState.ACTIVE:
            self._zero(self._last_now)
            self._held = _ZERO6
            self._wd.action = None

    def _stop(self, reason: str) -> None:
        """Controlled stop: ACTIVE -> STOPPED; a waiting step is dropped; else zero output."""
        if self._state is SafetyState.ACTIVE or (self._pending is not None
                                                  and self._state is SafetyState.STOPPED):
            self._pending = None
            self._set_state(SafetyState.STOPPED, reason)

    def _latch_stop(self, reason: str) -> None:
        """Latch ESTOP with ``reason`` (a repeat keeps the first reason)."""
        if self._state is not SafetyState.ESTOP:
            self._latch = reason
            self._pending = None
            self._set_state(SafetyState.ESTOP, f'estop: {reason}' if not reason.startswith(
                PROTECTIVE) else reason)
            logger.warning('safety: latched: %s', reason)

    def _clock(self, now: object) -> tuple[float | None, str]:
        """Validate ``now``; return (effective now, '') or (None, reason) for a bad clock."""
        try:
            t = float(now)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None, f'invalid time {now!r}'
        if not math.isfinite(t):
            return None, f'non-finite time {t}'
        if t < self._last_now - CLOCK_JITTER_S:
            back = self._last_now - t
            # Every stored input time is now in the future: forget them, so they count as never
            # received until fresh inputs arrive, and stop. Stamps of the old time base mean
            # nothing any more: only actions stamped after the jump are accepted.
            self._wd.forget()
            self._view = None
            self._last_stamp = None
            self._reset_time = t
            self._last_now = t
            self._out_time = min(self._out_time, t)
            self._gripper.rebase(t)
            return None, f'clock went backwards by {back:.3f} s'
        t = max(t, self._last_now)
        self._last_now = t
        return t, ''

    def _bad_clock(self, event: str, now: object, prev: SafetyState, reason: str,
                   requested: np.ndarray | None = None) -> Decision:
        if self._state is SafetyState.ACTIVE:
            logger.warning('safety: %s', reason)
        self._stop(reason)
        t = now if isinstance(now, float) else math.nan
        return self._decision(event, t, prev, reason=reason, requested=requested)

    def _command(self, t: float) -> tuple[np.ndarray, list[str], str, bool]:
        """Run the output stages on the held target; return (twist, limits, reason, ok).

        ``ok`` is false when the result cannot keep the acceleration bound (then stop).
        """
        kin = self.kinematics
        view = self._view
        if kin is not None and view is None:  # unreachable past the watchdog; fail safe
            return _ZERO6, ['joint:no_state'], 'no valid joint state', True
        prev = self._out
        dt = min(max(0.0, t - self._out_time), self._tick_period)
        horizon = self._hold + (max(0.0, t - view.time) if view is not None else 0.0)
        ctx = Context(self._bounds, prev, dt, horizon, view, kin,
                      None if self._contact is None else self._contact[0])
        v, limits, reason = run_stages(OUTPUT_STAGES, self._held.copy(), ctx)
        b = self._bounds
        for sl, accel, name in ((slice(0, 3), b.linear_accel, 'linear'),
                                (slice(3, 6), b.angular_accel, 'angular')):
            dv = v[sl] - prev[sl]
            if math.sqrt(float(dv @ dv)) > accel * dt * (1.0 + ACCEL_CHECK_REL):
                limits.append(f'accel:{name}:cannot_brake')
                return _ZERO6, limits, (
                    f'stopped: {", ".join(limits[:-1]) or "the limits"} would need a '
                    f'{name} deceleration above max_{name}_accel'), False
        return v, limits, reason, True

    def would_be(self, now: float) -> np.ndarray:
        """Return the held target through every output stage but the acceleration ramp.

        That is what the command ramps towards (shadow mode compares it with the reference);
        zero when nothing is held. ``now`` is not recorded as an input.
        """
        t = max(float(now), self._last_now) if math.isfinite(now) else self._last_now
        view = self._view
        horizon = self._hold + (max(0.0, t - view.time) if view is not None else 0.0)
        ctx = Context(self._bounds, self._out, 0.0, horizon, view, self.kinematics,
                      None if self._contact is None else self._contact[0])
        if self.kinematics is not None and view is None:
            return _ZERO6
        return _frozen(run_stages(OUTPUT_STAGES[1:], self._held.copy(), ctx)[0])

    def _emit(self, event: str, t: float, prev: SafetyState, **kw: Any) -> Decision:  # noqa: ANN401
        """Compute the command for the held target at ``t`` and return the decision."""
        try:
            twist, limits, reason, ok = self._command(t)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as exc:
            logger.exception('safety: limiting failed')
            twist, limits, reason, ok = _ZERO6, [], f'limiting failed ({exc}): stopped', False
        limits = list(kw.pop('limits', ())) + limits
        given = kw.pop('reason', '')
        if not ok:
            self._stop(reason)
            return self._decision(event, t, prev, reason=reason, limits=limits, **kw)
        self._out = _frozen(twist) if twist is not _ZERO6 else _ZERO6
        self._out_time = t
        if not reason and limits:
            reason = 'limited: ' + ', '.join(limits)
        return self._decision(event, t, prev, reason=given or reason, limits=limits, **kw)

    # ------------------------------------------------------------------ episode, operator
    def on_episode(self, episode_id: object, instruction: object, now: float,
                   start: object = None) -> Decision:
        """Start episode ``episode_id`` with ``instruction`` (empty or not a string: IDLE).

        The arm stops (zero output) until the first action of the new episode; counters, the
        still detector and a waiting step are reset. In ESTOP the latch stays; the new episode
        takes effect after ``reset``. ``start`` (the episode's stamp [s], same clock as the
        actions' frame stamps; None, zero, not finite or beyond ``max_stamp_ahead``: unknown;
        a little ahead: now): actions computed from frames
        taken before it are not of this episode (a restarted instruction owner numbers its
        episodes from 1 again, so an id alone can name an earlier episode).
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('episode', now, prev, bad)
        try:
            ep = operator.index(episode_id)  # type: ignore[arg-type]
        except TypeError:
            ep = -1
        text = instruction.strip() if isinstance(instruction, str) else ''
        self._instruction = text or None
        self._episode_id = ep if ep >= 0 and self._instruction else -1
        # A start ahead of the clock (skew) counts as now, an unreadable one as unknown.
        self._episode_start, _ = stamped_time(start, t, self.config.max_stamp_ahead)
        self._last_stamp = None
        self._step_count = 0
        self._still_count = 0
        self._pending = None
        self._unconfirmed = 0
        self._episode_done = False
        self._gripper.forget()  # the next gripper request of the episode is commanded
        if self._instruction is None:
            reason = 'empty instruction: no episode'
        elif ep < 0:
            self._instruction = None
            reason = f'episode rejected: bad episode id {episode_id!r}'
        else:
            reason = (f'episode {ep}: new instruction {self._instruction!r}: waiting for its '
                      'first action')
        if self._state is SafetyState.ESTOP:
            return self._decision('episode', t, prev,
                                  reason=f'{reason}; {self._idle_reason()}')
        self._set_state(SafetyState.IDLE, reason)
        self._reason = reason  # also when already IDLE: the status must say an episode waits
        return self._decision('episode', t, prev, reason=reason)

    def estop(self, now: float, reason: str = '') -> Decision:
        """Latch the emergency stop: zero output until ``reset`` (a repeat keeps the first)."""
        prev = self._state
        t, _ = self._clock(now)
        t = math.nan if t is None else t
        self._latch_stop(reason or 'estop requested')
        return self._decision('estop', t, prev, reason=self._idle_reason())

    def halt(self, now: float, reason: str) -> Decision:
        """Controlled stop without a latch (the node shutting down, an operator's pause)."""
        prev = self._state
        t, _ = self._clock(now)
        t = math.nan if t is None else t
        self._stop(reason)
        return self._decision('halt', t, prev, reason=reason)

    def reset(self, now: float) -> Decision:
        """Clear a latched e-stop or protective stop; never resumes motion by itself.

        ESTOP becomes STOPPED (DONE if the episode had ended, IDLE without an instruction). Only
        an action whose stamp is newer than this reset resumes motion.
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('reset', now, prev, f'reset refused: {bad}')
        if self._state is not SafetyState.ESTOP:
            return self._decision('reset', t, prev, reason='reset ignored: no estop latched')
        self._reset_time = t
        self._still_count = 0
        self._latch = ''
        if self._instruction is None:
            self._set_state(SafetyState.IDLE, 'reset: no instruction')
        elif self._episode_done:
            self._set_state(SafetyState.DONE, 'reset: episode already done')
        else:
            self._set_state(SafetyState.STOPPED, 'reset: waiting for an action newer than the '
                            'reset')
        return self._decision('reset', t, prev, reason=self._reason)

    def on_enable(self, enabled: object, now: float) -> Decision:
        """Record the operator's deadman: True is a heartbeat, anything else a release."""
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('enable', now, prev, bad)
        if enabled is True:
            self._wd.enable = t
            return self._decision('enable', t, prev)
        self._wd.enable = None
        reason = 'deadman released'
        if self.config.deadman_timeout > 0.0:
            self._stop(reason)
        return self._decision('enable', t, prev, reason=reason)

    def confirm(self, now: float) -> Decision:
        """Operator's confirm in step mode: the waiting action moves now (if still valid)."""
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('confirm', now, prev, bad)
        p = self._pending
        if p is None:
            return self._decision('confirm', t, prev, reason='confirm ignored: no action waits')
        self._pending = None
        why = self._wd.check(t, action=False)
        if why:
            self._set_state(SafetyState.STOPPED, f'confirm refused: {why}')
            return self._decision('confirm', t, prev, reason=self._reason)
        self._held = _frozen(p.target)
        self._unconfirmed = 1 % self.config.step_every
        self._wd.action = t  # the confirmed action is in force for action_timeout from now
        self._set_state(SafetyState.ACTIVE, f'action {p.step} confirmed')
        return self._emit('confirm', t, prev, limits=p.limits, gripper=self._grip_now(p, t),
                          reason=f'action {p.step} confirmed')

    def _grip_now(self, p: _Pending, t: float) -> float | None:
        if p.gripper is None:
            return None
        cmd, _ = self._gripper.update(p.gripper, t)
        return cmd

    # ------------------------------------------------------------------ sensors
    def on_camera_frame(self, stamp: object, now: float) -> Decision:
        """Record a camera frame; its age counts from ``min(stamp, now)``."""
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('camera', now, prev, bad)
        s, why = stamped_time(stamp, t, math.inf)
        if s is None:
            return self._decision('camera', t, prev, reason=f'camera frame ignored: {why}')
        self._wd.camera = s
        return self._decision('camera', t, prev)

    def on_vla_heartbeat(self, now: float) -> Decision:
        """Record a sign of life of the VLA node (every action counts as one too)."""
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('heartbeat', now, prev, bad)
        self._wd.heartbeat = t
        return self._decision('heartbeat', t, prev)

    def on_joint_state(self, q: object, stamp: object, now: float,
                       effort: object = None) -> Decision:
        """Record joint positions in model order (see ``ArmKinematics.order_joint_state``).

        The joint state's time is the older of ``stamp`` and ``now``; a zero stamp, a stamp
        beyond ``max_stamp_ahead`` ahead, or a malformed or non-finite state is ignored with a
        reason and invalidates the previous one, so that with kinematics an ACTIVE arm stops at
        once. ``effort`` (external joint efforts, optional) beyond ``max_external_effort``
        latches a protective stop.
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('joint_state', now, prev, bad)
        latched = self._check_effort(effort)
        try:
            arr = np.array(q, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            arr = np.full(1, math.nan)
        n = self.kinematics.n_joints if self.kinematics is not None else arr.size
        when, why = stamped_time(stamp, t, self.config.max_stamp_ahead)
        if arr.size != n or not np.isfinite(arr).all():
            why = f'{arr.size} values, expected {n} finite'
        if why or when is None:
            reason = f'invalid joint state ignored: {why}'
            self._view = None
            self._wd.joint_state = None
            if self.kinematics is not None:
                self._stop(reason)
            return self._decision('joint_state', t, prev, reason=latched or reason)
        _frozen(arr)
        if self.kinematics is not None:
            self._view = JointView.build(self.kinematics, arr, when)
        self._wd.joint_state = when
        return self._decision('joint_state', t, prev, reason=latched)

    def _check_effort(self, effort: object) -> str:
        limit = self.config.max_external_effort
        if limit <= 0.0 or effort is None:
            return ''
        try:
            e = np.asarray(effort, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            e = np.full(1, math.nan)
        if not e.size:
            return ''
        if not np.isfinite(e).all():
            self._stop('external effort not finite')
            return 'external effort not finite: stopped'
        worst = int(np.argmax(np.abs(e)))
        peak = float(abs(e[worst]))
        if peak < CONTACT_RELEASE * limit:
            self._effort_event = None  # the contact event is over
            return ''
        # As for the contact force: latch on the rising edge, and again when it grows further.
        if peak > limit and (self._effort_event is None
                             or peak > CONTACT_RELATCH * self._effort_event):
            grown = self._effort_event is not None
            self._effort_event = peak
            names = self.kinematics.joint_names if self.kinematics is not None else []
            joint = names[worst] if worst < len(names) else f'joint {worst}'
            self._latch_stop(f'{PROTECTIVE}: external effort {peak:.2f} N*m on {joint} > '
                             f'max_external_effort {limit} N*m'
                             + (' (pushing further into the contact)' if grown else ''))
            return self._reason
        return ''

    def on_wrench(self, force: object, now: float, *, in_base_frame: bool = True) -> Decision:
        """Record the external force on the tool [N]; beyond ``max_contact_force`` latch.

        The protective stop latches when the force rises above the threshold. After a reset
        while the contact lasts (the force stays above ``CONTACT_RELEASE`` times the threshold)
        only motion along the force, away from the obstacle, is allowed (when the force is given
        in the base frame), and a force growing to ``CONTACT_RELATCH`` times the one that
        latched latches again.
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('wrench', now, prev, bad)
        limit = self.config.max_contact_force
        if limit <= 0.0:
            return self._decision('wrench', t, prev)
        try:
            f = np.asarray(force, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            f = np.full(1, math.nan)
        if f.size != 3 or not np.isfinite(f).all():
            self._stop('contact force unreadable')
            return self._decision('wrench', t, prev, reason='contact force unreadable: stopped')
        n = math.sqrt(float(f @ f))
        if n < CONTACT_RELEASE * limit:
            self._contact = None  # the contact event is over
        elif self._contact is None or n > CONTACT_RELATCH * self._contact[1]:
            if n > limit:
                grown = self._contact is not None
                self._contact = (f / n if in_base_frame else None, n)
                self._latch = '' if grown else self._latch
                self._latch_stop(f'{PROTECTIVE}: contact force {n:.1f} N > max_contact_force '
                                 f'{limit} N' + (' (pushing further into the contact)'
                                                 if grown else ''))
        else:
            self._contact = (f / n if in_base_frame else None, self._contact[1])
        return self._decision('wrench', t, prev, reason=self._idle_reason()
                              if self._state is SafetyState.ESTOP else '')

    # ------------------------------------------------------------------ actions
    def tick(self, now: float) -> Decision:
        """Re-publish the held command at the output rate, or stop if any input is stale.

        While ACTIVE the held target is limited again by the output stages against the newest
        joint state; in step mode an unconfirmed action times out here.
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('tick', now, prev, bad)
        p = self._pending
        if p is not None and t - p.since > self.config.step_confirm_timeout:
            self._pending = None
            self._reason = (f'step mode: action {p.step} not confirmed within '
                            f'{self.config.step_confirm_timeout} s: dropped')
            return self._decision('tick', t, prev, reason=self._reason)
        if self._state is not SafetyState.ACTIVE:
            return self._decision('tick', t, prev, reason=self._idle_reason())
        why = self._wd.check(t, action=True)
        if why:
            self._stop(why)
            return self._decision('tick', t, prev, reason=why)
        return self._emit('tick', t, prev)

    def _idle_reason(self) -> str:
        if self._state is SafetyState.ESTOP:
            return (self._latch if self._latch.startswith(PROTECTIVE)
                    else f'estop latched: {self._latch}')
        return self._reason

    def on_action(self, delta7: object, gripper_closedness: object, episode_id: object,
                  stamp: object, now: float, *, instruction: object = None,
                  frame_id: object = None, token_probs: object = None,
                  token_margins: object = None) -> Decision:
        """Limit one policy action and return the command; never raises.

        Args:
            delta7: dx dy dz [m], droll dpitch dyaw [rad] and the checkpoint's gripper value
                (ignored here: the gripper enters through ``gripper_closedness``).
            gripper_closedness: 0 = open .. 1 = closed, already converted from the checkpoint's
                convention.
            episode_id: the episode the action was computed for (must be the current one).
            stamp: stamp of the camera frame it was computed from [s, same clock as ``now``].
            now: time of receipt [s].
            instruction: the instruction it was computed for (must be the current one).
            frame_id: the frame its delta is expressed in (must be ``config.frame_id``).
            token_probs: probabilities of the 7 chosen action tokens (confidence gate).
            token_margins: their margins over the runner-up tokens (confidence gate).

        """
        prev = self._state
        req = np.full(7, math.nan)
        arr = _vector7(delta7)
        if arr is not None:
            req[:6] = arr[:6]
        try:
            req[6] = float(gripper_closedness)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            req[6] = math.nan
        _frozen(req)
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('action', now, prev, bad, requested=req)
        self._wd.heartbeat = t  # any action proves the VLA node alive

        def reject(reason: str, *, stop: bool, limits: Sequence[str] = ()) -> Decision:
            """Refuse this action; with ``stop`` also stop the arm (bad input, stale inputs)."""
            if stop:  # a refused action also turns an armed IDLE into a visible STOPPED
                if self._state is SafetyState.IDLE and self._instruction is not None:
                    self._set_state(SafetyState.STOPPED, reason)
                self._stop(reason)
                self._still_count = 0
            return self._decision('action', t, prev, reason=reason, requested=req, limits=limits)

        if self._state is SafetyState.ESTOP:
            return reject(self._idle_reason(), stop=False)
        if self._instruction is None:
            return reject('no instruction: action ignored', stop=False)
        if self._state is SafetyState.DONE:
            return reject(f'episode done ({self._reason}): waiting for a new instruction',
                          stop=False)
        # Not of this episode: dropped (a late action of the previous one, or one computed for
        # an episode this node has not heard of yet); the command in force stays.
        try:
            ep = operator.index(episode_id)  # type: ignore[arg-type]
        except TypeError:
            return reject(f'malformed action header: episode_id={episode_id!r}', stop=True)
        if ep != self._episode_id:
            return reject(f'action of episode {ep}, not the current episode '
                          f'{self._episode_id}: ignored', stop=False)
        if not isinstance(instruction, str) or instruction.strip() != self._instruction:
            return reject(f'action for another instruction ({str(instruction)[:80]!r}, current '
                          f'{self._instruction[:80]!r}): refused', stop=True)
        if frame_id != self.config.frame_id:
            return reject(f'action in frame {str(frame_id)[:80]!r}, expected '
                          f'{self.config.frame_id!r}: refused', stop=True)
        st, why = stamped_time(stamp, t, self.config.max_stamp_ahead)
        if st is None:
            return reject(f'action refused: {why}', stop=True)
        st = float(stamp)  # type: ignore[arg-type]  # the stamp itself orders actions
        if arr is None:
            return reject(f'action rejected: expected 7 numbers, got {delta7!r:.80}', stop=True,
                          limits=('reject_non_finite',))
        if not np.isfinite(req).all():
            names = [_FIELDS7[i] for i in np.flatnonzero(~np.isfinite(req))]
            return reject(f'action rejected: non-finite {", ".join(names)}', stop=True,
                          limits=('reject_non_finite',))
        # Stale inputs that are simply dropped (the newer command stays in force).
        if self._last_stamp is not None and st <= self._last_stamp:
            return reject(f'out-of-order action ignored: stamp {st:.6f} <= last accepted '
                          f'{self._last_stamp:.6f}', stop=False)
        if self._episode_start is not None and st < self._episode_start:
            return reject(f'action computed from a frame taken before episode {ep} began '
                          f'(stamp {st:.6f} < {self._episode_start:.6f}): ignored', stop=False)
        if self._reset_time is not None and st <= self._reset_time:
            return reject(f'action computed before the reset ignored: stamp {st:.6f} <= reset '
                          f'at {self._reset_time:.6f}', stop=False)
        if self._pending is not None:
            return reject(f'step mode: action {self._pending.step} waits for a confirm: '
                          'ignored', stop=False)
        low = self._confidence(token_probs, token_margins)
        if low:
            return reject(low, stop=True, limits=('low_confidence',))
        why = self._wd.check(t, action=False)
        if why:
            return reject(why, stop=True)
        c = self.config
        if c.max_steps and self._step_count >= c.max_steps:
            self._episode_done = True
            self._set_state(SafetyState.DONE, f'step budget of {c.max_steps} actions used')
            return self._decision('action', t, prev, reason=self._reason, requested=req)
        # Accepted.
        self._step_count += 1
        self._last_stamp = st
        self._requested = req
        wait = c.step_every > 0 and self._unconfirmed == 0
        if wait:
            gripper, pending = None, self._gripper.wanted(req[6]) not in (
                None, self._gripper.command)
        else:
            gripper, pending = self._gripper.update(req[6], t)
        still = (gripper is None and not pending
                 and math.hypot(req[0], req[1], req[2]) < c.still_threshold_linear
                 and math.hypot(req[3], req[4], req[5]) < c.still_threshold_angular)
        self._still_count = self._still_count + 1 if still else 0
        if c.still_count and self._still_count >= c.still_count:
            self._episode_done = True
            self._set_state(SafetyState.DONE, f'{self._still_count} consecutive still actions')
            return self._decision('action', t, prev, reason=self._reason, requested=req,
                                  accepted=True)
        try:
            with np.errstate(over='ignore'):  # a huge finite delta becomes inf, then clamped
                v = req[:6] / self._period
            target, limits, _ = run_stages(TARGET_STAGES, v, Context(self._bounds, self._out, 0.0))
            if wait:
                self._pending = _Pending(_frozen(target), limits, req[6], t, self._step_count)
                reason = (f'step mode: action {self._step_count} waits for a confirm (within '
                          f'{c.step_confirm_timeout} s)')
                if self._state is SafetyState.ACTIVE or self._state is SafetyState.IDLE:
                    self._set_state(SafetyState.STOPPED, reason)
                self._reason = reason
                return self._decision('action', t, prev, reason=reason, requested=req,
                                      limits=limits, accepted=True)
            if c.step_every:
                self._unconfirmed = (self._unconfirmed + 1) % c.step_every
            self._held = _frozen(target)
            self._set_state(SafetyState.ACTIVE, 'action accepted')
            self._wd.action = t
            return self._emit('action', t, prev, requested=req, limits=limits,
                              gripper=gripper, accepted=True)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as exc:
            logger.exception('safety: limiting failed')
            self._held = _ZERO6
            return reject(f'limiting failed ({exc}): stopped', stop=True)

    def _confidence(self, probs: object, margins: object) -> str:
        """Return why the action's confidence is too low ('' when it passes or the gate is off)."""
        c = self.config
        p = _vector7(probs)
        if p is not None and np.isfinite(p).all():
            self._min_prob = float(p.min())
        if c.min_mean_token_prob > 0.0:
            if p is None or not np.isfinite(p).all():
                return 'low confidence: token probs missing or not 7 finite numbers'
            with np.errstate(divide='ignore'):
                mean = float(np.exp(np.mean(np.log(np.clip(p, 0.0, 1.0)))))
            if not mean >= c.min_mean_token_prob:
                return (f'low confidence: geometric mean token prob {mean:.3f} < '
                        f'min_mean_token_prob {c.min_mean_token_prob}')
        for values, threshold, what in ((p, c.min_token_prob, 'token prob'),
                                        (_vector7(margins), c.min_token_margin, 'token margin')):
            if threshold <= 0.0:
                continue
            if values is None or not np.isfinite(values).all():
                return f'low confidence: {what}s missing or not 7 finite numbers'
            worst = int(np.argmin(values))
            if values[worst] < threshold:
                return (f'low confidence: {what} {values[worst]:.3f} of {_FIELDS7[worst]} < '
                        f'min_{what.replace(" ", "_")} {threshold}')
        return ''
