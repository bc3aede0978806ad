"""Simulated arm node: a MoveIt Servo + arm + camera stand-in, so the full graph runs closed-loop.

Integrates incoming ``TwistStamped`` commands through the arm's Jacobian (``vla_ros.sim``) at
``physics_rate_hz``, applies the gripper command, and publishes ``joint_states``, the end-effector
pose and a rendered camera frame of the table-top scene. Like Servo, it holds position when
commands stop for longer than ``command_timeout``. Topics (relative, remapped by the bringup):
in ``twist`` (geometry_msgs/TwistStamped), ``gripper_command`` (std_msgs/Float64, 0 open,
1 closed), ``instruction`` (std_msgs/String: picks the task, resets the scene when
``reset_on_instruction``); out ``joint_states``, ``ee_pose`` (geometry_msgs/PoseStamped),
``image_raw`` (sensor_msgs/Image rgb8), ``task_success`` (std_msgs/Bool), and with every camera
frame the simulator's ground truth ``world_state`` (std_msgs/String, JSON: task, seed, block
centres, the held block, gripper closedness and finger width), which evaluation baselines read
and a policy never sees.
"""

from __future__ import annotations

import json
import time

import numpy as np
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64, String

from vla_ros.core.errors import VlaRosError
from vla_ros.core.image import encode_image
from vla_ros.nodes.camera_node import LATCHED_QOS, SENSOR_QOS
from vla_ros.nodes.params import Param, declare
from vla_ros.nodes.runtime import run_node
from vla_ros.sim.scene import Camera
from vla_ros.sim.tasks import TASKS, World, task_for_instruction

PARAMS = (
    Param('physics_rate_hz', 100.0, 'Integration and joint_states rate [Hz].', 1.0, 1000.0,
          read_only=True),
    Param('camera_rate_hz', 10.0, 'Rendered camera frame rate [Hz].', 0.1, 60.0,
          read_only=True),
    Param('image_width', 224, 'Rendered frame width [px].', 16, 1920, read_only=True),
    Param('image_height', 224, 'Rendered frame height [px].', 16, 1080, read_only=True),
    Param('command_timeout', 0.25, 'Hold position when no twist arrives for this long [s].',
          0.01, 5.0),
    Param('seed', 0, 'Seed of the block layout.', 0, 2**31 - 1),
    Param('task', 'reach_red', 'Initial task: ' + ', '.join(TASKS), read_only=True),
    Param('reset_on_instruction', True, 'A new instruction re-seeds the scene and the arm.'),
    Param('base_frame', 'panda_link0', 'Frame of the published poses.', read_only=True),
)


class SimArmNode(Node):
    """The simulated robot: integrates twists, publishes joint states, pose and camera frames."""

    def __init__(self) -> None:
        super().__init__('sim_arm_node')
        self.p = declare(self, PARAMS)
        camera = Camera.default(int(self.p['image_width']), int(self.p['image_height']))
        self.world = World(camera=camera)
        self._seed = int(self.p['seed'])
        self.world.reset(self._seed, str(self.p['task']))
        self._twist = np.zeros(6)
        self._twist_time = -1.0
        self._last_step = time.monotonic()
        self.rejected_twists = 0

        self._joint_pub = self.create_publisher(JointState, 'joint_states', 10)
        self._pose_pub = self.create_publisher(PoseStamped, 'ee_pose', 10)
        self._image_pub = self.create_publisher(Image, 'image_raw', SENSOR_QOS)
        self._success_pub = self.create_publisher(Bool, 'task_success', LATCHED_QOS)
        self._state_pub = self.create_publisher(String, 'world_state', 10)
        self.create_subscription(TwistStamped, 'twist', self._on_twist, 10)
        self.create_subscription(Float64, 'gripper_command', self._on_gripper, 10)
        self.create_subscription(String, 'instruction', self._on_instruction, LATCHED_QOS)
        self.create_timer(1.0 / float(self.p['physics_rate_hz']), self._on_physics)
        self.create_timer(1.0 / float(self.p['camera_rate_hz']), self._on_camera)
        self._success = None
        self.get_logger().info(f'sim arm ready: task {self.world.task.name}, seed {self._seed}')

    def _on_twist(self, msg: TwistStamped) -> None:
        t = msg.twist
        twist = np.array([t.linear.x, t.linear.y, t.linear.z,
                          t.angular.x, t.angular.y, t.angular.z])
        if not np.all(np.isfinite(twist)):
            self.rejected_twists += 1
            self.get_logger().error('non-finite twist ignored', throttle_duration_sec=2.0)
            return
        self._twist = twist
        self._twist_time = time.monotonic()

    def _on_gripper(self, msg: Float64) -> None:
        if not np.isfinite(msg.data):
            self.get_logger().error('non-finite gripper command ignored',
                                    throttle_duration_sec=2.0)
            return
        self.world.set_gripper(float(np.clip(msg.data, 0.0, 1.0)))

    def _on_instruction(self, msg: String) -> None:
        if not msg.data.strip() or not self.p['reset_on_instruction']:
            return
        try:
            task = task_for_instruction(msg.data)
        except VlaRosError as exc:
            self.get_logger().warning(f'keeping task {self.world.task.name}: {exc}')
            task = self.world.task
        self._seed += 1
        self.world.reset(self._seed, task)
        self._twist[:] = 0.0
        self._success = None
        self.get_logger().info(f'new episode: task {task.name}, seed {self._seed}')

    def _on_physics(self) -> None:
        now = time.monotonic()
        dt = min(now - self._last_step, 0.1)
        self._last_step = now
        fresh = now - self._twist_time <= float(self.p['command_timeout'])
        self.world.apply_twist(self._twist if fresh else np.zeros(6), dt)
        stamp = self.get_clock().now().to_msg()
        names, q, qdot = self.world.arm.joint_state()
        js = JointState()
        js.header.stamp = stamp
        js.name = list(names)
        js.position = [float(v) for v in q]
        js.velocity = [float(v) for v in qdot]
        self._joint_pub.publish(js)
        pos, quat = self.world.arm.ee_pose()
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.header.frame_id = str(self.p['base_frame'])
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = map(float, pos)
        (pose.pose.orientation.x, pose.pose.orientation.y, pose.pose.orientation.z,
         pose.pose.orientation.w) = map(float, quat)
        self._pose_pub.publish(pose)
        success = bool(self.world.success())
        if success != self._success:
            self._success = success
            self._success_pub.publish(Bool(data=success))

    def world_state(self) -> str:
        """Return the ground truth the ``world_state`` topic carries (JSON)."""
        w = self.world
        return json.dumps({
            'task': w.task.name, 'seed': self._seed, 'held': w.held,
            'blocks': {name: [float(v) for v in pos] for name, pos in w.blocks.items()},
            'gripper': float(w.arm.gripper), 'gripper_width': float(w.gripper_width())})

    def _on_camera(self) -> None:
        self._state_pub.publish(String(data=self.world_state()))
        rgb = self.world.observe()
        data, height, width, encoding, step = encode_image(rgb, 'rgb8')
        msg = Image()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = 'sim_camera'
        msg.height, msg.width, msg.encoding, msg.step, msg.data = (height, width, encoding,
                                                                    step, data)
        self._image_pub.publish(msg)


def main(args: list[str] | None = None) -> None:
    """Run the simulated arm until SIGINT/SIGTERM."""
    run_node(SimArmNode, args)


if __name__ == '__main__':
    main()
