"""Graph test: the generated messages cross a process boundary over Fast DDS intact."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy

from vla_ros.msg import Observation, SafetyStatus, VlaAction
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env

pytestmark = pytest.mark.graph


def _observation(rng: np.random.Generator) -> Observation:
    msg = Observation()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1234, 5678
    msg.header.frame_id = 'camera'
    msg.image.height = msg.image.width = 224
    msg.image.encoding = 'rgb8'
    msg.image.step = 224 * 3
    msg.image.data = rng.integers(0, 256, 224 * 224 * 3, dtype=np.uint8).tobytes()
    msg.instruction = 'pick up the black bowl'
    msg.episode_id = 7
    return msg


def _action(rng: np.random.Generator) -> VlaAction:
    msg = VlaAction()
    msg.header.stamp.sec = 99
    msg.episode_id = 3
    msg.delta = rng.normal(size=7)
    msg.normalized = rng.uniform(-1, 1, size=7)
    msg.token_ids = rng.integers(31744, 32000, size=7).astype(np.int32)
    msg.inference_ms = 12.5
    msg.instruction = 'wipe the table'
    return msg


def test_constants_and_field_types() -> None:
    assert (SafetyStatus.STATE_IDLE, SafetyStatus.STATE_ACTIVE, SafetyStatus.STATE_STOPPED,
            SafetyStatus.STATE_DONE, SafetyStatus.STATE_ESTOP) == (0, 1, 2, 3, 4)
    action = VlaAction()
    assert action.delta.shape == (7,) and action.token_ids.dtype == np.int32
    assert VlaAction.get_fields_and_field_types()['normalized'] == 'double[7]'
    assert Observation.get_fields_and_field_types()['image'] == 'sensor_msgs/Image'
    assert SafetyStatus.get_fields_and_field_types()['limits_applied'] == 'sequence<string>'


def test_observation_and_action_round_trip_between_processes(domain_id: int) -> None:
    rng = np.random.default_rng(0)
    sent_obs, sent_act = _observation(rng), _action(rng)
    got_obs: list[Observation] = []
    got_act: list[VlaAction] = []
    echo = NodeProcess('vla_ros.testing.echo_node', env=ros_env(domain_id))
    with node_processes(echo), rclpy_context(domain_id) as ctx:
        node = rclpy.create_node('graph_test', context=ctx)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        obs_pub = node.create_publisher(Observation, 'observation', qos)
        act_pub = node.create_publisher(VlaAction, 'action', qos)
        node.create_subscription(Observation, 'observation_echo', got_obs.append, qos)
        node.create_subscription(VlaAction, 'action_echo', got_act.append, qos)
        executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        assert echo.wait_for_output('echo node ready', 20), echo.output

        def exchanged() -> bool:
            if obs_pub.get_subscription_count() and act_pub.get_subscription_count():
                if not got_obs:
                    obs_pub.publish(sent_obs)
                    act_pub.publish(sent_act)
            executor.spin_once(timeout_sec=0.05)
            return bool(got_obs and got_act)

        deadline = time.monotonic() + 20
        while not exchanged() and time.monotonic() < deadline:
            pass
        assert got_obs and got_act, f'no echo within 20 s; echo node said:\n{echo.output}'
        node.destroy_node()

    obs, act = got_obs[0], got_act[0]
    assert (obs.header.stamp.sec, obs.header.stamp.nanosec) == (1234, 5678)
    assert obs.image.height == obs.image.width == 224 and obs.image.encoding == 'rgb8'
    assert bytes(obs.image.data) == bytes(sent_obs.image.data)
    assert (obs.instruction, obs.episode_id) == ('pick up the black bowl', 7)
    np.testing.assert_array_equal(act.delta, sent_act.delta)
    np.testing.assert_array_equal(act.normalized, sent_act.normalized)
    np.testing.assert_array_equal(act.token_ids, sent_act.token_ids)
    assert act.inference_ms == pytest.approx(12.5) and act.instruction == 'wipe the table'
    assert echo.proc.returncode == 0, f'echo node did not shut down cleanly:\n{echo.output}'
