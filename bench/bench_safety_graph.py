"""Graph benchmark of the safety path: e-stop latency while the VLA node infers, and watchdogs.

Every node is a separate process over Fast DDS on a reserved domain:

* e-stop: safety_node + sim_arm_node, plus camera_node and vla_node (the shipped checkpoint,
  CPU) running inference continuously on the simulated camera so the CPU is busy, their actions
  diverted to ``/vla/action_busy``. The bench keeps the limiter ACTIVE with its own actions, then
  latches the e-stop and measures, at the bench, the time from just before the e-stop to the
  receipt of the first zero twist the safety node made after it, for three clients: a
  persistent ``/vla/estop`` publisher (``ros2 topic pub``'s QoS, created once), the ``~/estop``
  service (what ``vla-ros estop`` calls), and a publisher created for the e-stop (as a one-shot
  ``ros2 topic pub`` does: publish as soon as the safety node has matched it), timed from its
  creation. Each trial is reset and re-armed with a fresh action.
* watchdog: the vla_node's actions go to the safety node; once twists move, the vla_node is
  SIGKILLed and the time to the first zero twist is measured (target: action_timeout + one
  output period).
* the limiter's own cost (in process, the node's configuration): ``on_action`` and ``tick``.

Run it on a quiet machine (the result records the load average).

    .venv/bin/python bench/bench_safety_graph.py --trials 200 --fresh 50 --kills 5
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
from std_msgs.msg import Bool, String

from vla_ros.msg import SafetyStatus, VlaAction
from vla_ros.nodes import qos
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, reserved_domain, ros_env
from vla_ros.testing.graph import SafetyHarness

SAFETY = ['--ros-args', '-r', '__ns:=/vla', '-r', 'twist:=/servo_node/delta_twist_cmds',
          '-r', 'joint_states:=/joint_states']
SIM = ['--ros-args', '-r', 'twist:=/servo_node/delta_twist_cmds',
       '-r', 'image_raw:=/camera/image_raw', '-r', 'gripper_command:=/vla/gripper_command']
# The camera node feeds the busy VLA node; its episode goes elsewhere (the bench is the owner);
# in the watchdog trials it is the owner again (CAMERA_OWNER).
CAMERA = ['--ros-args', '-r', '__ns:=/vla', '-r', 'image:=/camera/image_raw',
          '-r', 'episode:=/vla/episode_camera', '-p', 'policy_rate_hz:=20.0']


CAMERA_OWNER = ['--ros-args', '-r', '__ns:=/vla', '-r', 'image:=/camera/image_raw',
                '-p', 'policy_rate_hz:=5.0']


def vla_args(action_topic: str) -> list[str]:
    return ['--ros-args', '-r', '__ns:=/vla', '-r', f'action:={action_topic}',
            '-p', 'device:=cpu']


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


def estop_trials(h: SafetyHarness, trials: int, fresh: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {'topic': [], 'service': [], 'fresh_topic': []}
    plan = ['topic', 'service'] * trials + ['fresh_topic'] * fresh
    failures = 0
    for i, kind in enumerate(plan):
        if not arm(h, 1.0 if (i // 2) % 2 == 0 else -1.0):
            failures += 1
            if failures > trials:
                raise RuntimeError(f'could not arm the limiter: {h.last_status()}')
            continue
        time.sleep(0.02)
        t_ns, t0 = h.now_ns(), time.monotonic()
        if kind == 'topic':
            h.estop_pub.publish(Bool(data=True))
        elif kind == 'service':
            h.call('estop')
        else:  # a fresh publisher: publish once the safety node has matched it
            pub = h.node.create_publisher(Bool, '/vla/estop', qos.OPERATOR_INPUT)
            while not pub.get_subscription_count() and time.monotonic() - t0 < 5.0:
                time.sleep(0.0005)
            pub.publish(Bool(data=True))
        first = h.first_twist_after(t_ns, zero, timeout=5.0)
        if first is None:
            raise RuntimeError(f'no zero twist after the {kind} e-stop')
        out[kind].append((first.t - t0) * 1e3)
        if kind == 'fresh_topic':
            time.sleep(0.05)
            h.node.destroy_publisher(pub)
    return out


def limiter_cost(n: int = 2000) -> dict[str, float]:
    """Median and p99 [us] of on_action and tick with kinematics, in process."""
    from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
    from vla_ros.core.safety import SafetyLimiter
    from vla_ros.eval import load_safety_config
    from vla_ros.nodes.safety_node import FINGERTIPS

    cfg = load_safety_config()
    kin = ArmKinematics.from_urdf_file(default_urdf_path(), contact_frames=FINGERTIPS)
    lim = SafetyLimiter(cfg, kin)
    rng = np.random.default_rng(0)
    q = kin.neutral()
    t = 1.0
    lim.on_episode(1, 'bench', t)
    act, tick = [], []
    for i in range(n):
        t += 0.02
        lim.on_joint_state(q, t, t)
        lim.on_camera_frame(t, t)
        if i % 10 == 0:
            t0 = time.perf_counter()
            lim.on_action(np.r_[rng.normal(0, 0.01, 6), 1.0], 0.0, 1, t, t, instruction='bench',
                          frame_id=cfg.frame_id, token_probs=np.ones(7),
                          token_margins=np.ones(7))
            act.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
            lim.tick(t)
            tick.append(time.perf_counter() - t0)
    return {'on_action_median_us': float(np.median(act) * 1e6),
            'on_action_p99_us': float(np.percentile(act, 99) * 1e6),
            'tick_median_us': float(np.median(tick) * 1e6),
            'tick_p99_us': float(np.percentile(tick, 99) * 1e6)}


def summary(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {'n': int(a.size), 'p50_ms': float(np.percentile(a, 50)),
            'p99_ms': float(np.percentile(a, 99)), 'max_ms': float(a.max()),
            'mean_ms': float(a.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--trials', type=int, default=200, help='topic and service e-stop trials')
    ap.add_argument('--fresh', type=int, default=50, help='fresh-publisher e-stop trials')
    ap.add_argument('--kills', type=int, default=5, help='SIGKILL watchdog trials')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'safety_graph.json'))
    opts = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    latch = ['-p', f'latch_file:={Path(tmp.name) / "latch"}']
    result: dict = {'command': ' '.join([Path(sys.executable).name, *sys.argv]),
                    'machine': {'nproc': os.cpu_count(), 'python': platform.python_version(),
                                'platform': platform.platform(),
                                'load_average_at_start': os.getloadavg()},
                    'safety_config': 'config/safety_node.yaml defaults',
                    'vla_busy_checkpoint': 'checkpoints/sim_tabletop (CPU)'}
    result['limiter_cost'] = limiter_cost()

    with reserved_domain() as domain:
        env = ros_env(domain)
        procs = [NodeProcess('vla_ros.nodes.safety_node', SAFETY + latch, env=env),
                 NodeProcess('vla_ros.nodes.sim_arm_node', SIM, env=env),
                 NodeProcess('vla_ros.nodes.camera_node', CAMERA, env=env),
                 NodeProcess('vla_ros.nodes.vla_node', vla_args('/vla/action_busy'),
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
            camera_instruction = h.node.create_publisher(String, '/vla/instruction',
                                                         qos.OPERATOR_INPUT)
            while not camera_instruction.get_subscription_count():
                time.sleep(0.05)
            camera_instruction.publish(String(data='move to the red block'))  # VLA: busy
            h.instruct('move to the red block')
            h.wait_reason('waiting for its first action')
            t0 = time.monotonic()
            lat = estop_trials(h, opts.trials, opts.fresh)
            result['estop'] = {k: summary(v) for k, v in lat.items()}
            result['estop']['vla_busy'] = {
                'actions_during_trials': len(busy),
                'rate_hz': len(busy) / (time.monotonic() - t0),
                'median_inference_ms': float(np.median(busy)) if busy else None}
            h.close()

        kills = []
        for k in range(opts.kills):  # each with its own latch file (the e-stops above persist)
            latch = ['-p', f'latch_file:={Path(tmp.name) / f"latch{k}"}']
            procs = [NodeProcess('vla_ros.nodes.safety_node', SAFETY + latch, env=env),
                     NodeProcess('vla_ros.nodes.sim_arm_node', SIM, env=env),
                     NodeProcess('vla_ros.nodes.camera_node', CAMERA_OWNER, env=env),
                     NodeProcess('vla_ros.nodes.vla_node', vla_args('/vla/action'), env=env)]
            with node_processes(*procs), rclpy_context(domain) as ctx:
                h = SafetyHarness(ctx)
                if not (h.connected(60) and procs[3].wait_for_output('vla node active', 120)):
                    raise RuntimeError('graph did not come up for the kill trial')
                pub = h.node.create_publisher(String, '/vla/instruction', qos.OPERATOR_INPUT)
                while not pub.get_subscription_count():
                    time.sleep(0.05)
                t = h.now_ns()
                pub.publish(String(data='move to the red block'))  # the camera node's episode
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

    result['machine']['load_average_at_end'] = os.getloadavg()
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + '\n')
    e = result['estop']
    print(f"e-stop topic   p50 {e['topic']['p50_ms']:.2f} ms  p99 {e['topic']['p99_ms']:.2f} ms  "
          f"(n={e['topic']['n']})")
    print(f"e-stop service p50 {e['service']['p50_ms']:.2f} ms  p99 {e['service']['p99_ms']:.2f}"
          f" ms  (n={e['service']['n']})")
    f = e['fresh_topic']
    print(f"e-stop fresh publisher p50 {f['p50_ms']:.1f} ms  p99 {f['p99_ms']:.1f} ms  "
          f"(n={f['n']})")
    print(f"VLA busy: {e['vla_busy']}")
    w = result['watchdog_sigkill']
    print(f"SIGKILL -> zero twist: p50 {w['p50_ms']:.0f} ms, max {w['max_ms']:.0f} ms "
          f"(n={w['n']}) reasons {w['reasons']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
