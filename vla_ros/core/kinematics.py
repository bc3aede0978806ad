"""Arm kinematics from a URDF through pinocchio: joint order and limits, FK, Jacobian, IK rates.

``ArmKinematics`` is the one place where the safety limiter and the simulated arm learn about the
robot: the joint names in model order, their position and velocity limits as written in the URDF,
the pose of the end-effector frame in the base (world) frame, its 6xN Jacobian with linear rows
first in ``LOCAL_WORLD_ALIGNED`` convention (the velocity of the frame origin and the angular
velocity, both expressed in world axes), and the joint velocities that realize a twist. Every
robot-specific number comes from the URDF; errors in the file or the frame name are
``ConfigError`` naming the file and the valid choices. A model object holds one pinocchio
``Data`` work buffer, so one instance must not be used from several threads at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pinocchio as pin

from vla_ros.core.errors import ConfigError, VlaRosError

__all__ = [
    'ArmKinematics',
    'JointStateError',
    'PANDA_HOME',
    'default_urdf_path',
    'solve_twist',
]

logger = logging.getLogger(__name__)

#: A comfortable home pose of a Panda-like arm [rad]: elbow up, hand pointing down.
PANDA_HOME = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)


class JointStateError(VlaRosError, ValueError):
    """A joint configuration that cannot be used: unknown or missing names, wrong size, NaN."""


def default_urdf_path() -> Path:
    """Return the path of the bundled ``panda.urdf``.

    The source tree (``<repo>/config/panda.urdf``) wins; on a ROS install where the package is
    installed without its source tree, the package's share folder is used when
    ``ament_index_python`` is importable. When neither exists the source-tree path is returned
    and loading it raises a ``ConfigError`` that names it.
    """
    repo_path = Path(__file__).resolve().parents[2] / 'config' / 'panda.urdf'
    if repo_path.is_file():
        return repo_path
    try:
        from ament_index_python.packages import (  # noqa: PLC0415 (optional, ROS installs only)
            PackageNotFoundError,
            get_package_share_directory,
        )
    except ImportError:
        return repo_path
    try:
        share_path = Path(get_package_share_directory('vla_ros')) / 'config' / 'panda.urdf'
    except PackageNotFoundError:
        return repo_path
    return share_path if share_path.is_file() else repo_path


class ArmKinematics:
    """Kinematics of a serial arm with 1-DoF joints, loaded from a URDF.

    Attributes:
        joint_names: the movable joints in model order (the order of every ``q`` here).
        lower, upper: joint position limits [rad or m] from the URDF, shape ``(n,)``.
        velocity_limits: joint velocity limits [rad/s or m/s] from the URDF, shape ``(n,)``.
        n_joints: number of movable joints.
        ee_frame: name of the end-effector frame that ``fk`` and ``jacobian`` describe.
        contact_frames: frames whose positions ``contact_points`` returns (fingertips).
        link_shapes: the links of the URDF's cylinder and box shapes (``link_lowest``).
        source: where the model came from (a file path or ``'<string>'``), for messages.

    """

    def __init__(self, model: pin.Model, ee_frame: str, source: str = '<string>',
                 contact_frames: Sequence[str] = (), xml: str = '') -> None:
        """Wrap a pinocchio model; prefer ``from_urdf_file`` / ``from_urdf_string``.

        Raises:
            ConfigError: the model has joints with more than one coordinate (continuous,
                floating, planar), missing or non-finite limits, or ``ee_frame`` or one of
                ``contact_frames`` does not exist.

        """
        self.source = source
        self._model = model
        self._data = model.createData()
        bad = [model.names[i] for i in range(1, model.njoints) if model.joints[i].nq != 1]
        if bad:
            raise ConfigError(
                f'{source}: joints {bad} have more than one coordinate; only revolute and '
                'prismatic joints are supported')
        if model.nq == 0 or model.nq != model.nv:
            raise ConfigError(
                f'{source}: expected an arm of 1-DoF revolute/prismatic joints, got nq={model.nq}'
                f' nv={model.nv}')
        self.joint_names: list[str] = [str(n) for n in list(model.names)[1:]]
        self.n_joints: int = len(self.joint_names)
        self.lower = np.array(model.lowerPositionLimit, dtype=float)
        self.upper = np.array(model.upperPositionLimit, dtype=float)
        self.velocity_limits = np.array(model.velocityLimit, dtype=float)
        for i, name in enumerate(self.joint_names):
            lo, hi, vmax = self.lower[i], self.upper[i], self.velocity_limits[i]
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(
                    f'{source}: joint {name!r} needs finite position limits lower < upper in '
                    f'its <limit> tag, got lower={lo} upper={hi}')
            if not (math.isfinite(vmax) and vmax > 0.0):
                raise ConfigError(
                    f'{source}: joint {name!r} needs a finite velocity limit > 0 in its <limit> '
                    f'tag, got velocity={vmax}')
        for arr in (self.lower, self.upper, self.velocity_limits):
            arr.flags.writeable = False
        if not model.existFrame(ee_frame):
            frames = [str(f.name) for f in model.frames]
            raise ConfigError(
                f'{source}: end-effector frame {ee_frame!r} not found; frames in the model: '
                f'{frames}')
        self.ee_frame = ee_frame
        self._frame_id = model.getFrameId(ee_frame)
        if isinstance(contact_frames, str):
            contact_frames = [contact_frames]
        missing = [f for f in contact_frames if not model.existFrame(str(f))]
        if missing:
            frames = [str(f.name) for f in model.frames]
            raise ConfigError(
                f'{source}: contact frames {missing} not found; frames in the model: {frames}')
        self.contact_frames: tuple[str, ...] = tuple(str(f) for f in contact_frames)
        self._contact_ids = [model.getFrameId(f) for f in self.contact_frames]
        self.link_shapes: tuple[str, ...] = ()
        self._shapes: list[tuple[int, pin.SE3, tuple]] = []
        if xml:
            self._load_shapes(xml)
        self._index = {name: i for i, name in enumerate(self.joint_names)}
        home = np.array(PANDA_HOME, dtype=float)
        if self.n_joints == home.size and bool(np.all((home > self.lower) & (home < self.upper))):
            self._neutral = home
        else:
            self._neutral = 0.5 * (self.lower + self.upper)
        self._neutral.flags.writeable = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_urdf_string(cls, xml: str, ee_frame: str = 'panda_tcp', *,
                         source: str = '<string>', contact_frames: Sequence[str] = ()
                         ) -> ArmKinematics:
        """Build from URDF text.

        Args:
            xml: the URDF document.
            ee_frame: a link or frame of the model whose pose and Jacobian are wanted.
            source: a name for error messages (the file the text came from).
            contact_frames: frames whose positions ``contact_points`` returns.

        Raises:
            ConfigError: the text is not a valid URDF, or a check of ``__init__`` fails.

        """
        if not isinstance(xml, str) or not xml.strip():
            raise ConfigError(f'{source}: the URDF is empty')
        try:
            model = pin.buildModelFromXML(xml)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f'{source}: not a valid URDF model ({exc})') from exc
        return cls(model, ee_frame, source, contact_frames, xml)

    @classmethod
    def from_urdf_file(cls, path: str | Path, ee_frame: str = 'panda_tcp',
                       contact_frames: Sequence[str] = ()) -> ArmKinematics:
        """Build from a URDF file (see ``default_urdf_path`` for the bundled Panda-like arm).

        Raises:
            ConfigError: the file is missing, unreadable or not a valid URDF (names the file).

        """
        path = Path(path)
        try:
            xml = path.read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f'cannot read URDF file {str(path)!r}: {exc}') from exc
        kin = cls.from_urdf_string(xml, ee_frame, source=str(path),
                                   contact_frames=contact_frames)
        logger.debug('loaded %s: %d joints, ee frame %r', path, kin.n_joints, ee_frame)
        return kin

    # ------------------------------------------------------------------ configurations
    def neutral(self) -> np.ndarray:
        """Return a comfortable home configuration inside the limits (a fresh array).

        For a 7-joint arm whose limits admit it, this is ``PANDA_HOME``; otherwise the middle of
        every joint range.
        """
        return self._neutral.copy()

    def within_limits(self, q: np.ndarray, margin: float = 0.0) -> bool:
        """Return whether every joint lies within ``[lower + margin, upper - margin]``."""
        q = np.asarray(q, dtype=float)
        return bool(np.all(q >= self.lower + margin) and np.all(q <= self.upper - margin))

    def order_joint_state(self, names: Sequence[str], positions: Sequence[float], *,
                          allow_extra: bool = True) -> np.ndarray:
        """Map a JointState's ``(name, position)`` lists into model order.

        Args:
            names: joint names as published (any order).
            positions: the matching positions.
            allow_extra: ignore names the model does not know (a gripper's finger joints share
                ``/joint_states`` on real arms); with ``False`` they are an error.

        Returns:
            positions in ``joint_names`` order, shape ``(n_joints,)``.

        Raises:
            JointStateError: lengths differ, a name repeats, a model joint is missing, an
                unknown name appears while ``allow_extra`` is false, or a used position is not
                finite. The message names the joints.

        """
        names = list(names)
        try:
            pos = np.asarray(positions, dtype=float).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise JointStateError(f'joint positions are not numbers: {exc}') from exc
        if len(names) != pos.size:
            raise JointStateError(
                f'joint state has {len(names)} names but {pos.size} positions')
        out = np.full(self.n_joints, np.nan)
        seen: set[str] = set()
        unknown: list[str] = []
        for name, value in zip(names, pos, strict=True):
            if name in seen:
                raise JointStateError(f'joint {name!r} appears twice in the joint state')
            seen.add(name)
            idx = self._index.get(name)
            if idx is None:
                unknown.append(name)
            else:
                out[idx] = value
        if unknown and not allow_extra:
            raise JointStateError(
                f'unknown joints {unknown}; the model has {self.joint_names}')
        missing = [n for n in self.joint_names if n not in seen]
        if missing:
            raise JointStateError(
                f'joint state lacks joints {missing} (model joints: {self.joint_names})')
        bad = [self.joint_names[i] for i in np.flatnonzero(~np.isfinite(out))]
        if bad:
            raise JointStateError(f'non-finite positions for joints {bad}')
        return out

    # ------------------------------------------------------------------ kinematics
    def _check_q(self, q: np.ndarray | Sequence[float]) -> np.ndarray:
        arr = np.asarray(q, dtype=float)
        if arr.shape != (self.n_joints,):
            raise JointStateError(
                f'expected {self.n_joints} joint positions in order {self.joint_names}, got '
                f'shape {arr.shape}')
        if not np.all(np.isfinite(arr)):
            raise JointStateError(f'non-finite joint positions {arr.tolist()}')
        return arr

    def fk(self, q: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Return the position ``(3,)`` [m] and rotation ``(3, 3)`` of the ee frame in world.

        Raises:
            JointStateError: ``q`` has the wrong size or a non-finite entry.

        """
        q = self._check_q(q)
        pin.forwardKinematics(self._model, self._data, q)
        placement = pin.updateFramePlacement(self._model, self._data, self._frame_id)
        return np.array(placement.translation), np.array(placement.rotation)

    def contact_points(self, q: np.ndarray | Sequence[float]) -> np.ndarray:
        """Return the positions ``(m, 3)`` [m] of the ``contact_frames`` in world at ``q``.

        Raises:
            JointStateError: ``q`` has the wrong size or a non-finite entry.

        """
        q = self._check_q(q)
        out = np.empty((len(self._contact_ids), 3))
        if not self._contact_ids:
            return out
        pin.forwardKinematics(self._model, self._data, q)
        for k, fid in enumerate(self._contact_ids):
            out[k] = pin.updateFramePlacement(self._model, self._data, fid).translation
        return out

    def _load_shapes(self, xml: str) -> None:
        """Keep the URDF's cylinder and box shapes of the moving links (not the base's)."""
        try:
            geometry = pin.buildGeomFromUrdfString(self._model, xml, pin.GeometryType.VISUAL)
        except (ValueError, RuntimeError) as exc:  # shapes are optional: none then
            logger.warning('%s: no link shapes (%s)', self.source, exc)
            return
        names = []
        for obj in geometry.geometryObjects:
            shape = obj.geometry
            if obj.parentJoint == 0:
                continue  # fixed to the base, which stands on the table
            if hasattr(shape, 'halfLength'):  # cylinder along its z axis
                extent = (float(shape.radius), float(shape.halfLength), True)
            elif hasattr(shape, 'halfSide'):  # box
                extent = (*(float(v) for v in shape.halfSide), False)
            else:
                continue
            # a geometry's placement is relative to its parent joint
            self._shapes.append((int(obj.parentJoint), pin.SE3(obj.placement), extent))
            names.append(str(self._model.frames[obj.parentFrame].name))
        self.link_shapes = tuple(names)

    def link_lowest(self, q: np.ndarray | Sequence[float]) -> np.ndarray:
        """Return the height [m] of the lowest point of each link shape (``link_shapes``).

        The shapes are the URDF's ``<visual>`` cylinders and boxes of the links that move with
        a joint. A cylinder of centre ``c``, axis ``a``, radius ``r`` and half-length ``h`` is
        lowest at ``c_z - h |a_z| - r sqrt(1 - a_z^2)``; a box of half sides ``s`` at
        ``c_z - sum_i s_i |R_zi|``.

        Raises:
            JointStateError: ``q`` has the wrong size or a non-finite entry.

        """
        q = self._check_q(q)
        out = np.empty(len(self._shapes))
        if not self._shapes:
            return out
        pin.forwardKinematics(self._model, self._data, q)
        for k, (joint, placement, extent) in enumerate(self._shapes):
            pose = self._data.oMi[joint] * placement
            rz = pose.rotation[2]
            if extent[2] is True:
                radius, half = extent[0], extent[1]
                az = float(rz[2])
                out[k] = (float(pose.translation[2]) - half * abs(az)
                          - radius * math.sqrt(max(0.0, 1.0 - az * az)))
            else:
                out[k] = float(pose.translation[2]) - sum(
                    h * abs(float(r)) for h, r in zip(extent[:3], rz, strict=True))
        return out

    def jacobian(self, q: np.ndarray | Sequence[float]) -> np.ndarray:
        """Return the ee frame Jacobian ``(6, n)``: linear rows, then angular, world axes.

        Raises:
            JointStateError: ``q`` has the wrong size or a non-finite entry.

        """
        return self.fk_and_jacobian(q)[2]

    def fk_and_jacobian(self, q: np.ndarray | Sequence[float]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(position, rotation, jacobian)`` of the ee frame with one kinematics pass.

        Raises:
            JointStateError: ``q`` has the wrong size or a non-finite entry.

        """
        q = self._check_q(q)
        pin.computeJointJacobians(self._model, self._data, q)
        placement = pin.updateFramePlacement(self._model, self._data, self._frame_id)
        jac = pin.getFrameJacobian(self._model, self._data, self._frame_id,
                                   pin.ReferenceFrame.LOCAL_WORLD_ALIGNED)
        return np.array(placement.translation), np.array(placement.rotation), np.array(jac)

    def joint_velocity(self, q: np.ndarray | Sequence[float], twist: np.ndarray | Sequence[float],
                       damping: float = 0.0) -> np.ndarray:
        """Return joint velocities that realize an ee ``twist`` (vx vy vz wx wy wz, world axes).

        With ``damping == 0`` this is the minimum-norm pseudo-inverse solution (what a
        resolved-rate controller such as MoveIt Servo commands); with ``damping > 0`` the damped
        least-squares solution ``J^T (J J^T + damping^2 I)^-1 twist``.

        Raises:
            JointStateError: ``q`` has the wrong size or a non-finite entry.
            ValueError: ``twist`` is not 6 finite numbers or ``damping`` is negative.

        """
        jac = self.jacobian(q)
        return solve_twist(jac, twist, damping)


def solve_twist(jacobian: np.ndarray, twist: np.ndarray | Sequence[float],
                damping: float = 0.0) -> np.ndarray:
    """Return ``J^+ twist`` (``damping == 0``) or the damped least-squares joint velocities.

    Raises:
        ValueError: ``twist`` is not 6 finite numbers or ``damping`` is negative.

    """
    tw = np.asarray(twist, dtype=float)
    if tw.shape != (6,) or not np.all(np.isfinite(tw)):
        raise ValueError(f'twist must be 6 finite numbers, got {tw!r}')
    if not damping >= 0.0:
        raise ValueError(f'damping must be >= 0, got {damping}')
    u, s, vt = np.linalg.svd(jacobian, full_matrices=False)
    if damping > 0.0:
        inv = s / (s * s + damping * damping)
    else:
        cutoff = 1e-12 * max(float(s[0]), 1e-300)
        inv = np.where(s > cutoff, 1.0 / np.where(s > cutoff, s, 1.0), 0.0)
    return vt.T @ (inv * (u.T @ tw))


def rotation_to_quat_xyzw(rotation: np.ndarray) -> np.ndarray:
    """Return the unit quaternion (x, y, z, w) of a rotation matrix, with w >= 0."""
    quat = np.array(pin.Quaternion(np.asarray(rotation, dtype=float)).coeffs(), dtype=float)
    quat /= np.linalg.norm(quat)
    return -quat if quat[3] < 0.0 else quat


def integrate_rotation(rotation: np.ndarray, omega: np.ndarray | Sequence[float],
                       dt: float) -> np.ndarray:
    """Rotate ``rotation`` by the base-frame angular velocity ``omega`` [rad/s] for ``dt`` s."""
    return pin.exp3(np.asarray(omega, dtype=float) * float(dt)) @ np.asarray(rotation, float)

