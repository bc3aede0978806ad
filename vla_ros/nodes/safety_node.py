"""Safety node: the only path to the arm, feeding ``vla_ros.core.safety.SafetyLimiter``.

It publishes what the limiter decides: the limited twist (or a pose target) at the output rate,
the gripper command, ``SafetyStatus`` on every transition and action (latched),
``/diagnostics``, rviz markers and a JSON-lines audit log.

Wiring only; every rule lives in the pure limiter. The e-stop (topic and service) publishes the
zero twist from its own callback rather than waiting for the output timer, and keeps its own
callback group should the node be put in a multi-threaded executor. Times passed to the limiter
are the node clock in seconds; an action's camera stamp is its header stamp (the frame it came
from), so a stale frame stops the arm even while actions keep arriving. A dead VLA process is
seen through the action stream's DDS liveliness: the heartbeat stops, then the limiter stops the
arm. A latched e-stop or protective stop is written to ``latch_file`` (fsync'd) right after
the zero command and before the node reports it, so a restarted node comes back latched; only
``~/reset`` clears it and the file.
In ``shadow_mode`` the arm is commanded nothing (zero twist, no pose target, no gripper
command): the would-be twist goes to ``shadow_twist`` and the markers, and is compared with
``reference_twist`` (``vla_ros.core.safety.shadow``).

Topics (relative; the bringup remaps the external ones), QoS from ``vla_ros.nodes.qos``: in
``action`` (vla_ros/VlaAction), ``episode`` (vla_ros/Episode, latched, from the instruction's one
owner, the camera node: a new id or instruction starts an episode, an empty instruction idles),
``estop`` (std_msgs/Bool, true latches; two subscriptions, volatile for ``ros2 topic pub`` and
transient_local so that a latched publisher's held ``true`` reaches a restarted node),
``joint_states`` (positions; effort as external torques when ``max_external_effort`` > 0),
``wrench`` (geometry_msgs/WrenchStamped, the external force on the tool), ``enable``
(std_msgs/Bool, the operator's deadman heartbeat), ``reference_twist``
(geometry_msgs/TwistStamped, shadow mode); out ``twist`` (geometry_msgs/TwistStamped) or
``pose_target`` (geometry_msgs/PoseStamped), ``gripper_command`` (std_msgs/Float64, 0 open 1
closed), ``shadow_twist``, ``safety_status`` (latched), ``markers``, ``diagnostics``; services
``~/estop``, ``~/reset``, ``~/confirm`` (step mode).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseStamped, TwistStamped, WrenchStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.time import Time
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, ColorRGBA, Float64
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from vla_ros.core.actions import GripperConvention, gripper_closedness
from vla_ros.core.errors import VlaRosError
from vla_ros.core.safety import Decision, SafetyConfig, SafetyLimiter, SafetyState, specs
from vla_ros.core.safety.latch import LatchError, LatchFile, default_latch_path
from vla_ros.core.safety.shadow import ShadowStats, intervened
from vla_ros.msg import Episode, SafetyStatus, VlaAction
from vla_ros.nodes import qos
from vla_ros.nodes.params import Param, declare
from vla_ros.nodes.runtime import run_node

STATE_COLOURS = {
    SafetyState.IDLE: (0.6, 0.6, 0.6), SafetyState.ACTIVE: (0.1, 0.8, 0.2),
    SafetyState.STOPPED: (1.0, 0.7, 0.0), SafetyState.DONE: (0.2, 0.4, 1.0),
    SafetyState.ESTOP: (1.0, 0.0, 0.0),
}

#: Contact frames of the bundled URDF: the fingertip corners (table-plane check).
FINGERTIPS = ['panda_leftfinger_tip_front', 'panda_leftfinger_tip_back',
              'panda_rightfinger_tip_front', 'panda_rightfinger_tip_back']

#: A reference twist older than this is not compared in shadow mode [s].
REFERENCE_TIMEOUT = 0.5


def _limiter_params() -> tuple[Param, ...]:
    """One Param per SafetyConfig field: its doc, unit and range come from the config table."""
    out = []
    for spec in specs():
        default = list(spec.default) if spec.kind == 'vec3' else spec.default
        ranged = spec.kind in ('float', 'int')
        out.append(Param(spec.name, default, spec.describe() + ' (validated by SafetyConfig; '
                         'change requires restart)', spec.low if ranged else None,
                         spec.high if ranged else None, read_only=True))
    return tuple(out)


PARAMS = _limiter_params() + (
    Param('robot_description', '', 'URDF XML; empty = read urdf_path.', read_only=True),
    Param('urdf_path', '', 'URDF file; empty = the package\'s config/panda.urdf.',
          read_only=True),
    Param('ee_frame', 'panda_tcp', 'End-effector frame of the URDF.', read_only=True),
    Param('contact_frames', FINGERTIPS, 'URDF frames kept above the table plane besides the '
          'tool centre point (fingertips).', read_only=True),
    Param('use_kinematics', True, 'Apply workspace, table and joint limits from URDF + joint '
          'states.', read_only=True),
    Param('output_mode', 'twist', 'twist (MoveIt Servo TwistStamped) | pose (PoseStamped).',
          read_only=True),
    Param('gripper_convention', 'raw', 'Checkpoint gripper convention: raw | binarize | libero.',
          read_only=True),
    Param('audit_log', '', 'JSON-lines audit log file; empty = off.', read_only=True),
    Param('latch_file', '', 'File that persists a latched e-stop or protective stop across '
          'restarts; empty = <state dir>/vla_ros/<namespace and node name>.latch.',
          read_only=True),
    Param('shadow_mode', False, 'Command the arm nothing; publish the would-be twist on '
          'shadow_twist and compare it with reference_twist.', read_only=True),
    Param('status_rate_hz', 2.0, 'Periodic SafetyStatus/markers/diagnostics rate [Hz].', 0.1,
          50.0, read_only=True),
)


class SafetyNode(Node):
    """Feeds the limiter from DDS and publishes its decisions."""

    def __init__(self) -> None:
        super().__init__('safety_node')
        self.p = declare(self, PARAMS)
        config = SafetyConfig.from_dict({s.name: self.p[s.name] for s in specs()})
        self.config = config
        self.kinematics = self._load_kinematics() if self.p['use_kinematics'] else None
        self.limiter = SafetyLimiter(config, self.kinematics)
        self.convention = GripperConvention.parse(str(self.p['gripper_convention']))
        self.frame_id = config.frame_id
        self.pose_mode = self.p['output_mode'] == 'pose'
        self.shadow = bool(self.p['shadow_mode'])
        self.shadow_stats = ShadowStats()
        self._reference: tuple[np.ndarray, float] | None = None
        self._lock = threading.Lock()
        self._vla_alive = False
        self._episode_key: tuple[int, str, float] | None = None
        self._last: Decision | None = None
        self._ee_position: np.ndarray | None = None
        self._ee_rotation: np.ndarray | None = None
        self._audit = open(self.p['audit_log'], 'a', encoding='utf-8') \
            if self.p['audit_log'] else None  # noqa: SIM115 - closed in destroy_node
        self.latch_file = LatchFile(str(self.p['latch_file'])
                                    or default_latch_path(self.get_fully_qualified_name()))
        self._persisted = ''  # the latch reason on disk ('' = none)

        estop_group = MutuallyExclusiveCallbackGroup()
        io_group = MutuallyExclusiveCallbackGroup()
        if self.pose_mode:
            self._cmd_pub = self.create_publisher(PoseStamped, 'pose_target', qos.COMMAND)
        else:
            self._cmd_pub = self.create_publisher(TwistStamped, 'twist', qos.COMMAND)
        self._shadow_pub = self.create_publisher(TwistStamped, 'shadow_twist', qos.COMMAND) \
            if self.shadow else None
        self._grip_pub = self.create_publisher(Float64, 'gripper_command', qos.COMMAND)
        self._status_pub = self.create_publisher(SafetyStatus, 'safety_status', qos.LATCHED)
        self._marker_pub = self.create_publisher(MarkerArray, 'markers', qos.COMMAND)
        self._diag_pub = self.create_publisher(DiagnosticArray, 'diagnostics', qos.COMMAND)

        events = SubscriptionEventCallbacks(liveliness=self._on_liveliness)
        self.create_subscription(VlaAction, 'action', self._on_action, qos.ACTION,
                                 callback_group=io_group, event_callbacks=events)
        self.create_subscription(JointState, 'joint_states', self._on_joint_state,
                                 qos.JOINT_STATES, callback_group=io_group)
        self.create_subscription(Episode, 'episode', self._on_episode, qos.LATCHED,
                                 callback_group=io_group)
        self.create_subscription(WrenchStamped, 'wrench', self._on_wrench, qos.JOINT_STATES,
                                 callback_group=estop_group)
        self.create_subscription(Bool, 'enable', self._on_enable, qos.OPERATOR_INPUT,
                                 callback_group=estop_group)
        if self.shadow:
            self.create_subscription(TwistStamped, 'reference_twist', self._on_reference,
                                     qos.JOINT_STATES, callback_group=io_group)
        for profile in (qos.OPERATOR_INPUT, qos.LATCHED_INPUT):  # CLI and latched publishers
            self.create_subscription(Bool, 'estop', self._on_estop_topic, profile,
                                     callback_group=estop_group)
        self.create_service(Trigger, '~/estop', self._on_estop_service,
                            callback_group=estop_group)
        self.create_service(Trigger, '~/reset', self._on_reset_service,
                            callback_group=estop_group)
        self.create_service(Trigger, '~/confirm', self._on_confirm_service,
                            callback_group=estop_group)
        self.create_timer(1.0 / config.output_rate_hz, self._on_tick, callback_group=io_group)
        self.create_timer(1.0 / float(self.p['status_rate_hz']), self._on_status_timer,
                          callback_group=io_group)
        with self._lock:
            held = self.latch_file.read()
            if held:  # a restarted node comes back latched
                self._persisted = held
                self.get_logger().error(f'latched before this start: {held}; ~/reset clears it')
                self._publish(self.limiter.estop(self._now(), held), force_status=True)
            else:
                self._publish(self.limiter.tick(self._now()), force_status=True)
        self.get_logger().info(
            f'safety node ready: output {self.p["output_mode"]} in {self.frame_id} at '
            f'{config.output_rate_hz} Hz, kinematics '
            f'{"on" if self.kinematics is not None else "off"}'
            f'{", SHADOW MODE (the arm is not commanded)" if self.shadow else ""}, latch file '
            f'{self.latch_file.path}')

    # -- set-up ---------------------------------------------------------------------------
    def _load_kinematics(self):  # noqa: ANN202 - pinocchio stays out of the signature
        from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
        ee = str(self.p['ee_frame'])
        frames = [str(f) for f in self.p['contact_frames']]
        if self.p['robot_description']:
            return ArmKinematics.from_urdf_string(str(self.p['robot_description']), ee,
                                                  contact_frames=frames)
        return ArmKinematics.from_urdf_file(str(self.p['urdf_path']) or default_urdf_path(), ee,
                                            contact_frames=frames)

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # -- inputs ---------------------------------------------------------------------------
    def _on_action(self, msg: VlaAction) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        try:
            closed = gripper_closedness(float(msg.delta[6]), self.convention)
        except VlaRosError:
            closed = float('nan')  # the limiter rejects it with a reason
        with self._lock:  # ``now`` inside the lock: the limiter's inputs stay time-ordered
            now = self._now()
            self.limiter.on_camera_frame(stamp, now)
            decision = self.limiter.on_action(
                np.asarray(msg.delta), closed, msg.episode_id, stamp, now,
                instruction=msg.instruction, frame_id=msg.header.frame_id,
                token_probs=np.asarray(msg.token_probs), token_margins=np.asarray(
                    msg.token_margins))
            would_be = None
            if decision.accepted and self.shadow:
                would_be = self.limiter.would_be(now)
                self.shadow_stats.add(would_be, self._fresh_reference(now),
                                      intervened(decision.limits_applied))
            self._publish(decision, force_status=True, would_be=would_be)  # every action's limits

    def _on_joint_state(self, msg: JointState) -> None:
        if self.kinematics is None:
            return
        try:
            q = self.kinematics.order_joint_state(msg.name, msg.position)
        except VlaRosError as exc:
            self.get_logger().error(f'joint state rejected: {exc}', throttle_duration_sec=2.0)
            q = None
        effort = None
        if self.config.max_external_effort > 0.0 and len(msg.effort):
            try:
                effort = self.kinematics.order_joint_state(msg.name, msg.effort)
            except VlaRosError:
                effort = [float('nan')]  # unreadable: the limiter stops
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self._lock:
            decision = self.limiter.on_joint_state(q, stamp, self._now(), effort)
            if q is not None:
                self._ee_position, self._ee_rotation = self.kinematics.fk(q)
            if decision.transition:
                self._publish(decision)

    def _on_episode(self, msg: Episode) -> None:
        start = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        # The stamp is part of the key: a restarted camera node numbers from 1 again.
        key = (int(msg.episode_id), msg.instruction.strip(), start)
        if key == self._episode_key:
            return  # the same episode again (a re-delivered latched sample)
        self._episode_key = key
        with self._lock:
            self._publish(self.limiter.on_episode(key[0], key[1], self._now(), start),
                          force_status=True)

    def _on_wrench(self, msg: WrenchStamped) -> None:
        f = np.array([msg.wrench.force.x, msg.wrench.force.y, msg.wrench.force.z])
        frame = msg.header.frame_id
        with self._lock:
            # The threshold needs the norm only; "away from the contact" needs the base frame.
            in_base = frame == self.frame_id
            if frame == str(self.p['ee_frame']) and self._ee_rotation is not None:
                f, in_base = self._ee_rotation @ f, True
            decision = self.limiter.on_wrench(f, self._now(), in_base_frame=in_base)
            if decision.transition:
                self._publish(decision, force_status=True)

    def _on_enable(self, msg: Bool) -> None:
        with self._lock:
            decision = self.limiter.on_enable(bool(msg.data), self._now())
            if decision.transition:
                self._publish(decision, force_status=True)

    def _on_reference(self, msg: TwistStamped) -> None:
        t = msg.twist
        self._reference = (np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x,
                                     t.angular.y, t.angular.z]), self._now())

    def _fresh_reference(self, now: float) -> np.ndarray | None:
        ref = self._reference
        return ref[0] if ref is not None and now - ref[1] <= REFERENCE_TIMEOUT else None

    def _on_liveliness(self, event) -> None:  # noqa: ANN001 - rclpy event type
        alive = event.alive_count > 0
        if alive != self._vla_alive:
            self.get_logger().warning(f'VLA action stream liveliness: '
                                   f'{"alive" if alive else "LOST"}')
        self._vla_alive = alive

    def _estop(self, reason: str) -> None:
        with self._lock:
            self._publish(self.limiter.estop(self._now(), reason), force_status=True)

    def _on_estop_topic(self, msg: Bool) -> None:
        if msg.data:
            self._estop('estop topic')

    def _on_estop_service(self, request, response):  # noqa: ANN001, ANN201
        self._estop('estop service')
        response.success = self._persisted != ''
        response.message = 'estop latched' if response.success else (
            'estop latched in memory, but the latch file could not be written (see the log)')
        return response

    def _on_reset_service(self, request, response):  # noqa: ANN001, ANN201
        with self._lock:
            if self.limiter.state is SafetyState.ESTOP:
                try:
                    self.latch_file.clear()
                except LatchError as exc:
                    response.success, response.message = False, f'reset refused: {exc}'
                    self.get_logger().error(response.message)
                    return response
                self._persisted = ''
            decision = self.limiter.reset(self._now())
            self._publish(decision, force_status=True)
        response.success = decision.state is not SafetyState.ESTOP
        response.message = decision.reason
        return response

    def _on_confirm_service(self, request, response):  # noqa: ANN001, ANN201
        with self._lock:
            decision = self.limiter.confirm(self._now())
            self._publish(decision, force_status=True)
        response.success = decision.event == 'confirm' and 'confirmed' in decision.reason
        response.message = decision.reason
        return response

    def _on_tick(self) -> None:
        with self._lock:
            now = self._now()
            if self._vla_alive:
                self.limiter.on_vla_heartbeat(now)
            self._publish(self.limiter.tick(now))

    # -- outputs --------------------------------------------------------------------------
    def _persist(self) -> None:
        """Write a new latch to disk before anything reports it (caller holds the lock)."""
        latched = self.limiter.latched
        if not latched or latched == self._persisted:
            return
        try:
            self.latch_file.write(latched, self.get_fully_qualified_name())
            self._persisted = latched
        except LatchError as exc:
            self.get_logger().error(f'{exc}: the latch holds in memory only',
                                    throttle_duration_sec=2.0)

    def _publish(self, d: Decision, force_status: bool = False,
                 would_be: np.ndarray | None = None) -> None:
        """Publish the command of ``d`` (zero when not ACTIVE), gripper, status on transitions.

        The command goes out first (a stop must not wait for the disk); a new latch is written
        to ``latch_file`` before the status reports it.
        """
        # Stamped with the time the limiter computed the command (its acceleration bound holds
        # between these stamps), or now for an input whose time was not readable.
        stamp = (Time(nanoseconds=round(d.time * 1e9)) if math.isfinite(d.time)
                 else self.get_clock().now()).to_msg()
        if self.shadow:
            if self._shadow_pub is not None:
                self._shadow_pub.publish(self._twist_msg(d.twist, stamp))
            if not self.pose_mode:  # the arm holds still; no pose target at all
                self._cmd_pub.publish(self._twist_msg(np.zeros(6), stamp))
        elif self.pose_mode:
            # Target = current tool pose moved by the limited twist over one action period;
            # without a joint state there is no safe target, so nothing is sent.
            if self._ee_position is not None and self._ee_rotation is not None:
                from vla_ros.core.kinematics import integrate_rotation, rotation_to_quat_xyzw
                period = self.config.action_period
                target = self._ee_position + d.twist[:3] * period
                quat = rotation_to_quat_xyzw(
                    integrate_rotation(self._ee_rotation, d.twist[3:], period))
                msg = PoseStamped()
                msg.header.stamp, msg.header.frame_id = stamp, self.frame_id
                msg.pose.position = Point(x=float(target[0]), y=float(target[1]),
                                          z=float(target[2]))
                (msg.pose.orientation.x, msg.pose.orientation.y, msg.pose.orientation.z,
                 msg.pose.orientation.w) = (float(v) for v in quat)
                self._cmd_pub.publish(msg)
        else:
            self._cmd_pub.publish(self._twist_msg(d.twist, stamp))
        if d.gripper is not None and not self.shadow:
            self._grip_pub.publish(Float64(data=float(d.gripper)))
        self._persist()
        self._last = d
        self._audit_write(d, would_be)
        if d.transition or force_status:
            self._publish_status(d)
            if d.transition:
                self.get_logger().info(f'safety state {d.state.name}: {d.reason}')

    def _twist_msg(self, twist: np.ndarray, stamp) -> TwistStamped:  # noqa: ANN001
        msg = TwistStamped()
        msg.header.stamp, msg.header.frame_id = stamp, self.frame_id
        v = [float(x) for x in twist]
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = v[:3]
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = v[3:]
        return msg

    def _status_msg(self, d: Decision) -> SafetyStatus:
        s = SafetyStatus()
        s.header.stamp = (Time(nanoseconds=round(d.time * 1e9)) if math.isfinite(d.time)
                          else self.get_clock().now()).to_msg()  # as the command's stamp
        s.header.frame_id = self.frame_id
        s.state, s.state_name, s.reason = int(d.state), d.state.name, d.reason[:500]
        s.limits_applied = list(d.limits_applied)
        s.requested = np.nan_to_num(np.asarray(d.requested, dtype=np.float64), nan=0.0)
        s.applied = np.asarray(d.applied_delta, dtype=np.float64)
        s.linear_speed, s.angular_speed = d.linear_speed, d.angular_speed
        s.episode_id = max(0, int(d.episode_id))
        s.step_count, s.still_count = int(d.step_count), int(d.still_count)
        ages = self.limiter.ages(self._now())
        s.action_age = float(ages.get('action', -1.0))
        s.camera_age = float(ages.get('camera', -1.0))
        s.joint_state_age = float(ages.get('joint_state', -1.0))
        prob = self.limiter.min_token_prob
        s.min_token_prob = float(prob) if np.isfinite(prob) else -1.0
        s.waiting_confirm = self.limiter.waiting_confirm
        s.enable_age = float(ages.get('enable', -1.0))
        s.latched = self.limiter.latched[:500]
        s.latch_persisted = bool(s.latched) and self._persisted == self.limiter.latched
        s.shadow_mode = self.shadow
        if self.shadow:
            summary = self.shadow_stats.summary()
            s.shadow_actions = int(summary['actions'])
            s.shadow_samples = int(summary['samples'])
            s.shadow_mean_abs_error = np.nan_to_num(
                np.asarray(summary['mean_abs_error'], dtype=np.float64), nan=-1.0)
            s.shadow_direction_agreement = float(np.nan_to_num(summary['direction_agreement'],
                                                               nan=-1.0))
            s.shadow_intervention_rate = float(np.nan_to_num(summary['intervention_rate'],
                                                             nan=-1.0))
        return s

    def _publish_status(self, d: Decision) -> None:
        self._status_pub.publish(self._status_msg(d))

    def _on_status_timer(self) -> None:
        with self._lock:
            d = self._last
            if d is None:
                return
            self._publish_status(d)
        self._publish_markers(d)
        self._publish_diagnostics(d)

    def _publish_markers(self, d: Decision) -> None:
        stamp = self.get_clock().now().to_msg()
        colour = ColorRGBA(a=1.0)
        colour.r, colour.g, colour.b = STATE_COLOURS[d.state]
        markers = []
        lo, hi = np.asarray(self.config.workspace_min), np.asarray(self.config.workspace_max)
        box = Marker(ns='workspace', id=0, type=Marker.LINE_LIST, action=Marker.ADD)
        corners = [np.array([x, y, z]) for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                   for z in (lo[2], hi[2])]
        for i, a in enumerate(corners):
            for b in corners[i + 1:]:
                if np.count_nonzero(a != b) == 1:
                    box.points += [Point(x=float(a[0]), y=float(a[1]), z=float(a[2])),
                                   Point(x=float(b[0]), y=float(b[1]), z=float(b[2]))]
        box.scale.x, box.color = 0.005, colour
        markers.append(box)
        if self._ee_position is not None:
            p = self._ee_position
            tip = p + d.applied_delta[:3] * 5.0  # exaggerated for visibility
            arrow = Marker(ns='command', id=1, type=Marker.ARROW, action=Marker.ADD)
            arrow.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                            Point(x=float(tip[0]), y=float(tip[1]), z=float(tip[2]))]
            arrow.scale.x, arrow.scale.y, arrow.scale.z = 0.01, 0.02, 0.02
            arrow.color = colour
            text = Marker(ns='state', id=2, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD)
            text.pose.position = Point(x=float(p[0]), y=float(p[1]), z=float(p[2]) + 0.15)
            text.scale.z, text.color = 0.04, colour
            shadow = 'SHADOW ' if self.shadow else ''
            text.text = f'{shadow}{d.state.name}: {self.limiter.instruction or "-"}'[:120]
            markers += [arrow, text]
        for m in markers:
            m.header.stamp, m.header.frame_id = stamp, self.frame_id
        self._marker_pub.publish(MarkerArray(markers=markers))

    def _publish_diagnostics(self, d: Decision) -> None:
        level = {SafetyState.ESTOP: DiagnosticStatus.ERROR,
                 SafetyState.STOPPED: DiagnosticStatus.WARN}.get(d.state, DiagnosticStatus.OK)
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: limiter',
                                  level=level, message=f'{d.state.name}: {d.reason}'[:500],
                                  hardware_id=self.frame_id)
        status.values = [KeyValue(key='episode_id', value=str(d.episode_id)),
                         KeyValue(key='step_count', value=str(d.step_count)),
                         KeyValue(key='vla_alive', value=str(self._vla_alive)),
                         KeyValue(key='latched', value=self.limiter.latched),
                         KeyValue(key='waiting_confirm', value=str(self.limiter.waiting_confirm)),
                         KeyValue(key='shadow_mode', value=str(self.shadow))]
        if self.shadow:
            status.values += [KeyValue(key=f'shadow_{k}', value=json.dumps(v))
                              for k, v in self.shadow_stats.summary().items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def _audit_write(self, d: Decision, would_be: np.ndarray | None = None) -> None:
        """One JSON line per action and per transition (shadow mode: with the reference)."""
        if self._audit is not None and (d.event == 'action' or d.transition):
            record = d.to_record()
            if would_be is not None:
                ref = self._fresh_reference(d.time)
                record['shadow'] = {'would_be': [float(v) for v in would_be],
                                    'reference': None if ref is None else ref.tolist()}
            self._audit.write(json.dumps(record) + '\n')
            self._audit.flush()

    def destroy_node(self) -> None:
        """Close the audit log, then destroy the node."""
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        super().destroy_node()


def _last_zero(node: SafetyNode) -> None:
    with contextlib.suppress(Exception), node._lock:  # a last zero command, if DDS is up
        node._publish(node.limiter.halt(node._now(), 'safety node shutting down'))


def main(args: list[str] | None = None) -> None:
    """Run the safety node until SIGINT/SIGTERM; a last zero command goes out on the way down.

    Single-threaded on purpose: measured on 2 cores, rclpy's MultiThreadedExecutor sustained
    only ~15 Hz output (1.8 s gaps) beside 100 Hz joint states, this one a steady 50 Hz. Every
    callback here is well under a millisecond, so an e-stop waits for at most one of them.
    """
    run_node(SafetyNode, args, on_stop=_last_zero)


if __name__ == '__main__':
    main()
