"""Operator side of the graph: instruction publishing, e-stop/reset calls and a live status line.

Used by ``vla-ros`` (instruct, estop, reset, status, and the status lines of bringup). It is a
plain rclpy node in the caller's process, on the caller's DDS domain.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STATE_NAMES = {0: 'IDLE', 1: 'ACTIVE', 2: 'STOPPED', 3: 'DONE', 4: 'ESTOP'}


class _Rate:
    """Messages per second over a sliding window."""

    def __init__(self, window: float = 3.0) -> None:
        self._times: collections.deque[float] = collections.deque()
        self._window = window

    def tick(self) -> None:
        now = time.monotonic()
        self._times.append(now)
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()

    def hz(self) -> float:
        now = time.monotonic()
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-6)


class Monitor:
    """Subscribes to the graph's outputs and prints one status line per period.

    ``instructions`` are published in turn, starting over after the last: the next one goes
    out when the safety node reports the episode DONE (the arm came to rest) or
    ``instruction_timeout`` seconds after the current one. The simulated arm's
    ``/sim/task_success`` is reported when it turns true.
    """

    def __init__(self, namespace: str = 'vla', *, instructions: Sequence[str] = (),
                 instruction_timeout: float = 20.0,
                 joint_states_topic: str = '/joint_states',
                 twist_topic: str = '/servo_node/delta_twist_cmds',
                 camera_topic: str | None = None, save_frames: str | None = None,
                 period: float = 1.0, quiet: bool = False) -> None:
        import rclpy
        from geometry_msgs.msg import TwistStamped
        from rclpy.context import Context
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Bool, String

        from vla_ros.bringup import ns_topic
        from vla_ros.msg import Observation, SafetyStatus, VlaAction
        from vla_ros.nodes import qos

        self._ctx = Context()
        rclpy.init(context=self._ctx)
        self.node = rclpy.create_node('vla_ros_monitor', context=self._ctx)
        self._executor = rclpy.executors.SingleThreadedExecutor(context=self._ctx)
        self._executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._spin, daemon=True)
        self.rates = {k: _Rate() for k in ('obs', 'action', 'twist', 'joints')}
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=20)
        self.status: SafetyStatus | None = None
        self.joint_positions: np.ndarray | None = None
        self.last_twist = np.zeros(6)
        self._period = period
        self._quiet = quiet
        self._next_print = time.monotonic() + period
        self._save_dir = Path(save_frames) if save_frames else None
        self._next_save = 0.0
        self._frames_saved = 0

        depth = 10
        self.node.create_subscription(SafetyStatus, ns_topic(namespace, 'safety_status'),
                                      self._on_status, qos.LATCHED)
        self.node.create_subscription(VlaAction, ns_topic(namespace, 'action'), self._on_action,
                                      depth)
        self.node.create_subscription(Observation, ns_topic(namespace, 'observation'),
                                      lambda _m: self.rates['obs'].tick(), depth)
        self.node.create_subscription(TwistStamped, twist_topic, self._on_twist, depth)
        self.node.create_subscription(JointState, joint_states_topic, self._on_joints, depth)
        if self._save_dir is not None and camera_topic:
            self._save_dir.mkdir(parents=True, exist_ok=True)
            self.node.create_subscription(Image, camera_topic, self._on_image, qos.SENSOR_DATA)
        self.node.create_subscription(Bool, '/sim/task_success', self._on_success, depth)
        self._task_success = False
        self.successes = 0
        self._instructions = [str(text) for text in instructions if str(text).strip()]
        self._instruction_timeout = float(instruction_timeout)
        self._next_index = 0
        self._instruction_deadline = math.inf
        self._published_at = -math.inf
        self._episode_done = False
        self._instruction_pub = None
        self._String = String
        if self._instructions:
            self._instruction_pub = self.node.create_publisher(
                String, ns_topic(namespace, 'instruction'), qos.LATCHED)
            self._publish_next_instruction()
        self._spinner.start()

    def _publish_next_instruction(self) -> None:
        text = self._instructions[self._next_index % len(self._instructions)]
        self._next_index += 1
        self._episode_done = False
        self._published_at = time.monotonic()
        self._instruction_deadline = self._published_at + self._instruction_timeout
        self._instruction_pub.publish(self._String(data=text))
        print(f'[monitor] instruction: {text!r}', flush=True)

    def _on_success(self, msg) -> None:  # noqa: ANN001
        if bool(msg.data) and not self._task_success:
            self.successes += 1
            print(f'[monitor] the simulated task succeeded ({self.successes} so far)',
                  flush=True)
        self._task_success = bool(msg.data)

    def _spin(self) -> None:
        import contextlib
        with contextlib.suppress(Exception):  # ends when the context shuts down
            self._executor.spin()

    def _on_status(self, msg) -> None:  # noqa: ANN001
        if self.status is None or msg.state != self.status.state or msg.reason != \
                self.status.reason:
            print(f'[monitor] safety: {STATE_NAMES.get(msg.state, msg.state)} ({msg.reason})',
                  flush=True)
        # A DONE of the episode before the current instruction may still arrive at first.
        if STATE_NAMES.get(msg.state) == 'DONE' and time.monotonic() > self._published_at + 1.0:
            self._episode_done = True
        self.status = msg

    def _on_action(self, msg) -> None:  # noqa: ANN001
        self.rates['action'].tick()
        self.latency_ms.append(float(msg.inference_ms))

    def _on_twist(self, msg) -> None:  # noqa: ANN001
        self.rates['twist'].tick()
        t = msg.twist
        self.last_twist = np.array([t.linear.x, t.linear.y, t.linear.z,
                                    t.angular.x, t.angular.y, t.angular.z])

    def _on_joints(self, msg) -> None:  # noqa: ANN001
        self.rates['joints'].tick()
        self.joint_positions = np.asarray(msg.position, dtype=float)

    def _on_image(self, msg) -> None:  # noqa: ANN001
        now = time.monotonic()
        if now < self._next_save or self._save_dir is None:
            return
        self._next_save = now + 1.0
        from PIL import Image as PilImage

        from vla_ros.core.image import decode_image
        try:
            rgb = decode_image(msg.data, msg.height, msg.width, msg.encoding, msg.step)
        except Exception:  # noqa: BLE001 - a bad frame must not stop the monitor
            return
        PilImage.fromarray(rgb).save(self._save_dir / f'frame_{self._frames_saved:04d}.png')
        self._frames_saved += 1

    def line(self) -> str:
        """One status line: rates, latency, safety state, commanded speed, joints."""
        state = 'unknown' if self.status is None else STATE_NAMES.get(self.status.state, '?')
        lat = f'{np.median(self.latency_ms):.1f} ms' if self.latency_ms else '-'
        speed = np.linalg.norm(self.last_twist[:3])
        joints = '-' if self.joint_positions is None else np.array2string(
            self.joint_positions, precision=2, suppress_small=True, max_line_width=200)
        return (f'[status] safety {state} | obs {self.rates["obs"].hz():.1f} Hz | actions '
                f'{self.rates["action"].hz():.1f} Hz, inference {lat} | twist '
                f'{self.rates["twist"].hz():.0f} Hz, |v| {speed:.3f} m/s | joints {joints}')

    def spin_once(self, timeout: float = 0.0) -> None:
        """Wait ``timeout`` s (callbacks run in the monitor's thread); print the line when due."""
        if timeout > 0:
            time.sleep(timeout)
        if len(self._instructions) > 1 and (self._episode_done
                                            or time.monotonic() > self._instruction_deadline):
            self._publish_next_instruction()
        if not self._quiet and time.monotonic() >= self._next_print:
            self._next_print = time.monotonic() + self._period
            print(self.line(), flush=True)

    def close(self) -> None:
        """Destroy the node and shut down its context."""
        import rclpy
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self._ctx)
        self._spinner.join(timeout=1.0)


def publish_instruction(namespace: str, text: str, timeout: float = 10.0) -> int:
    """Publish ``text`` latched on <ns>/instruction; succeed once the camera node has taken it.

    The camera node is the instruction's one reader; it answers every accepted instruction
    with a latched ``episode``, which every other node follows. So the command waits for that
    episode (the instruction, stripped, stamped after the publication): then every node can
    learn it, now or when it starts later. The publisher is transient_local, so a camera node
    discovered only while this waits still gets the sample.
    """
    import rclpy
    from std_msgs.msg import String

    from vla_ros.bringup import ns_topic
    from vla_ros.msg import Episode
    from vla_ros.nodes import qos
    rclpy.init()
    node = rclpy.create_node('vla_ros_instruct')
    try:
        episodes: list[Episode] = []
        node.create_subscription(Episode, ns_topic(namespace, 'episode'), episodes.append,
                                 qos.LATCHED)
        pub = node.create_publisher(String, ns_topic(namespace, 'instruction'), qos.LATCHED)
        sent = node.get_clock().now().nanoseconds
        pub.publish(String(data=text))
        deadline = time.monotonic() + timeout

        def taken() -> Episode | None:
            return next((e for e in episodes if e.instruction == text.strip()
                         and rclpy.time.Time.from_msg(e.header.stamp).nanoseconds >= sent),
                        None)
        while taken() is None and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
        episode = taken()
        if episode is None:
            why = 'no camera_node' if not pub.get_subscription_count() else 'no episode'
            print(f'instruction published, but {why} within {timeout} s: {text!r}')
            return 1
        what = 'idle' if not episode.instruction else repr(episode.instruction)
        print(f'instruction delivered: episode {episode.episode_id}, {what}')
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def call_trigger(namespace: str, which: str, timeout: float = 10.0) -> int:
    """Call the safety node's ``~/estop`` or ``~/reset`` (std_srvs/Trigger)."""
    import rclpy
    from std_srvs.srv import Trigger

    from vla_ros.bringup import ns_topic
    rclpy.init()
    node = rclpy.create_node('vla_ros_trigger')
    try:
        client = node.create_client(Trigger, ns_topic(namespace, f'safety_node/{which}'))
        if not client.wait_for_service(timeout_sec=timeout):
            print(f'service {client.srv_name} not available after {timeout} s')
            return 1
        future = client.call_async(Trigger.Request())
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        result = future.result()
        if result is None:
            print(f'{which}: no answer within {timeout} s')
            return 1
        print(f'{which}: {"ok" if result.success else "refused"}: {result.message}')
        return 0 if result.success else 1
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
