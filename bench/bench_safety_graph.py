"""Graph benchmark of the safety path: e-stop latency under load, and the dead-VLA watchdog.

Every node is a separate process over Fast DDS on a reserved domain:

* e-stop: safety_node + sim_arm_node, plus camera_node and vla_node (tiny checkpoint, CPU)
  running inference continuously on the simulated camera so the CPU is busy, their actions
  diverted to ``/vla/action_busy``. The bench keeps the limiter ACTIVE with its own actions, then
  latches the e-stop through ``/vla/estop`` or ``~/estop`` and measures, at the bench, the time
  from just before the publish/call to the receipt of the first zero twist the safety node made
  after it. Each trial is reset and re-armed with a fresh action.
* watchdog: the vla_node's actions go to the safety node; once twists move, the vla_node is
  SIGKILLed and the time to the first zero twist is measured (target: action_timeout + one
  output period).

    .venv/bin/python bench/bench_safety_graph.py --trials 200 --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from std_msgs.msg import Bool

from vla_ros.msg import SafetyStatus, VlaAction
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, reserved_domain, ros_env
from vla_ros.testing.graph import SafetyHarness

SAFETY = ['--ros-args', '-r', '__ns:=/vla', '-r', 'twist:=/servo_node/delta_twist_cmds',
          '-r', 'joint_states:=/joint_states']
SIM = ['--ros-args', '-r', 'twist:=/servo_node/delta_twist_cmds',
       '-r', 'image_raw:=/camera/image_raw', '-r', 'gripper_command:=/vla/gripper_command',
       '-r', 'instruction:=/vla/instruction']
CAMERA = ['--ros-args', '-r', '__ns:=/vla', '-r', 'image:=/camera/image_raw',
          '-p', 'policy_rate_hz:=20.0']


def vla_args(ckpt: Path, action_topic: str) -> list[str]:
    return ['--ros-args', '-r', '__ns:=/vla', '-r', f'action:={action_topic}',
            '-p', f'model_path:={ckpt}', '-p', 'unnorm_key:=bridge_orig', '-p', 'device:=cpu']


def moving(v: np.ndarray) -> bool:
    return bool(np.any(v != 0.0))


def zero(v: np.ndarray) -> bool:
    return bool(np.all(v == 0.0))


def arm(h: SafetyHarness, sign: float) -> bool:
    """Bring the limiter to ACTIVE with a fresh small action; True once a moving twist is seen."""
    h.call('reset')  # answered 'ignored' when nothing is latched; the status may lag
    t = h.now_ns()
    h.action([0.004 * sign, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    return h.first_twist_after(t, moving, timeout=1.0) is not None


def estop_trials(h: SafetyHarness, trials: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {'topic': [], 'service': []}
    failures = 0
    for i in range(2 * trials):
        kind = 'topic' if i % 2 == 0 else 'service'
        if not arm(h, 1.0 if (i // 2) % 2 == 0 else -1.0):
            failures += 1
            if failures > trials:
                raise RuntimeError(f'could not arm the limiter: {h.last_status()}')
            continue
        time.sleep(0.02)
        t_ns, t0 = h.now_ns(), time.monotonic()
        if kind == 'topic':
            h.estop_pub.publish(Bool(data=True))
        else:
            h.call('estop')
        first = h.first_twist_after(t_ns, zero, timeout=2.0)
        if first is None:
            raise RuntimeError(f'no zero twist after the {kind} e-stop')
        out[kind].append((first.t - t0) * 1e3)
        if kind == 'topic':
            h.estop_pub.publish(Bool(data=False))
    return out


def summary(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {'n': int(a.size), 'p50_ms': float(np.percentile(a, 50)),
            'p99_ms': float(np.percentile(a, 99)), 'max_ms': float(a.max()),
            'mean_ms': float(a.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--trials', type=int, default=200, help='e-stop trials per kind')
    ap.add_argument('--kills', type=int, default=5, help='SIGKILL watchdog trials')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'safety_graph.json'))
    opts = ap.parse_args()
    from vla_ros.policy.tiny import write_tiny_checkpoint
    tmp = tempfile.TemporaryDirectory()
    ckpt = write_tiny_checkpoint(Path(tmp.name) / 'tiny')
    result: dict = {'command': ' '.join([Path(sys.executable).name, *sys.argv]),
                    'machine': {'nproc': os.cpu_count(), 'python': platform.python_version(),
                                'platform': platform.platform()},
                    'safety_config': 'config/safety_node.yaml defaults'}

    with reserved_domain() as domain:
        env = ros_env(domain)
        procs = [NodeProcess('vla_ros.nodes.safety_node', SAFETY, env=env),
                 NodeProcess('vla_ros.nodes.sim_arm_node', SIM, env=env),
                 NodeProcess('vla_ros.nodes.camera_node', CAMERA, env=env),
                 NodeProcess('vla_ros.nodes.vla_node', vla_args(ckpt, '/vla/action_busy'),
                             env=env, name='vla_busy')]
        with node_processes(*procs), rclpy_context(domain) as ctx:
            h = SafetyHarness(ctx)
            if not (procs[0].wait_for_output('safety node ready', 60) and h.connected()
                    and procs[3].wait_for_output('vla node active', 120)
                    and h.wait_joint_states()):
                raise RuntimeError('graph did not come up:\n' + '\n'.join(p.output for p in procs))
            busy = []
            h.node.create_subscription(VlaAction, '/vla/action_busy',
                                       lambda m: busy.append(m.inference_ms), 10)
            h.instruct('move to the red block')
            h.wait_reason('waiting for its first action')
            t0 = time.monotonic()
            lat = estop_trials(h, opts.trials)
            result['estop'] = {k: summary(v) for k, v in lat.items()}
            result['estop']['vla_busy'] = {
                'actions_during_trials': len(busy),
                'rate_hz': len(busy) / (time.monotonic() - t0),
                'median_inference_ms': float(np.median(busy)) if busy else None}
            h.close()

        kills = []
        for _ in range(opts.kills):
            procs = [NodeProcess('vla_ros.nodes.safety_node', SAFETY, env=env),
                     NodeProcess('vla_ros.nodes.sim_arm_node', SIM, env=env),
                     NodeProcess('vla_ros.nodes.camera_node', CAMERA, env=env),
                     NodeProcess('vla_ros.nodes.vla_node', vla_args(ckpt, '/vla/action'),
                                 env=env)]
            with node_processes(*procs), rclpy_context(domain) as ctx:
                h = SafetyHarness(ctx)
                if not (h.connected(60) and procs[3].wait_for_output('vla node active', 120)):
                    raise RuntimeError('graph did not come up for the kill trial')
                h.instruct('move to the red block')
                t = h.now_ns()
                if h.first_twist_after(t, moving, timeout=20.0) is None:
                    raise RuntimeError(f'no motion from the VLA node: {h.last_status()}')
                t_ns, t_kill = h.now_ns(), time.monotonic()
                procs[3].kill(signal.SIGKILL)
                first = h.first_twist_after(t_ns, zero, timeout=5.0)
                if first is None:
                    raise RuntimeError('no zero twist after the kill')
                h.wait_state(SafetyStatus.STATE_STOPPED, timeout=2.0)
                status = h.last_status()
                kills.append(((first.t - t_kill) * 1e3, status.reason if status else ''))
                h.close()
        result['watchdog_sigkill'] = {
            **summary([k for k, _ in kills]),
            'reasons': sorted({r for _, r in kills}),
            'target_ms': 'action_timeout 500 + one output period 20'}

    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + '\n')
    e = result['estop']
    print(f"e-stop topic   p50 {e['topic']['p50_ms']:.2f} ms  p99 {e['topic']['p99_ms']:.2f} ms  "
          f"(n={e['topic']['n']})")
    print(f"e-stop service p50 {e['service']['p50_ms']:.2f} ms  p99 {e['service']['p99_ms']:.2f}"
          f" ms  (n={e['service']['n']})")
    print(f"VLA busy: {e['vla_busy']}")
    w = result['watchdog_sigkill']
    print(f"SIGKILL -> zero twist: p50 {w['p50_ms']:.0f} ms, max {w['max_ms']:.0f} ms "
          f"(n={w['n']}) reasons {w['reasons']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
