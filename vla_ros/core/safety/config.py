"""The safety limiter's settings: one table of every parameter's default, unit, range and doc.

Each field of ``SafetyConfig`` is declared with :func:`_spec`, which stores its unit, valid range
and description in the field's metadata. That one declaration feeds the validation here
(``__post_init__``), the safety node's parameter descriptors (``FloatingPointRange`` /
``IntegerRange``, built from :func:`specs`) and ``config/safety_node.yaml`` (a test keeps the file
equal to :func:`specs`). Distances are in metres, angles in radians, times in seconds, all in
the arm's base frame; 0 switches off the optional checks whose doc says so.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_ros.core.errors import ConfigError

__all__ = ['SafetyConfig', 'Spec', 'specs']


@dataclass(frozen=True)
class Spec:
    """One parameter: name, default, unit ('' = none), range and description.

    ``low``/``high`` are inclusive unless ``low_open``; for 3-vectors they bound every element;
    strings and booleans have no range. ``kind`` is 'float', 'int', 'vec3', 'str' or 'bool'.
    """

    name: str
    default: object
    unit: str
    doc: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def describe(self) -> str:
        """Return the one-line description used for the node's parameter descriptor."""
        unit = f' [{self.unit}]' if self.unit else ''
        if self.low is None or self.high is None:
            return f'{self.doc}{unit}'
        bracket = '(' if self.low_open else '['
        return f'{self.doc}{unit}; valid {bracket}{self.low:g}, {self.high:g}]'


def _spec(default: object, unit: str, doc: str, low: float | None = None,
          high: float | None = None, *, low_open: bool = False) -> Any:  # noqa: ANN401
    """Declare a SafetyConfig field with its unit, range and doc in the metadata."""
    if isinstance(default, bool):
        kind = 'bool'
    elif isinstance(default, int):
        kind = 'int'
    elif isinstance(default, float):
        kind = 'float'
    elif isinstance(default, tuple):
        kind = 'vec3'
    else:
        kind = 'str'
    return field(default=default, metadata={'unit': unit, 'doc': doc, 'kind': kind,
                                            'low': low, 'high': high, 'low_open': low_open})


@dataclass(frozen=True)
class SafetyConfig:
    """Limits, timeouts and checks of the safety limiter; validated on construction.

    Every ``ConfigError`` names the field and its valid range; ``from_dict`` builds one from a
    mapping such as a YAML section (unknown keys are an error).
    """

    action_period: float = _spec(
        0.2, 's', 'Time one policy action is meant to take; twist = limited delta / '
        'action_period', 1e-3, 10.0)
    output_rate_hz: float = _spec(
        50.0, 'Hz', 'Rate at which the node re-publishes the command (at least one tick per '
        'action_period)', 0.1, 1000.0)
    max_delta_xyz: tuple[float, float, float] = _spec(
        (0.03, 0.03, 0.03), 'm', 'Largest |dx|, |dy|, |dz| of one action', 0.0, 1.0,
        low_open=True)
    max_delta_rpy: tuple[float, float, float] = _spec(
        (0.2, 0.2, 0.2), 'rad', 'Largest |droll|, |dpitch|, |dyaw| of one action', 0.0, math.pi,
        low_open=True)
    max_linear_speed: float = _spec(
        0.15, 'm/s', 'Largest norm of the commanded linear velocity', 0.0, 5.0, low_open=True)
    max_angular_speed: float = _spec(
        0.8, 'rad/s', 'Largest norm of the commanded angular velocity', 0.0, 4.0 * math.pi,
        low_open=True)
    max_linear_accel: float = _spec(
        0.5, 'm/s^2', 'Largest change of the commanded linear velocity per second, between any '
        'two consecutive commands while moving (a stop is not rate-limited)', 0.0, 50.0,
        low_open=True)
    max_angular_accel: float = _spec(
        3.0, 'rad/s^2', 'Largest change of the commanded angular velocity per second, between '
        'any two consecutive commands while moving', 0.0, 200.0, low_open=True)
    workspace_min: tuple[float, float, float] = _spec(
        (0.15, -0.45, 0.02), 'm', 'Lower corner of the allowed tool centre point box in the base '
        'frame', -10.0, 10.0)
    workspace_max: tuple[float, float, float] = _spec(
        (0.75, 0.45, 0.75), 'm', 'Upper corner of the allowed tool centre point box in the base '
        'frame', -10.0, 10.0)
    table_height: float = _spec(
        0.0, 'm', 'Height of the table plane (z in the base frame) that the tool centre point and '
        'the contact frames (fingertips) must not enter', -10.0, 10.0)
    table_clearance: float = _spec(
        0.003, 'm', 'The contact frames stay this far above the table plane', 0.0, 0.5)
    joint_position_margin: float = _spec(
        0.05, 'rad', 'Joints stay this far inside their URDF position limits (m for prismatic '
        'joints)', 0.0, 0.5)
    joint_velocity_scale: float = _spec(
        0.5, '', 'Joint speeds stay below this fraction of the URDF velocity limits, at the '
        'current joint state and at the predicted one', 0.0, 1.0, low_open=True)
    singularity_threshold: float = _spec(
        0.01, '', 'Below this smallest singular value of the 6xN Jacobian, motion towards the '
        'singularity is refused; motion away from it is allowed', 0.0, 1.0)
    driver_command_timeout: float = _spec(
        0.25, 's', 'How long the driver keeps executing the last command when no new one arrives '
        "(MoveIt Servo's incoming_command_timeout); the braking stages predict the motion over "
        'the longer of this and action_period, plus the joint state age', 0.0, 10.0,
        low_open=True)
    action_timeout: float = _spec(
        0.5, 's', 'A held action older than this (since it was received) stops the arm (at least '
        'action_period)', 1e-3, 60.0)
    camera_timeout: float = _spec(
        0.5, 's', 'A camera frame older than this (by stamp or receipt, whichever is older) stops '
        'the arm', 0.0, 60.0, low_open=True)
    vla_heartbeat_timeout: float = _spec(
        1.0, 's', 'Silence of the VLA node (no action, no heartbeat) longer than this stops the '
        'arm', 0.0, 600.0, low_open=True)
    joint_state_timeout: float = _spec(
        0.1, 's', 'Joint states older than this (by stamp or receipt, whichever is older) stop '
        'the arm when kinematics is used', 0.0, 60.0, low_open=True)
    max_stamp_ahead: float = _spec(
        0.05, 's', 'An action or joint state stamped further than this ahead of the local clock '
        'is refused (clock skew between hosts)', 0.0, 10.0)
    frame_id: str = _spec(
        'panda_link0', '', 'Frame of the action deltas and of the output twist or pose (the '
        'Servo planning frame); an action in any other frame is refused')
    still_threshold_linear: float = _spec(
        0.001, 'm', 'A requested action with |linear delta| below this is "still" ...', 0.0, 1.0)
    still_threshold_angular: float = _spec(
        0.01, 'rad', '... if also |angular delta| is below this and the gripper does not change',
        0.0, math.pi)
    still_count: int = _spec(
        10, '', 'This many consecutive still actions end the episode (0 disables stop '
        'detection)', 0, 1_000_000)
    max_steps: int = _spec(
        0, '', 'Actions per episode; the next one ends the episode (0 = unlimited)', 0,
        1_000_000_000)
    gripper_close_above: float = _spec(
        0.6, '', 'Gripper closedness above which the gripper closes (hysteresis, at least '
        'gripper_open_below)', 0.0, 1.0)
    gripper_open_below: float = _spec(
        0.4, '', 'Gripper closedness below which the gripper opens (hysteresis)', 0.0, 1.0)
    gripper_min_dwell: float = _spec(
        0.5, 's', 'Shortest time between two gripper command changes', 0.0, 60.0)
    min_token_prob: float = _spec(
        0.0, '', 'An action whose least probable action token is below this is refused with a '
        'controlled stop (low confidence; 0 = off)', 0.0, 1.0)
    min_mean_token_prob: float = _spec(
        0.3, '', 'An action whose 7 action-token probabilities have a geometric mean below this '
        'is refused with a controlled stop (low confidence; 0 = off; chosen for the shipped '
        'checkpoint by bench/bench_confidence.py: re-run it for another one)', 0.0, 1.0)
    min_token_margin: float = _spec(
        0.0, '', 'An action whose smallest token margin (chosen minus runner-up probability) is '
        'below this is refused with a controlled stop (low confidence; 0 = off)', 0.0, 1.0)
    max_contact_force: float = _spec(
        30.0, 'N', 'An external force on the tool (wrench input) rising above this latches a '
        'protective stop, cleared by reset only (0 = off)', 0.0, 10000.0)
    max_external_effort: float = _spec(
        0.0, 'N*m', 'An external joint effort (joint_states.effort) above this latches a '
        'protective stop, cleared by reset only (0 = off; for drivers that publish external '
        'torques there)', 0.0, 10000.0)
    deadman_timeout: float = _spec(
        0.0, 's', 'Operator deadman: without an enable=true heartbeat within this time the arm '
        'stops (0 = off)', 0.0, 60.0)
    step_every: int = _spec(
        0, '', 'Step mode: every Nth action of an episode waits for an operator confirm before '
        'it moves (1 = each action, 0 = off)', 0, 1_000_000)
    step_confirm_timeout: float = _spec(
        10.0, 's', 'Step mode: without a confirm within this time the waiting action is dropped '
        'and the arm stays stopped', 0.0, 3600.0, low_open=True)

    def __post_init__(self) -> None:
        """Coerce numbers to float/int tuples and check every field's range."""
        for spec in specs():
            value = getattr(self, spec.name)
            if spec.kind == 'vec3':
                value = _as_tuple3(spec.name, value)
                for i, v in enumerate(value):
                    _check(f'{spec.name}[{i}]', v, spec)
            elif spec.kind == 'int':
                value = _as_int(spec.name, value)
                _check(spec.name, value, spec)
            elif spec.kind == 'float':
                value = _as_float(spec.name, value)
                _check(spec.name, value, spec)
            elif not isinstance(value, str) or not value.strip():
                raise ConfigError(f'{spec.name} must be a non-empty string, got {value!r}')
            else:
                value = value.strip()
            object.__setattr__(self, spec.name, value)
        # Rules between fields.
        _above('output_rate_hz', self.output_rate_hz, 1.0 / self.action_period,
               '(at least one tick per action_period)')
        _above('action_timeout', self.action_timeout, self.action_period,
               '(at least action_period)')
        for i in range(3):
            if not self.workspace_max[i] > self.workspace_min[i]:
                raise ConfigError(f'workspace_max[{i}]={self.workspace_max[i]!r} must be above '
                                  f'workspace_min[{i}]={self.workspace_min[i]!r}')
        _above('gripper_close_above', self.gripper_close_above, self.gripper_open_below,
               '(at least gripper_open_below)')

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


def specs() -> tuple[Spec, ...]:
    """Return the parameter table: one ``Spec`` per ``SafetyConfig`` field, in field order."""
    return _SPECS


def _make_specs() -> tuple[Spec, ...]:
    out = []
    for f in dataclasses.fields(SafetyConfig):
        m = f.metadata
        out.append(Spec(f.name, f.default, m['unit'], m['doc'], m['kind'], m['low'], m['high'],
                        m['low_open']))
    return tuple(out)


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


def _check(name: str, value: float, spec: Spec) -> None:
    lo, hi = spec.low, spec.high
    if lo is None or hi is None:
        return
    ok = (value > lo if spec.low_open else value >= lo) and value <= hi
    if not ok:
        bracket = '(' if spec.low_open else '['
        raise ConfigError(f'{name}={value!r} is out of range: valid {bracket}{lo:g}, {hi:g}]')


def _above(name: str, value: float, low: float, hint: str) -> None:
    if not value >= low:
        raise ConfigError(f'{name}={value!r} is out of range: at least {low:g} {hint}')


_SPECS = _make_specs()
