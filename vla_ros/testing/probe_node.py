"""Probe nodes for fleet tests: a recorder of what reaches the arm, and an action injector.

``record`` subscribes to the limited twist, the actions, the safety status and the camera
frames (stamps only) of one namespace and appends one JSON line per message to ``--out`` (``k``
kind, ``t`` receipt and ``s`` header stamp in ns of the system clock, which every host of a
namespaced test shares), so a test can check, message by message, what moved the arm and on
which action. ``inject`` is a second,
unauthorised action publisher (a stand-in for a rogue participant): it follows the latched
episode (id and instruction) like the VLA node does, publishes a fixed delta stamped now at
``--rate`` in the VLA node's frame, each token sure of itself, and reports
whether the safety node's action subscription matched it. :class:`Recording` reads a record
file while it grows::

    python -m vla_ros.testing.probe_node record --out rec.jsonl
    python -m vla_ros.testing.probe_node inject --delta 0.0123,0,0,0,0,0,1 --duration 5
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The first six components of a twist, as recorded.
TWIST_KEYS = ('x', 'y', 'z', 'roll', 'pitch', 'yaw')


def _stamp_ns(header) -> int:  # noqa: ANN001 - std_msgs/Header
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def record(namespace: str, twist_topic: str, camera_topic: str, out: Path) -> None:
    """Append every twist, action, safety status and frame stamp to ``out`` until a signal."""
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import Image

    from vla_ros.bringup import ns_topic
    from vla_ros.msg import SafetyStatus, VlaAction
    from vla_ros.nodes import qos

    node, stop = _start('probe_recorder')
    lock = threading.Lock()
    with open(out, 'a', encoding='utf-8') as f:
        def write(item: dict) -> None:
            item['t'] = time.time_ns()
            with lock:
                f.write(json.dumps(item) + '\n')
                f.flush()

        def on_twist(m: TwistStamped) -> None:
            t = m.twist
            write({'k': 'twist', 's': _stamp_ns(m.header),
                   'v': [t.linear.x, t.linear.y, t.linear.z,
                         t.angular.x, t.angular.y, t.angular.z]})

        def on_action(m: VlaAction) -> None:
            write({'k': 'action', 's': _stamp_ns(m.header), 'e': int(m.episode_id),
                   'd': [float(x) for x in m.delta], 'ms': float(m.inference_ms)})

        def on_status(m: SafetyStatus) -> None:
            write({'k': 'status', 's': _stamp_ns(m.header), 'state': int(m.state),
                   'reason': m.reason, 'req': [float(x) for x in m.requested],
                   'camera_age': float(m.camera_age), 'action_age': float(m.action_age)})

        def on_frame(m: Image) -> None:
            write({'k': 'frame', 's': _stamp_ns(m.header)})

        deep = qos.COMMAND  # reliable, a queue: keep every message of a burst
        node.create_subscription(Image, camera_topic, on_frame, qos.SENSOR_DATA)
        node.create_subscription(TwistStamped, twist_topic, on_twist, deep)
        node.create_subscription(VlaAction, ns_topic(namespace, 'action'), on_action, deep)
        node.create_subscription(SafetyStatus, ns_topic(namespace, 'safety_status'), on_status,
                                 qos.LATCHED)
        node.get_logger().info(f'recording to {out}')
        _spin(node, stop)


def inject(namespace: str, delta: Sequence[float], rate: float, duration: float,
           frame_id: str = 'panda_link0') -> dict:
    """Publish ``delta`` as VlaActions of the current episode; return what happened."""
    from vla_ros.bringup import ns_topic
    from vla_ros.msg import Episode, VlaAction
    from vla_ros.nodes import qos

    node, stop = _start('probe_injector')
    episodes: list[tuple[int, str]] = []
    node.create_subscription(Episode, ns_topic(namespace, 'episode'),
                             lambda m: episodes.append((int(m.episode_id), m.instruction)),
                             qos.LATCHED)
    pub = node.create_publisher(VlaAction, ns_topic(namespace, 'action'), qos.ACTION)
    published, matched = 0, 0

    def tick() -> None:
        nonlocal published, matched
        msg = VlaAction()
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = frame_id
        msg.token_probs = [1.0] * 7
        msg.token_margins = [1.0] * 7
        msg.episode_id, msg.instruction = episodes[-1] if episodes else (0, '')
        msg.delta = [float(x) for x in delta]
        pub.publish(msg)
        published += 1
        matched = max(matched, pub.get_subscription_count())

    node.create_timer(1.0 / rate, tick)
    _spin(node, stop, duration)
    return {'k': 'inject', 'published': published, 'subscribers': matched,
            'episode_seen': episodes[-1][0] if episodes else None}


def _start(name: str):  # noqa: ANN202 - (node, stop event)
    import signal

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return rclpy.create_node(name), stop


def _spin(node, stop: threading.Event, duration: float = 0.0) -> None:  # noqa: ANN001
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor()
    executor.add_node(node)
    end = time.monotonic() + duration if duration else None
    try:
        while not stop.is_set() and rclpy.ok() and (end is None or time.monotonic() < end):
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()


@dataclass
class Recording:
    """The messages of a ``record`` file, read incrementally (call :meth:`update`)."""

    path: Path
    twists: list[dict] = field(default_factory=list)
    actions: list[dict] = field(default_factory=list)
    statuses: list[dict] = field(default_factory=list)
    frames: list[dict] = field(default_factory=list)
    _offset: int = 0

    def update(self) -> Recording:
        """Read the lines appended since the last call (a partial last line waits)."""
        if not self.path.exists():
            return self
        with open(self.path, 'rb') as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b'\n') + 1
        self._offset += end
        for line in data[:end].splitlines():
            item = json.loads(line)
            {'twist': self.twists, 'action': self.actions, 'status': self.statuses,
             'frame': self.frames}[item['k']].append(item)
        return self

    def moving(self, since_ns: int = 0) -> list[dict]:
        """Twists stamped after ``since_ns`` with any non-zero component."""
        return [r for r in self.twists if r['s'] > since_ns and any(r['v'])]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``record`` or ``inject``."""
    parser = argparse.ArgumentParser(prog='python -m vla_ros.testing.probe_node')
    sub = parser.add_subparsers(dest='command', required=True)
    r = sub.add_parser('record', help='record twists, actions and statuses as JSON lines')
    r.add_argument('--out', required=True, type=Path)
    r.add_argument('--twist-topic', dest='twist_topic', default='/servo_node/delta_twist_cmds')
    r.add_argument('--camera-topic', dest='camera_topic', default='/camera/image_raw')
    i = sub.add_parser('inject', help='publish a fixed action in the current episode')
    i.add_argument('--delta', default='0,0,0,0,0,0,1', help='7 comma-separated numbers')
    i.add_argument('--rate', type=float, default=10.0)
    i.add_argument('--duration', type=float, default=5.0)
    i.add_argument('--frame-id', dest='frame_id', default='panda_link0')
    for p in (r, i):
        p.add_argument('--namespace', default='vla')
    opts = parser.parse_args(argv)
    if opts.command == 'record':
        record(opts.namespace, opts.twist_topic, opts.camera_topic, opts.out)
    else:
        delta = [float(x) for x in opts.delta.split(',')]
        if len(delta) != 7:
            parser.error(f'--delta needs 7 numbers, got {len(delta)}')
        sys.stdout.write(json.dumps(inject(opts.namespace, delta, opts.rate, opts.duration,
                                           opts.frame_id)) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
