"""Tests of the simulated arm node: in-process (episodes, contact outputs) and as a process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped, TwistStamped, WrenchStamped
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64, String

from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.msg import Episode
from vla_ros.nodes import qos
from vla_ros.nodes.sim_arm_node import SimArmNode
from vla_ros.sim.scene import GRIPPER_DOWN
from vla_ros.sim.state import from_json
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env
from vla_ros.testing import spin_until as spin_executor_until

#: ``ros2 topic pub``'s default profile (Jazzy and later): reliable, volatile, keep last 10.
CLI_DEFAULT = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
TIMEOUT = 20.0


@pytest.fixture
def graph(domain_id: int):  # noqa: ANN201
    """A sim arm node and a peer node in one process and context, spun only on demand."""
    with rclpy_context(domain_id) as ctx:
        sim = SimArmNode(context=ctx, parameter_overrides=[
            Parameter('seed', value=100), Parameter('physics_rate_hz', value=1.0),
            Parameter('camera_rate_hz', value=0.1)])
        peer = rclpy.create_node('sim_peer', context=ctx)
        both = rclpy.executors.SingleThreadedExecutor(context=ctx)
        both.add_node(sim)
        both.add_node(peer)
        peer_only = rclpy.executors.SingleThreadedExecutor(context=ctx)
        peer_only.add_node(peer)

        def spin_until(predicate: Callable[[], bool], timeout: float = TIMEOUT,
                       sim_too: bool = True) -> bool:
            """Spin (the sim node's callbacks too, or the peer's only) until ``predicate``."""
            return spin_executor_until(both if sim_too else peer_only, predicate, timeout)

        yield sim, peer, spin_until
        both.shutdown(timeout_sec=1.0)
        peer_only.shutdown(timeout_sec=1.0)
        peer.destroy_node()
        sim.destroy_node()


def _episode(episode_id: int, text: str, sec: int = 5) -> Episode:
    msg = Episode()
    msg.episode_id = episode_id
    msg.instruction = text
    msg.header.stamp.sec = sec
    return msg


def test_episode_from_a_cli_default_publisher(graph) -> None:  # noqa: ANN001
    sim, peer, spin_until = graph
    pub = peer.create_publisher(Episode, 'episode', CLI_DEFAULT)
    # As ros2 topic pub --once: publish as soon as one subscription has matched, once.
    assert spin_until(lambda: pub.get_subscription_count() >= 1)
    pub.publish(_episode(3, 'pick up the red block'))
    assert spin_until(lambda: sim.world.seed == 103)
    assert sim.world.task.name == 'pick_red' and sim.episodes_started == 1


def test_episode_from_a_latched_publisher_that_was_there_first(graph, domain_id: int
                                                               ) -> None:  # noqa: ANN001
    sim, peer, spin_until = graph
    pub = peer.create_publisher(Episode, 'held_episode', qos.LATCHED)
    pub.publish(_episode(7, 'move to the blue block'))
    # A second sim node joins late, on the topic the latched publisher already holds.
    late = SimArmNode(context=sim.context, parameter_overrides=[Parameter('seed', value=10)],
                      cli_args=['--ros-args', '-r', 'episode:=held_episode'])
    executor = rclpy.executors.SingleThreadedExecutor(context=sim.context)
    executor.add_node(late)
    executor.add_node(peer)
    try:
        end = time.monotonic() + TIMEOUT
        while late.world.seed != 17 and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
        assert late.world.seed == 17 and late.world.task.name == 'reach_blue'
        # The sample matched both subscriptions (volatile and latched): one episode, once.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.02)
        assert late.episodes_started == 1
        pub.publish(_episode(8, 'move to the green block', sec=6))
        end = time.monotonic() + TIMEOUT
        while late.world.seed != 18 and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
        assert late.world.task.name == 'reach_green' and late.episodes_started == 2
    finally:
        executor.remove_node(late)
        executor.remove_node(peer)
        late.destroy_node()


def test_idle_unknown_and_repeated_episodes(graph) -> None:  # noqa: ANN001
    sim, _peer, _spin = graph
    sim._on_episode(_episode(1, 'move to the green block'))
    assert (sim.world.seed, sim.world.task.name, sim.episodes_started) == (101, 'reach_green', 1)
    sim._on_episode(_episode(1, 'move to the green block'))  # the same sample again
    assert sim.episodes_started == 1
    sim._on_episode(_episode(2, ''))  # idle: the scene stays
    assert (sim.world.seed, sim.episodes_started) == (101, 1)
    sim._on_episode(_episode(3, 'make coffee'))  # unknown: new layout, same task
    assert (sim.world.seed, sim.world.task.name, sim.episodes_started) == (103, 'reach_green', 2)


def test_contact_shows_in_effort_wrench_and_world_state(graph) -> None:  # noqa: ANN001
    sim, peer, spin_until = graph
    joints: list[JointState] = []
    wrenches: list[WrenchStamped] = []
    truths: list[str] = []
    keep_all = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
    peer.create_subscription(JointState, 'joint_states', joints.append, keep_all)
    peer.create_subscription(WrenchStamped, 'wrench', wrenches.append, keep_all)
    peer.create_subscription(String, 'world_state', lambda m: truths.append(m.data), keep_all)
    # Only the peer spins: the sim node's timers stay quiet, its ticks are the test's own.
    assert spin_until(lambda: all(pub.get_subscription_count() for pub in (
        sim._joint_pub, sim._wrench_pub, sim._state_pub)), sim_too=False)
    world = sim.world
    assert world.place_tool([0.30, 0.30, 0.03], GRIPPER_DOWN)
    sim.step(0.01, np.zeros(6))  # free: zero effort and wrench
    assert spin_until(lambda: joints and wrenches, sim_too=False)
    assert joints[-1].effort.tolist() == [0.0] * 7
    w = wrenches[-1].wrench
    assert [w.force.x, w.force.y, w.force.z] == [0.0] * 3
    n_truth = len(truths)
    for _ in range(60):  # 3 cm down: the fingertips touch after 2.5 cm
        sim.step(0.01, np.array([0.0, 0.0, -0.05, 0.0, 0.0, 0.0]))
    assert spin_until(lambda: len(joints) >= 61 and len(wrenches) >= 61
                      and len(truths) > n_truth, sim_too=False)
    js, ws = joints[-1], wrenches[-1]
    assert ws.header.frame_id == 'panda_tcp' and ws.header.stamp == js.header.stamp
    force = np.array([ws.wrench.force.x, ws.wrench.force.y, ws.wrench.force.z])
    torque = np.array([ws.wrench.torque.x, ws.wrench.torque.y, ws.wrench.torque.z])
    # Tool frame: z along the fingers, down; the table pushes the tool up, along -z.
    assert force[2] < -5.0
    kin = ArmKinematics.from_urdf_file(default_urdf_path())
    q = np.array(js.position)
    _, rotation = kin.fk(q)
    base_wrench = np.concatenate([rotation @ force, rotation @ torque])
    np.testing.assert_allclose(js.effort, kin.jacobian(q).T @ base_wrench, atol=1e-6)
    # The contact onset was published at once, stamped in ROS time inside the sub-step.
    onset_state = from_json(truths[n_truth])
    assert onset_state.contact.active and onset_state.contact.pair[1] == 'table'
    onset = onset_state.contact.onset
    stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in joints]
    first = next(i for i, m in enumerate(joints) if any(m.effort))
    assert stamps[first - 1] - 0.011 < onset <= stamps[first] + 1e-6


@pytest.mark.graph
def test_twists_move_the_arm_and_it_holds_and_renders(domain_id: int) -> None:
    proc = NodeProcess('vla_ros.nodes.sim_arm_node',
                       ['--ros-args', '-p', 'camera_rate_hz:=20.0'], env=ros_env(domain_id))
    poses: list[PoseStamped] = []
    joints: list[JointState] = []
    images: list[Image] = []
    truths: list[dict] = []
    with node_processes(proc), rclpy_context(domain_id) as ctx:
        node = rclpy.create_node('sim_test', context=ctx)
        twist_pub = node.create_publisher(TwistStamped, 'twist', 10)
        grip_pub = node.create_publisher(Float64, 'gripper_command', 10)
        node.create_subscription(PoseStamped, 'ee_pose', poses.append, 10)
        node.create_subscription(JointState, 'joint_states', joints.append, 10)
        node.create_subscription(Image, 'image_raw', images.append, qos.SENSOR_DATA)
        node.create_subscription(String, 'world_state', lambda m: truths.append(
            from_json(m.data)), 10)
        ex = rclpy.executors.SingleThreadedExecutor(context=ctx)
        ex.add_node(node)

        def spin(seconds: float, twist: tuple[float, ...] | None = None) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if twist is not None:
                    msg = TwistStamped()
                    (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z) = twist[:3]
                    (msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z) = twist[3:]
                    twist_pub.publish(msg)
                ex.spin_once(timeout_sec=0.02)

        assert proc.wait_for_output('sim arm ready', 20), proc.output
        deadline = time.monotonic() + 20
        while not (poses and joints and images) and time.monotonic() < deadline:
            spin(0.1)
        assert poses and joints and images and truths, proc.output
        assert twist_pub.get_subscription_count() and grip_pub.get_subscription_count()
        spin(0.5)
        assert images[-1].width == images[-1].height == 224 and images[-1].encoding == 'rgb8'
        assert len(joints[-1].name) == 7 and all(np.isfinite(joints[-1].position))
        x0 = poses[-1].pose.position.x

        spin(1.0, (0.05, 0.0, 0.0, 0.0, 0.0, 0.0))
        x1 = poses[-1].pose.position.x
        # A starved process loses physics time (dt is capped at 0.1 s): a loose lower bound.
        assert 0.01 < x1 - x0 < 0.07, f'+x twist of 0.05 m/s for 1 s moved {x1 - x0:.3f} m'

        spin(1.0)  # no commands: after command_timeout the arm holds
        x2 = poses[-1].pose.position.x
        spin(0.5)
        assert abs(poses[-1].pose.position.x - x2) < 1e-6, 'arm drifted without commands'

        spin(0.5, (float('nan'), 0.0, 0.0, 0.0, 0.0, 0.0))
        assert abs(poses[-1].pose.position.x - x2) < 1e-6 and proc.alive()
        assert 'non-finite twist ignored' in proc.output

        truth = truths[-1]  # the simulator's ground truth, for evaluation baselines
        assert truth.task == 'reach_red' and truth.seed == 0 and truth.held is None
        assert set(truth.blocks) == {'red', 'green', 'blue'} and truth.gripper == 0.0
        assert not truth.contact.active and truth.contact.onset is None
        before = np.asarray(images[-1].data).copy()
        grip_pub.publish(Float64(data=1.0))
        spin(1.0)
        assert not np.array_equal(before, np.asarray(images[-1].data)), \
            'closing the gripper must show in the camera image'
        assert truths[-1].gripper > 0.9 and truths[-1].gripper_width < 0.01
        node.destroy_node()
    assert proc.proc.returncode == 0, proc.output


def _doc_topic_rows() -> list[list[str]]:
    text = (Path(__file__).resolve().parents[1] / 'docs' / 'simulator.md').read_text()
    section = text.split('## Topics', 1)[1].split('\n## ', 1)[0]
    rows = [[cell.strip().strip('`') for cell in line.strip('|').split('|')]
            for line in section.splitlines() if line.startswith('| `')]
    assert rows, 'docs/simulator.md has no topic table'
    return rows


def _same_profile(a: QoSProfile, b: QoSProfile) -> bool:
    return (a.reliability, a.durability, a.history, a.depth) == \
        (b.reliability, b.durability, b.history, b.depth)


def test_the_docs_topic_table_is_the_node(graph) -> None:  # noqa: ANN001
    sim, _peer, _spin = graph
    endpoints: dict[tuple[str, str], list] = {}
    for pub in sim.publishers:
        endpoints.setdefault((pub.topic_name.lstrip('/'), 'out'), []).append(pub)
    for sub in sim.subscriptions:
        endpoints.setdefault((sub.topic_name.lstrip('/'), 'in'), []).append(sub)
    endpoints = {k: v for k, v in endpoints.items() if not k[0].startswith(('rosout',
                                                                           'parameter_events'))}
    documented = set()
    for topic, msg_type, direction, profiles, _remap in _doc_topic_rows():
        found = endpoints.get((topic, direction))
        assert found, f'docs/simulator.md lists {direction} {topic}, the node has none'
        package, name = msg_type.split('/')
        assert {(e.msg_type.__module__.split('.')[0], e.msg_type.__name__) for e in found} == \
            {(package, name)}, topic
        wanted = [getattr(qos, p.strip()) for p in profiles.split('+')]
        assert len(found) == len(wanted), topic
        for profile in wanted:
            assert any(_same_profile(e.qos_profile, profile) for e in found), (topic, profile)
        documented.add((topic, direction))
    assert documented == set(endpoints), set(endpoints) - documented
