"""Graph tests of the safety node as its own process, with the simulated arm closing the loop."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from std_msgs.msg import Bool

from vla_ros.msg import SafetyStatus
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env
from vla_ros.testing.graph import SafetyHarness, twist_vector

pytestmark = pytest.mark.graph

SAFETY_ARGS = ['--ros-args', '-r', '__ns:=/vla', '-r', 'twist:=/servo_node/delta_twist_cmds',
               '-r', 'joint_states:=/joint_states']
SIM_ARGS = ['--ros-args', '-r', 'twist:=/servo_node/delta_twist_cmds',
            '-r', 'gripper_command:=/vla/gripper_command', '-r', 'instruction:=/vla/instruction',
            '-p', 'camera_rate_hz:=1.0']


def _zero(v: np.ndarray) -> bool:
    return bool(np.all(v == 0.0))


@pytest.fixture
def graph(domain_id: int, tmp_path):  # noqa: ANN001, ANN201
    audit = tmp_path / 'audit.jsonl'
    safety = NodeProcess('vla_ros.nodes.safety_node',
                         SAFETY_ARGS + ['-p', f'audit_log:={audit}', '-p',
                                        f'latch_file:={tmp_path / "latch"}'],
                         env=ros_env(domain_id))
    safety.audit = audit
    sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=ros_env(domain_id))
    with node_processes(safety, sim), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        assert safety.wait_for_output('safety node ready', 30), safety.output
        assert h.connected(), safety.output
        assert h.wait_joint_states(), safety.output + sim.output
        yield safety, h
        h.close()


def _activate(h: SafetyHarness, delta: list[float]) -> int:
    """Instruct, send one action; return the ROS time [ns] just before it was sent."""
    h.instruct('move to the red block')
    assert h.wait_reason('waiting for its first action')
    t = h.now_ns()
    h.action(delta)
    return t


def _all_zero_after(h: SafetyHarness, stamp_ns: int) -> bool:
    return all(_zero(twist_vector(r.msg)) for r in h.twists_stamped_after(stamp_ns))


def test_in_range_action_passes_unchanged_then_stale_action_stops(graph) -> None:  # noqa: ANN001
    safety, h = graph
    delta = [0.01, -0.005, 0.004, 0.0, 0.0, 0.02, 1.0]  # gripper raw 1.0 = open (Bridge)
    target = np.array(delta[:6]) / 0.2
    t0 = _activate(h, delta)
    # The command ramps up at max_linear_accel / max_angular_accel per second (the linear
    # part reaches 0.056 m/s after 0.11 s at 0.5 m/s^2), keeping the direction of each part,
    # and then is the action's twist exactly.
    reached = h.first_twist_after(t0, lambda v: np.allclose(v, target, rtol=0, atol=1e-12))
    assert reached is not None, (safety.output, h.last_status())
    ramp = [twist_vector(r.msg) for r in h.twists_stamped_after(t0)
            if r.stamp_ns < reached.stamp_ns]
    for v in ramp:
        for part in (slice(0, 3), slice(3, 6)):
            n = np.linalg.norm(v[part])
            if n:
                np.testing.assert_allclose(v[part] / n, target[part] / np.linalg.norm(
                    target[part]), atol=1e-9)
    assert h.wait_state(SafetyStatus.STATE_ACTIVE)
    assert h.grippers and h.grippers[-1].msg.data == 0.0  # raw 1.0 (open) -> command 0 = open
    n_grip = len(h.grippers)
    t1 = h.now_ns()
    h.action(delta)  # the same command again: no new gripper command
    assert h.first_twist_after(t1, lambda v: not _zero(v)) is not None, safety.output
    time.sleep(0.1)
    assert len(h.grippers) == n_grip
    assert list(h.last_status().limits_applied) == []
    # The held twist is re-published at the output rate until the action is stale...
    stopped = h.first_twist_after(t1, _zero, timeout=3.0)
    assert stopped is not None
    repeats = [r for r in h.twists_stamped_after(t1) if r.stamp_ns < stopped.stamp_ns]
    assert len(repeats) >= 10, (f'only {len(repeats)} re-publications in ~0.5 s at 50 Hz',
                                safety.output)
    assert all(np.array_equal(twist_vector(r.msg), target) for r in repeats)
    # ...then a controlled stop: timeout 0.5 s + at most one output period (+ scheduling).
    assert 0.45e9 < stopped.stamp_ns - t1 < (0.5 + 0.02 + 0.1) * 1e9, stopped.stamp_ns - t1
    assert h.wait_state(SafetyStatus.STATE_STOPPED)
    assert 'stale' in h.last_status().reason


def test_estop_latches_and_reset_never_resumes_by_itself(graph) -> None:  # noqa: ANN001
    safety, h = graph
    t0 = _activate(h, [0.01, 0, 0, 0, 0, 0, 1.0])
    assert h.first_twist_after(t0, lambda v: not _zero(v)) is not None
    # Keep actions flowing, then e-stop through the topic.
    h.action([0.01, 0, 0, 0, 0, 0, 1.0])
    t_e, t_e_mono = h.now_ns(), time.monotonic()
    h.estop_pub.publish(Bool(data=True))
    zero = h.first_twist_after(t_e, _zero, timeout=2.0)
    assert zero is not None and zero.t - t_e_mono < 0.2
    assert h.wait_state(SafetyStatus.STATE_ESTOP)
    # Actions during the e-stop do nothing.
    t1 = h.now_ns()
    for _ in range(5):
        h.action([0.01, 0, 0, 0, 0, 0, 1.0])
        time.sleep(0.02)
    time.sleep(0.2)
    assert _all_zero_after(h, t1)
    # Reset: no motion by itself, nor from an action computed before the reset.
    stale = h.action([0.01, 0, 0, 0, 0, 0, 1.0], stamp_offset=-0.05)
    time.sleep(0.05)
    h.estop_pub.publish(Bool(data=False))  # clearing the topic does not reset the latch
    time.sleep(0.1)
    assert h.last_status().state == SafetyStatus.STATE_ESTOP
    t2 = h.now_ns()
    resp = h.call('reset')
    assert resp.success, resp.message
    h.action_pub.publish(stale)
    time.sleep(0.3)
    assert _all_zero_after(h, t2)
    assert h.last_status().state == SafetyStatus.STATE_STOPPED
    # A fresh action resumes.
    t3 = h.now_ns()
    h.action([0.01, 0, 0, 0, 0, 0, 1.0])
    assert h.first_twist_after(t3, lambda v: not _zero(v), timeout=2.0) is not None, \
        safety.output
    # The service e-stop works as well.
    resp = h.call('estop')
    assert resp.success
    t4 = h.now_ns()
    time.sleep(0.1)
    assert _all_zero_after(h, t4)
    assert h.last_status().state == SafetyStatus.STATE_ESTOP


def test_bad_actions_give_a_safe_state_and_huge_ones_are_limited(graph) -> None:  # noqa: ANN001
    safety, h = graph
    t0 = _activate(h, [float('nan'), 0, 0, 0, 0, 0, 1.0])
    assert h.wait_state(SafetyStatus.STATE_STOPPED), safety.output
    assert 'finite' in h.last_status().reason
    assert _all_zero_after(h, t0)
    t1 = h.now_ns()
    h.action([5.0, -5.0, 5.0, 3.0, -3.0, 3.0, 1.0])
    moving = h.first_twist_after(t1, lambda v: not _zero(v))
    assert moving is not None, safety.output
    v = twist_vector(moving.msg)
    assert np.linalg.norm(v[:3]) <= 0.15 + 1e-9 and np.linalg.norm(v[3:]) <= 0.8 + 1e-9
    assert np.all(np.abs(v[:3]) * 0.2 <= 0.03 + 1e-12)
    assert h.wait_state(SafetyStatus.STATE_ACTIVE)
    assert h.last_status().limits_applied, 'a huge action must report its limits'
    h.action([float('inf')] * 7)
    assert h.wait_state(SafetyStatus.STATE_STOPPED)
    assert safety.alive()
    # The audit log has one JSON line per action (and per transition): input, each limit
    # applied, output, state.
    records = [json.loads(line) for line in safety.audit.read_text().splitlines()]
    actions = [r for r in records if r['event'] == 'action']
    assert len(actions) >= 3, records
    nan_rec, huge_rec, inf_rec = actions[-3:]
    assert nan_rec['input']['requested'][0] == 'nan' and not nan_rec['accepted']
    assert nan_rec['output']['twist'] == [0.0] * 6
    assert huge_rec['accepted'] and huge_rec['state'] == 'ACTIVE'
    assert any(x.startswith('per_axis_clamp') for x in huge_rec['limits_applied'])
    assert huge_rec['output']['linear_speed'] <= 0.15 + 1e-9
    assert inf_rec['state'] == 'STOPPED' and inf_rec['output']['twist'] == [0.0] * 6


def test_stop_detection_done_after_exactly_n_still_actions_and_rearm(graph) -> None:  # noqa: ANN001
    safety, h = graph
    still = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    _activate(h, still)
    assert h.wait_status(lambda s: s.step_count == 1), safety.output
    # Still actions count once the gripper command has settled (debounce); DONE comes with the
    # 10th consecutive still action (still_count = 10), not one earlier.
    step = 1
    while h.last_status().still_count < 9:
        step += 1
        assert step < 20, h.last_status()
        h.action(still)
        assert h.wait_status(lambda s, n=step: s.step_count == n), h.last_status()
        assert h.last_status().state == SafetyStatus.STATE_ACTIVE, h.last_status().reason
    h.action(still)  # the 10th still action
    assert h.wait_state(SafetyStatus.STATE_DONE, timeout=2.0), h.last_status().reason
    assert h.last_status().still_count == 10
    t = h.now_ns()
    h.action([0.01, 0, 0, 0, 0, 0, 1.0])  # motion after DONE needs a new instruction
    time.sleep(0.3)
    assert _all_zero_after(h, t) and h.last_status().state == SafetyStatus.STATE_DONE
    t = _activate(h, [0.01, 0, 0, 0, 0, 0, 1.0])  # a new instruction re-arms
    assert h.first_twist_after(t, lambda v: not _zero(v), timeout=2.0) is not None
    assert h.wait_state(SafetyStatus.STATE_ACTIVE)


def test_pose_mode_targets_current_tool_pose_plus_limited_delta(domain_id) -> None:  # noqa: ANN001
    from geometry_msgs.msg import PoseStamped

    args = SAFETY_ARGS + ['-p', 'output_mode:=pose', '-r', 'pose_target:=/pose_target']
    safety = NodeProcess('vla_ros.nodes.safety_node', args, env=ros_env(domain_id))
    sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=ros_env(domain_id))
    with node_processes(safety, sim), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx, twist_topic='/unused_twist')
        poses: list[PoseStamped] = []
        sim_poses: list[PoseStamped] = []
        h.node.create_subscription(PoseStamped, '/pose_target', poses.append, 10)
        h.node.create_subscription(PoseStamped, '/ee_pose', sim_poses.append, 10)
        assert safety.wait_for_output('safety node ready', 30), safety.output
        assert h.wait_joint_states(), safety.output
        deadline = time.monotonic() + 20
        while not (poses and sim_poses) and time.monotonic() < deadline:
            time.sleep(0.05)  # the pose target is published with every output, even at rest
        assert poses and sim_poses, safety.output
        _activate(h, [0.01, 0.0, -0.005, 0.0, 0.0, 0.0, 1.0])
        assert h.wait_state(SafetyStatus.STATE_ACTIVE), safety.output
        time.sleep(0.1)
        target, here = poses[-1].pose, sim_poses[-1].pose
        # Position: the tool now + 0.05 m/s * 0.2 s in x, -0.025 m/s * 0.2 s in z (the arm is
        # held still by Servo's absence, so "now" barely moves); orientation: unchanged.
        assert abs(target.position.x - (here.position.x + 0.01)) < 2e-3
        assert abs(target.position.z - (here.position.z - 0.005)) < 2e-3
        q_t = np.array([target.orientation.x, target.orientation.y, target.orientation.z,
                        target.orientation.w])
        q_h = np.array([here.orientation.x, here.orientation.y, here.orientation.z,
                        here.orientation.w])
        assert abs(abs(float(q_t @ q_h)) - 1.0) < 1e-4, (q_t, q_h)
        h.close()


def test_latched_estop_publisher_reaches_a_node_started_later(domain_id) -> None:  # noqa: ANN001
    """A latched publisher's held ``true`` reaches the node through its transient_local reader."""
    from vla_ros.nodes import qos

    with rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        latched = h.node.create_publisher(Bool, '/vla/estop', qos.LATCHED)
        latched.publish(Bool(data=True))  # before the safety node exists
        safety = NodeProcess('vla_ros.nodes.safety_node', SAFETY_ARGS, env=ros_env(domain_id))
        with node_processes(safety):
            assert safety.wait_for_output('safety node ready', 30), safety.output
            assert h.wait_state(SafetyStatus.STATE_ESTOP, timeout=20.0), safety.output
            assert 'estop topic' in h.last_status().reason
        h.close()


def _node(domain_id: int, tmp_path, *params: str) -> NodeProcess:  # noqa: ANN001
    args = SAFETY_ARGS + ['-p', f'latch_file:={tmp_path / "latch"}']
    for p in params:
        args += ['-p', p]
    return NodeProcess('vla_ros.nodes.safety_node', args, env=ros_env(domain_id))


def _call(client, timeout: float = 5.0):  # noqa: ANN001, ANN202
    from std_srvs.srv import Trigger
    assert client.wait_for_service(timeout_sec=timeout)
    future = client.call_async(Trigger.Request())
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert future.done(), 'no answer'
    return future.result()


def test_step_mode_waits_for_the_confirm_service(domain_id: int, tmp_path) -> None:  # noqa: ANN001
    from std_srvs.srv import Trigger

    safety = _node(domain_id, tmp_path, 'step_every:=1', 'step_confirm_timeout:=5.0')
    sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=ros_env(domain_id))
    with node_processes(safety, sim), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        confirm = h.node.create_client(Trigger, '/vla/safety_node/confirm')
        try:
            assert safety.wait_for_output('safety node ready', 30), safety.output
            assert h.connected() and h.wait_joint_states(), safety.output
            t = _activate(h, [0.01, 0, 0, 0, 0, 0, 1.0])  # waits for the confirm
            assert h.wait_status(lambda s: s.waiting_confirm), h.last_status().reason
            time.sleep(0.3)
            assert _all_zero_after(h, t)
            t = h.now_ns()
            answer = _call(confirm)
            assert answer.success, answer.message
            assert h.first_twist_after(t, lambda v: not _zero(v), timeout=2.0) is not None
            assert not _call(confirm).success  # nothing waits any more
        finally:
            h.close()


def test_deadman_silence_stops_over_dds(domain_id: int, tmp_path) -> None:  # noqa: ANN001
    import threading

    from vla_ros.nodes import qos

    safety = _node(domain_id, tmp_path, 'deadman_timeout:=0.3')
    sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=ros_env(domain_id))
    with node_processes(safety, sim), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        enable = h.node.create_publisher(Bool, '/vla/enable', qos.OPERATOR_INPUT)
        held, stop = threading.Event(), threading.Event()

        def operator() -> None:  # the deadman at 20 Hz and actions at 10 Hz
            while not stop.wait(0.05):
                if held.is_set():
                    enable.publish(Bool(data=True))
        beat = threading.Thread(target=operator, daemon=True)
        beat.start()
        try:
            assert safety.wait_for_output('safety node ready', 30), safety.output
            assert h.connected() and h.wait_joint_states(), safety.output
            _activate(h, [0.01, 0, 0, 0, 0, 0, 1.0])  # not held: refused
            assert h.wait_reason('deadman'), h.last_status().reason
            held.set()
            time.sleep(0.2)
            t = h.now_ns()
            h.action([0.01, 0, 0, 0, 0, 0, 1.0])
            assert h.first_twist_after(t, lambda v: not _zero(v), timeout=2.0) is not None
            for _ in range(3):
                h.action([0.01, 0, 0, 0, 0, 0, 1.0])
                time.sleep(0.1)
            held.clear()  # the operator lets go while actions keep coming
            t = h.now_ns()
            for _ in range(8):
                h.action([0.01, 0, 0, 0, 0, 0, 1.0])
                time.sleep(0.1)
            stopped = h.first_twist_after(t, _zero, timeout=2.0)
            assert stopped is not None and stopped.stamp_ns - t < 0.45e9, h.last_status().reason
            assert 'deadman' in h.last_status().reason
        finally:
            stop.set()
            h.close()


def test_shadow_mode_commands_nothing_and_compares(domain_id: int, tmp_path) -> None:  # noqa: ANN001
    from geometry_msgs.msg import TwistStamped

    from vla_ros.core.safety.shadow import read_audit
    from vla_ros.nodes import qos

    audit = tmp_path / 'audit.jsonl'
    safety = _node(domain_id, tmp_path, 'shadow_mode:=true', f'audit_log:={audit}')
    sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=ros_env(domain_id))
    with node_processes(safety, sim), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        shadow: list = []
        h.node.create_subscription(TwistStamped, '/vla/shadow_twist', shadow.append, 50)
        ref = h.node.create_publisher(TwistStamped, '/vla/reference_twist', qos.COMMAND)
        try:
            assert safety.wait_for_output('SHADOW MODE', 30), safety.output
            assert h.connected() and h.wait_joint_states(), safety.output
            t = h.now_ns()
            _activate(h, [0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # gripper raw 0 = close
            for _ in range(10):
                r = TwistStamped()
                r.twist.linear.x = 0.05
                ref.publish(r)
                h.action([0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
                time.sleep(0.05)
            assert h.wait_status(lambda s: s.shadow_mode and s.shadow_samples >= 5), (
                h.last_status().reason, h.last_status().shadow_actions, safety.output[-2000:])
            s = h.last_status()
            assert s.state == SafetyStatus.STATE_ACTIVE
            assert 0.0 < s.shadow_direction_agreement <= 1.0
            assert s.shadow_mean_abs_error[0] == pytest.approx(0.0, abs=1e-9)  # 0.05 = 0.01/0.2
            assert _all_zero_after(h, t), 'the arm was commanded in shadow mode'
            assert any(m.twist.linear.x > 0 for m in shadow)
            assert not h.grippers
        finally:
            h.close()
    report = read_audit(audit)
    assert report['samples'] >= 5 and report['direction_agreement'] == 1.0, (
        report, audit.read_text()[-1500:])
    # the documented command: vla-ros shadow-report audit.jsonl
    import contextlib
    import io

    from vla_ros.cli import main as cli_main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(['shadow-report', str(audit)]) == 0
    assert 'direction agreement: 1.000' in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(['shadow-report', str(tmp_path / 'missing_or_empty.jsonl')]) != 0
