"""Contact stop through the graph: time from contact onset to a zero twist, and penetration.

The safety node (defaults of ``config/safety_node.yaml``: ``max_contact_force`` 30 N) and the
simulated arm with contact (``sim_arm_node``: penalty contacts with the table and the blocks,
compliant joints, tool wrench at 100 Hz) run as processes over Fast DDS. Each trial starts a new
episode (the simulator re-seeds the layout and the start pose), brings the tool centre point above
the red block with small actions and the gripper closed, then descends onto it at a trial speed
(0.02 to 0.15 m/s, drawn) until the safety node latches its protective stop; the block pushes back
on the fingers. Measured per trial, all on ROS time: the contact onset (the simulator's ground
truth on ``world_state``, interpolated within its integration sub-step), the stamp of the first
zero twist the safety node computed after it, and the deepest penetration of the contact event
(``peak_depth``, read 0.5 s after the stop). Between trials ``~/reset`` clears the latch and the
next episode moves the arm away. A second part drives the fingertips towards the table plane (no
block below) and counts table contacts: the table-plane stage must refuse every one (the workspace
floor is lowered to -0.1 m for the bench, so that the table plane alone guards the table).

    .venv/bin/python bench/bench_safety_contact.py --trials 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.msg import SafetyStatus
from vla_ros.nodes import qos
from vla_ros.sim.state import WorldStateError, from_json
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, reserved_domain, ros_env
from vla_ros.testing.graph import SafetyHarness, twist_vector
from vla_ros.testing.safety_fuzz import FINGERTIPS, SAFETY_ARGS

SIM_ARGS = ['--ros-args', '-r', 'twist:=/servo_node/delta_twist_cmds',
            '-r', 'gripper_command:=/vla/gripper_command', '-r', 'episode:=/vla/episode',
            '-p', 'camera_rate_hz:=10.0']


class World:
    """The simulator's ground truth and the tool position (FK of the joint states)."""

    def __init__(self, h: SafetyHarness) -> None:
        self.kin = ArmKinematics.from_urdf_file(default_urdf_path())
        self.lock = threading.Lock()
        self.states: list = []
        self.tcp: np.ndarray | None = None
        self.q: np.ndarray | None = None
        h.node.create_subscription(String, '/world_state', self._on_world, 50)
        h.node.create_subscription(JointState, '/joint_states', self._on_joints,
                                   qos.JOINT_STATES)

    def _on_world(self, msg: String) -> None:
        try:
            state = from_json(msg.data)
        except WorldStateError:
            return
        with self.lock:
            self.states.append(state)

    def _on_joints(self, msg: JointState) -> None:
        try:
            q = self.kin.order_joint_state(msg.name, msg.position)
        except ValueError:
            return
        pos, _ = self.kin.fk(q)
        with self.lock:
            self.tcp, self.q = pos, q

    def latest(self, seed: int | None = None):  # noqa: ANN201
        with self.lock:
            for s in reversed(self.states):
                if seed is None or s.seed == seed:
                    return s
        return None


def wait(pred, timeout: float) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def drive_to(h: SafetyHarness, world: World, goal: np.ndarray, timeout: float = 15.0,
             grip: float = 1.0) -> bool:
    """Send 5 Hz actions towards ``goal`` until the tool is within 3 mm (gripper raw ``grip``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        tcp = world.tcp
        if tcp is None:
            time.sleep(0.05)
            continue
        err = goal - tcp
        if np.linalg.norm(err) < 0.003:
            h.action([0.0] * 6 + [grip])  # hold still (a held action runs on otherwise)
            time.sleep(0.4)
            if np.linalg.norm(goal - world.tcp) < 0.003:
                return True
            continue
        # a proportional step (the command ramps at the acceleration bound and is held)
        step = 0.5 * err * min(1.0, 0.02 / max(np.linalg.norm(err), 1e-9))
        h.action([*step, 0.0, 0.0, 0.0, grip])
        time.sleep(0.2)
    return False


def contact_trial(h: SafetyHarness, world: World, rng: np.random.Generator,
                  text: str) -> dict | None:
    h.instruct(text)
    # the simulator re-seeds episode k with layout seed k (its seed parameter is 0): wait for
    # its ground truth of the new layout
    seed_ok = wait(lambda: world.latest() is not None and world.latest().seed == h._episode
                   and h.last_status() is not None
                   and 'waiting for its first action' in h.last_status().reason, 10.0)
    if not seed_ok:
        return None
    state = world.latest()
    block = np.asarray(state.blocks['red'])
    top = block[2] + state.block_size / 2.0
    above = np.array([block[0], block[1], top + 0.06])
    if not drive_to(h, world, above, grip=0.0):  # closed: the fingertips land on the block
        return {'skipped': 'could not reach the pre-contact pose'}
    speed = float(rng.uniform(0.02, 0.15))
    n_status = len(h.statuses)
    t_start = h.now_ns()
    stopped: list = []
    while not stopped and h.now_ns() - t_start < 8e9:  # descend until the protective stop
        h.action([0.0, 0.0, -speed * 0.2, 0.0, 0.0, 0.0, 0.0])
        time.sleep(0.2)
        stopped = [r.msg for r in h.statuses[n_status:]
                   if r.msg.state == SafetyStatus.STATE_ESTOP]
    if not stopped:
        return {'skipped': f'no protective stop at {speed:.3f} m/s: {h.last_status().reason}'}
    time.sleep(0.5)
    events = [s for s in world.states if s.contact.onset is not None
              and s.contact.onset * 1e9 > t_start]
    if not events:
        return {'skipped': 'no contact onset in the ground truth'}
    onset = min(s.contact.onset for s in events)
    peak = max(s.contact.peak_depth for s in events if s.contact.onset == onset)
    latched = stopped[0].header.stamp.sec + stopped[0].header.stamp.nanosec * 1e-9
    # the zero twist of the protective stop (a braking stage may have zeroed one before it)
    first_zero = next((r for r in h.twists_stamped_after(int(latched * 1e9) - 1)
                       if not np.any(twist_vector(r.msg))), None)
    if first_zero is None:
        return {'skipped': 'no zero twist after the protective stop'}
    pair = next(s.contact.pair for s in events if s.contact.onset == onset)
    return {'speed_mps': speed,
            'onset_to_zero_twist_ms': (first_zero.stamp_ns * 1e-9 - onset) * 1e3,
            'onset_to_latch_ms': (latched - onset) * 1e3,  # the force building up to 30 N
            'latch_to_zero_twist_ms': (first_zero.stamp_ns * 1e-9 - latched) * 1e3,
            'peak_depth_mm': peak * 1e3, 'pair': list(pair) if pair else None,
            'reason': stopped[0].reason}


def table_trial(h: SafetyHarness, world: World, text: str) -> dict:
    """Drive straight down far from the blocks: the table plane must stop the fingertips."""
    h.instruct(text)
    wait(lambda: world.latest() is not None and world.latest().seed == h._episode, 10.0)
    state = world.latest()
    blocks = np.array(list(state.blocks.values()))
    spot = np.array([0.45, -0.3 if blocks[:, 1].mean() > 0 else 0.3, 0.1])
    drive_to(h, world, spot)
    n = len(world.states)
    for _ in range(25):
        h.action([0.0, 0.0, -0.03, 0.0, 0.0, 0.0, 1.0])
        time.sleep(0.2)
    touches = [p for s in world.states[n:] for p in s.contact.pairs if p.obstacle == 'table']
    kin = ArmKinematics.from_urdf_file(default_urdf_path(), contact_frames=FINGERTIPS)
    q = kin.neutral() if world.q is None else world.q
    return {'table_touches': len(touches), 'tcp_z_m': float(world.tcp[2]),
            'lowest_fingertip_z_m': float(kin.contact_points(q)[:, 2].min()),
            'reason': h.last_status().reason}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--trials', type=int, default=60)
    ap.add_argument('--table-trials', type=int, default=5)
    ap.add_argument('--seed', type=int, default=3)
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results'
                                         / 'safety_contact.json'))
    opts = ap.parse_args()
    rng = np.random.default_rng(opts.seed)
    result: dict = {'command': ' '.join([Path(sys.executable).name, *sys.argv]),
                    'machine': {'nproc': os.cpu_count(), 'python': platform.python_version(),
                                'load_average_at_start': os.getloadavg()},
                    'safety_config': 'config/safety_node.yaml defaults'}
    trials, skipped, tables = [], [], []
    with tempfile.TemporaryDirectory() as tmp, reserved_domain() as domain:
        env = ros_env(domain)
        # the workspace floor lowered so that the table plane alone guards the table
        safety = NodeProcess('vla_ros.nodes.safety_node', SAFETY_ARGS + [
            '-p', f'latch_file:={Path(tmp) / "latch"}',
            '-p', 'workspace_min:=[0.15, -0.45, -0.1]'], env=env)
        sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=env)
        with node_processes(safety, sim), rclpy_context(domain) as ctx:
            h = SafetyHarness(ctx)
            world = World(h)
            if not (safety.wait_for_output('safety node ready', 60) and h.connected()
                    and h.wait_joint_states()):
                raise RuntimeError('graph did not come up:\n' + safety.output + sim.output)
            texts = ('move to the red block', 'move to the green block')
            for i in range(opts.trials):
                r = contact_trial(h, world, rng, texts[i % 2])
                if r is None or 'skipped' in r:
                    skipped.append(r)
                else:
                    trials.append(r)
                h.call('reset')
                print(f'trial {i + 1}/{opts.trials}: {r}', flush=True)
            for i in range(opts.table_trials):
                tables.append(table_trial(h, world, texts[i % 2]))
                h.call('reset')
            h.close()
    lat = [t['onset_to_zero_twist_ms'] for t in trials]
    depth = [t['peak_depth_mm'] for t in trials]
    result['contact_stop'] = {
        'trials': len(trials), 'skipped': skipped,
        'onset_to_zero_twist_ms': {'p50': pct(lat, 50), 'p99': pct(lat, 99), 'max': max(lat)},
        'peak_penetration_mm': {'p50': pct(depth, 50), 'p99': pct(depth, 99),
                                'max': max(depth)},
        'onset_to_latch_ms': {'p50': pct([t['onset_to_latch_ms'] for t in trials], 50),
                              'p99': pct([t['onset_to_latch_ms'] for t in trials], 99)},
        'latch_to_zero_twist_ms': {
            'p50': pct([t['latch_to_zero_twist_ms'] for t in trials], 50),
            'p99': pct([t['latch_to_zero_twist_ms'] for t in trials], 99)},
        'speed_mps': {'min': min(t['speed_mps'] for t in trials),
                      'max': max(t['speed_mps'] for t in trials)},
        'pairs': sorted({tuple(t['pair']) for t in trials if t['pair']}),
        'trials_detail': trials}
    result['table_plane'] = {'trials': tables,
                             'table_touches': sum(t['table_touches'] for t in tables)}
    result['machine']['load_average_at_end'] = os.getloadavg()
    Path(opts.out).write_text(json.dumps(result, indent=2, default=list) + '\n')
    c = result['contact_stop']
    print(f"{c['trials']} contact stops: onset -> zero twist p50 "
          f"{c['onset_to_zero_twist_ms']['p50']:.1f} ms p99 "
          f"{c['onset_to_zero_twist_ms']['p99']:.1f}"
          f" ms; penetration p50 {c['peak_penetration_mm']['p50']:.2f} mm p99 "
          f"{c['peak_penetration_mm']['p99']:.2f} mm; table touches "
          f"{result['table_plane']['table_touches']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
