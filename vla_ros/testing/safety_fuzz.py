"""Adversarial fuzz of the safety node through the node graph, speaking only the topic contract.

The caller runs ``safety_node`` and ``sim_arm_node`` as processes (``SAFETY_ARGS``,
``SIM_ARGS``); :func:`run_fuzz` takes the VLA node's place and publishes actions at 50 Hz drawn
from adversarial families (in range, huge, NaN/inf, sign-flip bursts, drives into the walls, the
floor and the joint limits, gripper chatter, out-of-order, future and zero stamps, wrong
episodes, instructions and frames), with new episodes, e-stops and resets in between. It records
every twist the safety node commands and every joint state of the simulated arm, and
:func:`check` counts the violations of every hard limit at zero tolerance (floating-point
rounding only): per-axis, speed and acceleration of the commands (per second between
consecutive twists, by their stamps, which are the limiter's computation times: 1 us per interval
for their float resolution), and on the arm joint position margins, joint speeds, the tool centre
point in the workspace box, the fingertips above the table plane and no arm body touching the
table (the simulator's contact ground truth), and the gripper's dwell time. Used by
``test/test_safety_fuzz_graph.py`` (a short run) and ``bench/bench_safety_fuzz_graph.py``
(>= 10^4 actions).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger

from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.core.safety import SafetyConfig
from vla_ros.nodes import qos
from vla_ros.testing.graph import SafetyHarness, twist_vector

__all__ = ['SAFETY_ARGS', 'SIM_ARGS', 'FuzzRecord', 'check', 'run_fuzz']

SAFETY_ARGS = ['--ros-args', '-r', '__ns:=/vla', '-r', 'twist:=/servo_node/delta_twist_cmds',
               '-r', 'joint_states:=/joint_states', '-r', 'wrench:=/wrench']
SIM_ARGS = ['--ros-args', '-r', 'twist:=/servo_node/delta_twist_cmds',
            '-r', 'gripper_command:=/vla/gripper_command', '-r', 'episode:=/vla/episode',
            '-p', 'camera_rate_hz:=1.0']
FINGERTIPS = ('panda_leftfinger_tip_front', 'panda_leftfinger_tip_back',
              'panda_rightfinger_tip_front', 'panda_rightfinger_tip_back')
INSTRUCTIONS = ('move to the red block', 'move to the green block', 'move to the blue block',
                'pick up the red block')


@dataclass
class FuzzRecord:
    """What one run sent and saw."""

    actions: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    episodes: int = 0
    estops: int = 0
    resets: int = 0
    joint_states: list[tuple[float, np.ndarray, np.ndarray]] = field(default_factory=list)
    world: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _action(rng: np.random.Generator, kind: str, state: dict) -> np.ndarray:
    """One 7D action of family ``kind`` (dx dy dz droll dpitch dyaw gripper raw: 1 = open)."""
    a = np.r_[rng.normal(0.0, [0.01, 0.01, 0.01, 0.05, 0.05, 0.05]), 1.0]
    if kind == 'huge':
        a[:6] = rng.choice([-1.0, 1.0], 6) * 10.0 ** rng.uniform(0, 308, 6)
    elif kind == 'nonfinite':
        a[rng.integers(0, 7)] = rng.choice([math.nan, math.inf, -math.inf])
    elif kind == 'flip':
        a[:6] = (1.0 if state['i'] % 2 == 0 else -1.0) * np.array([0.05, 0.05, 0.05, 0.4, 0.4,
                                                                     0.4])
    elif kind == 'wall':
        a[:6] = state['wall']
    elif kind == 'gripper':
        a[6] = float(state['i'] % 2)
    return a


def run_fuzz(h: SafetyHarness, n_actions: int, seed: int = 0, rate_hz: float = 50.0,
             progress: bool = False) -> FuzzRecord:
    """Drive the safety node with ``n_actions`` adversarial actions at ``rate_hz``."""
    rng = np.random.default_rng(seed)
    rec = FuzzRecord()
    lock = threading.Lock()

    def on_joints(msg: JointState) -> None:
        st = msg.header.stamp
        with lock:
            rec.joint_states.append((st.sec + st.nanosec * 1e-9, np.array(msg.position),
                                     np.array(msg.velocity)))

    def on_world(msg: String) -> None:
        with lock:
            rec.world.append(msg.data)

    h.node.create_subscription(JointState, '/joint_states', on_joints, qos.JOINT_STATES)
    h.node.create_subscription(String, '/world_state', on_world, 50)
    families = ('normal', 'huge', 'nonfinite', 'flip', 'wall', 'gripper', 'header')
    probs = (0.30, 0.10, 0.05, 0.10, 0.30, 0.05, 0.10)
    state = {'i': 0, 'wall': np.zeros(6), 'kind': 'normal', 'left': 0}
    h.instruct(INSTRUCTIONS[0])
    rec.episodes += 1
    period = 1.0 / rate_hz
    start = next_t = time.monotonic()
    for i in range(n_actions):
        state['i'] = i
        if state['left'] <= 0:  # families come in bursts
            state['kind'] = str(rng.choice(families, p=probs))
            long = state['kind'] == 'wall'  # long enough to reach a wall or a joint limit
            state['left'] = int(rng.integers(50, 250) if long else rng.integers(5, 60))
            axis = rng.integers(0, 6)
            wall = np.zeros(6)
            wall[axis] = rng.choice([-1.0, 1.0]) * (0.03 if axis < 3 else 0.2)
            wall[:3] += rng.normal(0.0, 0.005, 3)
            state['wall'] = wall
        state['left'] -= 1
        kind = state['kind']
        rec.kinds[kind] = rec.kinds.get(kind, 0) + 1
        a = _action(rng, kind, state)
        extra: dict = {}
        if kind == 'header':
            bad = int(rng.integers(0, 7))
            extra = [{'token_probs': rng.uniform(0.0, 0.08, 7)},
                     {'stamp_offset': -float(rng.uniform(0.05, 1.0))},
                     {'stamp_offset': float(rng.choice([0.06, 2.0, 1e6]))},
                     {'stamp_ns': 0}, {'episode': int(rng.choice([0, 4294967295]))},
                     {'instruction': str(rng.choice(['', 'put the cup away']))},
                     {'frame_id': str(rng.choice(['', 'world']))}][bad]
        h.action(a, **extra)
        rec.actions += 1
        u = rng.random()
        if u < 0.002:
            h.instruct(str(rng.choice(INSTRUCTIONS)))
            rec.episodes += 1
        elif u < 0.003:
            h.estop_pub.publish(Bool(data=True))
            rec.estops += 1
        elif u < 0.006 or (h.last_status() is not None and h.last_status().state == 4
                           and u < 0.05):
            if h.reset_client.service_is_ready():
                h.reset_client.call_async(Trigger.Request())
                rec.resets += 1
        next_t += period
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            next_t = time.monotonic()  # far behind (a loaded machine): do not burst
        if progress and i % 1000 == 0:
            print(f'{i}/{n_actions} actions', flush=True)  # noqa: T201 - bench progress
    time.sleep(0.3)
    rec.seconds = time.monotonic() - start
    return rec


def check(h: SafetyHarness, rec: FuzzRecord, config: SafetyConfig | None = None
          ) -> dict[str, object]:
    """Count violations of every hard limit in what ``h`` and ``rec`` saw (zero tolerance)."""
    c = config or SafetyConfig()
    kin = ArmKinematics.from_urdf_file(default_urdf_path(), contact_frames=FINGERTIPS)
    with h._lock:
        twists = list(h.twists)
        grippers = list(h.grippers)
        statuses = [r.msg for r in h.statuses]
    v = np.array([twist_vector(r.msg) for r in twists]).reshape(-1, 6)
    stamps = np.array([r.stamp_ns for r in twists], dtype=np.int64) * 1e-9
    out: dict[str, int] = {}
    out['nonfinite'] = int((~np.isfinite(v)).any(axis=1).sum())
    bound = np.r_[c.max_delta_xyz, c.max_delta_rpy] / c.action_period
    out['per_axis'] = int((np.abs(v) > bound * (1 + 1e-12)).any(axis=1).sum())
    lin, ang = np.linalg.norm(v[:, :3], axis=1), np.linalg.norm(v[:, 3:], axis=1)
    out['linear_speed'] = int((lin > c.max_linear_speed * (1 + 1e-12)).sum())
    out['angular_speed'] = int((ang > c.max_angular_speed * (1 + 1e-12)).sum())
    order = np.argsort(stamps, kind='stable')
    vs, ts = v[order], stamps[order]
    dt = np.diff(ts) + 1e-6
    moving = np.abs(vs[1:]).sum(axis=1) > 0.0
    dv_lin = np.linalg.norm(np.diff(vs[:, :3], axis=0), axis=1)
    dv_ang = np.linalg.norm(np.diff(vs[:, 3:], axis=0), axis=1)
    out['linear_accel'] = int((moving & (dv_lin > c.max_linear_accel * dt)).sum())
    out['angular_accel'] = int((moving & (dv_ang > c.max_angular_accel * dt)).sum())
    # the arm
    q_lo = kin.lower + c.joint_position_margin - 1e-9
    q_hi = kin.upper - c.joint_position_margin + 1e-9
    qd_max = c.joint_velocity_scale * kin.velocity_limits * (1 + 1e-9)
    lo, hi = np.array(c.workspace_min) - 1e-9, np.array(c.workspace_max) + 1e-9
    table = c.table_height + c.table_clearance - 1e-9
    worst = {'joint_margin': -math.inf, 'joint_speed_ratio': 0.0, 'box': -math.inf,
             'fingertip_below_plane': -math.inf}
    counts = {'joint_margin': 0, 'joint_velocity': 0, 'workspace': 0, 'table_plane': 0}
    for _, q, qd in rec.joint_states:
        if q.size != kin.n_joints:
            continue
        if ((q < q_lo) | (q > q_hi)).any():
            counts['joint_margin'] += 1
        worst['joint_margin'] = max(worst['joint_margin'], float((q - q_hi).max()),
                                    float((q_lo - q).max()))
        if qd.size == kin.n_joints:
            ratio = float((np.abs(qd) / qd_max).max())
            worst['joint_speed_ratio'] = max(worst['joint_speed_ratio'], ratio)
            counts['joint_velocity'] += ratio > 1.0
        pos, _ = kin.fk(q)
        counts['workspace'] += bool(((pos < lo) | (pos > hi)).any())
        worst['box'] = max(worst['box'], float((pos - hi).max()), float((lo - pos).max()))
        z = kin.contact_points(q)[:, 2]
        counts['table_plane'] += bool((z < table).any())
        worst['fingertip_below_plane'] = max(worst['fingertip_below_plane'],
                                             float(table - z.min()))
    out.update(counts)
    changes = [r.t for r in grippers]
    gaps = np.diff(changes) if len(changes) > 1 else np.array([math.inf])
    # receipt times (a gripper command has no stamp): 50 ms of transport jitter on the dwell
    out['gripper_dwell'] = int((gaps < c.gripper_min_dwell - 0.05).sum())
    table_contacts: dict[str, float] = {}  # arm body -> deepest penetration of the table
    for text in rec.world:
        try:
            pairs = json.loads(text)['contact']['pairs']
        except (ValueError, KeyError, TypeError):
            continue
        for p in pairs:
            if p.get('obstacle') == 'table':
                body = str(p.get('body'))
                table_contacts[body] = max(table_contacts.get(body, 0.0), float(p['depth']))
    states: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for s in statuses:
        states[s.state_name] = states.get(s.state_name, 0) + 1
        key = s.reason.split(':')[0][:40]
        reasons[key] = reasons.get(key, 0) + 1
    out['table_contact'] = len(table_contacts)  # arm bodies that touched the table at all
    return {'violations': out, 'worst': worst, 'twists': int(len(v)),
            'moving_twists': int((np.abs(v).sum(axis=1) > 0).sum()),
            'joint_states': len(rec.joint_states), 'gripper_changes': len(changes),
            'table_contacts': table_contacts,
            'states': states, 'top_reasons': dict(sorted(reasons.items(),
                                                         key=lambda kv: -kv[1])[:12])}
