"""Graph tests of the camera node as a process: preprocessing, pairing, staleness, bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rclpy
from sensor_msgs.msg import Image
from std_msgs.msg import String

from vla_ros.core.image import ImageConfig, decode_image, encode_image, preprocess
from vla_ros.msg import Observation
from vla_ros.nodes.camera_node import LATCHED_QOS, LATEST_QOS, SENSOR_QOS
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env

pytestmark = pytest.mark.graph


class Harness:
    """Test-side node: publishes frames and instructions, collects observations."""

    def __init__(self, ctx) -> None:  # noqa: ANN001
        self.node = rclpy.create_node('camera_test', namespace='vla', context=ctx)
        self.image_pub = self.node.create_publisher(Image, '/camera/image_raw', SENSOR_QOS)
        self.instr_pub = self.node.create_publisher(String, 'instruction', LATCHED_QOS)
        self.got: list[Observation] = []
        self.node.create_subscription(Observation, 'observation', self.got.append, LATEST_QOS)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.02)

    def connected(self, timeout: float = 20.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.image_pub.get_subscription_count() and self.got is not None and \
                    self.node.count_publishers('/vla/observation'):
                return True
            self.spin(0.05)
        return False

    def frame(self, rgb: np.ndarray, *, age: float = 0.0, encoding: str = 'rgb8') -> Image:
        data, h, w, enc, step = encode_image(rgb, encoding)
        msg = Image()
        stamp = self.node.get_clock().now() - rclpy.duration.Duration(seconds=age)
        msg.header.stamp = stamp.to_msg()
        msg.header.frame_id = 'camera'
        msg.height, msg.width, msg.encoding, msg.step, msg.data = h, w, enc, step, data
        return msg

    def stream(self, msg: Image, seconds: float, *, restamp: bool = True) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if restamp:
                msg.header.stamp = self.node.get_clock().now().to_msg()
            self.image_pub.publish(msg)
            self.spin(0.05)


@pytest.fixture
def camera(domain_id):  # noqa: ANN001, ANN201
    proc = NodeProcess('vla_ros.nodes.camera_node',
                       ['--ros-args', '-r', '__ns:=/vla', '-r', 'image:=/camera/image_raw',
                        '-p', 'policy_rate_hz:=20.0'],
                       env=ros_env(domain_id))
    with node_processes(proc), rclpy_context(domain_id) as ctx:
        harness = Harness(ctx)
        assert proc.wait_for_output('camera node ready', 20), proc.output
        assert harness.connected(), proc.output
        yield proc, harness
        harness.node.destroy_node()


def test_forwards_preprocessed_frame_with_instruction(camera) -> None:  # noqa: ANN001
    proc, h = camera
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    h.stream(h.frame(rgb), 1.0)
    assert not h.got, 'no instruction yet: the camera node must stay idle'
    h.instr_pub.publish(String(data='Pick up the black bowl'))
    h.stream(h.frame(rgb, encoding='bgr8'), 2.0)
    assert h.got, proc.output
    obs = h.got[-1]
    assert obs.instruction == 'Pick up the black bowl' and obs.episode_id == 1
    got = decode_image(obs.image.data, obs.image.height, obs.image.width, obs.image.encoding,
                       obs.image.step)
    np.testing.assert_array_equal(got, preprocess(rgb, ImageConfig()))
    # A new instruction starts a new episode.
    h.instr_pub.publish(String(data='wipe the table'))
    h.got.clear()
    h.stream(h.frame(rgb), 1.0)
    assert h.got and h.got[-1].episode_id == 2 and h.got[-1].instruction == 'wipe the table'


def test_drops_stale_malformed_and_idles_on_bad_instructions(camera) -> None:  # noqa: ANN001
    proc, h = camera
    rgb = np.full((64, 64, 3), 200, np.uint8)
    h.instr_pub.publish(String(data='move to the red block'))
    stale = h.frame(rgb, age=5.0)
    h.stream(stale, 1.0, restamp=False)
    assert not h.got, 'a 5 s old frame must be dropped (max_frame_age 0.5 s)'
    assert 'dropping a frame' in proc.output

    bad = h.frame(rgb)
    bad.data = bytes(10)  # wrong length for 64x64 rgb8
    h.stream(bad, 1.0)
    assert not h.got and 'malformed frame' in proc.output
    bad = h.frame(rgb)
    bad.encoding = 'yuv422_weird'
    h.stream(bad, 0.5)
    assert not h.got and proc.alive()

    h.instr_pub.publish(String(data='x' * 100_000))
    h.stream(h.frame(rgb), 1.0)
    assert not h.got and 'instruction rejected' in proc.output
    h.instr_pub.publish(String(data=''))
    h.stream(h.frame(rgb), 0.5)
    assert not h.got and proc.alive()

    h.instr_pub.publish(String(data='move to the red block'))
    h.stream(h.frame(rgb), 1.0)
    assert h.got, 'a good frame after bad input must flow again'
