"""Graph test of the simulated arm node as a process: twists move it, it holds, it renders."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped, TwistStamped
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64, String

from vla_ros.nodes.camera_node import SENSOR_QOS
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env

pytestmark = pytest.mark.graph


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
        node.create_subscription(Image, 'image_raw', images.append, SENSOR_QOS)
        node.create_subscription(String, 'world_state', lambda m: truths.append(
            json.loads(m.data)), 10)
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
        assert 0.03 < x1 - x0 < 0.07, f'+x twist of 0.05 m/s for 1 s moved {x1 - x0:.3f} m'

        spin(1.0)  # no commands: after command_timeout the arm holds
        x2 = poses[-1].pose.position.x
        spin(0.5)
        assert abs(poses[-1].pose.position.x - x2) < 1e-6, 'arm drifted without commands'

        spin(0.5, (float('nan'), 0.0, 0.0, 0.0, 0.0, 0.0))
        assert abs(poses[-1].pose.position.x - x2) < 1e-6 and proc.alive()
        assert 'non-finite twist ignored' in proc.output

        truth = truths[-1]  # the simulator's ground truth, for evaluation baselines
        assert truth['task'] == 'reach_red' and truth['seed'] == 0 and truth['held'] is None
        assert set(truth['blocks']) == {'red', 'green', 'blue'} and truth['gripper'] == 0.0
        before = np.asarray(images[-1].data).copy()
        grip_pub.publish(Float64(data=1.0))
        spin(1.0)
        assert not np.array_equal(before, np.asarray(images[-1].data)), \
            'closing the gripper must show in the camera image'
        assert truths[-1]['gripper'] > 0.9 and truths[-1]['gripper_width'] < 0.01
        node.destroy_node()
    assert proc.proc.returncode == 0, proc.output
