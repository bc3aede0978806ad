"""The camera node in-process: its callbacks driven directly, no spinning, no time windows.

A real ``CameraNode`` (real rclpy node, real generated messages) is created in this process and
its image, instruction and timer callbacks are called by the test in a chosen order; what the
timer would publish is what ``_on_tick`` returns. Frame ages are set through header stamps
relative to the node's clock. The compressed transport gets real JPEG and PNG bytes from OpenCV,
including truncated and corrupt ones. DDS delivery and QoS matching are the graph tests' part
(test_install_space.py).
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.duration import Duration
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from vla_ros.core.image import (
    ImageConfig,
    decode_compressed,
    decode_image,
    encode_image,
    preprocess,
)
from vla_ros.nodes.camera_node import CameraNode
from vla_ros.testing import rclpy_context

_SEQUENCE = itertools.count(1)


@pytest.fixture
def make_node(domain_id: int):  # noqa: ANN201
    """Build camera nodes in one rclpy context (parameter overrides as keyword arguments)."""
    nodes: list[CameraNode] = []
    with rclpy_context(domain_id) as ctx:
        def make(**params: object) -> CameraNode:
            node = CameraNode(context=ctx, namespace='vla', parameter_overrides=[
                Parameter(k, value=v) for k, v in params.items()])
            nodes.append(node)
            return node
        yield make
        for node in nodes:
            node.destroy_node()


def info(gid: int = 1, seq: int | None = None, stamp: int | None = None) -> dict:
    """A MessageInfo as rclpy hands it over: one per sample, identical on both subscriptions."""
    seq = next(_SEQUENCE) if seq is None else seq
    return {'publisher_gid': {'data': bytes([gid] * 16), 'implementation_identifier': 'x'},
            'source_timestamp': 1_000 + seq if stamp is None else stamp,
            'received_timestamp': 0, 'publication_sequence_number': seq,
            'reception_sequence_number': seq}


def instruct(node: CameraNode, text: str, sample: dict | None = None):  # noqa: ANN201
    return node._on_instruction(String(data=text), sample or info())


def raw_frame(node: CameraNode, rgb: np.ndarray, *, age: float = 0.0,
              encoding: str = 'rgb8') -> Image:
    data, h, w, enc, step = encode_image(rgb, encoding)
    msg = Image()
    msg.header.stamp = (node.get_clock().now() - Duration(seconds=age)).to_msg()
    msg.header.frame_id = 'camera'
    msg.height, msg.width, msg.encoding, msg.step, msg.data = h, w, enc, step, data
    return msg


def compressed_frame(node: CameraNode, data: bytes, fmt: str) -> CompressedImage:
    """A CompressedImage with ``format`` as image_transport's compressed publisher writes it."""
    msg = CompressedImage()
    msg.header.stamp = node.get_clock().now().to_msg()
    msg.header.frame_id = 'camera'
    msg.format, msg.data = fmt, data
    return msg


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, out = cv2.imencode('.jpg', np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return out.tobytes()


def png(rgb: np.ndarray) -> bytes:
    ok, out = cv2.imencode('.png', np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return out.tobytes()


def scene(h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth picture with edges (JPEG keeps it recognisable, unlike noise)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=2).astype(np.uint8)
    rgb[h // 4:h // 2, w // 4:w // 2] = (220, 30, 30)
    return rgb


def _damaged_png(rgb: np.ndarray) -> bytes:
    data = bytearray(png(rgb))
    data[data.index(b'IDAT') + 20] ^= 0xFF  # one flipped byte in the compressed pixels
    return bytes(data)


def tick_with(node: CameraNode, msg: Image | CompressedImage):  # noqa: ANN201
    node._on_image(msg)
    return node._on_tick()


def pixels(obs) -> np.ndarray:  # noqa: ANN001
    img = obs.image
    return decode_image(img.data, img.height, img.width, img.encoding, img.step)


def test_forwards_preprocessed_frame_with_instruction_and_episodes(make_node) -> None:  # noqa: ANN001
    node = make_node()
    rgb = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert tick_with(node, raw_frame(node, rgb)) is None, 'no instruction yet: idle'
    episode = instruct(node, '  Pick up the black bowl ')
    assert (episode.episode_id, episode.instruction) == (1, 'Pick up the black bowl')
    obs = tick_with(node, raw_frame(node, rgb, encoding='bgr8'))
    assert obs.instruction == 'Pick up the black bowl' and obs.episode_id == 1
    np.testing.assert_array_equal(pixels(obs), preprocess(rgb, ImageConfig()))
    assert node._on_tick() is None, 'a frame is forwarded once'
    # The same text sent again is a new sample: a new episode.
    assert instruct(node, 'Pick up the black bowl').episode_id == 2
    assert tick_with(node, raw_frame(node, rgb)).episode_id == 2


def test_a_sample_on_both_instruction_subscriptions_is_one_episode(make_node) -> None:  # noqa: ANN001
    node = make_node()
    sample = info()
    assert instruct(node, 'wipe the table', sample).episode_id == 1
    assert instruct(node, 'wipe the table', dict(sample)) is None  # the latched copy
    # Another writer, same sequence number and stamp: a different sample.
    other = info(gid=2, seq=sample['publication_sequence_number'],
                 stamp=sample['source_timestamp'])
    assert instruct(node, 'wipe the table', other).episode_id == 2


def test_bad_instructions_and_idle_publish_an_idle_episode(make_node) -> None:  # noqa: ANN001
    node = make_node()
    rgb = scene()
    instruct(node, 'move to the red block')
    assert tick_with(node, raw_frame(node, rgb)) is not None
    rejected = instruct(node, 'x' * 100_000)
    assert rejected.instruction == '' and rejected.episode_id == 2
    assert tick_with(node, raw_frame(node, rgb)) is None
    instruct(node, 'move to the red block')
    idle = instruct(node, '   ')
    assert idle.instruction == '' and idle.episode_id == 4
    assert tick_with(node, raw_frame(node, rgb)) is None


def test_drops_stale_and_malformed_raw_frames(make_node) -> None:  # noqa: ANN001
    node = make_node()
    rgb = np.full((64, 64, 3), 200, np.uint8)
    instruct(node, 'move to the red block')
    assert tick_with(node, raw_frame(node, rgb, age=5.0)) is None  # max_frame_age 0.5 s
    bad = raw_frame(node, rgb)
    bad.data = bytes(10)  # wrong length for 64x64 rgb8
    assert tick_with(node, bad) is None
    bad = raw_frame(node, rgb)
    bad.encoding = 'yuv422_weird'
    assert tick_with(node, bad) is None
    assert tick_with(node, raw_frame(node, rgb)) is not None, 'good frames flow again'


def test_compressed_jpeg_is_decoded_and_not_encoded_twice(make_node) -> None:  # noqa: ANN001
    node = make_node(image_transport='compressed')
    assert node.image_topic == '/vla/image/compressed'
    instruct(node, 'move to the red block')
    data = jpeg(scene(), quality=80)
    obs = tick_with(node, compressed_frame(node, data, 'rgb8; jpeg compressed bgr8'))
    assert obs is not None and obs.episode_id == 1
    decoded, codec = decode_compressed(data, 'rgb8; jpeg compressed bgr8')
    assert codec == 'jpeg'
    # The camera's JPEG is the round trip: resized as decoded, no second JPEG encoding...
    once = preprocess(decoded, ImageConfig(jpeg_roundtrip=False))
    np.testing.assert_array_equal(pixels(obs), once)
    # ...which would have changed the pixels.
    assert not np.array_equal(once, preprocess(decoded, ImageConfig(jpeg_roundtrip=True)))


def test_compressed_png_and_old_format_strings(make_node) -> None:  # noqa: ANN001
    node = make_node(image_transport='compressed')
    instruct(node, 'move to the red block')
    rgb = scene()
    # PNG is lossless: the configured JPEG round trip still applies.
    obs = tick_with(node, compressed_frame(node, png(rgb), 'rgb8; png compressed bgr8'))
    np.testing.assert_array_equal(pixels(obs), preprocess(rgb, ImageConfig()))
    # Grey PNG, and the bare format strings of older publishers.
    grey = rgb[:, :, 0]
    ok, grey_png = cv2.imencode('.png', grey)
    obs = tick_with(node, compressed_frame(node, grey_png.tobytes(), 'mono8; png compressed '))
    np.testing.assert_array_equal(pixels(obs), preprocess(np.repeat(grey[:, :, None], 3, 2),
                                                          ImageConfig()))
    assert tick_with(node, compressed_frame(node, png(rgb), 'png')) is not None
    assert tick_with(node, compressed_frame(node, jpeg(rgb), 'jpeg')) is not None


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'header_only',
                                    'no_scan', 'mislabelled', 'unknown_codec',
                                    'truncated_png', 'png_bad_idat'])
def test_corrupt_compressed_frames_stop_the_stream_not_the_node(make_node, damage: str,  # noqa: ANN001
                                                                 caplog) -> None:  # noqa: ANN001
    node = make_node(image_transport='compressed')
    instruct(node, 'move to the red block')
    rgb = scene()
    good = jpeg(rgb)
    data, fmt = {
        'truncated': (good[:len(good) // 2], 'rgb8; jpeg compressed bgr8'),
        'garbage': (bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8)),
                    'rgb8; jpeg compressed bgr8'),
        'empty': (b'', 'rgb8; jpeg compressed bgr8'),
        'header_only': (good[:20], 'rgb8; jpeg compressed bgr8'),
        # Start and end markers intact, the image data missing: only the decoder can tell.
        'no_scan': (good[:good.index(b'\xff\xda')] + good[-2:], 'rgb8; jpeg compressed bgr8'),
        'mislabelled': (png(rgb), 'rgb8; jpeg compressed bgr8'),
        'unknown_codec': (good, 'rgb8; h264 compressed bgr8'),
        'truncated_png': (png(rgb)[:-30], 'rgb8; png compressed bgr8'),
        'png_bad_idat': (_damaged_png(rgb), 'rgb8; png compressed bgr8'),
    }[damage]
    assert tick_with(node, compressed_frame(node, data, fmt)) is None, damage
    # The node is fine: the next good frame goes out.
    assert tick_with(node, compressed_frame(node, good, 'rgb8; jpeg compressed bgr8'))


def test_unknown_transport_is_refused(make_node) -> None:  # noqa: ANN001
    with pytest.raises(Exception, match='image_transport'):
        make_node(image_transport='theora')


def test_node_logs_say_why_a_frame_was_dropped(make_node) -> None:  # noqa: ANN001
    node = make_node(image_transport='compressed')
    instruct(node, 'move to the red block')
    lines: list[str] = []
    logger = node.get_logger()
    original = logger.error
    logger.error = lambda text, **kw: lines.append(text) or original(text, **kw)
    try:
        assert tick_with(node, compressed_frame(node, jpeg(scene())[:100], 'jpeg')) is None
    finally:
        logger.error = original
    assert lines and 'truncated jpeg' in lines[0] and 'nothing forwarded' in lines[0]


def test_rclpy_passes_message_info_to_the_instruction_callback(make_node) -> None:  # noqa: ANN001
    node = make_node()
    subs = [s for s in node.subscriptions if s.topic_name == '/vla/instruction']
    durability = sorted(s.qos_profile.durability.name for s in subs)
    assert durability == ['TRANSIENT_LOCAL', 'VOLATILE']
    assert all(s._callback_type == rclpy.subscription.Subscription.CallbackType.WithMessageInfo
               for s in subs)
