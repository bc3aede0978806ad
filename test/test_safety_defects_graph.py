"""Graph tests of issue 12's defects, black-box: only the topic contract, as the probe spoke it.

The safety node runs as its own process with kinematics on; this test process plays the camera
node (``episode``), the VLA node (``action``) and the arm's driver (``joint_states`` at 100 Hz,
stamped as a test chooses), and watches the twists. Each test first shows that a correct input
moves the arm, so that "no motion" afterwards means the defect's input was refused.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sensor_msgs.msg import JointState

from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.msg import SafetyStatus
from vla_ros.nodes import qos
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env
from vla_ros.testing.graph import SafetyHarness, twist_vector

pytestmark = pytest.mark.graph

SAFETY_ARGS = ['--ros-args', '-r', '__ns:=/vla', '-r', 'twist:=/servo_node/delta_twist_cmds',
               '-r', 'joint_states:=/joint_states']
MOVE = [0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


class Driver:
    """Joint states of the arm at home at 100 Hz, stamped now + ``offset_ns`` (None: zero)."""

    def __init__(self, h: SafetyHarness) -> None:
        kin = ArmKinematics.from_urdf_file(default_urdf_path())
        self.names, self.q = list(kin.joint_names), kin.neutral().tolist()
        self.pub = h.node.create_publisher(JointState, '/joint_states', qos.COMMAND)
        self.h = h
        self.offset_ns: int | None = 0  # None: zero stamp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            msg = JointState(name=self.names, position=self.q)
            if self.offset_ns is not None:
                t = self.h.now_ns() + self.offset_ns
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, 1_000_000_000)
            self.pub.publish(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


@pytest.fixture
def rig(domain_id: int, tmp_path):  # noqa: ANN001, ANN201
    safety = NodeProcess('vla_ros.nodes.safety_node',
                         SAFETY_ARGS + ['-p', f'latch_file:={tmp_path / "latch"}'],
                         env=ros_env(domain_id))
    with node_processes(safety), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        driver = Driver(h)
        assert safety.wait_for_output('safety node ready', 30), safety.output
        assert h.connected(), safety.output
        assert h.wait_joint_states(), safety.output
        yield safety, h, driver
        driver.close()
        h.close()


def _moving(v: np.ndarray) -> bool:
    return bool(np.any(v != 0.0))


def _moves(h: SafetyHarness, **action) -> bool:  # noqa: ANN003
    """Whether one of up to three actions moves the arm within 2 s each.

    Three, should a loaded machine delay the joint states past their timeout once.
    """
    for _ in range(3):
        t = h.now_ns()
        h.action(MOVE, **action)
        if h.first_twist_after(t, _moving, timeout=2.0) is not None:
            return True
    return False


def _still_after(h: SafetyHarness, send, seconds: float = 0.6) -> bool:  # noqa: ANN001
    """Call ``send()`` every 20 ms for ``seconds``; whether every twist made since was zero."""
    t = h.now_ns()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        send()
        time.sleep(0.02)
    time.sleep(0.1)
    return not any(_moving(twist_vector(r.msg)) for r in h.twists_stamped_after(t))


def _start(h: SafetyHarness, text: str = 'move to the red block') -> None:
    h.instruct(text)
    assert h.wait_reason('waiting for its first action')
    assert _moves(h), h.last_status()


def _stop(h: SafetyHarness) -> None:
    """Let the held action go stale (0.5 s) so that the arm is at rest again."""
    assert h.wait_state(SafetyStatus.STATE_STOPPED, timeout=3.0), h.last_status()


def test_future_stamped_actions_never_move_and_never_block_later_ones(rig) -> None:  # noqa: ANN001
    """Defect 1: 2 s and 1e6 s ahead are refused; the next correctly stamped action moves."""
    safety, h, _ = rig
    _start(h)
    _stop(h)
    for ahead in (2.0, 1e6):
        assert _still_after(h, lambda a=ahead: h.action(MOVE, stamp_offset=a)), safety.output
        assert 'ahead of the local clock' in h.last_status().reason
        assert _moves(h), (ahead, h.last_status())
        _stop(h)


def test_a_huge_episode_id_does_not_disable_the_node(rig) -> None:  # noqa: ANN001
    """Defect 2: uint32 max and current + 1 are not the current episode; later ones run."""
    safety, h, _ = rig
    _start(h)
    _stop(h)
    assert _still_after(h, lambda: h.action(MOVE, episode=4294967295)), safety.output
    assert _still_after(h, lambda: h.action(MOVE, episode=h._episode + 1)), safety.output
    assert _moves(h), h.last_status()
    _stop(h)
    _start(h, 'move to the green block')  # the next episode still moves


@pytest.mark.parametrize('offset_ns', [-5_000_000_000, None], ids=['5s_old', 'zero_stamp'])
def test_stale_or_unstamped_joint_states_never_move_the_arm(rig, offset_ns) -> None:  # noqa: ANN001
    """Defect 6: joint states stamped 5 s ago or with a zero stamp, arriving at 100 Hz."""
    safety, h, driver = rig
    _start(h)
    _stop(h)
    driver.offset_ns = offset_ns
    time.sleep(0.1)
    assert _still_after(h, lambda: h.action(MOVE), seconds=0.9), safety.output
    assert h.last_status().state != SafetyStatus.STATE_ACTIVE
    driver.offset_ns = 0
    assert h.wait_joint_states(), safety.output
    assert _moves(h), h.last_status()


def test_acceleration_holds_in_physical_units_at_50_hz(rig) -> None:  # noqa: ANN001
    """Defect 8: alternating actions at 50 Hz; |dv| / dt between consecutive twists is bounded."""
    safety, h, _ = rig
    _start(h)
    t = h.now_ns()
    for k in range(60):
        sign = 1.0 if (k // 5) % 2 == 0 else -1.0
        h.action([sign * 0.03, 0.0, 0.0, 0.0, 0.0, sign * 0.2, 1.0])
        time.sleep(0.02)
    time.sleep(0.2)
    twists = h.twists_stamped_after(t)
    assert len(twists) > 60, safety.output
    worst_lin = worst_ang = 0.0
    for a, b in zip(twists, twists[1:], strict=False):
        # Each twist is stamped with the time the limiter computed it; that time is a float of
        # seconds since the epoch (resolution 0.24 us): allow 1 us per interval for it.
        dt = (b.stamp_ns - a.stamp_ns) * 1e-9 + 1e-6
        dv = twist_vector(b.msg) - twist_vector(a.msg)
        if not _moving(twist_vector(b.msg)):
            continue  # a stop commands zero at once
        worst_lin = max(worst_lin, np.linalg.norm(dv[:3]) / dt)
        worst_ang = max(worst_ang, np.linalg.norm(dv[3:]) / dt)
    assert 0.4 < worst_lin <= 0.5, worst_lin  # the bound binds, and holds
    assert 0.0 < worst_ang <= 3.0, worst_ang


@pytest.mark.parametrize('field, value', [('instruction', 'put the cup away'),
                                          ('instruction', ''), ('frame_id', 'world'),
                                          ('frame_id', '')])
def test_actions_for_another_instruction_or_frame_never_move(rig, field, value) -> None:  # noqa: ANN001
    """Defect 9: the action's instruction and frame are checked (fail closed)."""
    safety, h, _ = rig
    _start(h)
    _stop(h)
    assert _still_after(h, lambda: h.action(MOVE, **{field: value})), safety.output
    assert _moves(h), h.last_status()


def test_gripper_flood_toggles_at_most_once_per_dwell(rig) -> None:  # noqa: ANN001
    """Defect 4: one second of open/close at 50 Hz, each opinion held for two actions."""
    safety, h, _ = rig
    _start(h)
    n = len(h.grippers)
    for k in range(50):
        h.action([0.01, 0.0, 0.0, 0.0, 0.0, 0.0, float((k // 2) % 2)])
        time.sleep(0.02)
    time.sleep(0.2)
    changes = h.grippers[n:]
    values = [r.msg.data for r in changes]
    assert len(changes) <= 3, values  # gripper_min_dwell 0.5 s: at most at 0, 0.5 and 1.0 s
    assert all(b.t - a.t >= 0.45 for a, b in zip(changes, changes[1:], strict=False))


@pytest.mark.parametrize('how', ['service', 'latched_topic_gone', 'sigkill'])
def test_an_estop_survives_a_restart_until_reset(domain_id: int, tmp_path, how: str) -> None:  # noqa: ANN001
    """Defect 7: latched by the service or by a publisher that has exited, or the node killed.

    The restarted node (same latch file) comes back in ESTOP and fresh actions do not move the
    arm; only ``~/reset`` clears it, and the file with it.
    """
    from std_msgs.msg import Bool

    latch = tmp_path / 'latch'
    args = SAFETY_ARGS + ['-p', f'latch_file:={latch}']
    with rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        driver = Driver(h)
        try:
            first = NodeProcess('vla_ros.nodes.safety_node', args, env=ros_env(domain_id))
            with node_processes(first):
                assert first.wait_for_output('safety node ready', 30), first.output
                assert h.connected() and h.wait_joint_states(), first.output
                _start(h)
                if how == 'latched_topic_gone':
                    pub = h.node.create_publisher(Bool, '/vla/estop', qos.LATCHED)
                    pub.publish(Bool(data=True))
                    assert h.wait_state(SafetyStatus.STATE_ESTOP), first.output
                    h.node.destroy_publisher(pub)  # the publisher exits
                else:
                    assert h.call('estop').success
                assert h.wait_status(lambda s: s.latch_persisted), h.last_status()
                assert latch.exists()
                if how == 'sigkill':
                    first.kill()
            restart = h.now_ns()
            second = NodeProcess('vla_ros.nodes.safety_node', args, env=ros_env(domain_id))
            with node_processes(second):
                assert second.wait_for_output('safety node ready', 30), second.output
                assert 'latched before this start' in second.output
                back = h.status_after(restart, lambda s: True, timeout=20.0)
                assert back is not None, second.output
                assert back.state == SafetyStatus.STATE_ESTOP and back.latched, back
                h.instruct('move to the red block')
                time.sleep(0.2)
                assert _still_after(h, lambda: h.action(MOVE), seconds=1.0), second.output
                assert h.last_status().state == SafetyStatus.STATE_ESTOP
                assert h.call('reset').success
                assert not latch.exists()
                assert h.wait_joint_states()
                assert _moves(h), (h.last_status().state_name, h.last_status().reason)
        finally:
            driver.close()
            h.close()


def test_a_corrupt_latch_file_fails_closed(domain_id: int, tmp_path) -> None:  # noqa: ANN001
    latch = tmp_path / 'latch'
    latch.write_bytes(b'\x00garbage{')
    args = SAFETY_ARGS + ['-p', f'latch_file:={latch}']
    with rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        try:
            safety = NodeProcess('vla_ros.nodes.safety_node', args, env=ros_env(domain_id))
            with node_processes(safety):
                assert safety.wait_for_output('safety node ready', 30), safety.output
                assert h.wait_status(lambda s: s.state == SafetyStatus.STATE_ESTOP
                                     and 'corrupt' in s.latched, timeout=20.0), safety.output
                assert h.call('reset').success and not latch.exists()
                assert h.wait_state(SafetyStatus.STATE_IDLE)
        finally:
            h.close()
