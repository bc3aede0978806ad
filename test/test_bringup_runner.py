"""End to end through the pip-path runner: ``vla-ros bringup --sim`` as a real process tree.

The runner starts camera, VLA (the shipped checkpoint), safety and simulated arm nodes on this
test's own DDS domain; the operator commands run as their own processes (``vla-ros instruct``,
``estop``, ``reset``), and a node in this test process watches the contract's topics. Motion is
asserted loosely (task success is test_eval's business); safety behaviour strictly: under
e-stop every twist is zero while actions keep arriving and the
arm stands still; a reset alone never resumes motion, only an action newer than the reset does;
SIGINT stops everything with exit 0; a node killed with SIGKILL ends the bringup with a non-zero
exit and a message that names it, and no node outlives the runner.

Times: twists and statuses are stamped by the safety node with the system clock, actions with
their camera frame's stamp, so they compare with ``time.time_ns()`` here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import TwistStamped
from sensor_msgs.msg import JointState

from vla_ros.msg import SafetyStatus, VlaAction
from vla_ros.nodes import qos
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env, wait_for
from vla_ros.testing.graph import Received, twist_vector

pytestmark = pytest.mark.graph

NODES = ('camera_node', 'vla_node', 'safety_node', 'sim_arm_node')
TWIST_TOPIC = '/servo_node/delta_twist_cmds'
#: First actions need the VLA node to import torch and load the checkpoint (2 shared cores).
START_TIMEOUT = 60.0


def _vla_ros(env: dict[str, str], *args: str, timeout: float = 30.0
             ) -> subprocess.CompletedProcess:
    """Run one ``vla-ros`` operator command as its own process (the installed entry point)."""
    script = Path(sys.executable).with_name('vla-ros')
    cmd = [str(script)] if script.exists() else [sys.executable, '-m', 'vla_ros.cli']
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _bringup(domain_id: int, *extra: str) -> NodeProcess:
    return NodeProcess('vla_ros.cli', ['bringup', '--sim', '--duration', '120', *extra],
                       env=ros_env(domain_id), name='bringup')


def _child_pids(runner: NodeProcess) -> dict[str, int]:
    """The node pids the runner prints when it has started them."""
    assert runner.wait_for_output('[bringup] started', 20), runner.output
    line = next(x for x in runner.output.splitlines() if x.startswith('[bringup] started'))
    pids = {name: int(pid) for name, pid in re.findall(r'(\w+) \(pid (\d+)\)', line)}
    assert sorted(pids) == sorted(NODES), line
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _spread(positions: np.ndarray) -> float:
    """The largest range of any joint over ``positions`` (rows = joint states) [rad]."""
    return float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0


def _zero(r: Received) -> bool:
    return bool(np.all(twist_vector(r.msg) == 0.0))


class Observer:
    """This test's node: keeps every twist, status, action and joint state with its receipt."""

    def __init__(self, ctx: object, ns: str = '/vla') -> None:
        self.node = rclpy.create_node('bringup_observer', context=ctx)
        self._lock = threading.Lock()
        self.twists: list[Received] = []
        self.statuses: list[Received] = []
        self.actions: list[Received] = []
        self.joints: list[Received] = []
        for kind, topic, where, profile in (
                (TwistStamped, TWIST_TOPIC, self.twists, 50),
                (SafetyStatus, f'{ns}/safety_status', self.statuses, qos.LATCHED),
                (VlaAction, f'{ns}/action', self.actions, 10),
                (JointState, '/joint_states', self.joints, 10)):
            self.node.create_subscription(kind, topic, self._keeper(where), profile)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def _keeper(self, where: list[Received]):  # noqa: ANN202
        def keep(msg: object) -> None:
            with self._lock:
                where.append(Received(time.monotonic(), msg))
        return keep

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    def stamped_after(self, where: list[Received], stamp_ns: int) -> list[Received]:
        with self._lock:
            return [r for r in where if r.stamp_ns > stamp_ns]

    def first_status(self, pred, since: int = 0, timeout: float = 5.0  # noqa: ANN001
                     ) -> Received | None:
        """The first status at index >= ``since`` for which ``pred(msg)`` holds."""
        found: list[Received] = []

        def check() -> bool:
            with self._lock:
                found[:] = [r for r in self.statuses[since:] if pred(r.msg)][:1]
            return bool(found)
        return found[0] if wait_for(check, timeout, period=0.02) else None

    def positions_since(self, stamp_ns: int) -> np.ndarray:
        return np.array([r.msg.position for r in self.stamped_after(self.joints, stamp_ns)])


def test_bringup_instruct_estop_reset_and_clean_shutdown(domain_id: int, tmp_path) -> None:  # noqa: ANN001
    env = ros_env(domain_id)
    frames = tmp_path / 'frames'
    runner = _bringup(domain_id, '--save-frames', str(frames))
    with node_processes(runner), rclpy_context(domain_id) as ctx:
        obs = Observer(ctx)
        try:
            pids = _child_pids(runner)
            # Up: every node is discovered, the camera node (the instruction's one reader) has
            # both its subscriptions; the limiter idles at zero.
            assert wait_for(lambda: set(NODES) <= {
                n for n, _ in obs.node.get_node_names_and_namespaces()}
                and obs.node.count_subscribers('/vla/instruction') >= 2,
                START_TIMEOUT), runner.output
            assert wait_for(lambda: obs.joints and len(obs.twists) > 10, 20), runner.output
            assert all(_zero(r) for r in obs.twists), 'moving before any instruction'

            # Instruct through the CLI: the policy runs, the limiter goes ACTIVE, the arm moves.
            done = _vla_ros(env, 'instruct', 'move to the red block')
            assert done.returncode == 0, done.stdout + done.stderr
            assert 'delivered' in done.stdout
            active = obs.first_status(lambda s: s.state == SafetyStatus.STATE_ACTIVE,
                                      timeout=START_TIMEOUT)
            assert active is not None, runner.output
            assert wait_for(lambda: any(not _zero(r) for r in obs.stamped_after(
                obs.twists, active.stamp_ns)) or _spread(obs.positions_since(
                    active.stamp_ns)) > 1e-3, 10), runner.output
            assert wait_for(lambda: len(obs.actions) >= 2, 5), runner.output
            assert runner.wait_for_output('[status] safety ACTIVE', 5), runner.output

            # E-stop through the CLI: zero twists at once, while the policy keeps asking.
            n_status = len(obs.statuses)
            done = _vla_ros(env, 'estop')
            acked = time.time_ns()
            assert done.returncode == 0 and 'estop latched' in done.stdout, done.stdout
            estop = obs.first_status(lambda s: s.state == SafetyStatus.STATE_ESTOP, n_status)
            assert estop is not None and 'estop service' in estop.msg.reason
            # The policy keeps asking (three actions after the e-stop, however slow inference is
            # on a loaded machine), and every twist meanwhile is zero.
            assert wait_for(lambda: len(obs.stamped_after(obs.actions, acked)) >= 3
                            and len(obs.stamped_after(obs.twists, estop.stamp_ns)) >= 75, 20), \
                'the policy stopped asking'
            held = obs.stamped_after(obs.twists, estop.stamp_ns)
            assert all(_zero(r) for r in held), [twist_vector(r.msg) for r in held if not _zero(r)]
            still = obs.positions_since(estop.stamp_ns + 400_000_000)  # sim: 0.25 s hold
            assert len(still) > 50 and _spread(still) < 1e-9, 'arm moved in e-stop'
            assert obs.statuses[-1].msg.state == SafetyStatus.STATE_ESTOP

            # Reset through the CLI: STOPPED, not moving, until an action newer than the reset.
            n_status = len(obs.statuses)
            done = _vla_ros(env, 'reset')
            assert done.returncode == 0, done.stdout + done.stderr
            reset = obs.first_status(lambda s: s.state != SafetyStatus.STATE_ESTOP, n_status)
            assert reset is not None, runner.output
            assert reset.msg.state == SafetyStatus.STATE_STOPPED, reset.msg.reason
            assert 'newer than the reset' in reset.msg.reason
            # The status is stamped just after the reset took effect (same callback, under the
            # limiter's lock); 20 ms of slack keeps "fresh" on the safe side of the true time.
            fresh_after = reset.stamp_ns - 20_000_000
            assert wait_for(lambda: obs.stamped_after(obs.actions, fresh_after), 5)
            first_fresh = min(r.stamp_ns for r in obs.stamped_after(obs.actions, fresh_after))
            between = [r for r in obs.stamped_after(obs.twists, reset.stamp_ns)
                       if r.stamp_ns < first_fresh]
            assert all(_zero(r) for r in between), 'moved after reset before a fresh action'
            resumed = obs.first_status(lambda s: s.state == SafetyStatus.STATE_ACTIVE, n_status)
            assert resumed is not None and resumed.stamp_ns > first_fresh, runner.output

            # Ctrl-C: every node stops, the safety node with a last zero command, exit 0.
            runner.proc.send_signal(signal.SIGINT)
            assert runner.proc.wait(30) == 0, runner.output
            assert runner.wait_for_output('[bringup] all nodes stopped', 2), runner.output
            assert '[bringup] SIGINT: stopping' in runner.output
            assert 'safety node shutting down' in runner.output
            assert all(_gone(pid) for pid in pids.values()), pids
            # --save-frames kept about a camera frame per second of the run.
            from PIL import Image
            saved = sorted(frames.glob('frame_*.png'))
            assert len(saved) >= 3, runner.output
            assert Image.open(saved[-1]).size == (224, 224)
        finally:
            obs.close()


def test_a_dead_node_ends_the_bringup(domain_id: int) -> None:
    runner = _bringup(domain_id, '--quiet')
    with node_processes(runner):
        pids = _child_pids(runner)
        # A crash mid-run, not during start-up: wait until the policy is loaded and active.
        assert runner.wait_for_output('vla node active', START_TIMEOUT), runner.output
        os.kill(pids['vla_node'], signal.SIGKILL)
        assert runner.proc.wait(30) == 1, runner.output
        runner.stop()  # joins the output reader
        assert '[bringup] vla_node was killed by SIGKILL; stopping the others' in runner.output
        assert runner.output.rstrip().endswith(
            '[bringup] all nodes stopped (vla_node was killed by SIGKILL)'), runner.output
        assert all(_gone(pid) for pid in pids.values()), pids
