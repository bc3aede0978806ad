"""Ping-pong nodes that time camera-sized messages between two processes over DDS.

``pong`` echoes every ``Observation`` (224x224 rgb8) and ``sensor_msgs/Image`` it receives on
``ping/*`` back on ``pong/*``. ``ping`` publishes frames of the chosen kind(s) at a fixed rate,
each tagged with a sequence number in ``header.stamp.sec``, and takes the round-trip time of every
echo with the monotonic clock of its own process, so no clock has to be shared. A frame's pixel
bytes repeat one pattern, a marker followed by the kind's name, so a test can find the frames in
shared memory (see ``test/test_shm_transport.py``); every echo is checked to carry the bytes that
were sent.

QoS follows the topic contract: observations reliable, depth 1; images sensor data (best
effort, depth 1) like a camera driver's, or reliable with ``--image-qos reliable`` (both sides
must agree). Both sides must be separate processes started with the environment under test
(``FASTDDS_DEFAULT_PROFILES_FILE`` is read once, when the first participant is created)::

    python -m vla_ros.testing.pingpong_node pong
    python -m vla_ros.testing.pingpong_node ping --kind image --rate 50 --warmup 50 --count 500 \
        --out rtt.json

The first ``--warmup`` frames are not timed; ping then sends until it has ``--count`` timed
echoes of every kind, or ``--max-frames`` frames were sent (``--count 0``: until interrupted).
``--out`` receives the round-trip times in nanoseconds and the frames sent, echoed, lost and
corrupted per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image

from vla_ros.msg import Observation

KINDS = ('observation', 'image')
SHAPES = {'observation': (224, 224), 'image': (480, 640)}  # (height, width), rgb8
MSG_TYPES = {'observation': Observation, 'image': Image}


def qos_for(kind: str, image_qos: str = 'sensor') -> QoSProfile:
    """Depth 1, reliable; images best effort unless ``image_qos`` is ``'reliable'``."""
    best_effort = kind == 'image' and image_qos == 'sensor'
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                      reliability=(ReliabilityPolicy.BEST_EFFORT if best_effort
                                   else ReliabilityPolicy.RELIABLE),
                      durability=DurabilityPolicy.VOLATILE)


def _image_of(msg: Observation | Image) -> Image:
    return msg.image if isinstance(msg, Observation) else msg


def pattern(kind: str, marker: bytes) -> bytes:
    """The byte pattern that the pixels of a ``kind`` frame repeat."""
    return marker + kind.encode()


def make_frame(kind: str, marker: bytes) -> Observation | Image:
    """A frame of ``kind`` whose pixel bytes repeat :func:`pattern` (cut to the frame size)."""
    height, width = SHAPES[kind]
    size = height * width * 3
    unit = pattern(kind, marker)
    image = Image()
    image.header.frame_id = 'camera'
    image.height, image.width, image.encoding, image.step = height, width, 'rgb8', width * 3
    image.data = (unit * (size // len(unit) + 1))[:size]
    if kind == 'image':
        return image
    msg = Observation()
    msg.header.frame_id = 'camera'
    msg.image = image
    msg.instruction = 'pick up the black bowl'
    msg.episode_id = 1
    return msg


class PongNode(Node):
    """Republishes every frame from ``ping/<kind>`` on ``pong/<kind>``, unchanged."""

    def __init__(self, image_qos: str = 'sensor') -> None:
        super().__init__('pong_node')
        for kind in KINDS:
            qos = qos_for(kind, image_qos)
            pub = self.create_publisher(MSG_TYPES[kind], f'pong/{kind}', qos)
            self.create_subscription(MSG_TYPES[kind], f'ping/{kind}', pub.publish, qos)
        self.get_logger().info(f'pong ready (pid {os.getpid()})')


class PingNode(Node):
    """Publishes frames at ``rate`` Hz and records the round-trip time of each echo."""

    def __init__(self, kinds: Sequence[str], rate: float, warmup: int, count: int,
                 marker: bytes, image_qos: str = 'sensor', log_every: int = 100,
                 max_frames: int = 0) -> None:
        super().__init__('ping_node')
        self.kinds = tuple(kinds)
        self.warmup, self.count, self.log_every = warmup, count, log_every
        self.max_frames = max_frames
        self.frames = {k: make_frame(k, marker) for k in self.kinds}
        self.payload = {k: bytes(_image_of(f).data) for k, f in self.frames.items()}
        self.sent: dict[str, dict[int, int]] = {k: {} for k in self.kinds}
        self.rtt_ns: dict[str, list[int]] = {k: [] for k in self.kinds}
        self.received = {k: 0 for k in self.kinds}
        self.corrupt = {k: 0 for k in self.kinds}
        self.seq = 0
        self.last_send = 0.0
        self._pubs, self._subs = {}, {}
        for kind in self.kinds:
            qos = qos_for(kind, image_qos)
            self._pubs[kind] = self.create_publisher(MSG_TYPES[kind], f'ping/{kind}', qos)
            self._subs[kind] = self.create_subscription(
                MSG_TYPES[kind], f'pong/{kind}', lambda msg, k=kind: self._on_echo(k, msg), qos)
        self._timer = self.create_timer(1.0 / rate, self._tick)
        self.get_logger().info(f'ping ready (pid {os.getpid()}), kinds {",".join(self.kinds)}')

    def matched(self) -> bool:
        """Whether every ping publisher and every pong subscription is matched with the peer."""
        return all(self._pubs[k].get_subscription_count() > 0
                   and self._subs[k].get_publisher_count() > 0 for k in self.kinds)

    def _sending_done(self) -> bool:
        if self.count <= 0:
            return False
        enough = all(len(self.rtt_ns[k]) >= self.count for k in self.kinds)
        return enough or bool(self.max_frames and self.seq >= self.max_frames)

    def done(self) -> bool:
        """Whether sending is over and no echo is pending (or the last is overdue by 2 s)."""
        if not self._sending_done():
            return False
        pending = any(self.sent[k] for k in self.kinds)
        return not pending or time.monotonic() - self.last_send > 2.0

    def _tick(self) -> None:
        if self._sending_done() or not self.context.ok() or not self.matched():
            return
        self.seq += 1
        for kind in self.kinds:
            frame = self.frames[kind]
            _image_of(frame).header.stamp.sec = self.seq
            frame.header.stamp.sec = self.seq
            self.sent[kind][self.seq] = time.perf_counter_ns()
            self._pubs[kind].publish(frame)
        self.last_send = time.monotonic()

    def _on_echo(self, kind: str, msg: Observation | Image) -> None:
        now = time.perf_counter_ns()
        seq = msg.header.stamp.sec
        sent = self.sent[kind].pop(seq, None)
        if sent is None:
            return
        image = _image_of(msg)
        if image.data.tobytes() != self.payload[kind] or image.header.stamp.sec != seq:
            self.corrupt[kind] += 1
            self.get_logger().warning(f'corrupt {kind} echo {seq}', throttle_duration_sec=1.0)
            return
        self.received[kind] += 1
        if seq > self.warmup:
            self.rtt_ns[kind].append(now - sent)
        n = self.received[kind]
        if n == 1 or n % self.log_every == 0:
            self.get_logger().info(f'echoes {kind} {n}')

    def summary(self) -> dict:
        """Round-trip times after warm-up and loss counts, per kind."""
        timed_sent = max(0, self.seq - self.warmup)
        return {kind: {
            'sent': self.seq, 'received': self.received[kind], 'corrupt': self.corrupt[kind],
            'lost': self.seq - self.received[kind] - self.corrupt[kind],
            'warmup': self.warmup, 'timed_sent': timed_sent,
            'timed_lost': timed_sent - len(self.rtt_ns[kind]), 'rtt_ns': self.rtt_ns[kind],
        } for kind in self.kinds}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='pingpong_node', description=__doc__.splitlines()[0])
    parser.add_argument('role', choices=('ping', 'pong'))
    parser.add_argument('--kind', choices=(*KINDS, 'both'), default='both')
    parser.add_argument('--rate', type=float, default=50.0, help='frames per second per kind')
    parser.add_argument('--warmup', type=int, default=50, help='first frames, not timed')
    parser.add_argument('--count', type=int, default=500, help='timed echoes; 0: run forever')
    parser.add_argument('--max-frames', type=int, default=0,
                        help='stop sending after this many frames (0: 4 x (warmup + count))')
    parser.add_argument('--marker', default='', help='hex bytes repeated as pixels (random)')
    parser.add_argument('--out', default='', help='JSON file for the round-trip times')
    parser.add_argument('--image-qos', choices=('sensor', 'reliable'), default='sensor')
    parser.add_argument('--log-every', type=int, default=100, help='log every n-th echo')
    parser.add_argument('--timeout', type=float, default=30.0, help='seconds to find the peer')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ping or pong side until done or SIGINT/SIGTERM; 1 when ping found no peer."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    # Stop between two spins rather than from rclpy's own handler, which shuts the context down
    # under a running take() (a RuntimeError in rclpy at exit).
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    if args.role == 'pong':
        node: Node = PongNode(args.image_qos)
    else:
        kinds = KINDS if args.kind == 'both' else (args.kind,)
        marker = bytes.fromhex(args.marker) if args.marker else os.urandom(16)
        node = PingNode(kinds, args.rate, args.warmup, args.count, marker, args.image_qos,
                        max(1, args.log_every),
                        args.max_frames or 4 * (args.warmup + args.count))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    status = 0
    deadline = time.monotonic() + args.timeout
    try:
        while not stop and not (isinstance(node, PingNode) and node.done()):
            executor.spin_once(timeout_sec=0.1)
            if isinstance(node, PingNode) and node.seq == 0 and time.monotonic() > deadline:
                node.get_logger().error('no pong peer matched; giving up')
                status = 1
                break
    finally:
        if isinstance(node, PingNode) and args.out:
            with open(args.out, 'w') as f:
                json.dump(node.summary(), f)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return status


if __name__ == '__main__':
    sys.exit(main())
