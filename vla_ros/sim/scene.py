"""A table-top scene (table, coloured blocks, a parallel gripper) rendered with numpy alone.

The renderer stands in for a real camera in demos and closed-loop tests, so it favours speed and
determinism over realism: every object is a box, each visible box face is a flat-shaded convex
quad filled through a per-pixel z-buffer (the depth of a planar face is exact per pixel), the
room behind (table top, floor, wall) is ray-cast once per camera and cached, and objects above the
table cast hard shadows straight down, which gives a single camera a cue for height. Points are
in the arm's base frame (x forward, y left, z up, metres); the camera follows the OpenCV optical
convention (x right, y down, z forward) with pixel centres at integer coordinates. A 224x224
frame renders in a few milliseconds on one CPU core, with no GL, and the same inputs always give
the same pixels.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vla_ros.core.errors import ConfigError

__all__ = [
    'BLOCK_COLOURS',
    'BLOCK_SIZE',
    'BLUE',
    'GREEN',
    'GRIPPER_DOWN',
    'GRIPPER_MAX_WIDTH',
    'RED',
    'Block',
    'Camera',
    'Renderer',
    'Scene',
    'gripper_boxes',
    'render',
    'yaw_matrix',
]

logger = logging.getLogger(__name__)

RED = (200, 35, 35)
GREEN = (35, 165, 60)
BLUE = (40, 70, 210)
BLOCK_COLOURS = {'red': RED, 'green': GREEN, 'blue': BLUE}
BLOCK_SIZE = 0.04
# Maximum distance between the fingers of the (Panda-like) gripper.
GRIPPER_MAX_WIDTH = 0.08
# The gripper pointing straight down with its fingers opening along the base y axis.
GRIPPER_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])

_TABLE_COLOUR = np.array([188.0, 158.0, 118.0])
_FLOOR_COLOUR = np.array([96.0, 90.0, 84.0])
_WALL_COLOUR = np.array([214.0, 214.0, 204.0])
_HAND_COLOUR = (232, 232, 232)
_FINGER_COLOUR = (64, 64, 68)
_BASE_COLOUR = (120, 120, 126)
# Table top extent in the base frame (x_min, x_max, y_min, y_max), the floor below it and the
# wall behind the robot.
_TABLE_EXTENT = (-0.30, 0.95, -0.70, 0.70)
_FLOOR_DROP = 0.75
_WALL_X = -0.45
_LIGHT = np.array([0.35, 0.2, 1.0]) / np.linalg.norm([0.35, 0.2, 1.0])
_AMBIENT = 0.5
_SHADOW_FACTOR = 0.62
_MAX_CACHED_RENDERERS = 8

# Corner signs of a unit box and its six faces (corner indices in cyclic order) with their
# outward normals in the box frame.
_CORNER_SIGNS = np.array(
    [[sx, sy, sz] for sx in (-1.0, 1.0) for sy in (-1.0, 1.0) for sz in (-1.0, 1.0)]
)
_FACES = (
    ((0, 1, 3, 2), (-1.0, 0.0, 0.0)),
    ((4, 6, 7, 5), (1.0, 0.0, 0.0)),
    ((0, 4, 5, 1), (0.0, -1.0, 0.0)),
    ((2, 3, 7, 6), (0.0, 1.0, 0.0)),
    ((0, 2, 6, 4), (0.0, 0.0, -1.0)),
    ((1, 5, 7, 3), (0.0, 0.0, 1.0)),
)
_FACE_NORMALS = np.array([normal for _, normal in _FACES]).T  # (3, 6), box frame


def _vector(value: object, name: str, size: int = 3) -> np.ndarray:
    """Return ``value`` as a finite float vector of ``size`` elements or raise ConfigError."""
    try:
        array = np.array(value, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'{name} must be {size} numbers, got {value!r}') from exc
    if array.shape != (size,) or not np.all(np.isfinite(array)):
        raise ConfigError(f'{name} must be {size} finite numbers, got {value!r}')
    return array


def _scalar(value: object, name: str) -> float:
    """Return ``value`` as a finite float or raise ConfigError."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'{name} must be a number, got {value!r}') from exc
    if not math.isfinite(number):
        raise ConfigError(f'{name} must be finite, got {value!r}')
    return number


def _rotation(value: object, name: str) -> np.ndarray:
    """Return ``value`` as a 3x3 rotation matrix or raise ConfigError."""
    try:
        matrix = np.array(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'{name} must be a 3x3 rotation matrix') from exc
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        raise ConfigError(f'{name} must be a finite 3x3 rotation matrix, got shape '
                          f'{matrix.shape}')
    if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-5) or np.linalg.det(matrix) < 0:
        raise ConfigError(f'{name} is not a rotation matrix (orthonormal, det +1)')
    return matrix


def _colour(value: object, name: str) -> tuple[int, int, int]:
    """Return ``value`` as an RGB triple of ints in [0, 255] or raise ConfigError."""
    rgb = _vector(value, name)
    if np.any(rgb < 0) or np.any(rgb > 255):
        raise ConfigError(f'{name} must be RGB values in [0, 255], got {value!r}')
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def yaw_matrix(yaw: float) -> np.ndarray:
    """Return the rotation about the base z axis by ``yaw`` radians."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(eq=False)
class Block:
    """A cube on (or above) the table.

    ``position`` is the centre of the cube in the base frame [m], ``size`` its edge length [m],
    ``yaw`` its rotation about the vertical [rad] and ``colour`` an RGB triple.
    """

    name: str
    position: np.ndarray
    colour: tuple[int, int, int]
    size: float = BLOCK_SIZE
    yaw: float = 0.0

    def __post_init__(self) -> None:
        """Validate and normalise the fields."""
        self.position = _vector(self.position, f'block {self.name!r} position')
        self.colour = _colour(self.colour, f'block {self.name!r} colour')
        self.size = _scalar(self.size, f'block {self.name!r} size')
        self.yaw = _scalar(self.yaw, f'block {self.name!r} yaw')
        if self.size <= 0.0:
            raise ConfigError(f'block {self.name!r} size must be > 0, got {self.size!r}')


@dataclass(eq=False)
class Scene:
    """Everything one frame shows: blocks, the table height and the gripper.

    ``gripper_position`` is the tool centre point (between the fingertips) in the base frame,
    or None for a frame without a gripper; ``gripper_rotation`` maps the tool frame (z along the
    fingers towards the tips, fingers opening along y) to the base frame; ``gripper_width`` is
    the distance between the fingers [m], 0 to ``GRIPPER_MAX_WIDTH``. ``show_base`` draws the
    arm's base block at the origin, ``show_shadows`` the shadows on the table.
    """

    blocks: Sequence[Block] = ()
    table_height: float = 0.0
    gripper_position: np.ndarray | None = None
    gripper_rotation: np.ndarray = field(default_factory=lambda: GRIPPER_DOWN.copy())
    gripper_width: float = GRIPPER_MAX_WIDTH
    show_base: bool = True
    show_shadows: bool = True

    def __post_init__(self) -> None:
        """Validate and normalise the fields."""
        self.blocks = tuple(self.blocks)
        for block in self.blocks:
            if not isinstance(block, Block):
                raise ConfigError(f'scene blocks must be Block objects, got {type(block)!r}')
        self.table_height = _scalar(self.table_height, 'table_height')
        if self.gripper_position is not None:
            self.gripper_position = _vector(self.gripper_position, 'gripper_position')
        self.gripper_rotation = _rotation(self.gripper_rotation, 'gripper_rotation')
        self.gripper_width = _scalar(self.gripper_width, 'gripper_width')
        if not 0.0 <= self.gripper_width <= GRIPPER_MAX_WIDTH + 1e-9:
            raise ConfigError(f'gripper_width must be in [0, {GRIPPER_MAX_WIDTH}] m, '
                              f'got {self.gripper_width!r}')


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera: intrinsics in pixels and ``pose``, the camera-to-base transform.

    ``pose`` is a 4x4 homogeneous matrix whose rotation columns are the optical axes (x right,
    y down, z forward) in the base frame. ``near`` is the closest depth drawn [m].
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    pose: np.ndarray
    near: float = 0.02

    def __post_init__(self) -> None:
        """Validate the fields and freeze a private copy of the pose."""
        for name in ('fx', 'fy', 'cx', 'cy', 'near'):
            value = _scalar(getattr(self, name), f'camera {name}')
            if name not in ('cx', 'cy') and value <= 0.0:
                raise ConfigError(f'camera {name} must be > 0, got {value!r}')
            object.__setattr__(self, name, value)
        for name in ('width', 'height'):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and 0 < value <= 8192):
                raise ConfigError(f'camera {name} must be an int in [1, 8192], got {value!r}')
            object.__setattr__(self, name, int(value))
        pose = np.array(self.pose, dtype=float)
        if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
            raise ConfigError(f'camera pose must be a finite 4x4 matrix, got shape {pose.shape}')
        if not np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0]):
            raise ConfigError('camera pose last row must be [0, 0, 0, 1]')
        _rotation(pose[:3, :3], 'camera pose rotation')
        pose.setflags(write=False)
        object.__setattr__(self, 'pose', pose)

    @classmethod
    def look_at(cls, eye: Sequence[float], target: Sequence[float], width: int = 224,
                height: int = 224, fov_y_deg: float = 45.0,
                up: Sequence[float] = (0.0, 0.0, 1.0)) -> Camera:
        """Return a camera at ``eye`` looking at ``target`` with square pixels.

        The vertical field of view is ``fov_y_deg``; the principal point is the image centre.
        """
        eye_v = _vector(eye, 'eye')
        forward = _vector(target, 'target') - eye_v
        if np.linalg.norm(forward) < 1e-9:
            raise ConfigError('look_at: eye and target coincide')
        if not 1.0 <= fov_y_deg <= 170.0:
            raise ConfigError(f'fov_y_deg must be in [1, 170], got {fov_y_deg!r}')
        forward = forward / np.linalg.norm(forward)
        right = np.cross(forward, _vector(up, 'up'))
        if np.linalg.norm(right) < 1e-9:
            raise ConfigError('look_at: the view direction is parallel to up')
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        pose = np.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye_v
        focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2.0)
        return cls(fx=focal, fy=focal, cx=(width - 1) / 2.0, cy=(height - 1) / 2.0,
                   width=int(width), height=int(height), pose=pose)

    @classmethod
    def default(cls, width: int = 224, height: int = 224) -> Camera:
        """Return the fixed third-person view: in front of the arm, above, facing the robot.

        It frames the block area (x 0.36 to 0.64 m, y -0.22 to 0.22 m) and the gripper up to
        about 0.35 m above the table, with the arm's base at the top edge, like the Bridge /
        LIBERO agent views; a 640x480 image of the same view shows more to the sides.
        """
        return cls.look_at(eye=(0.95, 0.0, 0.80), target=(0.46, 0.0, 0.16), width=width,
                           height=height, fov_y_deg=44.0)

    @property
    def rotation(self) -> np.ndarray:
        """The camera-to-base rotation (columns: optical x, y, z axes in the base frame)."""
        return self.pose[:3, :3]

    @property
    def position(self) -> np.ndarray:
        """The optical centre in the base frame."""
        return self.pose[:3, 3]

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """Return base-frame ``points`` (N, 3) expressed in the optical frame (N, 3)."""
        pts = np.asarray(points, dtype=float)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ConfigError(f'points must have shape (N, 3), got {pts.shape}')
        return (pts - self.position) @ self.rotation

    def project(self, points: np.ndarray) -> np.ndarray:
        """Return the pixel coordinates (N, 2) [u = column, v = row] of base-frame ``points``.

        Points closer than ``near`` (or behind the camera) project to NaN.
        """
        cam = self.to_camera(points)
        uv = np.full((cam.shape[0], 2), np.nan)
        front = cam[:, 2] >= self.near
        uv[front, 0] = self.fx * cam[front, 0] / cam[front, 2] + self.cx
        uv[front, 1] = self.fy * cam[front, 1] / cam[front, 2] + self.cy
        return uv

    def key(self) -> bytes:
        """Return bytes that identify this camera (for caching what depends on it only)."""
        head = np.array([self.fx, self.fy, self.cx, self.cy, self.width, self.height,
                         self.near], dtype=float)
        return head.tobytes() + self.pose.tobytes()


@dataclass(frozen=True)
class _Box:
    """An oriented box: centre, rotation (box to base) and half extents, in the base frame."""

    centre: np.ndarray
    rotation: np.ndarray
    half: np.ndarray
    colour: tuple[int, int, int]
    name: str = ''

    def corners(self) -> np.ndarray:
        """Return the eight corners (8, 3) in the base frame, in ``_CORNER_SIGNS`` order."""
        return self.centre + (_CORNER_SIGNS * self.half) @ self.rotation.T


def gripper_boxes(position: np.ndarray, rotation: np.ndarray, width: float) -> list[_Box]:
    """Return the boxes of a Panda-like hand whose tool centre point is at ``position``.

    The fingers (dark, 5.5 cm long) end just past the tool centre point and sit ``width``
    apart along the tool y axis (the left finger on +y); the white hand and a flange stack up
    behind them along -z. The simulator's collision model uses the same boxes, by name.
    """
    def box(name: str, local_centre: tuple[float, float, float],
            half: tuple[float, float, float], colour: tuple[int, int, int]) -> _Box:
        """Return a box given in the tool frame, placed in the base frame."""
        return _Box(position + rotation @ np.array(local_centre), rotation, np.array(half),
                    colour, name)

    finger_half = (0.011, 0.007, 0.0275)
    offset = width / 2.0 + finger_half[1]
    return [
        box('panda_leftfinger', (0.0, offset, -0.0225), finger_half, _FINGER_COLOUR),
        box('panda_rightfinger', (0.0, -offset, -0.0225), finger_half, _FINGER_COLOUR),
        box('panda_hand', (0.0, 0.0, -0.075), (0.026, 0.068, 0.025), _HAND_COLOUR),
        box('panda_flange', (0.0, 0.0, -0.130), (0.032, 0.032, 0.030), _FINGER_COLOUR),
    ]


def _convex_hull_2d(points: np.ndarray) -> np.ndarray:
    """Return the convex hull (counter-clockwise) of 2D ``points`` by the monotone chain."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) < 3:
        return np.array(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        """Return the z component of (a - o) x (b - o)."""
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


class Renderer:
    """Renders scenes for one camera; caches the ray-cast room per table height."""

    def __init__(self, camera: Camera) -> None:
        """Precompute the per-pixel viewing rays of ``camera``."""
        if not isinstance(camera, Camera):
            raise ConfigError(f'Renderer needs a Camera, got {type(camera)!r}')
        self.camera = camera
        self._cols = np.arange(camera.width, dtype=float)
        self._rows = np.arange(camera.height, dtype=float)
        self._rooms: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _room(self, table_height: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (image uint8, depth, is-table mask) of the empty room, cached by height."""
        cached = self._rooms.get(table_height)
        if cached is not None:
            return cached
        cam = self.camera
        u, v = np.meshgrid(self._cols, self._rows)
        rays_cam = np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u)], -1)
        rays = rays_cam @ cam.rotation.T  # base-frame direction per unit of optical depth
        eye = cam.position
        depth = np.full(u.shape, np.inf)
        colour = np.empty(u.shape + (3,))
        colour[:] = _WALL_COLOUR * 0.85
        with np.errstate(divide='ignore', invalid='ignore'):
            t_wall = (_WALL_X - eye[0]) / rays[..., 0]
            t_floor = (table_height - _FLOOR_DROP - eye[2]) / rays[..., 2]
            t_table = (table_height - eye[2]) / rays[..., 2]
        x0, x1, y0, y1 = _TABLE_EXTENT
        hit = eye + rays * t_table[..., None]
        on_table = ((t_table > cam.near) & (hit[..., 0] >= x0) & (hit[..., 0] <= x1)
                    & (hit[..., 1] >= y0) & (hit[..., 1] <= y1))
        # The wall, then the floor, then the table, each drawn where it is the nearest surface.
        wall = (t_wall > cam.near) & np.isfinite(t_wall)
        wall_hit = eye + rays * np.where(wall, t_wall, 0.0)[..., None]
        wall_shade = 0.8 + 0.2 * np.clip(wall_hit[..., 2] - table_height, 0.0, 1.0)
        colour[wall] = (_WALL_COLOUR * wall_shade[..., None])[wall]
        depth[wall] = t_wall[wall]
        floor = (t_floor > cam.near) & (t_floor < depth)
        colour[floor] = _FLOOR_COLOUR
        depth[floor] = t_floor[floor]
        on_table &= t_table < depth
        # Light falls off gently with distance from the arm base so the top is not flat.
        falloff = 1.0 - 0.12 * np.clip(np.hypot(hit[..., 0] - 0.4, hit[..., 1]), 0.0, 1.5)
        colour[on_table] = (_TABLE_COLOUR * falloff[..., None])[on_table]
        depth[on_table] = t_table[on_table]
        image = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
        for array in (image, depth, on_table):
            array.setflags(write=False)
        if len(self._rooms) >= 4:
            self._rooms.clear()
        self._rooms[table_height] = (image, depth, on_table)
        return self._rooms[table_height]

    def _fill(self, uv: np.ndarray, cam_pts: np.ndarray | None, zbuf: np.ndarray,
              ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray | None] | None:
        """Rasterise the convex polygon ``uv`` (K, 2).

        Returns the bounding-box slices, the inside mask and, when the polygon's camera-frame
        vertices ``cam_pts`` are given, the per-pixel depth with the depth test against
        ``zbuf`` already applied to the mask; None where nothing is covered.
        """
        cam = self.camera
        u_min = max(math.ceil(uv[:, 0].min()), 0)
        u_max = min(math.floor(uv[:, 0].max()), cam.width - 1)
        v_min = max(math.ceil(uv[:, 1].min()), 0)
        v_max = min(math.floor(uv[:, 1].max()), cam.height - 1)
        if u_min > u_max or v_min > v_max:
            return None
        us = self._cols[u_min:u_max + 1][None, :]
        vs = self._rows[v_min:v_max + 1][:, None]
        nxt = np.roll(uv, -1, axis=0)
        area = np.sum(uv[:, 0] * nxt[:, 1] - nxt[:, 0] * uv[:, 1])
        if abs(area) < 1e-9:
            return None
        sign = 1.0 if area > 0 else -1.0
        mask = np.ones((v_max - v_min + 1, u_max - u_min + 1), dtype=bool)
        for (ax, ay), (bx, by) in zip(uv, nxt, strict=True):
            mask &= sign * ((bx - ax) * (vs - ay) - (by - ay) * (us - ax)) >= 0.0
        window = (slice(v_min, v_max + 1), slice(u_min, u_max + 1))
        if cam_pts is None:
            return window, mask, None
        normal = np.cross(cam_pts[1] - cam_pts[0], cam_pts[2] - cam_pts[0])
        offset = float(normal @ cam_pts[0])
        denom = (normal[0] * (us - cam.cx) / cam.fx + normal[1] * (vs - cam.cy) / cam.fy
                 + normal[2])
        with np.errstate(divide='ignore', invalid='ignore'):
            depth = offset / denom
        mask &= (depth > 0.0) & (depth < zbuf[window])
        return window, mask, depth

    def render(self, scene: Scene) -> np.ndarray:
        """Return the (height, width, 3) uint8 RGB image of ``scene``."""
        if not isinstance(scene, Scene):
            raise ConfigError(f'render needs a Scene, got {type(scene)!r}')
        cam = self.camera
        room, room_depth, on_table = self._room(float(scene.table_height))
        image = room.copy()
        zbuf = room_depth.copy()
        boxes = self._scene_boxes(scene)
        if scene.show_shadows:
            self._shadows(boxes, scene.table_height, image, zbuf, on_table)
        for box in boxes:
            corners = box.corners()
            cam_pts = cam.to_camera(corners)
            if np.any(cam_pts[:, 2] < cam.near):
                continue  # too close to (or behind) the camera to draw a sane polygon
            uv = np.empty((8, 2))
            uv[:, 0] = cam.fx * cam_pts[:, 0] / cam_pts[:, 2] + cam.cx
            uv[:, 1] = cam.fy * cam_pts[:, 1] / cam_pts[:, 2] + cam.cy
            normals = box.rotation @ _FACE_NORMALS  # (3, 6), base frame
            for k, (face, _) in enumerate(_FACES):
                normal_world = normals[:, k]
                face_idx = list(face)
                if float(normal_world @ (cam.position - corners[face_idx[0]])) <= 0.0:
                    continue  # back face
                shade = _AMBIENT + (1.0 - _AMBIENT) * max(0.0, float(normal_world @ _LIGHT))
                filled = self._fill(uv[face_idx], cam_pts[face_idx], zbuf)
                if filled is None:
                    continue
                window, mask, depth = filled
                colour = np.clip(np.rint(np.array(box.colour) * shade), 0, 255).astype(np.uint8)
                image[window][mask] = colour
                zbuf[window][mask] = depth[mask]
        return image

    @staticmethod
    def _scene_boxes(scene: Scene) -> list[_Box]:
        """Return every box the scene shows: robot base, blocks and gripper."""
        h = scene.table_height
        boxes: list[_Box] = []
        if scene.show_base:
            boxes.append(_Box(np.array([0.0, 0.0, h + 0.06]), np.eye(3),
                              np.array([0.09, 0.09, 0.06]), _BASE_COLOUR))
        for block in scene.blocks:
            half = np.full(3, block.size / 2.0)
            boxes.append(_Box(block.position, yaw_matrix(block.yaw), half, block.colour))
        if scene.gripper_position is not None:
            boxes.extend(gripper_boxes(scene.gripper_position, scene.gripper_rotation,
                                       scene.gripper_width))
        return boxes

    def _shadows(self, boxes: list[_Box], table_height: float, image: np.ndarray,
                 zbuf: np.ndarray, on_table: np.ndarray) -> None:
        """Darken the table under every box that is above it (light straight from above)."""
        cam = self.camera
        shadow = np.zeros(on_table.shape, dtype=bool)
        for box in boxes:
            corners = box.corners()
            if corners[:, 2].max() <= table_height + 1e-6:
                continue
            hull = _convex_hull_2d(corners[:, :2])
            if len(hull) < 3:
                continue
            ground = np.column_stack([hull, np.full(len(hull), table_height)])
            cam_pts = cam.to_camera(ground)
            if np.any(cam_pts[:, 2] < cam.near):
                continue
            uv = np.column_stack([cam.fx * cam_pts[:, 0] / cam_pts[:, 2] + cam.cx,
                                  cam.fy * cam_pts[:, 1] / cam_pts[:, 2] + cam.cy])
            filled = self._fill(uv, None, zbuf)
            if filled is not None:
                window, mask, _ = filled
                shadow[window] |= mask
        shadow &= on_table
        if np.any(shadow):
            image[shadow] = (image[shadow] * _SHADOW_FACTOR).astype(np.uint8)


_renderers: OrderedDict[bytes, Renderer] = OrderedDict()


def render(scene: Scene, camera: Camera) -> np.ndarray:
    """Return the (camera.height, camera.width, 3) uint8 RGB image of ``scene``.

    Keeps a small cache of per-camera renderers, so repeated calls with one camera are fast.
    """
    if not isinstance(camera, Camera):
        raise ConfigError(f'render needs a Camera, got {type(camera)!r}')
    key = camera.key()
    renderer = _renderers.get(key)
    if renderer is None:
        renderer = Renderer(camera)
        _renderers[key] = renderer
        if len(_renderers) > _MAX_CACHED_RENDERERS:
            _renderers.popitem(last=False)
    else:
        _renderers.move_to_end(key)
    return renderer.render(scene)
