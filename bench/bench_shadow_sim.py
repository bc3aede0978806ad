"""Shadow mode on the simulator: the VLA proposes, the scripted expert drives, the node compares.

The procedure of a first session on a real arm, with the simulator in the arm's place: an
operator (here the scripted expert of ``vla_ros.sim.tasks``, computed from the simulator's ground
truth on ``world_state``) teleoperates the arm through its own twist topic, which the simulated
arm follows; the full graph (camera node, VLA node with the shipped checkpoint on CPU, safety node
with ``shadow_mode:=true``) runs beside it. The safety node commands nothing (its ``twist`` goes
nowhere), computes every command, and compares each accepted action's would-be twist with the
teleop twist (``reference_twist``). The report is what ``vla-ros shadow-report`` prints from the
audit log, plus the live ``SafetyStatus`` figures at the end.

    .venv/bin/python bench/bench_shadow_sim.py --episodes 3
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
from geometry_msgs.msg import TwistStamped
from std_msgs.msg import Bool, Float64, String

from vla_ros.core.actions import GripperConvention, gripper_closedness
from vla_ros.core.safety.shadow import format_report, read_audit
from vla_ros.msg import SafetyStatus
from vla_ros.nodes import qos
from vla_ros.sim.state import WorldStateError, from_json
from vla_ros.sim.tasks import ACTION_PERIOD, TASKS, expert_action
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, reserved_domain, ros_env

SIM = ['--ros-args', '-r', 'twist:=/teleop_twist', '-r', 'gripper_command:=/teleop_gripper',
       '-r', 'image_raw:=/camera/image_raw', '-r', 'episode:=/vla/episode',
       '-p', 'camera_rate_hz:=10.0']
CAMERA = ['--ros-args', '-r', '__ns:=/vla', '-r', 'image:=/camera/image_raw']
VLA = ['--ros-args', '-r', '__ns:=/vla', '-p', 'device:=cpu']


def safety_args(audit: Path, latch: Path) -> list[str]:
    return ['--ros-args', '-r', '__ns:=/vla', '-r', 'twist:=/shadow_null',
            '-r', 'joint_states:=/joint_states', '-r', 'wrench:=/wrench',
            '-r', 'reference_twist:=/teleop_twist', '-p', 'shadow_mode:=true',
            '-p', f'audit_log:={audit}', '-p', f'latch_file:={latch}']


class Teleop:
    """The operator: the scripted expert's twist from the simulator's ground truth, at 50 Hz."""

    def __init__(self, node) -> None:  # noqa: ANN001
        self.node = node
        self.twist_pub = node.create_publisher(TwistStamped, '/teleop_twist', qos.COMMAND)
        self.grip_pub = node.create_publisher(Float64, '/teleop_gripper', qos.COMMAND)
        self.success = False
        self._twist = np.zeros(6)
        self._lock = threading.Lock()
        node.create_subscription(String, '/world_state', self._on_world, 10)
        node.create_subscription(Bool, '/task_success', self._on_success, qos.LATCHED)
        node.create_timer(0.02, self._publish)

    def _on_world(self, msg: String) -> None:
        try:
            state = from_json(msg.data)
        except WorldStateError:
            return
        if state.task not in TASKS:
            return
        action = expert_action(TASKS[state.task], state)
        closed = gripper_closedness(float(action[6]), GripperConvention.parse('raw'))
        with self._lock:
            self._twist = np.asarray(action[:6], dtype=float) / ACTION_PERIOD
        self.grip_pub.publish(Float64(data=1.0 if closed > 0.5 else 0.0))

    def _on_success(self, msg: Bool) -> None:
        self.success = bool(msg.data)

    def _publish(self) -> None:
        with self._lock:
            v = self._twist.tolist()
        msg = TwistStamped()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = 'panda_link0'
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = v[:3]
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = v[3:]
        self.twist_pub.publish(msg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--episodes', type=int, default=3, help='episodes per task')
    ap.add_argument('--timeout', type=float, default=25.0, help='seconds per episode')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'shadow_sim.json'))
    opts = ap.parse_args()
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    result: dict = {'command': ' '.join([Path(sys.executable).name, *sys.argv]),
                    'machine': {'nproc': os.cpu_count(), 'python': platform.python_version(),
                                'load_average_at_start': os.getloadavg()},
                    'reference': 'scripted expert teleoperating the simulated arm',
                    'policy': 'checkpoints/sim_tabletop on CPU', 'episodes': []}
    with tempfile.TemporaryDirectory() as tmp, reserved_domain() as domain:
        env = ros_env(domain)
        audit = Path(tmp) / 'audit.jsonl'
        procs = [NodeProcess('vla_ros.nodes.sim_arm_node', SIM, env=env),
                 NodeProcess('vla_ros.nodes.camera_node', CAMERA, env=env),
                 NodeProcess('vla_ros.nodes.vla_node', VLA, env=env),
                 NodeProcess('vla_ros.nodes.safety_node', safety_args(audit, Path(tmp) / 'l'),
                             env=env)]
        with node_processes(*procs), rclpy_context(domain) as ctx:
            node = rclpy.create_node('shadow_bench', context=ctx)
            teleop = Teleop(node)
            statuses: list[SafetyStatus] = []
            node.create_subscription(SafetyStatus, '/vla/safety_status', statuses.append,
                                     qos.LATCHED)
            instr = node.create_publisher(String, '/vla/instruction', qos.OPERATOR_INPUT)
            executor = SingleThreadedExecutor(context=ctx)
            executor.add_node(node)
            spin = threading.Thread(target=executor.spin, daemon=True)
            spin.start()
            if not (procs[3].wait_for_output('SHADOW MODE', 60)
                    and procs[2].wait_for_output('vla node active', 180)):
                raise RuntimeError('graph did not come up:\n' + '\n'.join(p.output for p in procs))
            while not instr.get_subscription_count():
                time.sleep(0.05)
            for _ in range(opts.episodes):
                for task in TASKS.values():
                    teleop.success = False
                    instr.publish(String(data=task.instruction))
                    start = time.monotonic()
                    while not teleop.success and time.monotonic() - start < opts.timeout:
                        time.sleep(0.05)
                    result['episodes'].append({'task': task.name, 'success': teleop.success,
                                               'seconds': round(time.monotonic() - start, 1)})
                    print(result['episodes'][-1], flush=True)
                    instr.publish(String(data=''))  # idle between episodes
                    time.sleep(0.5)
            last = statuses[-1] if statuses else None
            executor.shutdown(timeout_sec=2.0)
            node.destroy_node()
        summary = read_audit(audit)
    result['report'] = summary
    result['report_text'] = format_report(summary).splitlines()
    if last is not None:
        result['live_status'] = {
            'shadow_actions': last.shadow_actions, 'shadow_samples': last.shadow_samples,
            'shadow_mean_abs_error': list(last.shadow_mean_abs_error),
            'shadow_direction_agreement': last.shadow_direction_agreement,
            'shadow_intervention_rate': last.shadow_intervention_rate}
    result['machine']['load_average_at_end'] = os.getloadavg()
    Path(opts.out).write_text(json.dumps(result, indent=2) + '\n')
    print(format_report(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
