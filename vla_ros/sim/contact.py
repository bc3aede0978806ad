"""Contact between the simulated arm and the table and blocks: geometry, forces and compliance.

``ArmGeometry`` is the arm's collision model: the link cylinders of the URDF's ``<visual>``
shapes (links 0 to 7) and, beyond the wrist, the hand and the two fingers exactly as the camera
draws them (``scene.gripper_boxes``, the fingers moving with the gripper width), plus a held
block. Obstacles are the table, a half-space below its top, and the blocks, boxes. Penetration
depth, normal and the deepest point of each touching pair come from coal, the collision library
that pinocchio ships (GJK/EPA), all pairs checked in one pinocchio call (a few microseconds in
free motion). Each touching pair pushes the arm out with a penalty force ``stiffness * depth``
along its normal (frictionless: a pressed tool can slide along the surface); its 3xN point
Jacobian maps the force to joint torques, so the external joint torques are ``sum J_i^T f_i``,
and the tool wrench ``w`` (the forces on the hand, the fingers and a held block, with their
torque about the tool centre point) gives their share as ``J_tcp^T w``. ``ContactSolver`` makes
the arm yield like a joint-impedance controlled arm: the commanded (reference) configuration
``q_ref`` pulls the actual configuration ``q`` through joint springs, and ``q`` settles where
spring and contact torques balance, ``K (q - q_ref) = sum J_i^T f_i`` (a quasi-static
Gauss-Newton solve, stable at any contact stiffness). Where a step of the reference would load a
joint spring beyond the joint's effort limit from the URDF, the servo stalls (the reference
stays), so a command that keeps pushing into the table holds at a bounded force and a bounded
penetration instead of driving through it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import coal
import numpy as np
import pinocchio as pin

from vla_ros.core.errors import ConfigError
from vla_ros.sim.scene import gripper_boxes, yaw_matrix

__all__ = [
    'CONTACT_STIFFNESS',
    'TABLE',
    'ArmGeometry',
    'Contact',
    'ContactSolver',
    'default_joint_stiffness',
    'external_torque',
    'tool_wrench',
]

logger = logging.getLogger(__name__)

#: Penalty stiffness of every contact [N/m]: a force of 100 N sinks the arm 1 mm into the table.
CONTACT_STIFFNESS = 1.0e5
#: Joint stiffness of the arm's impedance controller [N m/rad] (a Panda-like internal joint
#: impedance, shoulder to wrist); an arm with another joint count uses the last value for all.
PANDA_JOINT_STIFFNESS = (3000.0, 3000.0, 3000.0, 2500.0, 2500.0, 2000.0, 2000.0)
#: Name of the table obstacle.
TABLE = 'table'
#: Arm bodies that never touch the table (the base stands on it).
_TABLE_EXEMPT = frozenset({'panda_link0'})
_TOOL_FRAME = 'panda_tcp'


def default_joint_stiffness(n_joints: int) -> np.ndarray:
    """Return the default joint stiffness [N m/rad] for an arm of ``n_joints`` joints."""
    if n_joints == len(PANDA_JOINT_STIFFNESS):
        return np.array(PANDA_JOINT_STIFFNESS)
    return np.full(n_joints, PANDA_JOINT_STIFFNESS[-1])


@dataclass(frozen=True, eq=False)
class Contact:
    """One touching pair: an arm body in an obstacle.

    ``point`` is the deepest point of the arm body [m, base frame], ``normal`` the unit direction
    of the force on the arm (out of the obstacle), ``depth`` the penetration [m] (> 0),
    ``jacobian`` the (3, n) Jacobian of ``point`` as a point of the body, ``tool`` whether the
    body is beyond the wrist (a wrist force/torque sensor would see it).
    """

    body: str
    obstacle: str
    point: np.ndarray
    normal: np.ndarray
    depth: float
    stiffness: float
    jacobian: np.ndarray
    tool: bool

    @property
    def force(self) -> np.ndarray:
        """The force the obstacle exerts on the arm [N, base frame]."""
        return self.stiffness * self.depth * self.normal


def external_torque(contacts: Sequence[Contact], n_joints: int) -> np.ndarray:
    """Return the external joint torques ``sum J_i^T f_i`` of ``contacts`` [N m]."""
    tau = np.zeros(n_joints)
    for c in contacts:
        tau += c.jacobian.T @ c.force
    return tau


def tool_wrench(contacts: Sequence[Contact], tcp_position: np.ndarray) -> np.ndarray:
    """Return the wrench on the tool (force, torque about ``tcp_position``), base axes.

    Only contacts on tool bodies count (hand, fingers, a held block): what a wrist force/torque
    sensor at the tool centre point would measure, as the force the environment exerts.
    """
    wrench = np.zeros(6)
    for c in contacts:
        if c.tool:
            f = c.force
            wrench[:3] += f
            wrench[3:] += np.cross(c.point - tcp_position, f)
    return wrench


class ArmGeometry:
    """The collision model of the arm and the table-top scene, for pinocchio and coal.

    Args:
        urdf_path: the URDF that ``ArmKinematics`` loads (its ``<visual>`` cylinders of the
            links become the link shapes; the hand and the fingers are the rendered gripper's
            boxes, which the URDF's hand box stands in for).
        joint_names: the kinematics' joint order; must be the URDF's.
        block_names: the blocks of the scene (cubes of edge ``block_size`` [m]).
        stiffness: the penalty stiffness of every contact [N/m].

    The scene is updated through ``set_table``, ``set_gripper_width``, ``set_block`` and
    ``hold``; ``contacts(q)`` then returns every touching (arm body, obstacle) pair.

    Raises:
        ConfigError: the file cannot be loaded, the joints differ or the tool frame is missing.

    """

    def __init__(self, urdf_path: str | Path, joint_names: Sequence[str],
                 block_names: Sequence[str], block_size: float,
                 stiffness: float = CONTACT_STIFFNESS) -> None:
        """Load the model and place the link, gripper and scene shapes."""
        path = str(urdf_path)
        try:
            self._model = pin.buildModelFromUrdf(path)
            visual = pin.buildGeomFromUrdf(self._model, path, pin.GeometryType.VISUAL)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f'cannot load the collision model from {path!r}: {exc}') from exc
        names = [str(n) for n in list(self._model.names)[1:]]
        if names != list(joint_names):
            raise ConfigError(f"{path}: joints {names} differ from the kinematics' "
                              f'{list(joint_names)}')
        if not self._model.existFrame(_TOOL_FRAME):
            raise ConfigError(f'{path}: no {_TOOL_FRAME!r} frame for the gripper shapes')
        if not (math.isfinite(stiffness) and stiffness > 0.0):
            raise ConfigError(f'contact stiffness must be > 0 N/m, got {stiffness!r}')
        if not (math.isfinite(block_size) and block_size > 0.0):
            raise ConfigError(f'block_size must be > 0 m, got {block_size!r}')
        self.stiffness = float(stiffness)
        self.n_joints = len(names)
        self.effort_limits = np.array(self._model.effortLimit, dtype=float)
        self.block_size = float(block_size)
        self._data = self._model.createData()
        frame_id = self._model.getFrameId(_TOOL_FRAME)
        self._tool_frame = frame_id
        tcp = self._model.frames[frame_id]
        self._tool_joint = int(tcp.parentJoint)
        self._tool_placement = pin.SE3(tcp.placement)
        gm = pin.GeometryModel()
        self._geometry = gm
        self._tool: set[int] = set()

        def add(name: str, joint: int, frame: int, placement: pin.SE3,
                shape: coal.CollisionGeometry) -> int:
            return int(gm.addGeometryObject(
                pin.GeometryObject(name, joint, frame, placement, shape)))

        arm: list[int] = []
        for obj in visual.geometryObjects:
            frame = str(self._model.frames[obj.parentFrame].name)
            if frame.startswith('panda_link') and isinstance(obj.geometry, coal.Cylinder):
                arm.append(add(frame, obj.parentJoint, obj.parentFrame, obj.placement,
                               obj.geometry))
        self._fingers: dict[str, int] = {}
        for box in gripper_boxes(np.zeros(3), np.eye(3), 0.0):
            index = add(box.name, self._tool_joint, frame_id, self._tool_local(box.centre),
                        coal.Box(*(2.0 * box.half)))
            arm.append(index)
            self._tool.add(index)
            if 'finger' in box.name:
                self._fingers[box.name] = index
        cube = coal.Box(self.block_size, self.block_size, self.block_size)
        self._held_slot = add('held', self._tool_joint, frame_id, pin.SE3.Identity(), cube)
        self._tool.add(self._held_slot)
        self._table = add(TABLE, 0, 0, pin.SE3.Identity(),
                          coal.Halfspace(np.array([0.0, 0.0, 1.0]), 0.0))
        self._blocks = {name: add(name, 0, 0, pin.SE3.Identity(), cube) for name in block_names}
        obstacles = [self._table, *self._blocks.values()]
        self._pairs: list[tuple[int, int]] = []
        for body in [*arm, self._held_slot]:
            for obstacle in obstacles:
                if obstacle == self._table and gm.geometryObjects[body].name in _TABLE_EXEMPT:
                    continue
                gm.addCollisionPair(pin.CollisionPair(body, obstacle))
                self._pairs.append((body, obstacle))
        self._geometry_data = pin.GeometryData(gm)
        for request in self._geometry_data.collisionRequests:
            request.enable_contact = True
            request.num_max_contacts = 1
        self.body_names = [str(gm.geometryObjects[i].name) for i in arm]
        self._width: float | None = None
        self._held: str | None = None
        self.hold(None)
        self.set_table(0.0)

    # ------------------------------------------------------------------ scene
    def _tool_local(self, position: np.ndarray, rotation: np.ndarray | None = None) -> pin.SE3:
        """Return a pose given in the tool frame as a placement in the tool's joint frame."""
        local = pin.SE3(np.eye(3) if rotation is None else rotation, np.asarray(position))
        return self._tool_placement * local

    def _place(self, index: int, placement: pin.SE3) -> None:
        self._geometry.geometryObjects[index].placement = placement

    def set_table(self, height: float) -> None:
        """Put the table top at ``height`` [m] (the table fills the half-space below)."""
        self._place(self._table, pin.SE3(np.eye(3), np.array([0.0, 0.0, float(height)])))

    def set_gripper_width(self, width: float) -> None:
        """Place the fingers ``width`` [m] apart (as the renderer draws them)."""
        if width == self._width:
            return
        self._width = width
        for box in gripper_boxes(np.zeros(3), np.eye(3), width):
            if box.name in self._fingers:
                self._place(self._fingers[box.name], self._tool_local(box.centre))

    def set_block(self, name: str, centre: np.ndarray, yaw: float = 0.0) -> None:
        """Place block ``name`` at ``centre`` [m], turned by ``yaw`` [rad] about the vertical."""
        self._place(self._blocks[name], pin.SE3(yaw_matrix(yaw), np.asarray(centre, float)))

    def hold(self, name: str | None, rotation: np.ndarray | None = None,
             position: np.ndarray | None = None) -> None:
        """Carry block ``name`` in the hand at a pose relative to the tool frame (None: none).

        A held block moves with the tool, touches the table and the other blocks as a tool body
        and is no obstacle itself.
        """
        data = self._geometry_data
        self._held = name
        for k, (body, obstacle) in enumerate(self._pairs):
            held_pair = body == self._held_slot
            is_held = name is not None and obstacle == self._blocks.get(name)
            if (held_pair and name is None) or is_held:
                data.deactivateCollisionPair(k)
            else:
                data.activateCollisionPair(k)
        if name is not None:
            if name not in self._blocks:
                raise ConfigError(f'unknown block {name!r}; blocks: {sorted(self._blocks)}')
            self._place(self._held_slot, self._tool_local(
                np.zeros(3) if position is None else position, rotation))

    # ------------------------------------------------------------------ queries
    def contacts(self, q: np.ndarray) -> list[Contact]:
        """Return every touching (arm body, obstacle) pair at joint positions ``q``."""
        model, data, gm, gd = self._model, self._data, self._geometry, self._geometry_data
        if not pin.computeCollisions(model, data, gm, gd, q, False):
            return []
        found = []
        # One conversion of the results vector: indexing it pair by pair costs twice as much.
        for (body, obstacle), result in zip(self._pairs, list(gd.collisionResults),
                                            strict=True):
            if not result.isCollision():
                continue
            c = result.getContact(0)
            depth = -float(c.penetration_depth)
            if depth > 0.0:
                found.append((body, obstacle, np.array(c.getNearestPoint1()),
                              -np.array(c.normal), depth))
        if not found:
            return []
        pin.computeJointJacobians(model, data, q)
        out = []
        for body, obstacle, point, normal, depth in found:
            obj = gm.geometryObjects[body]
            joint = int(obj.parentJoint)
            jac = pin.getJointJacobian(model, data, joint, pin.ReferenceFrame.LOCAL_WORLD_ALIGNED)
            lever = point - data.oMi[joint].translation
            name = self._held if body == self._held_slot else str(obj.name)
            out.append(Contact(str(name), str(gm.geometryObjects[obstacle].name), point, normal,
                               depth, self.stiffness, jac[:3] - pin.skew(lever) @ jac[3:],
                               body in self._tool))
        return out


class ContactSolver:
    """Settles the actual arm configuration between the commanded one and the obstacles.

    Args:
        query: returns the contacts at a configuration (``ArmGeometry.contacts`` bound to the
            world's obstacles, gripper and held block).
        joint_stiffness: the impedance controller's joint springs [N m/rad], shape (n,).
        effort_limits: the largest spring torque per joint [N m] before the reference yields.
        iterations: the most Gauss-Newton steps per settle.

    """

    def __init__(self, query: Callable[[np.ndarray], list[Contact]],
                 joint_stiffness: Sequence[float], effort_limits: Sequence[float],
                 iterations: int = 6) -> None:
        """Keep the parameters; raise ConfigError where one is not positive and finite."""
        self.query = query
        self.joint_stiffness = np.asarray(joint_stiffness, dtype=float).reshape(-1)
        self.effort_limits = np.asarray(effort_limits, dtype=float).reshape(-1)
        for name, values in (('joint_stiffness', self.joint_stiffness),
                             ('effort_limits', self.effort_limits)):
            if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0.0):
                raise ConfigError(f'{name} must be positive and finite, got {values.tolist()}')
        if self.joint_stiffness.shape != self.effort_limits.shape:
            raise ConfigError('joint_stiffness and effort_limits need one value per joint')
        if not 1 <= int(iterations) <= 50:
            raise ConfigError(f'iterations must be in [1, 50], got {iterations!r}')
        self.iterations = int(iterations)
        self.yields = 0  # sub-steps in which the reference stalled at the effort limits

    def _equilibrium(self, q_ref: np.ndarray, q_start: np.ndarray, lower: np.ndarray,
                     upper: np.ndarray, iterations: int | None = None
                     ) -> tuple[np.ndarray, list[Contact]]:
        """Return the configuration where spring and contact torques balance, and its contacts.

        Minimises ``0.5 (q - q_ref)^T K (q - q_ref) + sum 0.5 k d_i(q)^2`` from ``q_start`` by
        Gauss-Newton steps on the contacts linearised at each iterate (free of contacts the
        minimum is ``q_ref`` itself, one step away).
        """
        k_joint = self.joint_stiffness
        q = np.clip(q_start, lower, upper)
        contacts = self.query(q)
        for _ in range(self.iterations if iterations is None else iterations):
            if not contacts:
                if np.array_equal(q, q_ref):
                    break
                q = q_ref.copy()  # nothing but the springs: their minimum, exactly
                contacts = self.query(q)
                continue
            grad = k_joint * (q - q_ref)
            hess = np.diag(k_joint)
            for c in contacts:
                jn = c.normal @ c.jacobian  # d(depth)/dq = -jn
                grad -= c.stiffness * c.depth * jn
                hess += c.stiffness * np.outer(jn, jn)
            step = -np.linalg.solve(hess, grad)
            q = np.clip(q + step, lower, upper)
            contacts = self.query(q)
            if float(np.max(np.abs(step))) < 1e-6:  # a micrometre at half a metre
                break
        return q, contacts

    def _load(self, q_ref: np.ndarray, q: np.ndarray) -> float:
        """Return the largest spring torque as a fraction of its joint's effort limit."""
        return float(np.max(np.abs(self.joint_stiffness * (q_ref - q)) / self.effort_limits))

    def settle(self, q_ref: np.ndarray, q_ref_prev: np.ndarray, q_prev: np.ndarray,
               lower: np.ndarray, upper: np.ndarray, max_step: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, list[Contact]]:
        """Return ``(q, q_ref, contacts)`` after one sub-step from ``q_ref_prev`` to ``q_ref``.

        The servo stalls: where the new reference would load a joint spring beyond its effort
        limit, and more than the previous reference did, the reference stays at ``q_ref_prev``
        (a command away from the obstacle always passes). ``q`` moves from ``q_prev`` towards
        the equilibrium at most ``max_step`` per joint (the velocity limits times the sub-step),
        so springing back after a release stays within the joint velocity limits.
        """
        # Warm start: where the arm was, moved by the reference's step (in free motion that is
        # the reference itself, and one collision query settles it).
        free = np.array_equal(q_prev, q_ref_prev)
        start = q_ref if free else q_prev + (q_ref - q_ref_prev)
        q, contacts = self._equilibrium(q_ref, start, lower, upper)
        if contacts and q_ref is not q_ref_prev and self._load(q_ref, q) > max(
                1.0, self._load(q_ref_prev, q_prev)):
            self.yields += 1
            q_ref = q_ref_prev
            # The previous configuration is this reference's equilibrium already: one step.
            q, contacts = self._equilibrium(q_ref, q_prev, lower, upper, iterations=1)
        move = q - q_prev
        scale = float(np.max(np.abs(move) / max_step))
        if scale > 1.0:
            q = q_prev + move / scale
            contacts = self.query(q)
        return q, q_ref, contacts
