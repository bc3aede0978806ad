"""Simulated arm node: a MoveIt Servo + arm + camera stand-in, so the full graph runs closed-loop.

Integrates incoming ``TwistStamped`` commands through the arm's Jacobian (``vla_ros.sim``) at
``physics_rate_hz``, with contact against the table and the blocks, applies the gripper command,
and publishes ``joint_states`` (effort: the external joint torques of the contacts, ``J^T F``),
the end-effector pose, the tool wrench and a rendered camera frame of the table-top scene. Like
Servo, it holds position when commands stop for longer than ``command_timeout``. Topics
(relative, remapped by the bringup): in ``twist`` (geometry_msgs/TwistStamped),
``gripper_command`` (std_msgs/Float64, 0 open, 1 closed), ``episode`` (vla_ros/Episode, from
the camera node, the instruction's one owner: a new episode picks the task and, with
``reset_on_instruction``, resets the scene with layout seed ``seed + episode_id``; both a
latched and a volatile publisher are heard, a sample seen on both is taken once); out
``joint_states``, ``ee_pose`` (geometry_msgs/PoseStamped), ``wrench``
(geometry_msgs/WrenchStamped: the contact force and torque the environment exerts on the tool,
in ``tool_frame`` axes about its origin, at the physics rate), ``image_raw`` (sensor_msgs/Image
rgb8), ``task_success`` (std_msgs/Bool, latched), and the simulator's ground truth
``world_state`` (std_msgs/String, the JSON of ``vla_ros.sim.state``, stamped in ROS time) with
every camera frame and at every contact onset and end, which evaluation baselines and
benchmarks read and a policy never sees.
"""

from __future__ import annotations

import time

import numpy as np
from geometry_msgs.msg import PoseStamped, TwistStamped, WrenchStamped
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64, String

from vla_ros.core.errors import VlaRosError
from vla_ros.core.image import encode_image
from vla_ros.msg import Episode
from vla_ros.nodes import qos
from vla_ros.nodes.params import Param, declare
from vla_ros.nodes.runtime import run_node
from vla_ros.sim.scene import Camera
from vla_ros.sim.state import retimed, to_json
from vla_ros.sim.tasks import TASKS, World, task_for_instruction

PARAMS = (
    Param('physics_rate_hz', 100.0, 'Integration, joint_states and wrench rate [Hz].', 1.0,
          1000.0, read_only=True),
    Param('camera_rate_hz', 10.0, 'Rendered camera frame rate [Hz].', 0.1, 60.0,
          read_only=True),
    Param('image_width', 224, 'Rendered frame width [px].', 16, 1920, read_only=True),
    Param('image_height', 224, 'Rendered frame height [px].', 16, 1080, read_only=True),
    Param('command_timeout', 0.25, 'Hold position when no twist arrives for this long [s].',
          0.01, 5.0),
    Param('seed', 0, 'Layout seed; episode n uses seed + n.', 0, 2**31 - 1),
    Param('task', 'reach_red', 'Initial task: ' + ', '.join(TASKS), read_only=True),
    Param('reset_on_instruction', True, 'A new episode re-seeds the scene and the arm.'),
    Param('contact', True, 'Contact between the arm and the table and blocks (false: the arm '
          'passes through everything).', read_only=True),
    Param('base_frame', 'panda_link0', 'Frame of the published poses.', read_only=True),
    Param('tool_frame', 'panda_tcp', 'Frame of the published wrench (the tool centre point).',
          read_only=True),
)


class SimArmNode(Node):
    """The simulated robot: integrates twists, publishes joint states, pose and camera frames."""

    def __init__(self, **node_kwargs: object) -> None:
        super().__init__('sim_arm_node', **node_kwargs)
        self.p = declare(self, PARAMS)
        camera = Camera.default(int(self.p['image_width']), int(self.p['image_height']))
        self.world = World(camera=camera, contact=bool(self.p['contact']))
        self._base_seed = int(self.p['seed'])
        self._seed = self._base_seed
        self.world.reset(self._seed, str(self.p['task']))
        self._twist = np.zeros(6)
        self._twist_time = -1.0
        self._last_step = time.monotonic()
        self._episode_key: tuple[int, int, int] | None = None
        self._contact_active = False
        self._clock_offset = self._ros_now() - self.world.arm.time  # ROS time - sim time [s]
        self.rejected_twists = 0
        self.episodes_started = 0

        self._joint_pub = self.create_publisher(JointState, 'joint_states', qos.COMMAND)
        self._pose_pub = self.create_publisher(PoseStamped, 'ee_pose', qos.COMMAND)
        self._wrench_pub = self.create_publisher(WrenchStamped, 'wrench', qos.COMMAND)
        self._image_pub = self.create_publisher(Image, 'image_raw', qos.SENSOR_DATA)
        self._success_pub = self.create_publisher(Bool, 'task_success', qos.LATCHED)
        self._state_pub = self.create_publisher(String, 'world_state', qos.COMMAND)
        self.create_subscription(TwistStamped, 'twist', self._on_twist, qos.COMMAND)
        self.create_subscription(Float64, 'gripper_command', self._on_gripper, qos.COMMAND)
        self.create_subscription(Episode, 'episode', self._on_episode, qos.OPERATOR_INPUT)
        # The camera node's latched episode for a late joiner; a volatile publisher never
        # matches this one, by design: no warning.
        self.create_subscription(Episode, 'episode', self._on_episode, qos.LATCHED_INPUT,
                                 event_callbacks=SubscriptionEventCallbacks(
                                     incompatible_qos=lambda _info: None))
        self.create_timer(1.0 / float(self.p['physics_rate_hz']), self._on_physics)
        self.create_timer(1.0 / float(self.p['camera_rate_hz']), self._on_camera)
        self._success: bool | None = None
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

    def _on_episode(self, msg: Episode) -> None:
        """Start the episode ``msg`` announces (once, whichever subscription brings it)."""
        key = (int(msg.episode_id), int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
        if key == self._episode_key:
            return
        self._episode_key = key
        if not msg.instruction.strip() or not self.p['reset_on_instruction']:
            return
        try:
            task = task_for_instruction(msg.instruction)
        except VlaRosError as exc:
            self.get_logger().warning(f'keeping task {self.world.task.name}: {exc}')
            task = self.world.task
        self._seed = self._base_seed + int(msg.episode_id)
        self.world.reset(self._seed, task)
        self._clock_offset = self._ros_now() - self.world.arm.time
        self._twist[:] = 0.0
        self._twist_time = -1.0
        self._success = None
        self._contact_active = False
        self.episodes_started += 1
        self.get_logger().info(f'episode {msg.episode_id}: task {task.name}, seed {self._seed}')

    def _on_physics(self) -> None:
        now = time.monotonic()
        dt = min(now - self._last_step, 0.1)
        self._last_step = now
        if dt > 0.0:
            fresh = now - self._twist_time <= float(self.p['command_timeout'])
            self.step(dt, self._twist if fresh else np.zeros(6))

    def step(self, dt: float, twist: np.ndarray) -> None:
        """Integrate ``twist`` for ``dt`` s and publish the arm's state (one physics tick)."""
        self.world.apply_twist(twist, dt)
        now = self.get_clock().now()
        stamp = now.to_msg()
        self._clock_offset = now.nanoseconds * 1e-9 - self.world.arm.time
        arm = self.world.arm
        names, q, qdot = arm.joint_state()
        js = JointState()
        js.header.stamp = stamp
        js.name = list(names)
        js.position = [float(v) for v in q]
        js.velocity = [float(v) for v in qdot]
        js.effort = [float(v) for v in arm.external_torque()]
        self._joint_pub.publish(js)
        position, rotation = arm.ee_transform()
        quat = arm.ee_pose()[1]
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.header.frame_id = str(self.p['base_frame'])
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = map(float, position)
        (pose.pose.orientation.x, pose.pose.orientation.y, pose.pose.orientation.z,
         pose.pose.orientation.w) = map(float, quat)
        self._pose_pub.publish(pose)
        base_wrench = arm.tool_wrench()
        force, torque = rotation.T @ base_wrench[:3], rotation.T @ base_wrench[3:]
        wrench = WrenchStamped()
        wrench.header.stamp = stamp
        wrench.header.frame_id = str(self.p['tool_frame'])
        wrench.wrench.force.x, wrench.wrench.force.y, wrench.wrench.force.z = map(float, force)
        wrench.wrench.torque.x, wrench.wrench.torque.y, wrench.wrench.torque.z = map(float,
                                                                                     torque)
        self._wrench_pub.publish(wrench)
        active = bool(arm.contacts)
        if active != self._contact_active:
            self._contact_active = active
            self._state_pub.publish(String(data=self.world_state()))
        success = bool(self.world.success())
        if success != self._success:
            self._success = success
            self._success_pub.publish(Bool(data=success))

    def _ros_now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def world_state(self) -> str:
        """Return the ground truth the ``world_state`` topic carries (JSON, ROS time).

        Sim times (the state's, a contact's onset and end) are mapped to ROS time with the
        clock pair of the latest physics tick.
        """
        state = self.world.state()
        return to_json(retimed(state, state.time + self._clock_offset))

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
