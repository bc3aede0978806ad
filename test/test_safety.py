"""Example-based tests of SafetyConfig and SafetyLimiter: one test per rule and branch.

Times and limits are binary-exact numbers (periods of 0.25 s, timeouts of 0.5 s ...) so that the
watchdog tests can check "stops exactly when age > timeout, not before".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_ros.core.errors import ConfigError
from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.core.safety import (
    GRIPPER_UNKNOWN,
    Decision,
    SafetyConfig,
    SafetyLimiter,
    SafetyState,
)
from vla_ros.core.safety.stages import (
    LINEARIZATION_MARGIN_M as M_M,
)
from vla_ros.core.safety.stages import (
    LINEARIZATION_MARGIN_RAD as M_RAD,
)
from vla_ros.core.safety.stages import (
    brake_speed,
    scale_rate,
)

T = 0.25  # action period of the test configs: twist = 4 * delta, exactly

# A config where only the rule under test binds; tests override the fields they exercise.
LOOSE = dict(
    action_period=T, output_rate_hz=40.0,
    max_delta_xyz=(1.0, 1.0, 1.0), max_delta_rpy=(3.0, 3.0, 3.0),
    max_linear_speed=5.0, max_angular_speed=12.0, max_linear_accel=50.0, max_angular_accel=200.0,
    workspace_min=(-10.0, -10.0, -10.0), workspace_max=(10.0, 10.0, 10.0),
    joint_position_margin=0.0, joint_velocity_scale=1.0, singularity_threshold=0.0,
    driver_command_timeout=T, action_timeout=0.5, camera_timeout=0.25, vla_heartbeat_timeout=1.0,
    joint_state_timeout=0.125,
    still_threshold_linear=0.001, still_threshold_angular=0.01, still_count=0, max_steps=0,
    gripper_close_above=0.6, gripper_open_below=0.4, gripper_min_dwell=0.0, min_token_prob=0.0,
    min_mean_token_prob=0.0,
)


@pytest.fixture(scope='module')
def kin() -> ArmKinematics:
    return ArmKinematics.from_urdf_file(default_urdf_path())


class Rig:
    """A limiter plus a clock; ``act`` feeds fresh camera/joint inputs, then one action."""

    def __init__(self, kin: ArmKinematics | None = None, q: np.ndarray | None = None,
                 instruction: str | None = 'pick up the bowl', **overrides: object) -> None:
        self.cfg = SafetyConfig(**{**LOOSE, **overrides})
        self.lim = SafetyLimiter(self.cfg, kin)
        self.kin = kin
        self.q = None if kin is None else (kin.neutral() if q is None else np.asarray(q))
        self.t = 1.0
        self.ep = 0
        self.instruction = instruction or ''
        if instruction is not None:
            self.lim.on_episode(self.ep, instruction, self.t)

    def new_episode(self, instruction: object) -> Decision:
        """The episode owner announces the next episode."""
        self.ep += 1
        self.instruction = instruction if isinstance(instruction, str) else ''
        return self.lim.on_episode(self.ep, instruction, self.t)

    def fresh(self, t: float | None = None) -> None:
        t = self.t if t is None else t
        self.lim.on_camera_frame(t, t)
        if self.q is not None:
            self.lim.on_joint_state(self.q, t, t)

    def send(self, delta7: object, grip: object, ep: object, stamp: object, now: object,
             **kw: object) -> Decision:
        """``on_action`` with this episode's instruction and frame unless given."""
        kw.setdefault('instruction', self.instruction.strip())
        kw.setdefault('frame_id', self.cfg.frame_id)
        return self.lim.on_action(delta7, grip, ep, stamp, now, **kw)  # type: ignore[arg-type]

    def act(self, delta6: object = (0.0,) * 6, grip: float = 0.5, *, dt: float = T,
            stamp: float | None = None, fresh: bool = True, **kw: object) -> Decision:
        self.t += dt
        if fresh:
            self.fresh()
        delta7 = list(delta6) + [0.0] if len(delta6) == 6 else delta6  # type: ignore[arg-type]
        return self.send(delta7, grip, kw.pop('ep', self.ep), self.t if stamp is None else stamp,
                         self.t, **kw)


MOVE = (0.01, 0.0, 0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------ config
def test_default_config_is_valid_and_frozen() -> None:
    cfg = SafetyConfig()
    assert cfg.action_period == 0.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.action_period = 1.0  # type: ignore[misc]


def test_from_dict_round_trip_and_coercion() -> None:
    d = SafetyConfig().to_dict()
    assert SafetyConfig.from_dict(d) == SafetyConfig()
    cfg = SafetyConfig.from_dict({'max_delta_xyz': [0.01, 0.02, 0.03], 'still_count': 4.0,
                                  'action_period': 1, 'action_timeout': 2})
    assert cfg.max_delta_xyz == (0.01, 0.02, 0.03)
    assert cfg.still_count == 4 and isinstance(cfg.still_count, int)
    assert isinstance(cfg.action_period, float)
    json.dumps(cfg.to_dict())


def test_from_dict_lists_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"\['max_speed', 'zzz'\].*valid keys"):
        SafetyConfig.from_dict({'max_speed': 1.0, 'zzz': 2, 'action_period': 0.2})
    with pytest.raises(ConfigError, match='mapping'):
        SafetyConfig.from_dict([('action_period', 0.2)])  # type: ignore[arg-type]


@pytest.mark.parametrize('overrides, field', [
    ({'action_period': 0.0}, 'action_period'),
    ({'action_period': math.nan}, 'action_period'),
    ({'action_period': '0.2'}, 'action_period'),
    ({'action_period': True}, 'action_period'),
    ({'output_rate_hz': 4.0}, 'output_rate_hz'),  # fewer than one tick per 0.2 s action
    ({'max_delta_xyz': (0.01, 0.0, 0.01)}, r'max_delta_xyz\[1\]'),
    ({'max_delta_xyz': (0.01, 0.01)}, 'max_delta_xyz'),
    ({'max_delta_rpy': 'abc'}, 'max_delta_rpy'),
    ({'max_delta_rpy': (0.1, 0.1, 4.0)}, r'max_delta_rpy\[2\]'),
    ({'max_linear_speed': -1.0}, 'max_linear_speed'),
    ({'max_angular_speed': 0.0}, 'max_angular_speed'),
    ({'max_linear_accel': math.inf}, 'max_linear_accel'),
    ({'max_angular_accel': 0.0}, 'max_angular_accel'),
    ({'workspace_min': (0.5, 0.0, 0.0), 'workspace_max': (0.5, 1.0, 1.0)},
     r'workspace_max\[0\]'),
    ({'joint_position_margin': -0.01}, 'joint_position_margin'),
    ({'joint_velocity_scale': 1.5}, 'joint_velocity_scale'),
    ({'singularity_threshold': -1.0}, 'singularity_threshold'),
    ({'action_timeout': 0.1}, 'action_timeout'),  # shorter than the action period
    ({'camera_timeout': 0.0}, 'camera_timeout'),
    ({'vla_heartbeat_timeout': 0.0}, 'vla_heartbeat_timeout'),
    ({'joint_state_timeout': 0.0}, 'joint_state_timeout'),
    ({'still_threshold_linear': -0.1}, 'still_threshold_linear'),
    ({'still_threshold_angular': 4.0}, 'still_threshold_angular'),
    ({'still_count': -1}, 'still_count'),
    ({'still_count': 2.5}, 'still_count'),
    ({'max_steps': -3}, 'max_steps'),
    ({'gripper_close_above': 0.3}, 'gripper_close_above'),  # below open_below 0.4
    ({'gripper_open_below': 1.5}, 'gripper_open_below'),
    ({'gripper_min_dwell': -0.5}, 'gripper_min_dwell'),
    ({'max_stamp_ahead': -1.0}, 'max_stamp_ahead'),
    ({'frame_id': ''}, 'frame_id'),
    ({'frame_id': 3}, 'frame_id'),
    ({'min_token_prob': 1.5}, 'min_token_prob'),
    ({'max_contact_force': -1.0}, 'max_contact_force'),
    ({'step_every': -1}, 'step_every'),
    ({'step_confirm_timeout': 0.0}, 'step_confirm_timeout'),
])
def test_config_rejects_out_of_range_values_naming_the_field(overrides: dict[str, object],
                                                               field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SafetyConfig(**overrides)  # type: ignore[arg-type]


def test_states_match_the_safety_status_message() -> None:
    text = (Path(__file__).resolve().parents[1] / 'msg' / 'SafetyStatus.msg').read_text()
    consts = {m[0]: int(m[1]) for m in re.findall(r'uint8 STATE_(\w+)=(\d+)', text)}
    assert consts == {s.name: int(s) for s in SafetyState}


def test_margin_larger_than_a_joint_range_is_a_config_error(kin: ArmKinematics) -> None:
    # joint 4 of the Panda spans 3.0 rad: a 0.5 rad margin leaves room, so shrink the range
    narrow = ArmKinematics.from_urdf_string(
        default_urdf_path().read_text().replace('lower="-3.0718" upper="-0.0698"',
                                                'lower="-0.9" upper="-0.1"'))
    with pytest.raises(ConfigError, match='panda_joint4'):
        SafetyLimiter(SafetyConfig(joint_position_margin=0.45), narrow)


# ------------------------------------------------------------------------------ states
def test_starts_idle_and_ignores_actions_without_instruction() -> None:
    rig = Rig(instruction=None)
    assert rig.lim.state is SafetyState.IDLE
    d = rig.act(MOVE)
    assert d.state is SafetyState.IDLE and not d.twist.any() and not d.accepted
    assert 'no instruction' in d.reason


def test_instruction_arms_and_first_action_activates() -> None:
    rig = Rig(instruction=None)
    d = rig.new_episode('  put the cup away ')
    assert d.state is SafetyState.IDLE and 'put the cup away' in d.reason
    assert rig.lim.instruction == 'put the cup away'
    d = rig.act(MOVE)
    assert d.state is SafetyState.ACTIVE and d.transition and d.accepted
    np.testing.assert_array_equal(d.twist, np.array(MOVE) / T)
    assert d.limits_applied == () and d.reason == ''
    assert d.step_count == 1 and d.episode_id == 1


@pytest.mark.parametrize('text', ['', '   ', None, 42])
def test_empty_instruction_goes_idle_with_zero_output(text: object) -> None:
    rig = Rig()
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    d = rig.new_episode(text)
    assert d.state is SafetyState.IDLE and d.transition and not d.twist.any()
    assert rig.lim.instruction is None
    d = rig.act(MOVE)
    assert d.state is SafetyState.IDLE and not d.twist.any()


def test_new_instruction_while_active_stops_and_resets_counters() -> None:
    rig = Rig()
    rig.act(MOVE)
    rig.act(MOVE)
    d = rig.new_episode('next task')
    assert d.state is SafetyState.IDLE and not d.twist.any() and d.step_count == 0
    assert not rig.lim.tick(rig.t).twist.any()
    d = rig.act(MOVE)
    assert d.state is SafetyState.ACTIVE and d.step_count == 1 and d.episode_id == 1


def test_actions_from_frames_before_the_episode_began_are_not_of_it() -> None:
    """A restarted instruction owner numbers from 1 again: the episode's stamp tells them apart."""
    rig = Rig(instruction=None)
    rig.lim.on_episode(1, 'pick up the bowl', rig.t, start=rig.t)
    rig.instruction = 'pick up the bowl'
    rig.ep = 1
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    # The camera node restarts and announces its episode 1 with the same instruction.
    start = rig.t + 1.0
    rig.t = start
    d = rig.lim.on_episode(1, 'pick up the bowl', rig.t, start=start)
    assert d.state is SafetyState.IDLE and not d.twist.any()
    # A late action of the earlier episode 1 (same id, same instruction, a fresh-enough frame)
    d = rig.act(MOVE, dt=0.05, stamp=start - 0.01)
    assert not d.accepted and d.state is SafetyState.IDLE and not d.twist.any()
    assert 'before episode 1 began' in d.reason
    d = rig.act(MOVE, dt=0.05)
    assert d.accepted and d.state is SafetyState.ACTIVE
    # An unknown start (zero, None, not finite) checks nothing, as before.
    for ep, unknown in enumerate((0.0, None, math.nan, 'x'), start=2):
        rig.lim.on_episode(ep, 'pick up the bowl', rig.t, start=unknown)
        rig.ep = ep
        d = rig.act(MOVE, dt=0.05, stamp=rig.t - 0.01)  # a frame from before the episode
        assert d.accepted, d.reason


# ------------------------------------------------------------------------------ limits, in order
@pytest.mark.parametrize('index', range(7))
@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_non_finite_action_is_rejected_whole_and_stops(index: int, bad: float) -> None:
    rig = Rig()
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    delta7 = [0.01] * 7
    grip = 0.0
    if index == 6:
        grip = bad
    else:
        delta7[index] = bad
    rig.t += T
    rig.fresh()
    d = rig.send(delta7, grip, 0, rig.t, rig.t)
    assert d.state is SafetyState.STOPPED and d.transition
    assert not d.twist.any() and d.limits_applied == ('reject_non_finite',)
    assert ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper'][index] in d.reason
    assert not rig.lim.tick(rig.t + 0.01).twist.any()  # the old twist is not held
    d = rig.act(MOVE)  # a fresh finite action resumes
    assert d.state is SafetyState.ACTIVE and d.twist.any()


@pytest.mark.parametrize('delta7', [[0.0] * 6, [0.0] * 8, 'abc', None, [[0.0] * 7]])
def test_malformed_action_is_rejected_and_stops(delta7: object) -> None:
    rig = Rig()
    rig.act(MOVE)
    rig.t += T
    rig.fresh()
    d = rig.send(delta7, 0.0, 0, rig.t, rig.t)
    if np.asarray(delta7, dtype=object).size == 7:  # a (1, 7) array flattens to 7 numbers
        assert d.state is SafetyState.ACTIVE
        return
    assert d.state is SafetyState.STOPPED and not d.twist.any()


@pytest.mark.parametrize('episode_id, stamp, why', [
    ('x', None, 'malformed action header'), (1.5, None, 'malformed action header'),
    (0, math.nan, 'bad stamp'), (0, 'soon', 'bad stamp'), (0, 0.0, 'zero stamp')])
def test_malformed_header_is_rejected_and_stops(episode_id: object, stamp: object,
                                                why: str) -> None:
    rig = Rig()
    rig.act(MOVE)
    rig.t += T
    rig.fresh()
    d = rig.send([0.0] * 7, 0.0, episode_id, rig.t if stamp is None else stamp, rig.t)
    assert d.state is SafetyState.STOPPED and why in d.reason


@pytest.mark.parametrize('axis', range(6))
@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_per_axis_clamp(axis: int, sign: float) -> None:
    limit = [0.02, 0.03, 0.04, 0.1, 0.2, 0.3]
    rig = Rig(max_delta_xyz=tuple(limit[:3]), max_delta_rpy=tuple(limit[3:]))
    delta = [0.001 * (i + 1) for i in range(6)]
    delta[axis] = sign * 5 * limit[axis]
    d = rig.act(delta)
    expected = np.array(delta)
    expected[axis] = sign * limit[axis]
    np.testing.assert_allclose(d.applied_delta[:6], expected, rtol=1e-15)
    name = ['x', 'y', 'z', 'roll', 'pitch', 'yaw'][axis]
    assert d.limits_applied == (f'per_axis_clamp:{name}',)
    np.testing.assert_array_equal(d.requested[:6], delta)


def test_linear_speed_scales_the_linear_part_uniformly() -> None:
    rig = Rig(max_linear_speed=0.1)
    delta = (0.03, -0.04, 0.0, 0.1, 0.0, 0.0)  # 0.05 m in 0.25 s = 0.2 m/s
    d = rig.act(delta)
    np.testing.assert_allclose(d.twist[:3], [0.06, -0.08, 0.0], rtol=1e-12)
    np.testing.assert_allclose(d.twist[3:], [0.4, 0.0, 0.0])  # angular part untouched
    assert d.linear_speed == pytest.approx(0.1)
    assert d.limits_applied == ('speed:linear',)


def test_angular_speed_scales_the_angular_part_uniformly() -> None:
    rig = Rig(max_angular_speed=0.5)
    d = rig.act((0.01, 0.0, 0.0, 0.0, 0.3, 0.4))  # 0.5 rad in 0.25 s = 2 rad/s
    np.testing.assert_allclose(d.twist[3:], [0.0, 0.3, 0.4], rtol=1e-12)
    np.testing.assert_allclose(d.twist[:3], [0.04, 0.0, 0.0])
    assert d.limits_applied == ('speed:angular',)


TICK = 1.0 / LOOSE['output_rate_hz']  # 0.025 s


def test_linear_acceleration_is_per_second_across_actions_and_ticks() -> None:
    """Defect 8: |dv| <= max_linear_accel * (time since the previous command), ticks included."""
    rig = Rig(max_linear_accel=0.4)  # 0.01 m/s per 0.025 s tick
    d = rig.act((0.025, 0.0, 0.0, 0.0, 0.0, 0.0))  # wants 0.1 m/s from rest
    np.testing.assert_allclose(d.twist[:3], [0.01, 0.0, 0.0], rtol=1e-9)
    assert d.limits_applied == ('accel:linear',)
    np.testing.assert_allclose(d.target[:3], [0.1, 0.0, 0.0])
    t0 = rig.t
    for k in range(1, 10):  # the re-published ticks ramp towards the target
        d = rig.lim.tick(t0 + k * TICK)
        assert d.twist[0] == pytest.approx(0.01 * (k + 1), rel=1e-9)
    d = rig.lim.tick(t0 + 10 * TICK)
    assert d.twist[0] == pytest.approx(0.1) and d.limits_applied == ()
    rig.t = t0 + 10 * TICK
    d = rig.act((-0.025, 0.0, 0.0, 0.0, 0.0, 0.0), dt=0.005)  # sign flip 5 ms later: brake
    assert d.twist[0] == pytest.approx(0.1 - 0.4 * 0.005, rel=1e-9)
    d = rig.act((0.0, 0.02, 0.0, 0.0, 0.0, 0.0), dt=TICK)  # the change is scaled as a whole
    dv = d.twist[:3] - np.array([0.098, 0.0, 0.0])
    assert np.linalg.norm(dv) == pytest.approx(0.01, rel=1e-9)
    np.testing.assert_allclose(dv / np.linalg.norm(dv), np.array([-0.098, 0.08, 0]) / np.hypot(
        0.098, 0.08))


def test_acceleration_holds_whatever_the_action_rate() -> None:
    """Defect 8: actions at 50 Hz change the command no faster than ticks do."""
    rig = Rig(max_linear_accel=0.5, max_angular_accel=3.0, output_rate_hz=50.0)
    prev, t_prev = np.zeros(6), rig.t
    fastest = 0.0
    for k in range(200):
        sign = 1.0 if (k // 5) % 2 == 0 else -1.0  # direction flips every 0.1 s
        d = rig.act((sign * 0.05, 0.0, 0.0, 0.0, 0.0, sign * 0.3), dt=0.02)
        assert d.accepted, d.reason
        dt = rig.t - t_prev
        assert np.linalg.norm(d.twist[:3] - prev[:3]) <= 0.5 * dt * (1 + 1e-9)
        assert np.linalg.norm(d.twist[3:] - prev[3:]) <= 3.0 * dt * (1 + 1e-9)
        prev, t_prev = d.twist, rig.t
        fastest = max(fastest, abs(prev[0]))
    assert fastest == pytest.approx(0.05)  # ramps of 0.01 m/s per 0.02 s, five per direction


def test_angular_acceleration_between_consecutive_commands() -> None:
    rig = Rig(max_angular_accel=2.0)  # 0.05 rad/s per tick
    d = rig.act((0.0, 0.0, 0.0, 0.0, 0.0, 0.5))  # wants 2 rad/s
    np.testing.assert_allclose(d.twist[3:], [0.0, 0.0, 0.05], rtol=1e-9)
    assert d.limits_applied == ('accel:angular',)


def test_acceleration_restarts_from_rest_after_a_stop() -> None:
    rig = Rig(max_linear_accel=0.4)
    rig.act((0.025, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert rig.lim.tick(rig.t + TICK).twist[0] == pytest.approx(0.02)
    rig.lim.tick(rig.t + 0.75)  # action stale: stop
    rig.t += 1.0
    d = rig.act((0.05, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert d.twist[0] == pytest.approx(0.01) and d.limits_applied == ('accel:linear',)


def test_limits_compose_in_order() -> None:
    rig = Rig(max_delta_xyz=(0.05, 0.05, 0.05), max_linear_speed=0.15, max_linear_accel=0.4)
    d = rig.act((0.5, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert d.limits_applied == ('per_axis_clamp:x', 'speed:linear', 'accel:linear')
    assert d.twist[0] == pytest.approx(0.01) and d.target[0] == pytest.approx(0.15)
    assert d.reason.startswith('limited: per_axis_clamp:x')


# ------------------------------------------------------------------------------ workspace
DECEL = LOOSE['max_linear_accel'] / math.sqrt(3.0)  # per axis


def test_brake_speed_stops_within_the_room() -> None:
    for room, horizon, decel in ((0.004, 0.25, 28.0), (0.1, 0.2, 0.29), (1e-9, 0.2, 0.3)):
        v = brake_speed(room, horizon, decel)
        assert v * horizon + v * v / (2 * decel) == pytest.approx(room, rel=1e-9)
    assert brake_speed(0.004, 0.25, math.inf) == pytest.approx(0.016)
    assert brake_speed(0.0, 0.2, 1.0) == 0.0 and brake_speed(-1.0, 0.2, 1.0) == 0.0


def test_workspace_clips_the_predicted_position(kin: ArmKinematics) -> None:
    pos, _ = kin.fk(kin.neutral())
    top = pos[2] + 0.004
    rig = Rig(kin, workspace_min=(0.0, -1.0, 0.0), workspace_max=(1.0, 1.0, top))
    d = rig.act((0.005, 0.0, 0.02, 0.0, 0.0, 0.0))
    # horizon = action period (fresh joint state): z may move 0.004 m within it and brake
    assert d.twist[2] == pytest.approx(brake_speed(0.004 - M_M, T, DECEL), rel=1e-9)
    assert d.twist[0] == pytest.approx(0.005 / T)
    assert d.limits_applied == ('workspace:z_max',)
    d = rig.act((0.0, 0.0, -0.02, 0.0, 0.0, 0.0))  # away from the bound: unchanged
    assert d.twist[2] == pytest.approx(-0.02 / T) and d.limits_applied == ()


def test_workspace_lower_bound(kin: ArmKinematics) -> None:
    pos, _ = kin.fk(kin.neutral())
    rig = Rig(kin, workspace_min=(-1.0, pos[1] - 0.003, -1.0), workspace_max=(1.0, 1.0, 1.0))
    d = rig.act((0.0, -0.01, 0.0, 0.0, 0.0, 0.0))
    assert d.twist[1] == pytest.approx(-brake_speed(0.003 - M_M, T, DECEL), rel=1e-9)
    assert d.limits_applied == ('workspace:y_min',)


def test_outside_the_box_only_motion_back_is_allowed(kin: ArmKinematics) -> None:
    pos, _ = kin.fk(kin.neutral())  # x = 0.307
    rig = Rig(kin, workspace_min=(0.1, -1.0, 0.0), workspace_max=(0.3, 1.0, 1.0))
    d = rig.act((0.01, 0.0, 0.0, 0.0, 0.0, 0.0))  # further out: no x motion
    assert d.twist[0] == 0.0 and d.limits_applied == ('workspace:outside', 'workspace:x_max')
    assert 'only motion back' in d.reason
    d = rig.act((-0.01, 0.0, 0.0, 0.0, 0.0, 0.0))  # back towards the box: allowed in full
    np.testing.assert_array_equal(d.twist, [-0.04, 0, 0, 0, 0, 0])
    assert d.limits_applied == ('workspace:outside',)
    # no sliding along the box and no rotation while outside: only the way back remains
    d = rig.act((-0.01, 0.01, -0.01, 0.05, 0.0, -0.05))
    np.testing.assert_array_equal(d.twist, [-0.04, 0, 0, 0, 0, 0])
    rig2 = Rig(kin, workspace_min=(pos[0] + 0.01, -1.0, 0.0), workspace_max=(pos[0] + 0.02, 1.0,
                                                                          1.0))
    d = rig2.act((0.05, 0.0, 0.0, 0.0, 0.0, 0.0))  # back in, but not through the far side
    assert d.twist[0] == pytest.approx(brake_speed(0.02 - M_M, T, DECEL), rel=1e-9)
    assert d.limits_applied == ('workspace:outside', 'workspace:x_max')


def test_at_the_wall_only_motion_back_is_allowed(kin: ArmKinematics) -> None:
    """In the outer half of the margin (reached by drift, never by command): back off only."""
    pos, _ = kin.fk(kin.neutral())
    lim = {'workspace_min': (-1.0, -1.0, 0.0), 'workspace_max': (pos[0] + 0.4 * M_M, 1.0, 1.0)}
    rig = Rig(kin, **lim)
    slide = (0.0, 0.01, 0.0, 0.0, 0.0, 0.05)  # along the wall and turning: the drift's source
    d = rig.act(slide)
    assert not d.twist.any() and d.limits_applied == ('workspace:at_wall',)
    assert 'only motion back' in d.reason
    d = rig.act((-0.01, 0.01, 0.0, 0.0, 0.0, 0.05))  # backing off passes, the rest does not
    np.testing.assert_array_equal(d.twist, [-0.01 / T, 0, 0, 0, 0, 0])
    # Inside the inner half of the margin sliding and turning are allowed as before.
    rig = Rig(kin, workspace_min=lim['workspace_min'],
              workspace_max=(pos[0] + 0.6 * M_M, 1.0, 1.0))
    d = rig.act(slide)
    np.testing.assert_allclose(d.twist, np.array(slide) / T)
    assert d.limits_applied == ()


def test_workspace_horizon_grows_with_joint_state_age(kin: ArmKinematics) -> None:
    pos, _ = kin.fk(kin.neutral())
    rig = Rig(kin, workspace_min=(-1.0, -1.0, 0.0), workspace_max=(1.0, 1.0, pos[2] + 0.004))
    rig.t += T
    rig.lim.on_joint_state(rig.q, rig.t, rig.t)
    rig.lim.on_camera_frame(rig.t + 0.0625, rig.t + 0.0625)
    d = rig.send([0.0, 0.0, 0.02, 0, 0, 0, 0], 0.0, 0, rig.t + 0.0625, rig.t + 0.0625)
    # the arm may have moved since the joint state: horizon = 0.25 + 0.0625
    assert d.twist[2] == pytest.approx(brake_speed(0.004 - M_M, T + 0.0625, DECEL), rel=1e-9)


def test_tick_relimits_the_held_twist_against_the_newest_joint_state(kin: ArmKinematics
                                                                     ) -> None:
    q0 = kin.neutral()
    pos, _ = kin.fk(q0)
    rig = Rig(kin, workspace_min=(-1.0, -1.0, 0.0), workspace_max=(1.0, 1.0, pos[2] + 0.02))
    d = rig.act((0.0, 0.0, 0.01, 0.0, 0.0, 0.0))
    assert d.twist[2] == pytest.approx(0.04) and d.limits_applied == ()
    # the arm rose 0.015 m: only 0.005 m are left, over a full period from now
    q1 = q0 + np.linalg.pinv(kin.jacobian(q0)) @ np.array([0, 0, 0.015, 0, 0, 0])
    p1, _ = kin.fk(q1)
    rig.lim.on_joint_state(q1, rig.t + 0.05, rig.t + 0.05)
    d = rig.lim.tick(rig.t + 0.05)
    assert d.state is SafetyState.ACTIVE
    assert d.twist[2] == pytest.approx(brake_speed(pos[2] + 0.02 - p1[2] - M_M, T, DECEL),
                                       rel=1e-9)
    assert d.limits_applied == ('workspace:z_max',)


# ------------------------------------------------------------------------------ joints
def near_limit(kin: ArmKinematics, joint: int, room: float, margin: float) -> np.ndarray:
    q = kin.neutral()
    q[joint] = kin.upper[joint] - margin - room
    return q


def test_joint_margin_scales_the_twist_uniformly(kin: ArmKinematics) -> None:
    margin = 0.05
    q = near_limit(kin, 0, 0.005 + M_RAD, margin)  # 0.005 rad left before margin + M_RAD
    rig = Rig(kin, q=q, joint_position_margin=margin)
    delta = np.array([0.002, 0.0, 0.0, 0.0, 0.0, 0.125])  # yaw turns joint 1 towards its limit
    d = rig.act(delta)
    v = delta / T
    qd = np.linalg.pinv(kin.jacobian(q)) @ v
    assert qd[0] > 0
    # stop within the 0.005 rad at the deceleration a uniform scale may have (accel bounds)
    scale = brake_speed(0.005, T, scale_rate(v, rig.lim._bounds) * qd[0]) / qd[0]
    assert 0 < scale < 0.005 / (qd[0] * T) < 1
    np.testing.assert_allclose(d.twist, v * scale, rtol=1e-9)
    assert d.limits_applied == ('joint_margin:panda_joint1',)
    d = rig.act(-delta)  # away from the limit: nothing to scale
    np.testing.assert_allclose(d.twist, -v, rtol=1e-12)
    assert d.limits_applied == ()


def test_joint_past_its_margin_may_only_move_away(kin: ArmKinematics) -> None:
    margin = 0.05
    q = near_limit(kin, 0, -0.01, margin)  # 0.01 rad inside the margin band
    rig = Rig(kin, q=q, joint_position_margin=margin)
    d = rig.act((0.0, 0.0, 0.0, 0.0, 0.0, 0.05))
    assert d.state is SafetyState.ACTIVE and not d.twist.any()
    assert 'panda_joint1 at its position margin' in d.reason
    assert 'joint_margin:panda_joint1' in d.limits_applied
    d = rig.act((0.0, 0.0, 0.0, 0.0, 0.0, -0.05))
    np.testing.assert_allclose(d.twist[5], -0.2)


def test_joint_velocity_bound_scales_the_twist(kin: ArmKinematics) -> None:
    rig = Rig(kin, joint_velocity_scale=0.1)
    q = kin.neutral()
    delta = np.array([0.04, 0.0, 0.0, 0.0, 0.0, 0.0])  # 0.16 m/s forward
    d = rig.act(delta)
    qd = np.linalg.pinv(kin.jacobian(q)) @ (delta / T)
    qd_max = 0.1 * kin.velocity_limits
    scale = float(np.min(qd_max / np.abs(np.where(qd == 0, 1e-300, qd))))
    assert scale < 1
    # the same direction, scaled to the bound at q and 1 % inside it along the predicted path
    got = d.twist[0] / (delta[0] / T)
    np.testing.assert_allclose(d.twist, delta / T * got, rtol=1e-12)
    assert 0.98 * scale <= got <= scale * (1 + 1e-9)
    over = [f'joint_velocity:panda_joint{i + 1}' for i in np.flatnonzero(np.abs(qd) > qd_max)]
    assert [x for x in d.limits_applied if not x.startswith('step:')] == over
    qd_out = np.linalg.pinv(kin.jacobian(q)) @ d.twist
    assert np.all(np.abs(qd_out) <= qd_max * (1 + 1e-9))
    step = qd_out * T
    for f in (0.125, 0.25, 0.5, 1.0):
        qd_f = np.linalg.pinv(kin.jacobian(q + step * f)) @ d.twist
        assert np.all(np.abs(qd_f) <= 0.99 * qd_max * (1 + 1e-9))


def test_most_restrictive_joint_rule_wins(kin: ArmKinematics) -> None:
    margin = 0.05
    q = near_limit(kin, 0, 0.02 + M_RAD, margin)
    rig = Rig(kin, q=q, joint_position_margin=margin, joint_velocity_scale=0.02)
    delta = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.125])
    d = rig.act(delta)
    v = delta / T
    qd = np.linalg.pinv(kin.jacobian(q)) @ v
    scales = [brake_speed(0.02, T, scale_rate(v, rig.lim._bounds) * qd[0]) / qd[0]]
    scales += list(0.02 * kin.velocity_limits / np.maximum(np.abs(qd), 1e-300))
    best = min(1.0, min(scales))
    got = d.twist[5] / v[5]
    np.testing.assert_allclose(d.twist, v * got, rtol=1e-12)
    assert 0.98 * best <= got <= best * (1 + 1e-9)  # the path check may take 1 % more


def test_exactly_singular_configuration_gives_zero(kin: ArmKinematics) -> None:
    rig = Rig(kin, q=np.zeros(7))  # arm straight up: rank-deficient Jacobian
    d = rig.act(MOVE)
    assert not d.twist.any() and d.limits_applied == ('joint:singular',)
    assert 'at a singularity' in d.reason


def smallest_singular_value(kin: ArmKinematics, q: np.ndarray) -> float:
    return float(np.linalg.svd(kin.jacobian(q), compute_uv=False)[-1])


def test_near_a_singularity_only_motion_away_is_allowed(kin: ArmKinematics) -> None:
    q = kin.neutral()
    q[3] = -0.2  # elbow almost straight: close to the elbow singularity at q4 = 0
    s_min = smallest_singular_value(kin, q)
    assert 0.0 < s_min < 0.05
    twist_elbow = kin.jacobian(q)[:, 3] * 0.05  # the motion joint 4 alone would make
    # which sign of it straightens the elbow (towards the singularity)?
    worse = 1.0 if smallest_singular_value(kin, q + np.eye(7)[3] * 1e-3) < s_min else -1.0
    rig = Rig(kin, q=q, singularity_threshold=0.05)
    d = rig.act(worse * twist_elbow * T)
    assert not d.twist.any() and d.limits_applied == ('joint:singular',)
    assert 'towards a singularity' in d.reason
    d = rig.act(-worse * twist_elbow * T)
    np.testing.assert_allclose(d.twist, -worse * twist_elbow, rtol=1e-12, atol=1e-12)
    assert d.limits_applied == ()
    rig = Rig(kin, q=q, singularity_threshold=0.9 * s_min)  # outside the zone: not checked
    d = rig.act(worse * twist_elbow * T)
    np.testing.assert_allclose(d.twist, worse * twist_elbow, rtol=1e-12, atol=1e-12)


def test_kinematics_requires_a_joint_state(kin: ArmKinematics) -> None:
    rig = Rig(kin)
    rig.q = None  # never sends one
    d = rig.act(MOVE)
    assert d.state is SafetyState.STOPPED and 'no valid joint state' in d.reason


def test_nan_joint_state_is_ignored_and_stops_at_once(kin: ArmKinematics) -> None:
    rig = Rig(kin)
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    bad = rig.q.copy()
    bad[2] = math.nan
    d = rig.lim.on_joint_state(bad, rig.t + 0.01, rig.t + 0.01)
    assert d.state is SafetyState.STOPPED and d.transition and 'invalid joint state' in d.reason
    d = rig.lim.on_joint_state(np.zeros(3), rig.t + 0.02, rig.t + 0.02)
    assert 'expected 7' in d.reason
    d = rig.act(MOVE)  # a valid joint state (fed by act) and a fresh action resume
    assert d.state is SafetyState.ACTIVE


def test_without_kinematics_joint_states_are_not_required() -> None:
    rig = Rig()
    d = rig.lim.on_joint_state([math.nan], rig.t, rig.t)
    assert 'invalid joint state' in d.reason and d.state is SafetyState.IDLE
    assert rig.act(MOVE).state is SafetyState.ACTIVE


# ------------------------------------------------------------------------------ watchdogs
def test_action_watchdog_stops_exactly_after_the_timeout() -> None:
    rig = Rig(camera_timeout=10.0, vla_heartbeat_timeout=10.0)
    d = rig.act(MOVE)
    t0 = rig.t
    for dt in (0.025, 0.25, 0.5):  # age == timeout still moves
        d = rig.lim.tick(t0 + dt)
        assert d.state is SafetyState.ACTIVE
        np.testing.assert_array_equal(d.twist, np.array(MOVE) / T)
    d = rig.lim.tick(np.nextafter(t0 + 0.5, 2.0))
    assert d.state is SafetyState.STOPPED and d.transition and not d.twist.any()
    assert d.reason.startswith('action stale')
    d = rig.lim.tick(t0 + 0.6)
    assert not d.transition and not d.twist.any()


def test_camera_watchdog_stops_exactly_after_the_timeout() -> None:
    rig = Rig(camera_timeout=0.25, vla_heartbeat_timeout=10.0, action_timeout=10.0)
    rig.act(MOVE)
    t0 = rig.t
    assert rig.lim.tick(t0 + 0.25).state is SafetyState.ACTIVE
    d = rig.lim.tick(np.nextafter(t0 + 0.25, 2.0))
    assert d.state is SafetyState.STOPPED and d.reason.startswith('camera stale')


def test_camera_age_counts_from_the_older_of_stamp_and_receipt() -> None:
    rig = Rig(camera_timeout=0.25, vla_heartbeat_timeout=10.0, action_timeout=10.0)
    rig.act(MOVE)
    t0 = rig.t
    rig.lim.on_camera_frame(t0 - 0.125, t0 + 0.1)  # a frame received late
    assert rig.lim.tick(t0 + 0.125).state is SafetyState.ACTIVE
    d = rig.lim.tick(t0 + 0.13)
    assert d.state is SafetyState.STOPPED and 'camera stale' in d.reason
    d = rig.lim.on_camera_frame(math.nan, t0 + 0.2)
    assert 'bad stamp' in d.reason


def test_action_is_refused_without_camera_frames() -> None:
    rig = Rig()
    rig.t += T
    d = rig.send([0.01] + [0.0] * 6, 0.0, 0, rig.t, rig.t)
    assert d.state is SafetyState.STOPPED and d.reason == 'no camera frame received'


def test_vla_heartbeat_watchdog() -> None:
    rig = Rig(camera_timeout=10.0, action_timeout=10.0, vla_heartbeat_timeout=1.0)
    rig.act(MOVE)  # an action is a heartbeat
    t0 = rig.t
    assert rig.lim.tick(t0 + 1.0).state is SafetyState.ACTIVE
    rig.lim.on_vla_heartbeat(t0 + 1.0)
    assert rig.lim.tick(t0 + 2.0).state is SafetyState.ACTIVE
    d = rig.lim.tick(np.nextafter(t0 + 2.0, 5.0))
    assert d.state is SafetyState.STOPPED and d.reason.startswith('VLA node silent')


def test_joint_state_watchdog(kin: ArmKinematics) -> None:
    rig = Rig(kin, camera_timeout=10.0, action_timeout=10.0, vla_heartbeat_timeout=10.0,
              joint_state_timeout=0.125)
    rig.act(MOVE)
    t0 = rig.t
    assert rig.lim.tick(t0 + 0.125).state is SafetyState.ACTIVE
    d = rig.lim.tick(np.nextafter(t0 + 0.125, 2.0))
    assert d.state is SafetyState.STOPPED and d.reason.startswith('joint state stale')


def test_a_fresh_action_resumes_after_a_watchdog_stop() -> None:
    rig = Rig()
    rig.act(MOVE)
    assert rig.lim.tick(rig.t + 0.75).state is SafetyState.STOPPED
    rig.t += 1.0
    d = rig.act(MOVE)
    assert d.state is SafetyState.ACTIVE and d.transition


def test_clock_going_backwards_stops_and_forgets_inputs() -> None:
    rig = Rig()
    rig.act(MOVE)
    assert rig.lim.tick(rig.t - 0.0005).state is SafetyState.ACTIVE  # jitter is tolerated
    d = rig.lim.tick(rig.t - 0.5)
    assert d.state is SafetyState.STOPPED and 'backwards' in d.reason
    rig.t -= 0.4
    d = rig.send([0.01] + [0.0] * 6, 0.0, 0, rig.t + 0.01, rig.t)
    assert d.state is SafetyState.STOPPED and 'no camera frame' in d.reason


@pytest.mark.parametrize('now', [math.nan, math.inf, 'x'])
def test_non_finite_time_never_moves(now: object) -> None:
    rig = Rig()
    rig.act(MOVE)
    d = rig.lim.tick(now)  # type: ignore[arg-type]
    assert d.state is SafetyState.STOPPED and not d.twist.any()
    d = rig.send([0.0] * 7, 0.0, 0, rig.t + 1.0, now)  # type: ignore[arg-type]
    assert not d.twist.any()


# ------------------------------------------------------------------------------ e-stop
def test_estop_latches_and_dominates() -> None:
    rig = Rig()
    rig.act(MOVE)
    d = rig.lim.estop(rig.t + 0.01, 'operator')
    assert d.state is SafetyState.ESTOP and d.transition and not d.twist.any()
    assert rig.lim.estop(rig.t + 0.02, 'again').reason == 'estop latched: operator'
    for _ in range(3):
        d = rig.act(MOVE)
        assert d.state is SafetyState.ESTOP and not d.twist.any() and d.gripper is None
    assert rig.lim.tick(rig.t).state is SafetyState.ESTOP
    d = rig.new_episode('new task')
    assert d.state is SafetyState.ESTOP and 'estop latched: operator' in d.reason
    d = rig.send([0.0] * 7, 1.0, 0, rig.t + 0.1, math.nan)
    assert d.state is SafetyState.ESTOP


def test_reset_never_resumes_by_itself() -> None:
    rig = Rig()
    rig.act(MOVE)
    stale_stamp = rig.t + 0.01  # a frame captured just before the e-stop
    rig.lim.estop(rig.t + 0.02, 'operator')
    t_reset = rig.t + 0.05
    d = rig.lim.reset(t_reset)
    assert d.state is SafetyState.STOPPED and d.transition and not d.twist.any()
    for k in range(1, 5):
        d = rig.lim.tick(t_reset + 0.02 * k)
        assert d.state is SafetyState.STOPPED and not d.twist.any()
    # an action computed from a pre-reset frame arrives after the reset: no motion
    rig.t = t_reset + 0.1
    rig.fresh()
    d = rig.send([0.01] + [0.0] * 6, 0.0, 0, stale_stamp, rig.t)
    assert d.state is SafetyState.STOPPED and not d.twist.any() and not d.accepted
    d = rig.send([0.01] + [0.0] * 6, 0.0, 0, t_reset, rig.t)  # stamp == reset time
    assert d.state is SafetyState.STOPPED and 'before the reset' in d.reason
    d = rig.send([0.01] + [0.0] * 6, 0.0, 0, t_reset + 0.001, rig.t + TICK)
    assert d.state is SafetyState.ACTIVE and d.twist[0] == pytest.approx(0.04)


def test_reset_without_estop_is_ignored() -> None:
    rig = Rig()
    rig.act(MOVE)
    d = rig.lim.reset(rig.t + 0.01)
    assert d.state is SafetyState.ACTIVE and not d.transition and 'ignored' in d.reason


def test_reset_returns_to_done_or_idle_where_appropriate() -> None:
    rig = Rig(still_count=1)
    assert rig.act().state is SafetyState.DONE
    rig.lim.estop(rig.t, '')
    assert rig.lim.reset(rig.t + 0.1).state is SafetyState.DONE
    rig2 = Rig(instruction=None)
    rig2.lim.estop(rig2.t, 'x')
    assert rig2.lim.reset(rig2.t + 0.1).state is SafetyState.IDLE


# ------------------------------------------------------------------------------ episode end
def test_stop_detection_after_exactly_n_still_actions_and_rearm() -> None:
    rig = Rig(still_count=3, still_threshold_linear=0.001, still_threshold_angular=0.01)
    still = (0.0005, 0.0, 0.0, 0.0, 0.0, 0.005)
    rig.act(MOVE)
    assert rig.act(still).still_count == 1
    assert rig.act(MOVE).still_count == 0  # motion resets the count
    for k in (1, 2):
        d = rig.act(still)
        assert d.state is SafetyState.ACTIVE and d.still_count == k
    d = rig.act(still)
    assert d.state is SafetyState.DONE and d.transition and d.still_count == 3
    assert not d.twist.any() and '3 consecutive still actions' in d.reason
    d = rig.act(MOVE)  # DONE until a new instruction
    assert d.state is SafetyState.DONE and not d.twist.any()
    assert rig.lim.tick(rig.t).state is SafetyState.DONE
    rig.new_episode('again')
    d = rig.act(MOVE)
    assert d.state is SafetyState.ACTIVE and d.still_count == 0 and d.step_count == 1


@pytest.mark.parametrize('still, counts', [
    ((0.001, 0.0, 0.0, 0.0, 0.0, 0.0), False),  # threshold is strict: |d| < threshold
    ((0.0, 0.0, 0.0, 0.0, 0.01, 0.0), False),
    ((0.0006, 0.0008, 0.0, 0.0, 0.0, 0.0), False),  # the norm counts, not each axis
    ((0.0006, 0.0007, 0.0, 0.006, 0.0, 0.0079), True),
])
def test_still_thresholds(still: tuple[float, ...], counts: bool) -> None:
    rig = Rig(still_count=5)
    assert (rig.act(still).still_count == 1) is counts


def test_still_requires_an_unchanged_gripper() -> None:
    rig = Rig(still_count=2, gripper_min_dwell=0.6)
    assert rig.act(grip=0.0).gripper == 0.0  # the first command goes at once: not still
    assert rig.act(grip=0.0).still_count == 1
    d = rig.act(grip=1.0)  # a close is pending (0.5 s since the last change < 0.6 s)
    assert d.gripper is None and d.still_count == 0
    assert rig.act(grip=0.5).still_count == 1  # inside the hysteresis band: unchanged
    assert rig.act(grip=0.5).state is SafetyState.DONE


def test_stop_detection_disabled_with_zero() -> None:
    rig = Rig(still_count=0)
    for _ in range(20):
        d = rig.act()
    assert d.state is SafetyState.ACTIVE and d.still_count == 20


def test_step_budget() -> None:
    rig = Rig(max_steps=3)
    for k in (1, 2, 3):
        d = rig.act(MOVE)
        assert d.state is SafetyState.ACTIVE and d.step_count == k
    d = rig.act(MOVE)
    assert d.state is SafetyState.DONE and d.transition and not d.twist.any()
    assert d.reason == 'step budget of 3 actions used' and d.step_count == 3
    rig.new_episode('next')
    assert rig.act(MOVE).state is SafetyState.ACTIVE


# ------------------------------------------------------------------------------ gripper
def test_gripper_hysteresis() -> None:
    rig = Rig(gripper_close_above=0.6, gripper_open_below=0.4)
    d = rig.act(grip=0.5)
    assert d.gripper is None and d.applied_delta[6] == GRIPPER_UNKNOWN
    d = rig.act(grip=0.7)
    assert d.gripper == 1.0 and d.applied_delta[6] == 1.0
    for g in (0.6, 0.5, 0.41, 0.4, 0.9):  # thresholds are strict; the band holds
        d = rig.act(grip=g)
        assert d.gripper is None and d.applied_delta[6] == 1.0
    assert rig.act(grip=0.39).gripper == 0.0
    assert rig.act(grip=0.59).gripper is None
    assert rig.act(grip=0.61).gripper == 1.0


def test_gripper_dwell_time_bounds_the_toggle_rate_whatever_the_action_rate() -> None:
    """Defect 4: a flood of contradicting actions changes the gripper once per dwell time."""
    rig = Rig(gripper_min_dwell=0.5)
    changes = []
    for k in range(50):  # one second of actions at 50 Hz, open/close alternating
        d = rig.act(grip=float(k % 2), dt=0.02)
        if d.gripper is not None:
            changes.append(rig.t)
    assert len(changes) == 2, changes  # at 0 s and 0.5 s (dwell), never 26 times
    assert np.diff(changes).min() >= 0.5 - 1e-9
    rig2 = Rig(gripper_min_dwell=0.5)
    assert rig2.act(grip=1.0).gripper == 1.0
    assert rig2.act(grip=0.0, dt=0.4).gripper is None  # 0.4 s after the change: held
    assert rig2.act(grip=0.0, dt=0.1).gripper == 0.0  # 0.5 s: allowed


def test_gripper_holds_while_not_moving() -> None:
    rig = Rig()
    rig.lim.estop(rig.t, 'x')
    assert rig.act(grip=1.0).gripper is None
    assert rig.lim.tick(rig.t).gripper is None


# ------------------------------------------------------------------------------ ordering
def test_out_of_order_action_is_rejected_without_state_change() -> None:
    rig = Rig()
    d1 = rig.act(MOVE)
    t1 = rig.t
    d = rig.act((0.02, 0, 0, 0, 0, 0), stamp=t1 - 0.1)
    assert d.state is SafetyState.ACTIVE and not d.transition and not d.accepted
    assert 'out-of-order' in d.reason and d.step_count == 1
    np.testing.assert_array_equal(d.twist, d1.twist)  # the accepted command stays in force
    assert rig.act((0.02, 0, 0, 0, 0, 0), stamp=t1).reason.startswith('out-of-order')
    d = rig.act((0.02, 0, 0, 0, 0, 0))
    assert d.accepted and d.twist[0] == pytest.approx(0.08)


def test_only_actions_of_the_current_episode_are_accepted() -> None:
    """Defect 2: the episode owner's id is the only one accepted; others are just dropped."""
    rig = Rig()
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    rig.new_episode('new task')  # episode 1
    d = rig.act(MOVE, ep=0)  # computed for the old instruction
    assert d.state is SafetyState.IDLE and not d.accepted
    assert 'not the current episode 1' in d.reason
    d = rig.act(MOVE, ep=2)  # current + 1: not accepted inside episode 1 either
    assert not d.accepted and 'action of episode 2' in d.reason
    assert rig.act(MOVE).state is SafetyState.ACTIVE


def test_a_huge_episode_id_does_not_disable_later_episodes() -> None:
    """Defect 2: uint32 max is just "not the current episode"; later episodes still run."""
    rig = Rig()
    d = rig.act(MOVE, ep=4294967295)
    assert not d.accepted and 'not the current episode' in d.reason
    assert rig.act(MOVE).state is SafetyState.ACTIVE  # this episode still runs
    for _ in range(3):
        rig.new_episode('next task')
        d = rig.act(MOVE)
        assert d.accepted and d.state is SafetyState.ACTIVE, d.reason


def test_episode_with_a_bad_id_or_empty_instruction_idles() -> None:
    rig = Rig()
    rig.act(MOVE)
    d = rig.lim.on_episode('x', 'go', rig.t)
    assert d.state is SafetyState.IDLE and 'bad episode id' in d.reason
    assert not rig.act(MOVE).accepted
    d = rig.lim.on_episode(7, '', rig.t)
    assert d.state is SafetyState.IDLE and rig.lim.instruction is None


# ------------------------------------------------------------------------------ decisions
def test_decision_is_immutable_and_record_is_strict_json() -> None:
    rig = Rig()
    d = rig.act((0.5, 0, 0, 0, 0, 0), grip=0.9)
    with pytest.raises(ValueError):
        d.twist[0] = 1.0
    rec = d.to_record()
    text = json.dumps(rec, allow_nan=False)
    assert json.loads(text)['limits_applied'] == list(d.limits_applied)
    assert rec['state'] == 'ACTIVE' and rec['output']['gripper'] == 1.0
    assert rec['input']['requested'][0] == 0.5
    rig.t += T
    bad = rig.send([math.nan, math.inf, -math.inf, 0, 0, 0, 0], 0.0, 0, rig.t, rig.t)
    rec = bad.to_record()
    json.dumps(rec, allow_nan=False)
    assert rec['input']['requested'][:3] == ['nan', 'inf', '-inf']
    assert rec['state'] == 'STOPPED' and rec['transition'] is True


def test_every_input_returns_a_decision_with_zero_twist_unless_active(kin: ArmKinematics
                                                                      ) -> None:
    rig = Rig(kin)
    lim = rig.lim
    t = rig.t
    for d in (lim.on_camera_frame(t, t), lim.on_vla_heartbeat(t),
              lim.on_joint_state(rig.q, t, t),
              lim.tick(t), lim.reset(t)):
        assert isinstance(d, Decision) and d.state is SafetyState.IDLE and not d.twist.any()
    assert lim.ages(t + 1.0)['camera'] == 1.0 and lim.ages(t)['action'] == -1.0


# ------------------------------------------------------------------------------ properties
finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(-0.1, 0.1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(finite_or_not, min_size=7, max_size=7), min_size=1, max_size=6))
def test_property_outputs_respect_cartesian_limits(actions: list[list[float]]) -> None:
    rig = Rig(max_delta_xyz=(0.02, 0.03, 0.04), max_delta_rpy=(0.1, 0.1, 0.1),
              max_linear_speed=0.1, max_angular_speed=0.3, max_linear_accel=0.8,
              max_angular_accel=2.0)
    prev = np.zeros(6)
    bound = np.array([0.02, 0.03, 0.04, 0.1, 0.1, 0.1]) / T
    for a in actions:
        d = rig.act(a[:6], grip=a[6])
        tw = d.twist
        assert np.all(np.isfinite(tw)) and np.all(np.isfinite(d.applied_delta))
        assert np.all(np.abs(tw) <= bound * (1 + 1e-12))
        assert d.linear_speed <= 0.1 * (1 + 1e-12) and d.angular_speed <= 0.3 * (1 + 1e-12)
        assert np.linalg.norm(tw[:3] - prev[:3]) <= 0.8 * T * (1 + 1e-9) + 1e-15
        assert np.linalg.norm(tw[3:] - prev[3:]) <= 2.0 * T * (1 + 1e-9) + 1e-15
        if d.state is not SafetyState.ACTIVE:
            assert not tw.any()
        prev = tw


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(LOOSE)), st.floats(-1e3, 1e3), max_size=3))
def test_property_from_dict_either_builds_or_raises_config_error(d: dict[str, float]) -> None:
    try:
        cfg = SafetyConfig.from_dict(d)
    except ConfigError as exc:
        assert any(k in str(exc) for k in d)
    else:
        assert SafetyConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------ issue 12 defects
def test_future_stamped_action_is_refused_and_does_not_poison_the_order() -> None:
    """Defect 1: a stamp ahead of the clock stops; later correct stamps are still accepted."""
    rig = Rig(max_stamp_ahead=0.05)
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    for ahead in (2.0, 1e6):
        d = rig.act(MOVE, stamp=rig.t + ahead)
        assert d.state is SafetyState.STOPPED and not d.accepted and not d.twist.any()
        assert 'ahead of the local clock' in d.reason
        d = rig.act(MOVE)  # correctly stamped, right after: accepted (the bad stamp is not kept)
        assert d.accepted and d.state is SafetyState.ACTIVE, d.reason
    d = rig.act(MOVE, stamp=rig.t + 0.25 + 0.05)  # within the tolerance: accepted
    assert d.accepted


@pytest.mark.parametrize('stamp_offset, why', [(-5.0, 'joint state stale'),
                                               (None, 'zero stamp'), (+2.0, 'ahead')])
def test_joint_state_age_counts_from_its_stamp(kin: ArmKinematics, stamp_offset: float | None,
                                               why: str) -> None:
    """Defect 6: old, unstamped and future joint states are not fresh."""
    rig = Rig(kin)
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    t = rig.t + 0.02
    stamp = 0.0 if stamp_offset is None else t + stamp_offset
    rig.lim.on_joint_state(rig.q, stamp, t)  # received now, stamped otherwise
    d = rig.lim.tick(t)
    assert d.state is SafetyState.STOPPED and not d.twist.any(), d.reason
    rig.t = t + 0.2
    rig.lim.on_camera_frame(rig.t, rig.t)
    for _ in range(3):  # a stream of such states never makes the arm move
        rig.lim.on_joint_state(rig.q, 0.0 if stamp_offset is None else rig.t + stamp_offset,
                               rig.t)
        d = rig.send([0.01] + [0.0] * 6, 0.5, 0, rig.t, rig.t)
        assert d.state is SafetyState.STOPPED and not d.accepted
        rig.t += 0.02
    assert why in d.reason or why in rig.lim.on_joint_state(
        rig.q, 0.0 if stamp_offset is None else rig.t + stamp_offset, rig.t).reason


def test_joint_state_received_late_counts_from_its_stamp(kin: ArmKinematics) -> None:
    rig = Rig(kin, joint_state_timeout=0.125)
    rig.act(MOVE)
    t = rig.t
    rig.lim.on_joint_state(rig.q, t - 0.1, t + 0.01)  # stamped 0.11 s before its receipt
    assert rig.lim.tick(t + 0.02).state is SafetyState.ACTIVE
    d = rig.lim.tick(t + 0.03)  # age by stamp 0.13 s > 0.125 s
    assert d.state is SafetyState.STOPPED and 'joint state stale' in d.reason
    assert rig.lim.ages(t + 0.03)['joint_state'] == pytest.approx(0.13)


@pytest.mark.parametrize('instruction', ['put the cup away', '', None, 3])
def test_action_for_another_instruction_is_refused(instruction: object) -> None:
    """Defect 9: the action's instruction must be the current episode's."""
    rig = Rig()
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    d = rig.act(MOVE, instruction=instruction)
    assert d.state is SafetyState.STOPPED and not d.accepted and 'another instruction' in d.reason
    assert rig.act(MOVE, instruction='  pick up the bowl ').accepted  # stripped, as announced


@pytest.mark.parametrize('frame', ['world', '', None, 'panda_link0 '])
def test_action_in_another_frame_is_refused(frame: object) -> None:
    """Defect 9: the delta must be expressed in the configured frame (no transform applied)."""
    rig = Rig()
    d = rig.act(MOVE, frame_id=frame)
    assert d.state is SafetyState.STOPPED and not d.accepted and 'expected' in d.reason
    assert rig.act(MOVE, frame_id='panda_link0').accepted


# ------------------------------------------------------------------------------ checklist
def test_low_confidence_is_refused_with_a_controlled_stop() -> None:
    rig = Rig(min_token_prob=0.3, min_token_margin=0.1)
    probs, margins = [0.9] * 7, [0.5] * 7
    assert rig.act(MOVE, token_probs=probs, token_margins=margins).accepted
    low = list(probs)
    low[2] = 0.29
    d = rig.act(MOVE, token_probs=low, token_margins=margins)
    assert d.state is SafetyState.STOPPED and not d.twist.any()
    assert d.reason.startswith('low confidence') and 'dz' in d.reason
    assert d.limits_applied == ('low_confidence',)
    assert rig.lim.min_token_prob == pytest.approx(0.29)
    d = rig.act(MOVE, token_probs=probs, token_margins=[0.5] * 6 + [0.05])
    assert not d.accepted and 'token margin' in d.reason and 'gripper' in d.reason
    for missing in (None, [0.9] * 6, [math.nan] * 7):  # fail closed
        d = rig.act(MOVE, token_probs=missing, token_margins=margins)
        assert not d.accepted and 'missing' in d.reason
    assert rig.act(MOVE, token_probs=probs, token_margins=margins).accepted
    assert Rig().act(MOVE).accepted  # off (0): no probabilities needed


def test_geometric_mean_confidence_gate() -> None:
    rig = Rig(min_mean_token_prob=0.3)
    assert SafetyConfig().min_mean_token_prob > 0.0  # on by default (bench/bench_confidence.py)
    assert rig.act(MOVE, token_probs=[0.3] * 7).accepted  # exactly at the threshold
    d = rig.act(MOVE, token_probs=[0.9] * 6 + [0.0001])  # one token flat, the mean low
    assert not d.accepted and d.state is SafetyState.STOPPED
    assert 'geometric mean token prob 0.245' in d.reason
    assert rig.act(MOVE, token_probs=[0.99] * 6 + [0.05]).accepted  # one token low, mean fine
    for bad in (None, [0.9] * 6, [math.nan] * 7, [0.0] * 7):  # missing or zero: fail closed
        assert not rig.act(MOVE, token_probs=bad).accepted


def test_deadman_silence_or_release_stops() -> None:
    rig = Rig(deadman_timeout=0.5, action_timeout=10.0, camera_timeout=10.0,
              vla_heartbeat_timeout=10.0)
    d = rig.act(MOVE)
    assert d.state is SafetyState.STOPPED and 'deadman released' in d.reason
    rig.lim.on_enable(True, rig.t + T)
    assert rig.act(MOVE).state is SafetyState.ACTIVE
    t = rig.t
    assert rig.lim.tick(t + 0.5).state is SafetyState.ACTIVE
    d = rig.lim.tick(t + 0.51)
    assert d.state is SafetyState.STOPPED and 'deadman silent' in d.reason
    rig.t = t + 0.6
    rig.lim.on_enable(True, rig.t)
    assert rig.act(MOVE, dt=0.01).state is SafetyState.ACTIVE
    d = rig.lim.on_enable(False, rig.t + 0.01)
    assert d.state is SafetyState.STOPPED and 'released' in d.reason
    assert Rig().lim.on_enable(False, 2.0).state is SafetyState.IDLE  # off: ignored


def test_step_mode_waits_for_a_confirm_then_moves_one_action() -> None:
    rig = Rig(step_every=2, step_confirm_timeout=1.0, action_timeout=0.5)
    d = rig.act(MOVE)  # action 1 waits
    assert d.state is SafetyState.STOPPED and d.accepted and not d.twist.any()
    assert 'waits for a confirm' in d.reason and rig.lim.waiting_confirm
    d = rig.act(MOVE, dt=0.1)  # actions meanwhile are ignored
    assert not d.accepted and 'waits for a confirm' in d.reason
    d = rig.lim.confirm(rig.t + 0.05)
    assert d.state is SafetyState.ACTIVE and d.twist[0] > 0 and 'confirmed' in d.reason
    d = rig.act(MOVE)  # action 2 moves without a confirm
    assert d.state is SafetyState.ACTIVE and d.accepted
    d = rig.act(MOVE)  # action 3 waits again; no confirm within 1 s: dropped, stays stopped
    assert d.state is SafetyState.STOPPED
    d = rig.lim.tick(rig.t + 1.01)
    assert d.state is SafetyState.STOPPED and 'not confirmed' in d.reason
    assert not rig.lim.waiting_confirm
    assert 'no action waits' in rig.lim.confirm(rig.t + 1.1).reason
    rig.t += 1.2
    d = rig.act(MOVE)  # after an unconfirmed action the next one waits again
    assert d.state is SafetyState.STOPPED and rig.lim.waiting_confirm


def test_contact_force_latches_a_protective_stop_until_reset() -> None:
    rig = Rig(max_contact_force=20.0)
    rig.act(MOVE)
    assert rig.lim.on_wrench([3.0, 4.0, 0.0], rig.t).state is SafetyState.ACTIVE
    d = rig.lim.on_wrench([0.0, 0.0, -20.5], rig.t + 0.01)
    assert d.state is SafetyState.ESTOP and not d.twist.any()
    assert d.reason.startswith('protective stop: contact force 20.5 N')
    assert rig.lim.latched.startswith('protective stop')
    assert not rig.act(MOVE).accepted  # latched: no action, no new episode clears it
    assert rig.new_episode('next').state is SafetyState.ESTOP
    assert rig.lim.reset(rig.t + 0.1).state is SafetyState.STOPPED
    assert rig.act(MOVE).accepted
    d = rig.lim.on_wrench([math.nan, 0.0, 0.0], rig.t)  # unreadable: controlled stop
    assert d.state is SafetyState.STOPPED and 'unreadable' in d.reason


def test_after_a_contact_reset_only_motion_away_until_it_ends() -> None:
    rig = Rig(max_contact_force=20.0)
    rig.act(MOVE)
    push = [0.0, 0.0, 25.0]  # the table pushes the tool up
    assert rig.lim.on_wrench(push, rig.t).state is SafetyState.ESTOP
    rig.lim.reset(rig.t + 0.01)
    assert rig.lim.on_wrench(push, rig.t + 0.02).state is SafetyState.STOPPED  # no re-latch
    d = rig.act((0.01, 0.0, -0.01, 0.1, 0.0, 0.0))  # sideways, down and a turn: only up is left
    assert d.accepted and not d.twist.any() and 'contact:retreat_only' in d.limits_applied
    d = rig.act((0.01, 0.0, 0.01, 0.1, 0.0, 0.0))
    np.testing.assert_allclose(d.twist, [0.0, 0.0, 0.04, 0.0, 0.0, 0.0], atol=1e-12)
    d = rig.lim.on_wrench([0.0, 0.0, 38.0], rig.t)  # pushed 1.5 x harder: latched again
    assert d.state is SafetyState.ESTOP and 'further' in d.reason
    rig.lim.reset(rig.t + 0.01)
    rig.lim.on_wrench([0.0, 0.0, 9.0], rig.t + 0.02)  # below half the threshold: over
    d = rig.act((0.01, 0.0, -0.01, 0.0, 0.0, 0.0))
    np.testing.assert_allclose(d.twist, [0.04, 0.0, -0.04, 0.0, 0.0, 0.0], atol=1e-12)
    assert rig.lim.on_wrench(push, rig.t).state is SafetyState.ESTOP  # a new contact latches


def test_external_effort_latches_a_protective_stop(kin: ArmKinematics) -> None:
    rig = Rig(kin, max_external_effort=5.0)
    rig.act(MOVE)
    effort = np.zeros(7)
    effort[3] = -5.5
    d = rig.lim.on_joint_state(rig.q, rig.t, rig.t, effort)
    assert d.state is SafetyState.ESTOP and 'panda_joint4' in d.reason
    rig.lim.reset(rig.t + 0.01)
    assert rig.lim.on_joint_state(rig.q, rig.t + 0.02, rig.t + 0.02,
                                  effort).state is SafetyState.STOPPED  # the same contact
    effort[3] = -8.5
    d = rig.lim.on_joint_state(rig.q, rig.t + 0.03, rig.t + 0.03, effort)
    assert d.state is SafetyState.ESTOP and 'further' in d.reason
    assert Rig(kin).lim.on_joint_state(rig.q, rig.t, rig.t, effort).state is SafetyState.IDLE


def test_table_plane_refuses_motion_of_the_fingertips_into_it(kin: ArmKinematics) -> None:
    frames = ('panda_leftfinger_tip_front', 'panda_leftfinger_tip_back',
              'panda_rightfinger_tip_front', 'panda_rightfinger_tip_back')
    kin_c = ArmKinematics.from_urdf_file(default_urdf_path(), contact_frames=frames)
    q = kin_c.neutral()
    tips = kin_c.contact_points(q)
    pos, _ = kin_c.fk(q)
    low = float(tips[:, 2].min())
    assert low < pos[2]  # the fingertips reach below the tool centre point
    rig = Rig(kin_c, q=q, table_height=low - 0.003, table_clearance=0.001)
    d = rig.act((0.0, 0.0, -0.02, 0.0, 0.0, 0.0))
    v = d.twist[2]
    assert v < 0 and any(x.startswith('table:') for x in d.limits_applied)
    # the fingertips can stop above the plane: speed * horizon + v^2 / (2 decel) <= room
    assert -v * T <= 0.002 + 1e-12
    d = rig.act((0.0, 0.0, 0.02, 0.0, 0.0, 0.0))  # up: unchanged
    assert d.twist[2] == pytest.approx(0.08) and not d.limits_applied
    rig2 = Rig(kin_c, q=q, table_height=low - 0.001, table_clearance=0.001)  # at the plane
    d = rig2.act((0.0, 0.0, -0.01, 0.0, 0.0, 0.0))
    assert not d.twist.any() and 'at the table plane' in d.reason
    # tilting that lowers a fingertip is refused too
    d = rig2.act((0.0, 0.0, 0.0, 0.2, 0.0, 0.0))
    tips_v = d.twist[2] + d.twist[3] * (tips[:, 1] - pos[1]) - d.twist[4] * (tips[:, 0] - pos[0])
    assert (tips_v >= -1e-12).all()


def test_halt_stops_without_a_latch() -> None:
    rig = Rig()
    rig.act(MOVE)
    d = rig.lim.halt(rig.t, 'node shutting down')
    assert d.state is SafetyState.STOPPED and rig.lim.latched == ''
    assert rig.act(MOVE).accepted


def test_predicted_step_keeps_every_link_shape_above_the_table(kin: ArmKinematics) -> None:
    """Links are not contact frames; the predicted step keeps every link shape off the table."""
    q = kin.neutral()
    low = kin.link_lowest(q)
    hand = kin.link_shapes.index('panda_hand')
    table = float(low[hand]) - 0.004  # the hand 4 mm above a (raised) table plane
    rig = Rig(kin, q=q, table_height=table, table_clearance=0.0)
    d = rig.act((0.0, 0.0, -0.03, 0.0, 0.0, 0.0))  # straight down, 0.12 m/s
    assert 'step:table' in d.limits_applied, d.limits_applied
    q_next = q + np.linalg.pinv(kin.jacobian(q)) @ d.twist * T
    above = low >= table
    assert (kin.link_lowest(q_next)[above] >= table).all()
    assert 0.0 > d.twist[2] > -0.004 / T  # it still moves down, within the room left
