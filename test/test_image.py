"""Tests of vla_ros.core.image: sensor_msgs/Image decoding, OpenVLA preprocessing, normalization.

Every test builds a synthetic image whose expected pixels are known by construction.
"""

import array
import dataclasses
import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vla_ros.core.errors import CheckpointError, ConfigError, ImageError
from vla_ros.core.image import (
    ENCODINGS,
    ImageConfig,
    center_crop_resize,
    decode_compressed,
    decode_image,
    encode_image,
    jpeg_roundtrip,
    normalization_from_preprocessor_config,
    normalize_for_backbones,
    orient,
    preprocess,
    resize_square,
)

# bf16-rounded DINOv2 (ImageNet) constants as stored in derived OpenVLA checkpoints, then SigLIP.
DINO_MEAN = [0.484375, 0.455078125, 0.40625]
DINO_STD = [0.228515625, 0.2236328125, 0.224609375]
SIGLIP = [0.5, 0.5, 0.5]

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255,) * 3, (0, 0, 0)

# A 2x3 RGB image with distinct channels everywhere: pixel (r, c) = (10r+c+1, 100+r+c, 200-r-c)
SMALL_RGB = np.array(
    [[[10 * r + c + 1, 100 + 10 * r + c, 200 - 10 * r - c] for c in range(3)] for r in range(2)],
    dtype=np.uint8,
)
SMALL_GRAY = np.array([[0, 17, 255], [128, 1, 254]], dtype=np.uint8)


def raw_bytes(encoding: str, padding: int) -> tuple[bytes, int]:
    """Hand-build the sensor_msgs/Image data of SMALL_RGB / SMALL_GRAY; return (data, step)."""
    rows = []
    for r in range(2):
        row = bytearray()
        for c in range(3):
            red, green, blue = (int(v) for v in SMALL_RGB[r, c])
            row += {
                "rgb8": bytes([red, green, blue]),
                "bgr8": bytes([blue, green, red]),
                "rgba8": bytes([red, green, blue, 77]),
                "bgra8": bytes([blue, green, red, 77]),
                "mono8": bytes([int(SMALL_GRAY[r, c])]),
            }[encoding]
        row += bytes([0xEE] * padding)  # padding bytes must be ignored
        rows.append(bytes(row))
    return b"".join(rows), len(rows[0])


def expected_rgb(encoding: str) -> np.ndarray:
    if encoding == "mono8":
        return np.repeat(SMALL_GRAY[:, :, None], 3, axis=2)
    return SMALL_RGB


def no_jpeg(**kwargs) -> ImageConfig:
    return ImageConfig(jpeg_roundtrip=False, **kwargs)


# ------------------------------------------------------------------------------------------
# decode_image / encode_image
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 1, 5])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decode_each_encoding_exact(encoding, padding):
    data, step = raw_bytes(encoding, padding)
    out = decode_image(data, 2, 3, encoding, step)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected_rgb(encoding))


def test_supported_encodings():
    assert set(ENCODINGS) == {"rgb8", "bgr8", "rgba8", "bgra8", "mono8"}


@pytest.mark.parametrize(
    "wrap",
    [
        bytes,
        bytearray,
        memoryview,
        lambda b: array.array("B", b),
        lambda b: np.frombuffer(b, dtype=np.uint8),
        lambda b: np.frombuffer(b, dtype=np.uint8).reshape(2, -1),
    ],
    ids=["bytes", "bytearray", "memoryview", "array.array", "ndarray", "ndarray2d"],
)
def test_decode_accepts_buffer_types(wrap):
    data, step = raw_bytes("bgr8", 2)
    np.testing.assert_array_equal(decode_image(wrap(data), 2, 3, "bgr8", step), SMALL_RGB)


def test_decode_accepts_numpy_integer_fields_and_ignores_endianness():
    data, step = raw_bytes("rgb8", 0)
    out = decode_image(data, np.uint32(2), np.uint32(3), "rgb8", np.uint32(step), is_bigendian=1)
    np.testing.assert_array_equal(out, SMALL_RGB)


def test_decode_returns_a_copy():
    data, step = raw_bytes("rgb8", 0)
    buffer = bytearray(data)
    out = decode_image(buffer, 2, 3, "rgb8", step)
    buffer[0] = 99
    assert out[0, 0, 0] == SMALL_RGB[0, 0, 0]
    out[0, 0, 0] = 1  # writable
    assert out.flags.writeable


def test_decode_non_contiguous_memoryview():
    data, step = raw_bytes("rgb8", 0)
    doubled = bytes(b for byte in data for b in (byte, 0))
    view = memoryview(doubled)[::2]
    np.testing.assert_array_equal(decode_image(view, 2, 3, "rgb8", step), SMALL_RGB)


@pytest.mark.parametrize(
    ("height", "width", "step", "length", "fragments"),
    [
        (0, 3, 9, 0, ["height", "positive", "0"]),
        (2, 0, 9, 18, ["width", "positive", "0"]),
        (2, 3, 8, 16, ["step 8", "3 * 3 = 9", "rgb8"]),
        (2, 3, 9, 17, ["17 bytes", "9 * 2 = 18"]),
        (2, 3, 9, 19, ["19 bytes", "9 * 2 = 18", "exactly"]),
        (2, 3, 10, 18, ["18 bytes", "10 * 2 = 20"]),
        (2, 3, 9, 0, ["0 bytes", "= 18"]),
    ],
)
def test_decode_malformed_buffers(height, width, step, length, fragments):
    with pytest.raises(ImageError) as info:
        decode_image(bytes(length), height, width, "rgb8", step)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("encoding", ["rgb16", "mono16", "RGB8", "yuv422", "", "8UC3"])
def test_decode_unknown_encoding_lists_supported(encoding):
    with pytest.raises(ImageError) as info:
        decode_image(bytes(18), 2, 3, encoding, 9)
    message = str(info.value)
    assert repr(encoding) in message
    for name in ENCODINGS:
        assert name in message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([1, 2, 3] * 6, "buffer protocol"),
        (None, "buffer protocol"),
        (np.zeros(18, dtype=np.float32), "uint8"),
    ],
)
def test_decode_rejects_non_byte_data(data, fragment):
    with pytest.raises(ImageError, match=fragment):
        decode_image(data, 2, 3, "rgb8", 9)


@pytest.mark.parametrize(("field", "value"), [("height", 2.0), ("width", "3"), ("step", None)])
def test_decode_rejects_non_integer_dimensions(field, value):
    kwargs = {"height": 2, "width": 3, "step": 9}
    kwargs[field] = value
    with pytest.raises(ImageError, match=field):
        decode_image(bytes(18), encoding="rgb8", **kwargs)


def test_encode_rgb8_and_bgr8_bytes():
    data, height, width, encoding, step = encode_image(SMALL_RGB)
    assert (height, width, encoding, step) == (2, 3, "rgb8", 9)
    assert data == raw_bytes("rgb8", 0)[0]
    data, height, width, encoding, step = encode_image(SMALL_RGB, "bgr8")
    assert (height, width, encoding, step) == (2, 3, "bgr8", 9)
    assert data == raw_bytes("bgr8", 0)[0]
    assert isinstance(data, bytes)


@pytest.mark.parametrize(
    ("rgb", "encoding", "fragment"),
    [
        (SMALL_RGB, "mono8", "rgb8, bgr8"),
        (SMALL_RGB.astype(np.float32), "rgb8", "float32"),
        (np.zeros((2, 3, 4), np.uint8), "rgb8", r"\(2, 3, 4\)"),
        (np.zeros((0, 3, 3), np.uint8), "rgb8", "empty"),
        (SMALL_RGB.tolist(), "rgb8", "numpy array"),
    ],
)
def test_encode_rejects(rgb, encoding, fragment):
    with pytest.raises(ImageError, match=fragment):
        encode_image(rgb, encoding)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    padding=st.integers(0, 7),
    encoding=st.sampled_from(["rgb8", "bgr8"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_decode_roundtrip_with_padding(height, width, padding, encoding, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data, h, w, enc, step = encode_image(rgb, encoding)
    padded = b"".join(
        data[r * step : (r + 1) * step] + b"\x5a" * padding for r in range(height)
    )
    out = decode_image(padded, h, w, enc, step + padding)
    np.testing.assert_array_equal(out, rgb)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    padding=st.integers(0, 5),
    encoding=st.sampled_from(["rgba8", "bgra8", "mono8"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_alpha_and_mono_with_padding(height, width, padding, encoding, seed):
    rng = np.random.default_rng(seed)
    bpp = 1 if encoding == "mono8" else 4
    pixels = rng.integers(0, 256, (height, width, bpp), dtype=np.uint8)
    rows = np.concatenate(
        [pixels.reshape(height, -1), np.full((height, padding), 0xAB, np.uint8)], axis=1
    )
    out = decode_image(rows.tobytes(), height, width, encoding, width * bpp + padding)
    if encoding == "mono8":
        expected = np.repeat(pixels, 3, axis=2)
    elif encoding == "rgba8":
        expected = pixels[:, :, :3]
    else:
        expected = pixels[:, :, 2::-1]
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------------------------------
# ImageConfig
# ------------------------------------------------------------------------------------------


def test_config_defaults():
    config = ImageConfig()
    assert config.size == 224
    assert config.resize_filter == "lanczos"
    assert config.jpeg_roundtrip is True
    assert config.center_crop is False
    assert config.crop_scale == 0.9
    assert not (config.rotate_180 or config.flip_horizontal or config.flip_vertical)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ImageConfig().size = 100  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": 0}, "size"),
        ({"size": -224}, "size"),
        ({"size": 224.0}, "size"),
        ({"size": True}, "size"),
        ({"size": 5000}, "size"),
        ({"size": "224"}, "size"),
        ({"resize_filter": "bilinear"}, "resize_filter"),
        ({"resize_filter": "LANCZOS"}, "resize_filter"),
        ({"jpeg_roundtrip": "false"}, "jpeg_roundtrip"),
        ({"center_crop": 1}, "center_crop"),
        ({"rotate_180": None}, "rotate_180"),
        ({"flip_horizontal": "yes"}, "flip_horizontal"),
        ({"flip_vertical": 0}, "flip_vertical"),
        ({"crop_scale": 0.0}, "crop_scale"),
        ({"crop_scale": -0.5}, "crop_scale"),
        ({"crop_scale": 1.5}, "crop_scale"),
        ({"crop_scale": math.nan}, "crop_scale"),
        ({"crop_scale": "0.9"}, "crop_scale"),
        ({"crop_scale": False}, "crop_scale"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"ImageConfig.{field}"):
        ImageConfig(**kwargs)


def test_config_accepts_valid_edges():
    ImageConfig(size=1, crop_scale=1.0, resize_filter="bicubic", center_crop=True)
    ImageConfig(size=np.int64(32), crop_scale=1, rotate_180=np.bool_(True))


# ------------------------------------------------------------------------------------------
# preprocess: validation, orientation, order
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rgb", "fragment"),
    [
        (np.zeros((8, 8, 3), np.float32), "float32"),
        (np.zeros((8, 8, 3), np.uint16), "uint16"),
        (np.zeros((8, 8, 4), np.uint8), r"\(8, 8, 4\)"),
        (np.zeros((8, 8), np.uint8), r"\(8, 8\)"),
        (np.zeros((8, 8, 3, 1), np.uint8), r"\(8, 8, 3, 1\)"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_preprocess_rejects_bad_input(rgb, fragment):
    with pytest.raises(ImageError, match=fragment):
        preprocess(rgb, ImageConfig())


def corner_marked(height=6, width=8) -> np.ndarray:
    img = np.full((height, width, 3), 128, np.uint8)
    img[0, 0] = RED
    return img


@pytest.mark.parametrize(
    ("flags", "corner"),
    [
        ({}, (0, 0)),
        ({"rotate_180": True}, (-1, -1)),
        ({"flip_horizontal": True}, (0, -1)),
        ({"flip_vertical": True}, (-1, 0)),
        ({"flip_horizontal": True, "flip_vertical": True}, (-1, -1)),
        ({"rotate_180": True, "flip_horizontal": True}, (-1, 0)),
        ({"rotate_180": True, "flip_vertical": True}, (0, -1)),
        ({"rotate_180": True, "flip_horizontal": True, "flip_vertical": True}, (0, 0)),
    ],
)
@pytest.mark.parametrize("resize_filter", ["lanczos", "bicubic"])
def test_orientation_moves_corner_pixel(flags, corner, resize_filter):
    img = corner_marked()
    # Same-size resize passes pixels through unchanged, so the marker keeps its exact colour.
    config = no_jpeg(size=8, resize_filter=resize_filter, **flags)
    out = preprocess(corner_marked(8, 8), config)
    assert tuple(out[corner]) == RED
    assert np.count_nonzero(np.all(out == RED, axis=2)) == 1
    direct = orient(img, **flags)
    assert tuple(direct[corner]) == RED and direct.shape == img.shape


def test_preprocess_orients_before_jpeg_and_resize():
    # 100x150 is not a multiple of the JPEG block grid, so rotating after the JPEG round trip
    # would give a different image.
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    rotated = preprocess(img, ImageConfig(rotate_180=True))
    manual = resize_square(jpeg_roundtrip(np.ascontiguousarray(img[::-1, ::-1])), 224)
    np.testing.assert_array_equal(rotated, manual)
    assert not np.array_equal(rotated, preprocess(img, ImageConfig())[::-1, ::-1])


def test_preprocess_crops_after_resize():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    cropped = preprocess(img, ImageConfig(center_crop=True))
    manual = center_crop_resize(preprocess(img, ImageConfig()), 0.9, 224)
    np.testing.assert_array_equal(cropped, manual)


def test_preprocess_does_not_modify_input_and_returns_new_array():
    img = corner_marked(30, 40)
    before = img.copy()
    out = preprocess(img, ImageConfig(rotate_180=True, center_crop=True))
    np.testing.assert_array_equal(img, before)
    assert out.flags.c_contiguous and out.flags.writeable
    assert not np.shares_memory(out, img)


# ------------------------------------------------------------------------------------------
# Resize
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(480, 640), (224, 224), (1, 1), (2, 3), (300, 200), (37, 500)])
@pytest.mark.parametrize("resize_filter", ["lanczos", "bicubic"])
def test_resize_shape_and_dtype(shape, resize_filter):
    img = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    out = preprocess(img, ImageConfig(resize_filter=resize_filter))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    small = resize_square(img, 32, resize_filter)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (37, 200, 91), (1, 254, 128)])
@pytest.mark.parametrize("shape", [(480, 640), (100, 150), (224, 224), (700, 90)])
@pytest.mark.parametrize("resize_filter", ["lanczos", "bicubic"])
def test_constant_colour_survives_resize(colour, shape, resize_filter):
    img = np.empty(shape + (3,), np.uint8)
    img[:] = colour
    out = resize_square(img, 224, resize_filter)
    assert np.all(out == np.array(colour, np.uint8))


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (37, 200, 91), (1, 254, 128)])
def test_constant_colour_survives_crop_and_full_pipeline(colour):
    img = np.empty((120, 160, 3), np.uint8)
    img[:] = colour
    assert np.all(center_crop_resize(img[:100, :100], 0.9, 224) == np.array(colour, np.uint8))
    for resize_filter in ("lanczos", "bicubic"):
        config = no_jpeg(resize_filter=resize_filter, center_crop=True, rotate_180=True)
        assert np.all(preprocess(img, config) == np.array(colour, np.uint8))


def horizontal_gradient(height: int, width: int) -> np.ndarray:
    row = np.round(np.linspace(0, 255, width)).astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], height, axis=0), 3, axis=2)


@pytest.mark.parametrize("shape", [(480, 640), (40, 50), (224, 224), (100, 1000)])
@pytest.mark.parametrize("resize_filter", ["lanczos", "bicubic"])
def test_gradient_stays_monotonic(shape, resize_filter):
    out = resize_square(horizontal_gradient(*shape), 224, resize_filter).astype(int)
    assert np.all(np.diff(out, axis=1) >= 0)
    assert np.all(out == out[:1])  # rows stay identical
    assert out[0, 0, 0] <= 3 and out[0, -1, 0] >= 252


def test_lanczos_and_bicubic_differ_on_high_frequency_image():
    img = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    lanczos = resize_square(img, 224, "lanczos").astype(int)
    bicubic = resize_square(img, 224, "bicubic").astype(int)
    assert np.abs(lanczos - bicubic).mean() > 1.0


def test_bicubic_is_pillow_bicubic():
    img = np.random.default_rng(6).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(resize_square(img, 224, "bicubic"), pillow)


@pytest.mark.parametrize("shape", [(480, 640), (256, 256), (100, 150), (300, 200)])
def test_lanczos_agrees_with_pillow_lanczos_within_rounding(shape):
    # Pillow's LANCZOS is the same antialiased lanczos3 in fixed point with a uint8 intermediate;
    # away from clipping (mid-range values) the two may differ only by rounding.
    img = np.random.default_rng(7).integers(96, 160, shape + (3,), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.LANCZOS))
    ours = resize_square(img, 224, "lanczos")
    assert np.abs(ours.astype(int) - pillow).max() <= 1


@pytest.mark.parametrize("resize_filter", ["lanczos", "bicubic"])
def test_same_size_resize_is_identity(resize_filter):
    img = np.random.default_rng(8).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_square(img, 224, resize_filter), img)


@pytest.mark.parametrize(("size", "resize_filter"), [(0, "lanczos"), (224, "nearest")])
def test_resize_square_rejects_bad_arguments(size, resize_filter):
    with pytest.raises(ConfigError):
        resize_square(SMALL_RGB, size, resize_filter)


# ------------------------------------------------------------------------------------------
# Center crop
# ------------------------------------------------------------------------------------------


def framed(border: int, size: int = 224) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BLUE
    img[border : size - border, border : size - border] = WHITE
    return img


def test_center_crop_removes_thin_border_exactly():
    # The crop box starts at (1 - sqrt(0.9)) / 2 * 223 = 5.72 px, so a 5 px frame is cut away.
    out = center_crop_resize(framed(5), 0.9, 224)
    assert np.all(out == np.array(WHITE, np.uint8))


def test_center_crop_of_matching_frame_is_almost_all_centre_colour():
    out = center_crop_resize(framed(6), 0.9, 224)
    white = np.all(out == np.array(WHITE, np.uint8), axis=2)
    assert white[1:-1, 1:-1].all()  # only the outermost ring blends with the border
    assert white.mean() > 0.98
    assert not white[0].all()


def test_center_crop_maps_coordinates_like_crop_and_resize():
    # On a horizontal ramp img[:, x] = x, output column j samples x = x0 + j * (x1 - x0) / 223
    # with x0, x1 the box edges times 223; uint8 conversion multiplies by 255.5/255, truncates.
    ramp = np.repeat(np.repeat(np.arange(224, dtype=np.uint8)[None, :, None], 224, 0), 3, 2)
    out = center_crop_resize(ramp, 0.9, 224)
    side = math.sqrt(0.9)
    x0, x1 = (1 - side) / 2 * 223, (1 + side) / 2 * 223
    expected = np.floor((x0 + np.arange(224) * (x1 - x0) / 223) * 255.5 / 255)
    assert np.abs(out[0, :, 0].astype(int) - expected).max() <= 1
    assert np.all(out == out[:1])
    assert out[0, 0, 0] == 5 and out[0, -1, 0] == 217


def test_center_crop_full_scale_is_identity():
    img = np.random.default_rng(9).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(img, 1.0, 224), img)


@pytest.mark.parametrize(("scale", "size"), [(0.0, 224), (1.2, 224), (0.9, 0)])
def test_center_crop_rejects_bad_arguments(scale, size):
    with pytest.raises(ConfigError):
        center_crop_resize(framed(5), scale, size)


# ------------------------------------------------------------------------------------------
# JPEG round trip
# ------------------------------------------------------------------------------------------


def noisy_scene(seed: int = 10, height: int = 120, width: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full(x.shape, 128)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_jpeg_roundtrip_changes_noisy_image_by_bounded_amount():
    img = noisy_scene()
    out = jpeg_roundtrip(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - img)
    assert diff.max() > 0
    assert diff.mean() < 6.0
    assert diff.max() < 48


def test_jpeg_roundtrip_is_used_only_when_enabled():
    img = noisy_scene(height=224, width=224)
    config = ImageConfig(resize_filter="bicubic", jpeg_roundtrip=False)
    np.testing.assert_array_equal(preprocess(img, config), img)  # exact: a no-op
    with_jpeg = preprocess(img, dataclasses.replace(config, jpeg_roundtrip=True))
    np.testing.assert_array_equal(with_jpeg, jpeg_roundtrip(img))
    assert not np.array_equal(with_jpeg, img)


# ------------------------------------------------------------------------------------------
# Normalization
# ------------------------------------------------------------------------------------------


def reference_normalize(value: int, mean: float, std: float) -> np.float32:
    """torchvision to_tensor + normalize on one pixel, in float32."""
    x = np.float32(value) / np.float32(255)
    return (x - np.float32(mean)) / np.float32(std)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_normalize_constant_image_exact(value):
    img = np.full((224, 224, 3), value, np.uint8)
    out = normalize_for_backbones(img, [DINO_MEAN, SIGLIP], [DINO_STD, SIGLIP])
    assert out.shape == (6, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous
    means, stds = DINO_MEAN + SIGLIP, DINO_STD + SIGLIP
    for channel in range(6):
        expected = reference_normalize(value, means[channel], stds[channel])
        assert np.all(out[channel] == expected), (channel, out[channel, 0, 0], expected)


def test_normalize_known_values_and_channel_order():
    img = np.empty((4, 5, 3), np.uint8)
    img[:] = (255, 0, 255)
    out = normalize_for_backbones(img, [DINO_MEAN, SIGLIP], [DINO_STD, SIGLIP])
    # SigLIP: 255 -> +1 and 0 -> -1 exactly.
    assert np.all(out[3] == 1.0) and np.all(out[4] == -1.0) and np.all(out[5] == 1.0)
    # DINO, red channel: (1 - 0.484375) / 0.228515625 = 0.515625 / 0.228515625
    assert np.all(out[0] == np.float32(0.515625 / 0.228515625))
    assert np.all(out[1] == np.float32(-0.455078125 / 0.2236328125))


def test_normalize_single_backbone_and_numpy_inputs():
    img = np.random.default_rng(11).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = normalize_for_backbones(img, np.array([SIGLIP]), np.array([SIGLIP]))
    assert out.shape == (3, 7, 9)
    expected = (img.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - 0.5) / 0.5
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("means", "stds", "fragment"),
    [
        ([DINO_MEAN, SIGLIP], [DINO_STD], "2 mean triples but 1 std"),
        ([[0.5, 0.5]], [SIGLIP], r"mean\[0\]"),
        ([SIGLIP], [[0.5, 0.0, 0.5]], r"std\[0\] must be positive"),
        ([[0.5, math.nan, 0.5]], [SIGLIP], "finite"),
        ([], [], "non-empty"),
        ("0.5", [SIGLIP], "non-empty list"),
    ],
)
def test_normalize_rejects_bad_parameters(means, stds, fragment):
    with pytest.raises(ConfigError, match=fragment):
        normalize_for_backbones(np.zeros((2, 2, 3), np.uint8), means, stds)


def test_normalize_rejects_bad_image():
    with pytest.raises(ImageError, match="float32"):
        normalize_for_backbones(np.zeros((2, 2, 3), np.float32), [SIGLIP], [SIGLIP])


OPENVLA_PREPROCESSOR = {
    "image_processor_type": "PrismaticImageProcessor",
    "image_resize_strategy": "resize-naive",
    "image_mean": [DINO_MEAN, SIGLIP],
    "image_std": [DINO_STD, SIGLIP],
    "tvf_normalize_params": [
        {"inplace": False, "mean": DINO_MEAN, "std": DINO_STD},
        {"inplace": False, "mean": SIGLIP, "std": SIGLIP},
    ],
    "use_fused_vision_backbone": True,
}


def test_normalization_from_openvla_preprocessor_config():
    means, stds = normalization_from_preprocessor_config(OPENVLA_PREPROCESSOR)
    assert means == [DINO_MEAN, SIGLIP] and stds == [DINO_STD, SIGLIP]
    img = np.full((224, 224, 3), 200, np.uint8)
    assert normalize_for_backbones(img, means, stds).shape == (6, 224, 224)


def test_normalization_prefers_tvf_params_and_warns_on_disagreement(caplog):
    cfg = dict(OPENVLA_PREPROCESSOR, image_mean=[[0.485, 0.456, 0.406], SIGLIP])
    with caplog.at_level(logging.WARNING, logger="vla_ros.core.image"):
        means, _ = normalization_from_preprocessor_config(cfg)
    assert means[0] == DINO_MEAN
    assert "differ" in caplog.text


def test_normalization_falls_back_to_image_mean_std():
    cfg = {"image_mean": [DINO_MEAN, SIGLIP], "image_std": [DINO_STD, SIGLIP]}
    assert normalization_from_preprocessor_config(cfg) == ([DINO_MEAN, SIGLIP], [DINO_STD, SIGLIP])
    flat = {"image_mean": SIGLIP, "image_std": SIGLIP}
    assert normalization_from_preprocessor_config(flat) == ([SIGLIP], [SIGLIP])


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        ([], "JSON object"),
        ({}, "neither tvf_normalize_params nor image_mean"),
        ({"image_mean": [SIGLIP]}, "neither"),
        ({"tvf_normalize_params": []}, "tvf_normalize_params must be a non-empty list"),
        ({"tvf_normalize_params": {"mean": SIGLIP}}, "tvf_normalize_params must be"),
        ({"tvf_normalize_params": [{"mean": SIGLIP}]}, r"tvf_normalize_params\[0\]"),
        (
            {"tvf_normalize_params": [{"mean": SIGLIP, "std": SIGLIP}, "x"]},
            r"tvf_normalize_params\[1\]",
        ),
        (
            {"tvf_normalize_params": [{"mean": [0.5, 0.5], "std": SIGLIP}]},
            r"tvf_normalize_params mean\[0\]",
        ),
        (
            {"tvf_normalize_params": [{"mean": SIGLIP, "std": [0.5, "a", 0.5]}]},
            r"tvf_normalize_params std\[0\]",
        ),
        (
            {"tvf_normalize_params": [{"mean": SIGLIP, "std": [0.5, -1, 0.5]}]},
            "must be positive",
        ),
        ({"image_mean": [SIGLIP, SIGLIP], "image_std": [SIGLIP]}, "image_mean/image_std"),
        ({"image_mean": "0.5", "image_std": [SIGLIP]}, "image_mean/image_std"),
    ],
)
def test_normalization_config_errors_name_the_field(cfg, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        normalization_from_preprocessor_config(cfg)


# --------------------------------------------------------------------------------------------
# decode_compressed (image_transport's compressed transport)
# --------------------------------------------------------------------------------------------


def _cv_encode(ext, pixels, *params):
    import cv2
    ok, out = cv2.imencode(ext, np.ascontiguousarray(pixels), list(params))
    assert ok
    return out.tobytes()


@pytest.mark.parametrize('fmt', ['rgb8; png compressed bgr8', 'bgr8; png compressed bgr8',
                                 'png', 'PNG', ''])
def test_decode_compressed_png_is_exact_rgb(fmt):
    rgb = np.random.default_rng(5).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    got, codec = decode_compressed(_cv_encode('.png', rgb[:, :, ::-1]), fmt)
    assert codec == 'png'
    np.testing.assert_array_equal(got, rgb)


def test_decode_compressed_mono_alpha_and_jpeg():
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    got, _ = decode_compressed(_cv_encode('.png', grey), 'mono8; png compressed ')
    np.testing.assert_array_equal(got, np.repeat(grey[:, :, None], 3, axis=2))
    bgra = np.random.default_rng(6).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    got, _ = decode_compressed(_cv_encode('.png', bgra), 'bgra8; png compressed bgr8')
    np.testing.assert_array_equal(got, bgra[:, :, 2::-1])
    flat = np.full((16, 16, 3), (200, 40, 10), np.uint8)  # JPEG keeps a flat colour closely
    got, codec = decode_compressed(_cv_encode('.jpg', flat[:, :, ::-1]),
                                   'rgb8; jpeg compressed bgr8')
    assert codec == 'jpeg' and np.abs(got.astype(int) - flat).max() <= 3


@pytest.mark.parametrize('fmt, data, fragment', [
    ('rgb8; h264 compressed bgr8', b'\xff\xd8\xff\xd9', 'unsupported compressed image format'),
    ('16UC1; compressedDepth png', b'', 'unsupported compressed image format'),
    ('jpeg', b'', 'neither JPEG nor PNG'),
    ('jpeg', b'\x89PNG\r\n\x1a\n' + b'\0' * 20, 'but the data is png'),
    ('jpeg', b'\xff\xd8\xff\xe0' + b'\1' * 50, 'truncated jpeg'),
])
def test_decode_compressed_rejects(fmt, data, fragment):
    with pytest.raises(ImageError, match=fragment):
        decode_compressed(data, fmt)


def test_decode_compressed_rejects_16_bit():
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    with pytest.raises(ImageError, match='only 8-bit'):
        decode_compressed(_cv_encode('.png', deep), '16UC1; png compressed ')


def test_preprocess_skips_the_roundtrip_only_for_a_decoded_jpeg():
    rgb = np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    config = ImageConfig(size=32)
    assert not np.array_equal(preprocess(rgb, config), preprocess(rgb, config, jpeg_decoded=True))
    np.testing.assert_array_equal(
        preprocess(rgb, config, jpeg_decoded=True),
        preprocess(rgb, dataclasses.replace(config, jpeg_roundtrip=False)))
