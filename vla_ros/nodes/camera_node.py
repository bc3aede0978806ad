"""Camera node: camera frames + the current instruction -> ``Observation`` at the policy rate.

Wiring only: the image callback decodes nothing and just keeps the newest frame (drop-oldest,
size 1); a timer at ``policy_rate_hz`` takes it, drops it when older than ``max_frame_age``,
decodes and preprocesses it exactly as OpenVLA expects (``vla_ros.core.image``) and publishes it
with the instruction and episode id. An empty instruction means idle: nothing is forwarded.
Malformed frames (raw or compressed: corrupt or truncated JPEG/PNG) and unusable instructions
are logged and dropped, so no observation goes out and the graph stops the arm on stale input;
the node keeps running.

The camera node is the one owner of the operator's ``instruction``: it alone subscribes to it,
twice -- reliable + volatile, which matches ``ros2 topic pub``'s default and latched publishers
alike, and transient_local, which also hands it a latched publisher's held instruction when it
(re)starts; a sample that arrives on both is taken once. Each accepted instruction starts an
episode, published latched on ``episode`` (vla_ros/Episode) for every other node, a late or
restarted one too.

Topics (relative; remap ``image`` to the camera driver): in ``image`` (sensor_msgs/Image) or,
with ``image_transport:=compressed``, ``<image>/compressed`` (sensor_msgs/CompressedImage, JPEG
or PNG as image_transport's compressed transport publishes it), both sensor-data QoS;
``instruction`` (std_msgs/String); out ``episode`` (latched), ``observation`` (vla_ros/Observation,
reliable, depth 1), ``debug_image`` (the preprocessed frame, for rviz2).
"""

from __future__ import annotations

import collections
import time

import numpy as np
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from vla_ros.core.buffer import LatestBuffer
from vla_ros.core.errors import VlaRosError
from vla_ros.core.image import (
    ImageConfig,
    decode_compressed,
    decode_image,
    encode_image,
    preprocess,
)
from vla_ros.core.prompt import build_prompt
from vla_ros.msg import Episode, Observation
from vla_ros.nodes import qos
from vla_ros.nodes.params import Param, declare
from vla_ros.nodes.runtime import run_node

#: Values of the ``image_transport`` parameter (image_transport's transport names).
TRANSPORTS = ('raw', 'compressed')

PARAMS = (
    Param('policy_rate_hz', 5.0, 'Rate at which observations are forwarded [Hz].', 0.1, 100.0,
          read_only=True),
    Param('max_frame_age', 0.5, 'Frames older than this (header stamp vs now) are dropped [s].',
          0.01, 10.0),
    Param('max_instruction_chars', 1000, 'Longer instructions are rejected [characters].',
          1, 100000),
    Param('image_transport', 'raw', 'raw = sensor_msgs/Image on image; compressed = '
          'sensor_msgs/CompressedImage (JPEG/PNG) on <image>/compressed.', read_only=True),
    Param('size', 224, 'Side of the square model input [px].', 16, 1024, read_only=True),
    Param('resize_filter', 'lanczos', 'lanczos (OpenVLA eval scripts) or bicubic (HF processor).',
          read_only=True),
    Param('jpeg_roundtrip', True, 'JPEG-encode/decode frames first, as in OpenVLA training data '
          '(a frame that arrives as JPEG already is one and is not encoded again).',
          read_only=True),
    Param('center_crop', False, 'Center crop of crop_scale area (models trained with '
          'augmentation); base openvla-7b must not be cropped.', read_only=True),
    Param('crop_scale', 0.9, 'Area fraction kept by the center crop.', 0.1, 1.0, read_only=True),
    Param('rotate_180', False, 'Rotate frames 180 degrees (LIBERO).', read_only=True),
    Param('flip_horizontal', False, 'Mirror frames left-right.', read_only=True),
    Param('flip_vertical', False, 'Mirror frames top-bottom.', read_only=True),
)


class CameraNode(Node):
    """Forwards the freshest preprocessed frame with the current instruction."""

    def __init__(self, **node_kwargs: object) -> None:
        super().__init__('camera_node', **node_kwargs)
        p = declare(self, PARAMS)
        self._max_age = float(p['max_frame_age'])
        self._max_chars = int(p['max_instruction_chars'])
        transport = str(p['image_transport'])
        if transport not in TRANSPORTS:
            raise VlaRosError(f'image_transport must be one of {TRANSPORTS}, got {transport!r}')
        self._image_config = ImageConfig(
            size=int(p['size']), resize_filter=str(p['resize_filter']),
            jpeg_roundtrip=bool(p['jpeg_roundtrip']), center_crop=bool(p['center_crop']),
            crop_scale=float(p['crop_scale']), rotate_180=bool(p['rotate_180']),
            flip_horizontal=bool(p['flip_horizontal']), flip_vertical=bool(p['flip_vertical']))
        self._frames: LatestBuffer[tuple[Image | CompressedImage, float]] = LatestBuffer()
        self._instruction = ''
        self._episode_id = 0
        self._seen: collections.deque[tuple] = collections.deque(maxlen=32)
        self.forwarded = 0

        self._obs_pub = self.create_publisher(Observation, 'observation', qos.LATEST)
        self._debug_pub = self.create_publisher(Image, 'debug_image', qos.LATEST)
        self._episode_pub = self.create_publisher(Episode, 'episode', qos.LATCHED)
        if transport == 'compressed':  # image_transport's naming: <base topic>/compressed
            self.image_topic = self.resolve_topic_name('image') + '/compressed'
            self.create_subscription(CompressedImage, self.image_topic, self._on_image,
                                     qos.SENSOR_DATA)
        else:
            self.image_topic = self.resolve_topic_name('image')
            self.create_subscription(Image, 'image', self._on_image, qos.SENSOR_DATA)
        self.create_subscription(String, 'instruction', self._on_instruction,
                                 qos.OPERATOR_INPUT)
        # A volatile publisher (ros2 topic pub) never matches this one, by design: no warning.
        self.create_subscription(String, 'instruction', self._on_instruction, qos.LATCHED_INPUT,
                                 event_callbacks=SubscriptionEventCallbacks(
                                     incompatible_qos=lambda _info: None))
        self.create_timer(1.0 / float(p['policy_rate_hz']), self._on_tick)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(
            f'camera node ready: {self.image_topic} ({transport}), {p["policy_rate_hz"]} Hz, '
            f'max frame age {self._max_age} s, {self._image_config}')

    def _on_set_parameters(self, params):  # noqa: ANN001 - rclpy callback signature
        from rcl_interfaces.msg import SetParametersResult
        for param in params:
            if param.name == 'max_frame_age':
                self._max_age = float(param.value)
            elif param.name == 'max_instruction_chars':
                self._max_chars = int(param.value)
        return SetParametersResult(successful=True)

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self._frames.put((msg, time.monotonic()))

    def _on_instruction(self, msg: String, info: dict) -> Episode | None:
        """Start an episode for ``msg``; None when the sample was already taken.

        A latched publisher matches both instruction subscriptions, so its sample arrives
        twice: the writer's identity, source stamp and sequence number tell the copies apart
        from a new sample (an operator may well send the same text again to restart).
        """
        key = (repr(info.get('publisher_gid')), info.get('source_timestamp'),
               info.get('publication_sequence_number'))
        if key in self._seen:
            return None
        self._seen.append(key)
        text = msg.data.strip()
        if text:
            try:
                build_prompt(text, self._max_chars)
            except VlaRosError as exc:
                self.get_logger().error(f'instruction rejected, idle: {exc}')
                text = ''
        elif not self._instruction:
            self.get_logger().info('empty instruction: idle')
        self._instruction = text
        self._episode_id += 1
        episode = Episode()
        episode.header.stamp = self.get_clock().now().to_msg()
        episode.episode_id = self._episode_id
        episode.instruction = text
        self._episode_pub.publish(episode)
        if text:
            self.get_logger().info(f'episode {self._episode_id}: {text[:200]!r}')
        else:
            self.get_logger().info(f'episode {self._episode_id}: idle')
        return episode

    def _frame_age(self, msg: Image | CompressedImage, received: float) -> float:
        """Age from the header stamp (camera clock = our clock), else time since arrival."""
        stamp = Time.from_msg(msg.header.stamp)
        if stamp.nanoseconds == 0:
            return time.monotonic() - received
        return (self.get_clock().now() - stamp).nanoseconds * 1e-9

    def _on_tick(self) -> Observation | None:
        """Forward the newest frame, if fresh and decodable, with the instruction."""
        if not self._instruction:
            return None
        item = self._frames.take()
        if item is None:
            return None
        msg, received = item
        age = self._frame_age(msg, received)
        if age > self._max_age or age < -self._max_age:
            self.get_logger().warning(
                f'dropping a frame {age:.3f} s old (max_frame_age {self._max_age} s)',
                throttle_duration_sec=2.0)
            return None
        try:
            if isinstance(msg, CompressedImage):
                rgb, codec = decode_compressed(msg.data, msg.format)
            else:
                rgb = decode_image(msg.data, msg.height, msg.width, msg.encoding, msg.step,
                                   msg.is_bigendian)
                codec = 'raw'
            model_input = preprocess(rgb, self._image_config, jpeg_decoded=codec == 'jpeg')
        except VlaRosError as exc:
            self.get_logger().error(f'dropping a malformed frame, nothing forwarded: {exc}',
                                    throttle_duration_sec=2.0)
            return None
        obs = Observation()
        obs.header = msg.header
        obs.image = _to_image_msg(model_input, msg.header)
        obs.instruction = self._instruction
        obs.episode_id = self._episode_id
        self._obs_pub.publish(obs)
        self._debug_pub.publish(obs.image)
        self.forwarded += 1
        return obs


def _to_image_msg(rgb: np.ndarray, header) -> Image:  # noqa: ANN001 - std_msgs/Header
    data, height, width, encoding, step = encode_image(rgb, 'rgb8')
    out = Image()
    out.header = header
    out.height, out.width, out.encoding, out.step = height, width, encoding, step
    out.data = data
    return out


def main(args: list[str] | None = None) -> None:
    """Run the camera node until SIGINT/SIGTERM."""
    run_node(CameraNode, args)


if __name__ == '__main__':
    main()
