"""A test-side node that drives the safety node over DDS and records what comes out.

Used by the graph tests and by ``bench/bench_safety_graph.py``: it publishes actions and the
current episode as the real nodes do (``episode`` latched, as the camera node publishes it),
e-stops with ``ros2 topic pub``'s default QoS (reliable, volatile), calls the safety node's
services, and keeps every twist, gripper command and status with its receipt time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import rclpy
from geometry_msgs.msg import TwistStamped
from rclpy.executors import ExternalShutdownException
from std_msgs.msg import Bool, Float64
from std_srvs.srv import Trigger

from vla_ros.core.safety import SafetyConfig
from vla_ros.msg import Episode, SafetyStatus, VlaAction
from vla_ros.nodes import qos

#: The frame the safety node expects actions in by default.
FRAME = SafetyConfig().frame_id


@dataclass
class Received:
    """A message, its receipt time (time.monotonic) and its header stamp [ns] if it has one."""

    t: float
    msg: object

    @property
    def stamp_ns(self) -> int:
        """Header stamp in nanoseconds (when the publisher says it was made)."""
        st = self.msg.header.stamp
        return st.sec * 1_000_000_000 + st.nanosec


class SafetyHarness:
    """Publishes to and listens to one safety node in namespace ``ns``; spins in a thread."""

    def __init__(self, ctx, ns: str = '/vla', twist_topic: str = '/servo_node/delta_twist_cmds'
                 ) -> None:  # noqa: ANN001
        self.node = rclpy.create_node('safety_harness', context=ctx)
        self.action_pub = self.node.create_publisher(VlaAction, f'{ns}/action', qos.ACTION)
        self.episode_pub = self.node.create_publisher(Episode, f'{ns}/episode', qos.LATCHED)
        # ``ros2 topic pub``'s default QoS: reliable, volatile.
        self.estop_pub = self.node.create_publisher(Bool, f'{ns}/estop', qos.OPERATOR_INPUT)
        self.twists: list[Received] = []
        self.statuses: list[Received] = []
        self.grippers: list[Received] = []
        self._lock = threading.Lock()
        self._outputs = (twist_topic, f'{ns}/safety_status', f'{ns}/gripper_command')
        self.node.create_subscription(TwistStamped, twist_topic,
                                      lambda m: self._keep(self.twists, m), 50)
        self.node.create_subscription(SafetyStatus, f'{ns}/safety_status',
                                      lambda m: self._keep(self.statuses, m), qos.LATCHED)
        self.node.create_subscription(Float64, f'{ns}/gripper_command',
                                      lambda m: self._keep(self.grippers, m), qos.COMMAND)
        self.estop_client = self.node.create_client(Trigger, f'{ns}/safety_node/estop')
        self.reset_client = self.node.create_client(Trigger, f'{ns}/safety_node/reset')
        self.executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        self._episode = 0
        self._instruction = ''

    def _spin(self) -> None:
        with contextlib.suppress(ExternalShutdownException):  # close() ends the spin
            self.executor.spin()

    def _keep(self, where: list[Received], msg: object) -> None:
        with self._lock:
            where.append(Received(time.monotonic(), msg))

    def close(self) -> None:
        """Stop spinning and destroy the node."""
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    # -- inputs ---------------------------------------------------------------------------
    def instruct(self, text: str) -> None:
        """Start a new episode with ``text`` (empty = idle), as the camera node announces it."""
        self._episode += 1
        self._instruction = text.strip()
        msg = Episode(episode_id=self._episode, instruction=self._instruction)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.episode_pub.publish(msg)

    def action(self, delta: list[float] | np.ndarray, *, stamp_offset: float = 0.0,
               episode: int | None = None, instruction: str | None = None,
               frame_id: str = FRAME, token_probs: list[float] | None = None,
               stamp_ns: int | None = None) -> VlaAction:
        """Publish one VlaAction of the current episode stamped now (+ ``stamp_offset`` s).

        ``stamp_ns`` sets the stamp itself (0: unstamped); the instruction is the episode's and
        the frame the safety node's default unless given.
        """
        msg = VlaAction()
        if stamp_ns is None:
            now = self.node.get_clock().now() + rclpy.duration.Duration(seconds=stamp_offset)
            msg.header.stamp = now.to_msg()
        else:
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
        msg.header.frame_id = frame_id
        msg.episode_id = self._episode if episode is None else episode
        msg.delta = np.asarray(delta, dtype=np.float64)
        msg.instruction = self._instruction if instruction is None else instruction
        # a test stand-in is certain unless told otherwise (the confidence gate is on)
        msg.token_probs = np.asarray(np.ones(7) if token_probs is None else token_probs,
                                     dtype=np.float32)
        msg.token_margins = np.ones(7, dtype=np.float32)
        self.action_pub.publish(msg)
        return msg

    def call(self, which: str, timeout: float = 5.0) -> Trigger.Response:
        """Call ``~/estop`` or ``~/reset`` and wait for the answer."""
        client = self.estop_client if which == 'estop' else self.reset_client
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f'{client.srv_name} not available')
        future = client.call_async(Trigger.Request())
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            time.sleep(0.001)
        if not future.done():
            raise TimeoutError(f'{client.srv_name} did not answer')
        return future.result()

    # -- outputs --------------------------------------------------------------------------
    def connected(self, timeout: float = 20.0) -> bool:
        """Whether the safety node subscribed to our topics and its services exist."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if (self.action_pub.get_subscription_count()
                    and self.estop_pub.get_subscription_count()
                    and self.episode_pub.get_subscription_count()
                    and self.reset_client.service_is_ready() and self.twists
                    and all(self.node.count_publishers(t) for t in self._outputs)):
                return True
            time.sleep(0.05)
        return False

    def wait_joint_states(self, timeout: float = 20.0) -> bool:
        """Wait until the safety node reports a joint state (its periodic status says so)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.last_status()
            if s is not None and 0.0 <= s.joint_state_age < 0.5:
                return True
            time.sleep(0.01)
        return False

    def last_status(self) -> SafetyStatus | None:
        """The newest SafetyStatus."""
        with self._lock:
            return self.statuses[-1].msg if self.statuses else None

    def wait_status(self, pred, timeout: float = 5.0) -> bool:  # noqa: ANN001
        """Wait until ``pred(newest status)`` holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.last_status()
            if s is not None and pred(s):
                return True
            time.sleep(0.005)
        return False

    def status_after(self, stamp_ns: int, pred, timeout: float = 5.0  # noqa: ANN001
                     ) -> SafetyStatus | None:
        """The first status stamped after ROS time ``stamp_ns`` for which ``pred`` holds."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [r.msg for r in self.statuses if r.stamp_ns > stamp_ns and pred(r.msg)]
            if found:
                return found[0]
            if time.monotonic() >= end:
                return None
            time.sleep(0.005)

    def wait_state(self, state: int, timeout: float = 5.0) -> bool:
        """Wait until the newest status has ``state``."""
        return self.wait_status(lambda s: s.state == state, timeout)

    def wait_reason(self, text: str, timeout: float = 5.0) -> bool:
        """Wait until the newest status reason contains ``text``."""
        return self.wait_status(lambda s: text in s.reason, timeout)

    def now_ns(self) -> int:
        """ROS time now [ns] (the clock the safety node stamps its twists with)."""
        return self.node.get_clock().now().nanoseconds

    def twists_since(self, t: float) -> list[Received]:
        """Twists received at or after monotonic time ``t``."""
        with self._lock:
            return [r for r in self.twists if r.t >= t]

    def twists_stamped_after(self, stamp_ns: int) -> list[Received]:
        """Twists the safety node made after ROS time ``stamp_ns`` (by their header stamp)."""
        with self._lock:
            return [r for r in self.twists if r.stamp_ns > stamp_ns]

    def first_twist_after(self, stamp_ns: int, pred, timeout: float = 5.0  # noqa: ANN001
                          ) -> Received | None:
        """The first twist made after ROS time ``stamp_ns`` for which ``pred(vector)`` holds.

        Scans only what arrived since the last look, so polling does not starve the executor.
        """
        end = time.monotonic() + timeout
        seen = 0
        while True:
            with self._lock:
                new = self.twists[seen:]
            seen += len(new)
            for r in new:
                if r.stamp_ns > stamp_ns and pred(twist_vector(r.msg)):
                    return r
            if time.monotonic() >= end:
                return None
            time.sleep(0.0002)


def twist_vector(msg: TwistStamped) -> np.ndarray:
    """The six components of a TwistStamped as an array."""
    t = msg.twist
    return np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])
