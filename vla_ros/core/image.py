"""Camera frames for OpenVLA: sensor_msgs/Image decoding and the model's image preprocessing.

``decode_image`` turns the fields of a sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, rows
possibly padded) into an HxWx3 uint8 RGB array and ``encode_image`` is its inverse for rgb8/bgr8;
``decode_compressed`` does the same for a sensor_msgs/CompressedImage of image_transport's
``compressed`` transport (JPEG or PNG, decoded with OpenCV) and says whether it was a JPEG.
``preprocess`` reproduces what OpenVLA's published evaluation scripts do to a frame before the HF
processor sees it, in this order: optional 180-degree rotation and flips (LIBERO frames are
rotated), a JPEG round trip at quality 95 (the training data was stored as JPEG), a resize to
``size`` x ``size`` (lanczos3 with antialiasing, computed the way ``tf.image.resize(...,
method="lanczos3", antialias=True)`` does, or Pillow's antialiased bicubic as in the processor's
"resize-naive" strategy), and an optional center crop of 90% of the area resized back to
``size`` with the bilinear sampling of ``tf.image.crop_and_resize``. The crop is only for
checkpoints fine-tuned with image augmentation; base openvla-7b must not be cropped.
``normalize_for_backbones`` then produces the stacked per-backbone tensor (6 channels for the
fused DINOv2 + SigLIP featurizer) from the values in a checkpoint's ``preprocessor_config.json``.
The arithmetic follows the float32 steps of the reference implementations, so results should
match them up to float rounding (checked against Pillow here, not against TensorFlow itself).
Only numpy, Pillow and the standard library are used.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vla_ros.core.errors import CheckpointError, ConfigError, ImageError

__all__ = [
    "ENCODINGS",
    "ENCODABLE",
    "COMPRESSED_CODECS",
    "JPEG_QUALITY",
    "RESIZE_FILTERS",
    "ImageConfig",
    "center_crop_resize",
    "decode_compressed",
    "decode_image",
    "encode_image",
    "jpeg_roundtrip",
    "normalization_from_preprocessor_config",
    "normalize_for_backbones",
    "orient",
    "preprocess",
    "resize_square",
]

logger = logging.getLogger(__name__)

# encoding -> (bytes per pixel, source byte index of R, G, B within a pixel)
_LAYOUTS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}

#: sensor_msgs/Image encodings that ``decode_image`` accepts.
ENCODINGS: tuple[str, ...] = tuple(_LAYOUTS)
#: Encodings that ``encode_image`` produces.
ENCODABLE: tuple[str, ...] = ("rgb8", "bgr8")
#: Resize filters of ``ImageConfig.resize_filter``.
RESIZE_FILTERS: tuple[str, ...] = ("lanczos", "bicubic")
#: JPEG quality of the round trip (the default of ``tf.image.encode_jpeg``).
JPEG_QUALITY = 95
#: Codecs of image_transport's ``compressed`` transport that ``decode_compressed`` accepts.
COMPRESSED_CODECS: tuple[str, ...] = ("jpeg", "png")
# How each codec's stream starts and ends (JPEG: SOI ... EOI; PNG: signature ... IEND chunk).
_MAGIC = {"jpeg": (b"\xff\xd8\xff", b"\xff\xd9"), "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82")}

_MAX_SIZE = 4096
_LANCZOS_RADIUS = np.float32(3.0)
_PI = np.float32(3.14159265359)


# --------------------------------------------------------------------------------------------
# sensor_msgs/Image <-> numpy
# --------------------------------------------------------------------------------------------


def _as_dimension(value: Any, name: str) -> int:
    """Return ``value`` as a positive int, or raise ImageError naming ``name``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ImageError(f"image {name} must be an integer, got {value!r}") from None
    if number <= 0:
        raise ImageError(f"image {name} must be positive, got {number}")
    return number


def _as_byte_array(data: Any) -> np.ndarray:
    """View ``data`` (buffer protocol or uint8 array) as a flat uint8 array, without copying."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageError(f"image data array must have dtype uint8, got {data.dtype}")
        return data.reshape(-1)
    try:
        view = memoryview(data)
    except TypeError:
        raise ImageError(
            f"image data must support the buffer protocol (bytes, bytearray, array.array('B'), "
            f"memoryview, numpy uint8 array), got {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


def decode_image(
    data: bytes | bytearray | memoryview | np.ndarray,
    height: int,
    width: int,
    encoding: str,
    step: int,
    is_bigendian: int = 0,
) -> np.ndarray:
    """Decode the fields of a sensor_msgs/Image into an RGB array.

    Args:
        data: The pixel bytes; anything supporting the buffer protocol (rclpy delivers an
            ``array.array('B')`` or ``bytes``) or a numpy uint8 array. Must hold exactly
            ``step * height`` bytes.
        height: Number of rows.
        width: Number of columns.
        encoding: One of ``ENCODINGS``: rgb8, bgr8, rgba8, bgra8 (alpha dropped) or mono8
            (replicated to three channels).
        step: Bytes per row, at least ``width * bytes_per_pixel``; bytes beyond that at the end
            of each row are padding and are ignored.
        is_bigendian: Accepted for completeness; byte order does not matter for 8-bit encodings.

    Returns:
        A new C-contiguous ``(height, width, 3)`` uint8 array in RGB order, never a view of
        ``data``.

    Raises:
        ImageError: Unknown encoding, zero size, ``step`` too small for the row, or a buffer
            whose length is not ``step * height``.

    """
    del is_bigendian  # irrelevant for 8-bit channels
    layout = _LAYOUTS.get(encoding) if isinstance(encoding, str) else None
    if layout is None:
        raise ImageError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}"
        )
    bpp, channels = layout
    height = _as_dimension(height, "height")
    width = _as_dimension(width, "width")
    try:
        step = operator.index(step)
    except TypeError:
        raise ImageError(f"image step must be an integer, got {step!r}") from None
    row_bytes = width * bpp
    if step < row_bytes:
        raise ImageError(
            f"image step {step} is smaller than width * bytes_per_pixel = {width} * {bpp} = "
            f"{row_bytes} for encoding {encoding}"
        )
    buf = _as_byte_array(data)
    expected = step * height
    if buf.size != expected:
        raise ImageError(
            f"image data holds {buf.size} bytes but step * height = {step} * {height} = "
            f"{expected} (sensor_msgs/Image requires exactly step * height)"
        )
    pixels = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, bpp)
    if encoding == "mono8":
        return np.repeat(pixels, 3, axis=2)
    rgb = pixels[:, :, :3] if channels == (0, 1, 2) else pixels[:, :, 2::-1]
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


def _compressed_codec(fmt: str) -> str | None:
    """The codec named by a CompressedImage ``format`` (None when it names none).

    image_transport's compressed publisher writes ``"<encoding>; jpeg compressed <target>"`` or
    ``"<encoding>; png compressed <target>"`` (e.g. ``"rgb8; jpeg compressed bgr8"``,
    ``"mono8; png compressed "``); older publishers write just ``"jpeg"`` or ``"png"``.
    """
    text = fmt.strip().lower()
    if ";" in text:
        words = text.split(";", 1)[1].split()
        if len(words) >= 2 and words[1] == "compressed":
            return words[0]
        return words[0] if words else None
    return text or None


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray,
                      fmt: str) -> tuple[np.ndarray, str]:
    """Decode the fields of a sensor_msgs/CompressedImage into an RGB array.

    The stream is decoded with OpenCV (``cv2.imdecode``), as image_transport's compressed
    subscriber does: colour comes out in OpenCV's BGR order whatever the original encoding
    (the publisher converts colour frames to bgr8 before compressing) and is returned as RGB;
    a grey frame is replicated to three channels and an alpha channel dropped.

    Args:
        data: The compressed bytes.
        fmt: The message's ``format`` field; its codec must be one of ``COMPRESSED_CODECS``
            (an empty format is accepted and the codec taken from the data).

    Returns:
        ``(rgb, codec)``: a new ``(H, W, 3)`` uint8 RGB array and ``"jpeg"`` or ``"png"``, the
        codec the data really holds (what tells the preprocessing that a JPEG round trip has
        already happened).

    Raises:
        ImageError: An unsupported codec, data that is not a complete JPEG/PNG stream of the
            declared codec (empty, truncated, garbage), or a frame that is not 8-bit.

    """
    declared = _compressed_codec(fmt) if isinstance(fmt, str) else None
    if declared is not None and declared not in COMPRESSED_CODECS:
        raise ImageError(
            f"unsupported compressed image format {fmt!r}; supported codecs: "
            f"{', '.join(COMPRESSED_CODECS)}"
        )
    buf = _as_byte_array(data)
    raw = buf.tobytes()
    found = next((c for c, (head, _) in _MAGIC.items() if raw.startswith(head)), None)
    if found is None:
        raise ImageError(
            f"compressed image data ({buf.size} bytes) is neither JPEG nor PNG "
            f"(starts with {raw[:8]!r}; format {fmt!r})"
        )
    if declared is not None and found != declared:
        raise ImageError(f"compressed image format {fmt!r} but the data is {found}")
    # A truncated stream: some decoders return the decoded part without an error.
    if not raw.rstrip(b"\x00").endswith(_MAGIC[found][1]):
        raise ImageError(
            f"truncated {found} data ({buf.size} bytes): no end-of-image marker"
        )
    import cv2  # lazy: only the compressed transport needs OpenCV

    decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageError(f"corrupt {found} data ({buf.size} bytes): OpenCV could not decode it")
    if decoded.dtype != np.uint8:
        raise ImageError(
            f"compressed image is {decoded.dtype} ({fmt!r}); only 8-bit frames are supported"
        )
    if decoded.ndim == 2:
        return np.repeat(decoded[:, :, None], 3, axis=2), found
    if decoded.ndim != 3 or decoded.shape[2] not in (3, 4):
        raise ImageError(f"compressed image has an unsupported shape {decoded.shape}")
    return np.ascontiguousarray(decoded[:, :, 2::-1]), found


def _check_rgb(rgb: Any, what: str) -> np.ndarray:
    """Return ``rgb`` if it is an HxWx3 uint8 array with H, W > 0, else raise ImageError."""
    if not isinstance(rgb, np.ndarray):
        raise ImageError(f"{what} must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ImageError(f"{what} must have dtype uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"{what} must have shape (H, W, 3), got {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{what} must not be empty, got shape {rgb.shape}")
    return rgb


def encode_image(rgb: np.ndarray, encoding: str = "rgb8") -> tuple[bytes, int, int, str, int]:
    """Encode an RGB array as the fields of a sensor_msgs/Image (unpadded rows).

    Args:
        rgb: A ``(H, W, 3)`` uint8 array in RGB order.
        encoding: ``"rgb8"`` or ``"bgr8"``.

    Returns:
        ``(data, height, width, encoding, step)`` with ``step = 3 * width``.

    Raises:
        ImageError: A wrong dtype or shape, or an encoding other than rgb8/bgr8.

    """
    if encoding not in ENCODABLE:
        raise ImageError(
            f"cannot encode to {encoding!r}; supported: {', '.join(ENCODABLE)}"
        )
    rgb = _check_rgb(rgb, "image to encode")
    pixels = rgb if encoding == "rgb8" else rgb[:, :, ::-1]
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    return np.ascontiguousarray(pixels).tobytes(), height, width, encoding, 3 * width


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


@dataclass(frozen=True)
class ImageConfig:
    """How a camera frame becomes the model's input image (see ``preprocess`` for the order).

    Attributes:
        size: Side of the square model input in pixels (224 for OpenVLA).
        resize_filter: ``"lanczos"`` (lanczos3 with antialiasing, as OpenVLA's evaluation scripts
            resize with ``tf.image.resize(method="lanczos3", antialias=True)``) or ``"bicubic"``
            (Pillow's antialiased bicubic, as the HF processor's "resize-naive" strategy).
        jpeg_roundtrip: Encode and decode the frame as JPEG at quality 95 before resizing, as
            the evaluation scripts do because the training frames were stored as JPEG.
        center_crop: Crop the resized image to ``crop_scale`` of its area (side
            ``sqrt(crop_scale)`` of each dimension, centered) and resize back to ``size``. Only
            for checkpoints fine-tuned with image augmentation; base openvla-7b must NOT be
            cropped.
        crop_scale: Area fraction kept by the center crop, in (0, 1]; OpenVLA uses 0.9.
        rotate_180: Rotate the frame by 180 degrees first (LIBERO frames).
        flip_horizontal: Mirror the frame left-right first.
        flip_vertical: Mirror the frame top-bottom first.

    """

    size: int = 224
    resize_filter: str = "lanczos"
    jpeg_roundtrip: bool = True
    center_crop: bool = False
    crop_scale: float = 0.9
    rotate_180: bool = False
    flip_horizontal: bool = False
    flip_vertical: bool = False

    def __post_init__(self) -> None:
        """Validate every field; raise ConfigError naming the first bad one."""
        if not _is_int(self.size) or not 1 <= self.size <= _MAX_SIZE:
            raise ConfigError(
                f"ImageConfig.size must be an integer in [1, {_MAX_SIZE}], got {self.size!r}"
            )
        if self.resize_filter not in RESIZE_FILTERS:
            raise ConfigError(
                f"ImageConfig.resize_filter must be one of {', '.join(RESIZE_FILTERS)}, "
                f"got {self.resize_filter!r}"
            )
        for name in ("jpeg_roundtrip", "center_crop", "rotate_180", "flip_horizontal",
                     "flip_vertical"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"ImageConfig.{name} must be a bool, got {value!r}")
        if (
            not _is_real(self.crop_scale)
            or not math.isfinite(self.crop_scale)
            or not 0.0 < self.crop_scale <= 1.0
        ):
            raise ConfigError(
                f"ImageConfig.crop_scale must be a number in (0, 1], got {self.crop_scale!r}"
            )


# --------------------------------------------------------------------------------------------
# Preprocessing steps
# --------------------------------------------------------------------------------------------


def orient(
    rgb: np.ndarray,
    rotate_180: bool = False,
    flip_horizontal: bool = False,
    flip_vertical: bool = False,
) -> np.ndarray:
    """Rotate by 180 degrees and/or mirror an HxWxC array (these commute); returns a view."""
    flip_rows = bool(rotate_180) != bool(flip_vertical)
    flip_cols = bool(rotate_180) != bool(flip_horizontal)
    return rgb[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1]


def jpeg_roundtrip(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Encode an RGB uint8 image as baseline JPEG (4:2:0 chroma) and decode it again.

    This is what ``tf.image.encode_jpeg`` (default quality 95, chroma downsampling) followed by
    ``tf.io.decode_image`` does in OpenVLA's evaluation scripts; both go through libjpeg with
    the same quantization tables and the default (integer, accurate) DCT.
    """
    rgb = _check_rgb(rgb, "image")
    stream = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(
        stream, format="JPEG", quality=int(quality), subsampling="4:2:0"
    )
    stream.seek(0)
    with Image.open(stream) as decoded:
        return np.array(decoded.convert("RGB"), dtype=np.uint8)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """Lanczos kernel of radius 3 in float32, as TensorFlow's sampling kernel evaluates it."""
    x = np.abs(x).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (
            _LANCZOS_RADIUS
            * np.sin(_PI * x)
            * np.sin(_PI * x / _LANCZOS_RADIUS)
            / (_PI * _PI * x * x)
        )
    value = np.where(x <= np.float32(1e-3), np.float32(1.0), value)
    return np.where(x > _LANCZOS_RADIUS, np.float32(0.0), value).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _lanczos3_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Return the (out_size, in_size) float32 resampling matrix of an antialiased lanczos3 resize.

    Follows TensorFlow's scale_and_translate span computation with zero translation: sample
    positions at pixel centers, kernel stretched by the downscale factor, spans clamped to the
    image and weights normalized to sum to one.
    """
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0 / float(scale))
    kernel_scale = max(inv_scale, f32(1.0))
    one_over_kernel_scale = f32(1.0) / kernel_scale
    reach = _LANCZOS_RADIUS * kernel_scale
    sample = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale
    starts = np.clip(np.ceil(sample - reach - f32(0.5)), 0, in_size - 1).astype(np.int64)
    ends = np.clip(np.floor(sample + reach - f32(0.5)), 0, in_size - 1).astype(np.int64) + 1
    span = int((ends - starts).max())
    sources = starts[:, None] + np.arange(span)[None, :]
    inside = sources < ends[:, None]
    positions = sources.astype(f32) + f32(0.5) - sample[:, None]
    weights = np.where(inside, _lanczos3(positions * one_over_kernel_scale), f32(0.0))
    totals = weights.sum(axis=1, dtype=f32)
    usable = np.abs(totals) >= f32(1000.0) * np.finfo(f32).tiny
    reciprocal = f32(1.0) / np.where(usable, totals, f32(1.0))
    weights = np.where(usable[:, None], weights * reciprocal[:, None], f32(0.0)).astype(f32)
    matrix = np.zeros((out_size, in_size), dtype=f32)
    rows = np.broadcast_to(np.arange(out_size)[:, None], sources.shape)
    matrix[rows[inside], sources[inside]] = weights[inside]
    matrix.setflags(write=False)
    return matrix


def _resize_lanczos3(rgb: np.ndarray, size: int) -> np.ndarray:
    """Antialiased lanczos3 resize to size x size, rounded half-to-even and clipped to uint8."""
    height, width = rgb.shape[:2]
    rows = _lanczos3_matrix(height, size)
    cols = _lanczos3_matrix(width, size)
    pixels = rgb.astype(np.float32)
    # Rows first, then columns, as TensorFlow gathers its spans.
    tall = (rows @ pixels.reshape(height, -1)).reshape(size, width, rgb.shape[2])
    resized = np.matmul(cols, tall)
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def resize_square(rgb: np.ndarray, size: int, resize_filter: str = "lanczos") -> np.ndarray:
    """Resize an RGB uint8 image to ``size`` x ``size`` with the given filter.

    ``"lanczos"`` computes ``tf.image.resize(image, (size, size), method="lanczos3",
    antialias=True)`` in float32 and then rounds and clips to uint8 as OpenVLA's evaluation
    scripts do. ``"bicubic"`` is Pillow's antialiased bicubic resize, which is what torchvision's
    ``resize(interpolation=BICUBIC, antialias=True)`` runs on the PIL image in the HF processor;
    an image already of the target size passes through unchanged.

    Args:
        rgb: A ``(H, W, 3)`` uint8 array.
        size: Side of the square output.
        resize_filter: One of ``RESIZE_FILTERS``.

    Returns:
        A new ``(size, size, 3)`` uint8 array.

    Raises:
        ImageError: Not an HxWx3 uint8 array.
        ConfigError: An unknown filter or a size outside [1, 4096].

    """
    rgb = _check_rgb(rgb, "image")
    if not _is_int(size) or not 1 <= size <= _MAX_SIZE:
        raise ConfigError(f"resize size must be an integer in [1, {_MAX_SIZE}], got {size!r}")
    if resize_filter == "lanczos":
        return _resize_lanczos3(rgb, int(size))
    if resize_filter == "bicubic":
        image = Image.fromarray(np.ascontiguousarray(rgb))
        return np.array(image.resize((int(size), int(size)), Image.Resampling.BICUBIC))
    raise ConfigError(
        f"resize_filter must be one of {', '.join(RESIZE_FILTERS)}, got {resize_filter!r}"
    )


def center_crop_resize(rgb: np.ndarray, crop_scale: float, size: int) -> np.ndarray:
    """Center-crop ``crop_scale`` of the area and resize the crop to ``size`` x ``size``.

    Reproduces OpenVLA's ``crop_and_resize``: the image is scaled to [0, 1] floats, the box of
    side ``sqrt(crop_scale)`` (normalized coordinates, centered) is resampled bilinearly with
    ``tf.image.crop_and_resize`` semantics (corner-aligned sample grid), clipped to [0, 1] and
    converted back to uint8 as ``tf.image.convert_image_dtype(..., saturate=True)`` does.

    Args:
        rgb: A ``(H, W, 3)`` uint8 array (in the pipeline, the ``size`` x ``size`` image).
        crop_scale: Area fraction to keep, in (0, 1]; OpenVLA uses 0.9.
        size: Side of the square output.

    Returns:
        A new ``(size, size, 3)`` uint8 array.

    Raises:
        ImageError: Not an HxWx3 uint8 array.
        ConfigError: ``crop_scale`` outside (0, 1] or a size outside [1, 4096].

    """
    rgb = _check_rgb(rgb, "image")
    if not _is_real(crop_scale) or not 0.0 < float(crop_scale) <= 1.0:
        raise ConfigError(f"crop_scale must be a number in (0, 1], got {crop_scale!r}")
    if not _is_int(size) or not 1 <= size <= _MAX_SIZE:
        raise ConfigError(f"crop size must be an integer in [1, {_MAX_SIZE}], got {size!r}")
    f32 = np.float32
    side = np.clip(np.sqrt(f32(crop_scale)), f32(0.0), f32(1.0))
    low = (f32(1.0) - side) / f32(2.0)
    high = low + side

    def grid(extent: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        last = f32(extent - 1)
        if size > 1:
            step = (high - low) * last / f32(size - 1)
            coords = low * last + np.arange(size, dtype=f32) * step
        else:
            coords = np.full(1, f32(0.5) * (low + high) * last, dtype=f32)
        coords = np.clip(coords, f32(0.0), last)  # centered boxes never leave the image
        first = np.floor(coords).astype(np.int64)
        second = np.ceil(coords).astype(np.int64)
        return first, second, (coords - first.astype(f32)).astype(f32)

    top, bottom, y_lerp = grid(rgb.shape[0])
    left, right, x_lerp = grid(rgb.shape[1])
    image = rgb.astype(f32) * f32(1.0 / 255.0)
    x_lerp = x_lerp[None, :, None]
    upper = image[top][:, left] + (image[top][:, right] - image[top][:, left]) * x_lerp
    lower = image[bottom][:, left] + (image[bottom][:, right] - image[bottom][:, left]) * x_lerp
    crop = upper + (lower - upper) * y_lerp[:, None, None]
    crop = np.clip(crop, f32(0.0), f32(1.0)) * f32(255.5)
    return np.clip(np.trunc(crop), 0, 255).astype(np.uint8)


def preprocess(rgb: np.ndarray, config: ImageConfig, *, jpeg_decoded: bool = False
               ) -> np.ndarray:
    """Turn a decoded RGB frame into the ``size`` x ``size`` uint8 image the model sees.

    Order: rotate/flip -> JPEG round trip -> resize to ``size`` x ``size`` -> optional center
    crop resized back to ``size``. The result feeds ``normalize_for_backbones`` (the HF
    processor's own bicubic resize is then the identity, as the image already has its size).

    A frame that arrived as a JPEG (``jpeg_decoded``) has had its JPEG round trip: the round
    trip exists because the training frames were stored as JPEG and decoded by the loader, and
    the camera's JPEG decoded once is that. It is not encoded a second time; the difference
    from the evaluation scripts is only the encoder's quality (the camera's, not 95) and that
    the JPEG comes before, not after, a rotation or flip.

    Args:
        rgb: A ``(H, W, 3)`` uint8 array (e.g. from ``decode_image``); not modified.
        config: The preprocessing choices.
        jpeg_decoded: ``rgb`` is a decoded JPEG (``decode_compressed`` said ``"jpeg"``).

    Returns:
        A new C-contiguous ``(size, size, 3)`` uint8 array.

    Raises:
        ImageError: ``rgb`` is not an HxWx3 uint8 array.

    """
    rgb = _check_rgb(rgb, "input image")
    image = orient(rgb, config.rotate_180, config.flip_horizontal, config.flip_vertical)
    if config.jpeg_roundtrip and not jpeg_decoded:
        image = jpeg_roundtrip(image)
    image = resize_square(image, config.size, config.resize_filter)
    if config.center_crop:
        image = center_crop_resize(image, config.crop_scale, config.size)
    return np.array(image, dtype=np.uint8, order="C", copy=True)


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


def _triples(values: Any, what: str, error: type[Exception]) -> list[list[float]]:
    """Validate a non-empty sequence of 3-element finite number lists; return it as floats."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise error(f"{what} must be a non-empty list of 3-element lists, got {values!r}")
    triples = []
    for index, triple in enumerate(values):
        if isinstance(triple, np.ndarray):
            triple = triple.tolist()
        if (
            isinstance(triple, (str, bytes))
            or not isinstance(triple, Sequence)
            or len(triple) != 3
            or not all(_is_real(v) and math.isfinite(v) for v in triple)
        ):
            raise error(f"{what}[{index}] must be 3 finite numbers, got {triple!r}")
        triples.append([float(v) for v in triple])
    return triples


def _check_means_stds(
    means: Any, stds: Any, what: str, error: type[Exception]
) -> tuple[list[list[float]], list[list[float]]]:
    mean_list = _triples(means, f"{what} mean", error)
    std_list = _triples(stds, f"{what} std", error)
    if len(mean_list) != len(std_list):
        raise error(
            f"{what}: {len(mean_list)} mean triples but {len(std_list)} std triples "
            "(one of each per vision backbone)"
        )
    for index, triple in enumerate(std_list):
        if min(triple) <= 0.0:
            raise error(f"{what} std[{index}] must be positive, got {triple}")
    return mean_list, std_list


def normalize_for_backbones(
    img: np.ndarray, means: Sequence[Sequence[float]], stds: Sequence[Sequence[float]]
) -> np.ndarray:
    """Normalize an RGB uint8 image once per vision backbone and stack the results.

    For backbone ``i`` this computes ``(img / 255 - means[i]) / stds[i]`` per channel in float32
    (as torchvision's ``to_tensor`` and ``normalize`` do), in CHW layout, and concatenates the
    backbones on the channel axis: OpenVLA's fused DINOv2 + SigLIP featurizer gets 6 channels,
    DINOv2 first.

    Args:
        img: A ``(H, W, 3)`` uint8 array, normally the output of ``preprocess``.
        means: One RGB mean triple per backbone.
        stds: One RGB std triple per backbone (all positive).

    Returns:
        A C-contiguous float32 array of shape ``(3 * len(means), H, W)``.

    Raises:
        ImageError: ``img`` is not an HxWx3 uint8 array.
        ConfigError: ``means``/``stds`` are not matching lists of 3 finite numbers (std > 0).

    """
    img = _check_rgb(img, "image to normalize")
    mean_list, std_list = _check_means_stds(means, stds, "normalization", ConfigError)
    scaled = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
    out = np.empty((3 * len(mean_list),) + scaled.shape[1:], dtype=np.float32)
    for index, (mean, std) in enumerate(zip(mean_list, std_list, strict=True)):
        mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
        std32 = np.asarray(std, dtype=np.float32)[:, None, None]
        np.divide(scaled - mean32, std32, out=out[3 * index : 3 * index + 3])
    return out


def normalization_from_preprocessor_config(
    cfg: dict,
) -> tuple[list[list[float]], list[list[float]]]:
    """Read the per-backbone normalization from a parsed ``preprocessor_config.json``.

    Uses ``tvf_normalize_params`` (a list of ``{"mean": [...], "std": [...]}``, one per
    backbone), which is what the OpenVLA processor applies; derived checkpoints store
    bf16-rounded DINOv2 constants there (0.484375, ...), so the values are taken as stored.
    Without it, falls back to ``image_mean``/``image_std`` (lists of lists; a flat triple counts
    as one backbone).

    Args:
        cfg: The parsed JSON object.

    Returns:
        ``(means, stds)``, each a list of one ``[r, g, b]`` float list per backbone.

    Raises:
        CheckpointError: ``cfg`` is not a dict, or the fields are missing or malformed (the
            message names the field).

    """
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"preprocessor_config.json must hold a JSON object, got {type(cfg).__name__}"
        )
    params = cfg.get("tvf_normalize_params")
    if params is not None:
        if isinstance(params, (str, bytes)) or not isinstance(params, Sequence) or not params:
            raise CheckpointError(
                "preprocessor_config.json field tvf_normalize_params must be a non-empty list "
                f"of {{'mean': [...], 'std': [...]}} objects, got {params!r}"
            )
        means, stds = [], []
        for index, entry in enumerate(params):
            if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
                raise CheckpointError(
                    f"preprocessor_config.json field tvf_normalize_params[{index}] must be an "
                    f"object with 'mean' and 'std', got {entry!r}"
                )
            means.append(entry["mean"])
            stds.append(entry["std"])
        result = _check_means_stds(
            means, stds, "preprocessor_config.json field tvf_normalize_params", CheckpointError
        )
        _warn_if_inconsistent(cfg, result)
        return result
    if "image_mean" not in cfg or "image_std" not in cfg:
        raise CheckpointError(
            "preprocessor_config.json has neither tvf_normalize_params nor image_mean/image_std; "
            f"keys present: {sorted(cfg)}"
        )
    means, stds = cfg["image_mean"], cfg["image_std"]
    means = [means] if _is_flat_triple(means) else means
    stds = [stds] if _is_flat_triple(stds) else stds
    logger.debug("preprocessor_config.json has no tvf_normalize_params; using image_mean/std")
    return _check_means_stds(
        means, stds, "preprocessor_config.json field image_mean/image_std", CheckpointError
    )


def _is_flat_triple(value: Any) -> bool:
    return isinstance(value, Sequence) and len(value) == 3 and all(_is_real(v) for v in value)


def _warn_if_inconsistent(cfg: dict, result: tuple[list[list[float]], list[list[float]]]) -> None:
    """Log a warning when image_mean/image_std disagree with tvf_normalize_params."""
    means, stds = cfg.get("image_mean"), cfg.get("image_std")
    if means is None or stds is None:
        return
    try:
        other = _check_means_stds(means, stds, "image_mean/image_std", ValueError)
    except ValueError:
        return
    if not (np.allclose(other[0], result[0]) and np.allclose(other[1], result[1])):
        logger.warning(
            "preprocessor_config.json: image_mean/image_std %s/%s differ from "
            "tvf_normalize_params %s/%s; using tvf_normalize_params",
            other[0], other[1], result[0], result[1],
        )
