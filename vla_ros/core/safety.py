"""The safety limiter: a pure, fail-safe state machine between the policy's actions and the arm.

``SafetyLimiter`` turns each 7D policy action (dx dy dz [m], droll dpitch dyaw [rad], gripper) into
the base-frame twist the arm may execute, and decides when it must not move at all. It owns no
clock: every input carries its time ``now`` (float seconds; one monotonic clock for all calls,
which action and camera stamps share), so tests control time. Limits apply in a fixed order and
each one that acts is named in ``Decision.limits_applied``: reject non-finite input, per-axis
clamp, Cartesian speed, Cartesian acceleration between consecutive actions, workspace box (FK at
the latest joint state plus the motion over the prediction horizon; outside the box only motion
straight back), joint position margins and joint velocity bounds (pseudo-inverse of the URDF
Jacobian; the twist is scaled uniformly, the most restrictive joint wins; near a singularity only
motion away from it). The last two stages only shrink motion, may brake harder than the
acceleration bound, and are re-applied on every ``tick`` against the newest joint state. Stale
actions, camera frames or joint states and a silent VLA node stop the arm; an e-stop latches and
a reset never resumes motion by itself; stop detection and a step budget end the episode. Bad
input never raises: it yields a zero twist and a reason.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vla_ros.core.errors import ConfigError

if TYPE_CHECKING:  # keeps pinocchio out of a kinematics-free import
    from vla_ros.core.kinematics import ArmKinematics

__all__ = ['AXES', 'Decision', 'SafetyConfig', 'SafetyLimiter', 'SafetyState']

logger = logging.getLogger(__name__)

#: Names of the six Cartesian components of a delta or twist, used in ``limits_applied``.
AXES = ('x', 'y', 'z', 'roll', 'pitch', 'yaw')
_FIELDS7 = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')

#: Tolerance for clock jitter between callbacks: a ``now`` up to this much older than the newest
#: one seen is treated as the newest; further back is a clock jump and stops the arm.
CLOCK_JITTER_S = 1e-3

#: Smallest singular value, relative to the largest, below which the Jacobian counts as singular.
SINGULAR_EPS = 1e-9
#: Joint-space step [rad] used to probe whether a motion approaches a singularity.
SINGULAR_PROBE_RAD = 1e-4

#: ``Decision.applied_delta[6]`` before any gripper command was issued.
GRIPPER_UNKNOWN = -1.0


class SafetyState(enum.IntEnum):
    """Limiter states, numbered as the ``STATE_*`` constants of ``msg/SafetyStatus.msg``."""

    IDLE = 0  #: no instruction, or no action yet in this episode: zero output
    ACTIVE = 1  #: passing limited actions
    STOPPED = 2  #: controlled stop (watchdog, rejected input, after reset): until a fresh action
    DONE = 3  #: episode finished (stop detection or step budget) until a new instruction
    ESTOP = 4  #: latched emergency stop: zero output until ``reset``


# ------------------------------------------------------------------------------ configuration
_TUPLE3 = ('max_delta_xyz', 'max_delta_rpy', 'workspace_min', 'workspace_max')
_INTS = ('still_count', 'max_steps', 'gripper_debounce')


@dataclass(frozen=True)
class SafetyConfig:
    """Limits and timeouts of the safety limiter; validated on construction.

    Every ``ConfigError`` names the field and its valid range. Distances are in metres, angles in
    radians, times in seconds, all in the arm's base frame. ``config/*.yaml`` mirrors these
    defaults; ``from_dict`` builds one from such a mapping.
    """

    #: Time one policy action is meant to take [s]; twist = limited delta / action_period.
    action_period: float = 0.2
    #: Rate at which the node calls ``tick`` and re-publishes the twist [Hz].
    output_rate_hz: float = 50.0
    #: Largest |dx|, |dy|, |dz| of one action [m].
    max_delta_xyz: tuple[float, float, float] = (0.03, 0.03, 0.03)
    #: Largest |droll|, |dpitch|, |dyaw| of one action [rad].
    max_delta_rpy: tuple[float, float, float] = (0.2, 0.2, 0.2)
    #: Largest norm of the commanded linear velocity [m/s].
    max_linear_speed: float = 0.15
    #: Largest norm of the commanded angular velocity [rad/s].
    max_angular_speed: float = 0.8
    #: Largest change of the linear velocity between consecutive actions, per second [m/s^2].
    max_linear_accel: float = 0.5
    #: Largest change of the angular velocity between consecutive actions, per second [rad/s^2].
    max_angular_accel: float = 3.0
    #: Lower corner of the allowed end-effector box in the base frame [m].
    workspace_min: tuple[float, float, float] = (0.15, -0.45, 0.02)
    #: Upper corner of the allowed end-effector box in the base frame [m].
    workspace_max: tuple[float, float, float] = (0.75, 0.45, 0.75)
    #: Joints stay this far inside their URDF position limits [rad or m].
    joint_position_margin: float = 0.05
    #: Joint speeds stay below this fraction of the URDF velocity limits.
    joint_velocity_scale: float = 0.5
    #: Below this smallest singular value of the 6xN Jacobian, motion towards the singularity
    #: (a smaller value after the step) is refused; motion away from it is allowed.
    singularity_threshold: float = 0.01
    #: A held action older than this (since it was received) stops the arm [s].
    action_timeout: float = 0.5
    #: A camera frame older than this (by stamp or receipt, whichever is older) stops the arm [s].
    camera_timeout: float = 0.5
    #: Silence of the VLA node (no action, no heartbeat) longer than this stops the arm [s].
    vla_heartbeat_timeout: float = 1.0
    #: Joint states older than this stop the arm when kinematics is used [s].
    joint_state_timeout: float = 0.1
    #: A requested action with |linear delta| below this is "still" [m] ...
    still_threshold_linear: float = 0.001
    #: ... if also |angular delta| is below this [rad] and the gripper does not change.
    still_threshold_angular: float = 0.01
    #: This many consecutive still actions end the episode (0 disables stop detection).
    still_count: int = 10
    #: Actions per episode; the next one ends the episode (0 = unlimited).
    max_steps: int = 0
    #: Gripper closedness above which the gripper closes (hysteresis upper threshold).
    gripper_close_above: float = 0.6
    #: Gripper closedness below which the gripper opens (hysteresis lower threshold).
    gripper_open_below: float = 0.4
    #: Consecutive actions that must agree before the gripper command changes (1 = at once).
    gripper_debounce: int = 2

    def __post_init__(self) -> None:
        """Coerce numbers to float/int tuples and check every field's range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _TUPLE3:
                object.__setattr__(self, f.name, _as_tuple3(f.name, value))
            elif f.name in _INTS:
                object.__setattr__(self, f.name, _as_int(f.name, value))
            else:
                object.__setattr__(self, f.name, _as_float(f.name, value))
        _check('action_period', self.action_period, 1e-3, 10.0)
        _check('output_rate_hz', self.output_rate_hz, 1.0 / self.action_period, 1000.0,
               hint='(at least one tick per action_period)')
        for i, v in enumerate(self.max_delta_xyz):
            _check(f'max_delta_xyz[{i}]', v, 0.0, 1.0, lo_open=True)
        for i, v in enumerate(self.max_delta_rpy):
            _check(f'max_delta_rpy[{i}]', v, 0.0, math.pi, lo_open=True)
        _check('max_linear_speed', self.max_linear_speed, 0.0, 5.0, lo_open=True)
        _check('max_angular_speed', self.max_angular_speed, 0.0, 4.0 * math.pi, lo_open=True)
        _check('max_linear_accel', self.max_linear_accel, 0.0, 50.0, lo_open=True)
        _check('max_angular_accel', self.max_angular_accel, 0.0, 200.0, lo_open=True)
        for i in range(3):
            _check(f'workspace_min[{i}]', self.workspace_min[i], -10.0, 10.0)
            _check(f'workspace_max[{i}]', self.workspace_max[i], self.workspace_min[i], 10.0,
                   lo_open=True, hint='(above workspace_min)')
        _check('joint_position_margin', self.joint_position_margin, 0.0, 0.5)
        _check('joint_velocity_scale', self.joint_velocity_scale, 0.0, 1.0, lo_open=True)
        _check('singularity_threshold', self.singularity_threshold, 0.0, 1.0)
        _check('action_timeout', self.action_timeout, self.action_period, 60.0,
               hint='(at least action_period)')
        _check('camera_timeout', self.camera_timeout, 0.0, 60.0, lo_open=True)
        _check('vla_heartbeat_timeout', self.vla_heartbeat_timeout, 0.0, 600.0, lo_open=True)
        _check('joint_state_timeout', self.joint_state_timeout, 0.0, 60.0, lo_open=True)
        _check('still_threshold_linear', self.still_threshold_linear, 0.0, 1.0)
        _check('still_threshold_angular', self.still_threshold_angular, 0.0, math.pi)
        _check('still_count', self.still_count, 0, 1_000_000)
        _check('max_steps', self.max_steps, 0, 1_000_000_000)
        _check('gripper_open_below', self.gripper_open_below, 0.0, 1.0)
        _check('gripper_close_above', self.gripper_close_above, self.gripper_open_below, 1.0,
               hint='(at least gripper_open_below)')
        _check('gripper_debounce', self.gripper_debounce, 1, 1000)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SafetyConfig:
        """Build from a mapping (a YAML section); unknown keys are a ``ConfigError``.

        Raises:
            ConfigError: ``d`` is not a mapping, has unknown keys (listed with the valid ones),
                or a value is of the wrong type or out of range.

        """
        if not isinstance(d, Mapping):
            raise ConfigError(f'safety config must be a mapping, got {type(d).__name__}')
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise ConfigError(f'unknown safety config keys {unknown}; valid keys: {names}')
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as plain Python values (tuples as lists), e.g. for YAML."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f'{name} must be a number, got {value!r}')
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f'{name} must be finite, got {value!r}')
    return out


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f'{name} must be an integer, got {value!r}')
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f'{name} must be an integer, got {value!r}') from None


def _as_tuple3(name: str, value: object) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ConfigError(f'{name} must be a list of 3 numbers, got {value!r}')
    if len(value) != 3:
        raise ConfigError(f'{name} must be a list of 3 numbers, got {len(value)}: {value!r}')
    x, y, z = (_as_float(f'{name}[{i}]', v) for i, v in enumerate(value))
    return (x, y, z)


def _check(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False,
           hint: str = '') -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = '(' if lo_open else '['
        raise ConfigError(
            f'{name}={value!r} is out of range: valid {bracket}{lo:g}, {hi:g}] {hint}'.rstrip())


# ------------------------------------------------------------------------------ decision
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
        limits_applied: names of the limits that changed this action, in pipeline order
            (``'per_axis_clamp:x'``, ``'speed:linear'``, ``'workspace:z_max'``, ...).
        reason: why the output is what it is ('' when passed unchanged).
        transition: whether this input changed the state.
        episode_id: episode of the latest accepted action (-1 before any).
        step_count: accepted actions in this episode.
        still_count: consecutive still actions so far.
        accepted: whether this input was an action that was accepted (limited and executed).
        event: which input produced it ('action', 'tick', 'instruction', 'estop', ...).
        time: the ``now`` of the input [s].

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


# ------------------------------------------------------------------------------ limiter
class SafetyLimiter:
    """The safety state machine; see the module docstring for the rules.

    Without ``kinematics`` the workspace and joint stages are skipped (no pose is known) and
    joint states are not required; with it, a fresh, valid joint state is required to move.
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
        self._period = c.action_period
        self._max_delta = np.array(c.max_delta_xyz + c.max_delta_rpy)
        self._ws_lo = list(c.workspace_min)
        self._ws_hi = list(c.workspace_max)
        self._dv_lin = c.max_linear_accel * c.action_period
        self._dv_ang = c.max_angular_accel * c.action_period
        if kinematics is not None:
            self._q_lo = kinematics.lower + c.joint_position_margin
            self._q_hi = kinematics.upper - c.joint_position_margin
            narrow = [n for n, lo, hi in zip(kinematics.joint_names, self._q_lo, self._q_hi,
                                              strict=True) if not lo < hi]
            if narrow:
                raise ConfigError(
                    f'joint_position_margin={c.joint_position_margin} leaves no range for joints '
                    f'{narrow}')
            self._qd_max_l = (c.joint_velocity_scale * kinematics.velocity_limits).tolist()
            self._q_lo_l = self._q_lo.tolist()
            self._q_hi_l = self._q_hi.tolist()
            self._joint_names = list(kinematics.joint_names)
        self._state = SafetyState.IDLE
        self._reason = 'no instruction'
        self._instruction: str | None = None
        self._episode_done = False
        self._last_now = -math.inf
        self._estop_reason = ''
        self._reset_time: float | None = None
        self._last_episode = -1
        self._episode_floor = 0
        self._last_stamp: float | None = None
        self._step_count = 0
        self._still_count = 0
        # inputs: receipt times (None = never / invalidated)
        self._action_time: float | None = None
        self._camera_time: float | None = None
        self._heartbeat_time: float | None = None
        self._q: np.ndarray | None = None
        self._q_time: float | None = None
        # commands
        self._held = _ZERO6  # twist of the current action after stages 1-3 (read-only)
        self._out = _ZERO6  # the twist last commanded (read-only, shared by decisions)
        self._applied: tuple[np.ndarray, float | None, np.ndarray] | None = None
        # kinematics of the latest joint state: (q object, ee position, q as list, svd of J)
        self._kin_cache: tuple[np.ndarray, list[float], list[float], np.ndarray, np.ndarray,
                               np.ndarray] | None = None
        self._requested = _frozen(np.full(7, math.nan))
        self._grip: float | None = None
        self._grip_pending: float | None = None
        self._grip_count = 0

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

    def ages(self, now: float) -> dict[str, float]:
        """Return ages [s] of the newest action, camera frame and joint state (-1 = never)."""
        def age(t: float | None) -> float:
            """Return the age of an input received at ``t``."""
            return -1.0 if t is None else max(0.0, now - t)
        return {'action': age(self._action_time), 'camera': age(self._camera_time),
                'joint_state': age(self._q_time), 'vla': age(self._heartbeat_time)}

    # ------------------------------------------------------------------ helpers
    def _decision(self, event: str, now: float, prev: SafetyState, *, reason: str = '',
                  requested: np.ndarray | None = None, limits: Sequence[str] = (),
                  gripper: float | None = None, accepted: bool = False) -> Decision:
        if self._state is not SafetyState.ACTIVE:
            self._out = _ZERO6
        twist = self._out
        cached = self._applied
        if cached is None or cached[0] is not twist or cached[1] != self._grip:
            applied = np.empty(7)
            applied[:6] = twist * self._period
            applied[6] = GRIPPER_UNKNOWN if self._grip is None else self._grip
            cached = self._applied = (twist, self._grip, _frozen(applied))
        return Decision(
            state=self._state, twist=twist, applied_delta=cached[2],
            requested=self._requested if requested is None else requested, gripper=gripper,
            limits_applied=tuple(limits), reason=reason, transition=self._state is not prev,
            episode_id=self._last_episode, step_count=self._step_count,
            still_count=self._still_count, accepted=accepted, event=event, time=now)

    def _set_state(self, state: SafetyState, reason: str) -> None:
        if state is not self._state:
            logger.info('safety %s -> %s: %s', self._state.name, state.name, reason)
            self._reason = reason
        self._state = state
        if state is not SafetyState.ACTIVE:
            self._out = _ZERO6
            self._held = _ZERO6
            self._action_time = None

    def _stop(self, reason: str) -> None:
        """Controlled stop: ACTIVE -> STOPPED; other states keep their zero output."""
        if self._state is SafetyState.ACTIVE:
            self._set_state(SafetyState.STOPPED, reason)

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
            self._camera_time = self._heartbeat_time = self._q_time = None
            self._q = None
            self._last_stamp = None
            self._reset_time = t
            self._last_now = t
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

    def _watchdog(self, now: float, *, action: bool) -> str:
        """Return why the arm must stop now ('' when every input is fresh)."""
        c = self.config
        if action and self._action_time is not None:
            age = now - self._action_time
            if age > c.action_timeout:
                return f'action stale: age {age:.3f} s > action_timeout {c.action_timeout} s'
        if self._camera_time is None:
            return 'no camera frame received'
        age = now - self._camera_time
        if age > c.camera_timeout:
            return f'camera stale: frame age {age:.3f} s > camera_timeout {c.camera_timeout} s'
        if self._heartbeat_time is None:
            return 'VLA node silent: no heartbeat or action received'
        age = now - self._heartbeat_time
        if age > c.vla_heartbeat_timeout:
            return (f'VLA node silent for {age:.3f} s > vla_heartbeat_timeout '
                    f'{c.vla_heartbeat_timeout} s')
        if self.kinematics is not None:
            if self._q is None or self._q_time is None:
                return 'no valid joint state'
            age = now - self._q_time
            if age > c.joint_state_timeout:
                return (f'joint state stale: age {age:.3f} s > joint_state_timeout '
                        f'{c.joint_state_timeout} s')
        return ''

    # ------------------------------------------------------------------ inputs
    def on_instruction(self, text: object, now: float) -> Decision:
        """Start a new episode with ``text`` (empty or not a string: no episode, IDLE).

        The arm stops (zero output) until the first action of the new episode; counters, the
        still detector and the gripper debounce are reset. In ESTOP the latch stays; the new
        instruction takes effect after ``reset``.
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('instruction', now, prev, bad)
        text = text.strip() if isinstance(text, str) else ''
        self._instruction = text or None
        self._episode_floor = self._last_episode + 1
        self._last_stamp = None
        self._step_count = 0
        self._still_count = 0
        self._grip_pending = None
        self._grip_count = 0
        self._episode_done = False
        if self._instruction is None:
            reason = 'empty instruction: no episode'
        else:
            reason = f'new instruction {self._instruction!r}: waiting for its first action'
        if self._state is SafetyState.ESTOP:
            return self._decision('instruction', t, prev,
                                  reason=f'{reason}; estop still latched ({self._estop_reason})')
        self._set_state(SafetyState.IDLE, reason)
        self._reason = reason  # also when already IDLE: the status must say an episode waits
        return self._decision('instruction', t, prev, reason=reason)

    def estop(self, now: float, reason: str = '') -> Decision:
        """Latch the emergency stop: zero output until ``reset`` (a repeat keeps the first)."""
        prev = self._state
        t, _ = self._clock(now)
        t = math.nan if t is None else t
        if self._state is not SafetyState.ESTOP:
            self._estop_reason = reason or 'estop requested'
            self._set_state(SafetyState.ESTOP, f'estop: {self._estop_reason}')
            logger.warning('safety: estop latched: %s', self._estop_reason)
        return self._decision('estop', t, prev, reason=f'estop latched: {self._estop_reason}')

    def reset(self, now: float) -> Decision:
        """Clear a latched e-stop; never resumes motion by itself.

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
        if self._instruction is None:
            self._set_state(SafetyState.IDLE, 'reset: no instruction')
        elif self._episode_done:
            self._set_state(SafetyState.DONE, 'reset: episode already done')
        else:
            self._set_state(SafetyState.STOPPED, 'reset: waiting for an action newer than the '
                            'reset')
        return self._decision('reset', t, prev, reason=self._reason)

    def on_camera_frame(self, stamp: float, now: float) -> Decision:
        """Record a camera frame; its age counts from ``min(stamp, now)``."""
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('camera', now, prev, bad)
        try:
            s = float(stamp)
        except (TypeError, ValueError):
            s = math.nan
        if not math.isfinite(s):
            return self._decision('camera', t, prev, reason=f'camera frame ignored: bad stamp '
                                  f'{stamp!r}')
        self._camera_time = min(s, t)
        return self._decision('camera', t, prev)

    def on_vla_heartbeat(self, now: float) -> Decision:
        """Record a sign of life of the VLA node (every action counts as one too)."""
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('heartbeat', now, prev, bad)
        self._heartbeat_time = t
        return self._decision('heartbeat', t, prev)

    def on_joint_state(self, q: object, now: float) -> Decision:
        """Record joint positions in model order (see ``ArmKinematics.order_joint_state``).

        A malformed or non-finite joint state is ignored with a reason and invalidates the
        previous one, so that with kinematics an ACTIVE arm stops at once.
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('joint_state', now, prev, bad)
        try:
            arr = np.array(q, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            arr = np.full(1, math.nan)
        n = self.kinematics.n_joints if self.kinematics is not None else arr.size
        if arr.size != n or not np.isfinite(arr).all():
            reason = f'invalid joint state ignored: {arr.size} values, expected {n} finite'
            self._q = None
            self._q_time = None
            if self.kinematics is not None:
                self._stop(reason)
            return self._decision('joint_state', t, prev, reason=reason)
        self._q = _frozen(arr)
        self._q_time = t
        return self._decision('joint_state', t, prev)

    def tick(self, now: float) -> Decision:
        """Re-publish the held twist at the output rate, or stop if any input is stale.

        While ACTIVE the held twist (after per-axis, speed and acceleration limits) is limited
        again against the newest joint state (workspace, joint margins and speeds).
        """
        prev = self._state
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('tick', now, prev, bad)
        if self._state is not SafetyState.ACTIVE:
            return self._decision('tick', t, prev, reason=self._idle_reason())
        why = self._watchdog(t, action=True)
        if why:
            self._stop(why)
            return self._decision('tick', t, prev, reason=why)
        twist, limits, reason = self._kinematic_limits(self._held.copy(), t)
        self._out = _frozen(twist)
        return self._decision('tick', t, prev, reason=reason, limits=limits)

    def _idle_reason(self) -> str:
        if self._state is SafetyState.ESTOP:
            return f'estop latched: {self._estop_reason}'
        return self._reason

    def on_action(self, delta7: object, gripper_closedness: object, episode_id: object,
                  stamp: object, now: float) -> Decision:
        """Limit one policy action and return the command; never raises.

        Args:
            delta7: dx dy dz [m], droll dpitch dyaw [rad] and the checkpoint's gripper value
                (ignored here: the gripper enters through ``gripper_closedness``).
            gripper_closedness: 0 = open .. 1 = closed, already converted from the checkpoint's
                convention.
            episode_id: the episode the action was computed for.
            stamp: stamp of the camera frame it was computed from [s, same clock as ``now``].
            now: time of receipt [s].

        """
        prev = self._state
        req = np.full(7, math.nan)
        try:
            arr = np.asarray(delta7, dtype=float).reshape(-1)
            shape_ok = arr.size == 7
            if shape_ok:
                req[:6] = arr[:6]
        except (TypeError, ValueError, OverflowError):
            shape_ok = False
        try:
            req[6] = float(gripper_closedness)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            req[6] = math.nan
        _frozen(req)
        t, bad = self._clock(now)
        if t is None:
            return self._bad_clock('action', now, prev, bad, requested=req)
        self._heartbeat_time = t  # any action proves the VLA node alive

        def reject(reason: str, *, stop: bool, limits: Sequence[str] = ()) -> Decision:
            """Refuse this action; with ``stop`` also stop the arm (bad input, stale inputs)."""
            if stop:  # a refused action also turns an armed IDLE into a visible STOPPED
                if self._state is SafetyState.IDLE:
                    self._set_state(SafetyState.STOPPED, reason)
                self._stop(reason)
                self._still_count = 0
            return self._decision('action', t, prev, reason=reason, requested=req, limits=limits)

        if self._state is SafetyState.ESTOP:
            return reject(f'estop latched: {self._estop_reason}', stop=False)
        if self._instruction is None:
            return reject('no instruction: action ignored', stop=False)
        if self._state is SafetyState.DONE:
            return reject(f'episode done ({self._reason}): waiting for a new instruction',
                          stop=False)
        try:
            ep = operator.index(episode_id)  # type: ignore[arg-type]
            st = float(stamp)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return reject(f'malformed action header: episode_id={episode_id!r} '
                          f'stamp={stamp!r}', stop=True)
        if not math.isfinite(st) or ep < 0:
            return reject(f'malformed action header: episode_id={ep} stamp={st}', stop=True)
        if not shape_ok:
            return reject(f'action rejected: expected 7 numbers, got {delta7!r:.80}', stop=True,
                          limits=('reject_non_finite',))
        if not np.isfinite(req).all():
            names = [_FIELDS7[i] for i in np.flatnonzero(~np.isfinite(req))]
            return reject(f'action rejected: non-finite {", ".join(names)}', stop=True,
                          limits=('reject_non_finite',))
        # Stale inputs that are simply dropped (the newer command stays in force).
        if ep < self._episode_floor:
            return reject(f'action of an earlier episode ({ep} < {self._episode_floor}) '
                          'ignored', stop=False)
        if self._last_stamp is not None and st <= self._last_stamp:
            return reject(f'out-of-order action ignored: stamp {st:.6f} <= last accepted '
                          f'{self._last_stamp:.6f}', stop=False)
        if self._reset_time is not None and st <= self._reset_time:
            return reject(f'action computed before the reset ignored: stamp {st:.6f} <= reset '
                          f'at {self._reset_time:.6f}', stop=False)
        why = self._watchdog(t, action=False)
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
        self._last_episode = max(self._last_episode, ep)
        self._requested = req
        gripper, pending = self._gripper(req[6])
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
            twist, limits, reason = self._limit(req[:6].copy(), t)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as exc:
            logger.exception('safety: limiting failed')
            return reject(f'limiting failed ({exc}): stopped', stop=True)
        self._set_state(SafetyState.ACTIVE, 'action accepted')
        self._out = _frozen(twist)
        self._action_time = t
        return self._decision('action', t, prev, reason=reason, requested=req, limits=limits,
                              gripper=gripper, accepted=True)

    def _gripper(self, closedness: float) -> tuple[float | None, bool]:
        """Apply hysteresis and debounce; return (new command or None, change pending)."""
        c = self.config
        if closedness > c.gripper_close_above:
            want: float | None = 1.0
        elif closedness < c.gripper_open_below:
            want = 0.0
        else:
            want = None  # inside the hysteresis band: keep
        if want is None or want == self._grip:
            self._grip_pending = None
            self._grip_count = 0
            return None, False
        if want == self._grip_pending:
            self._grip_count += 1
        else:
            self._grip_pending = want
            self._grip_count = 1
        if self._grip_count >= c.gripper_debounce:
            self._grip = want
            self._grip_pending = None
            self._grip_count = 0
            return want, False
        return None, True

    # ------------------------------------------------------------------ the limit pipeline
    def _limit(self, delta: np.ndarray, now: float) -> tuple[np.ndarray, list[str], str]:
        """Stages 2-5 on a finite 6D delta; return (twist, limits applied, reason)."""
        limits: list[str] = []
        # 2. per-axis clamp
        over = np.abs(delta) > self._max_delta
        if over.any():
            limits.extend(f'per_axis_clamp:{AXES[i]}' for i in np.flatnonzero(over))
            np.clip(delta, -self._max_delta, self._max_delta, out=delta)
        v = delta / self._period
        # 3a. Cartesian speed: uniform scaling of the linear and the angular part
        c = self.config
        for sl, vmax, name in ((slice(0, 3), c.max_linear_speed, 'linear'),
                               (slice(3, 6), c.max_angular_speed, 'angular')):
            speed = math.sqrt(float(v[sl] @ v[sl]))
            if speed > vmax:
                v[sl] *= vmax / speed
                limits.append(f'speed:{name}')
        # 3b. acceleration: |v - v_prev| <= a_max * action_period, v_prev = last commanded twist
        prev = self._out
        for sl, dv_max, name in ((slice(0, 3), self._dv_lin, 'linear'),
                                 (slice(3, 6), self._dv_ang, 'angular')):
            dv = v[sl] - prev[sl]
            n = math.sqrt(float(dv @ dv))
            if n > dv_max:
                v[sl] = prev[sl] + dv * (dv_max / n)
                limits.append(f'accel:{name}')
        self._held = _frozen(v.copy())
        v, more, reason = self._kinematic_limits(v, now)
        limits.extend(more)
        if not reason and limits:
            reason = 'limited: ' + ', '.join(limits)
        return v, limits, reason

    def _kinematic_limits(self, v: np.ndarray, now: float
                          ) -> tuple[np.ndarray, list[str], str]:
        """Stages 4-5 (workspace, joints) against the newest joint state; only shrink ``v``."""
        kin = self.kinematics
        if kin is None:
            return v, [], ''
        if self._q is None or self._q_time is None:  # unreachable past the watchdog; fail safe
            return np.zeros(6), ['joint:no_state'], 'no valid joint state'
        limits: list[str] = []
        reason = ''
        q = self._q
        # The twist may be held for one action period after now; the joint state is older by
        # (now - q_time) and the arm may have moved meanwhile: predict over both.
        horizon = self._period + max(0.0, now - self._q_time)
        cache = self._kin_cache
        if cache is None or cache[0] is not q:
            pos, _, jac = kin.fk_and_jacobian(q)
            u, s, vt = np.linalg.svd(jac, full_matrices=False)
            cache = self._kin_cache = (q, pos.tolist(), q.tolist(), u, s, vt)
        _, pos, ql, u, s, vt = cache
        # 4. workspace box, per axis on Python floats (3 values: cheaper than numpy calls)
        outside = [not lo <= p <= hi for p, lo, hi in zip(pos, self._ws_lo, self._ws_hi,
                                                           strict=True)]
        any_outside = any(outside)
        if any_outside:
            # Outside the box only motion back towards it is allowed: the inward components
            # along the axes where it is outside; no sliding along the box and no rotation,
            # whose second-order effects could carry the arm further out.
            limits.append('workspace:outside')
            v[3:] = 0.0
        for i in range(3):
            if any_outside and not outside[i]:
                v[i] = 0.0
                continue
            d = float(v[i]) * horizon
            room_hi = max(0.0, self._ws_hi[i] - pos[i])
            room_lo = min(0.0, self._ws_lo[i] - pos[i])
            if d > room_hi:
                limits.append(f'workspace:{AXES[i]}_max')
                v[i] = room_hi / horizon
            elif d < room_lo:
                limits.append(f'workspace:{AXES[i]}_min')
                v[i] = room_lo / horizon
        if not v.any():
            if any_outside:
                reason = 'outside the workspace: only motion back towards it is allowed'
            else:
                reason = 'workspace: no motion allowed' if limits else ''
            return v, limits, reason
        # 5. joint position margins and velocity bounds through the pseudo-inverse
        s_min = float(s[-1])
        if not s_min > SINGULAR_EPS * float(s[0]):
            limits.append('joint:singular')
            return np.zeros(6), limits, (f'at a singularity (smallest singular value '
                                         f'{s_min:.2e}): no motion allowed')
        qd = vt.T @ ((u.T @ v) / s)
        if not np.isfinite(qd).all():
            limits.append('joint:singular')
            return np.zeros(6), limits, 'joint velocities not finite'
        if s_min < self.config.singularity_threshold:
            # Near a singularity only motion that does not bring the arm closer is allowed:
            # compare the smallest singular value after a small step along qd.
            step = SINGULAR_PROBE_RAD / math.sqrt(float(qd @ qd))
            s_next = np.linalg.svd(kin.jacobian(q + qd * step), compute_uv=False)[-1]
            if s_next < s_min:
                limits.append('joint:singular')
                return np.zeros(6), limits, (
                    f'motion towards a singularity (smallest singular value {s_min:.2e} < '
                    f'{self.config.singularity_threshold}): not allowed')
        # Uniform scale so that every joint keeps within its velocity bound and, over the
        # horizon, within its margin; a joint already past its margin may only move away.
        scale = 1.0
        blocked = ''
        names = self._joint_names
        for i, w in enumerate(qd.tolist()):
            if w == 0.0:
                continue
            speed = abs(w)
            room = self._q_hi_l[i] - ql[i] if w > 0.0 else ql[i] - self._q_lo_l[i]
            room = max(room, 0.0)
            travel = speed * horizon
            if travel > room:
                limits.append(f'joint_margin:{names[i]}')
                f = room / travel
                if f < scale:
                    scale = f
                    blocked = names[i] if f <= 0.0 else blocked
            if speed > self._qd_max_l[i]:
                limits.append(f'joint_velocity:{names[i]}')
                scale = min(scale, self._qd_max_l[i] / speed)
        if scale < 1.0:
            if scale <= 0.0:
                return np.zeros(6), limits, (f'joint {blocked} at its position margin: no '
                                             'motion allowed')
            v = v * scale
        return v, limits, reason
