"""A 7-DoF arm that integrates end-effector twists, standing in for MoveIt Servo and a driver.

``SimArm`` holds joint positions and a parallel gripper, and moves them only through what a
servo driver would do: a Cartesian twist in the base frame becomes joint velocities by damped
least squares on the URDF Jacobian (``ArmKinematics``), scaled down as a whole where a joint
would exceed its velocity limit, integrated in small sub-steps and clamped to the joint position
limits. It never crosses a limit; instead it counts every clamp, and it ignores (and counts)
non-finite commands, holding still. A zero twist holds the pose exactly. The gripper closes and
opens at a limited rate and can be stopped by a grasped object. A pose-target mode moves the
end effector by one 7D delta (OpenVLA / Bridge convention) over one action period, closing the
loop on the pose inside the period so that orientation drift does not accumulate. What the
servo integrates is the commanded (reference) configuration; with a ``ContactSolver`` the actual
configuration settles between it and the obstacles through joint springs (``vla_ros.sim.contact``)
and the arm reports its contacts, external joint torques and tool wrench; without one the
actual configuration is the reference, a purely kinematic arm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pinocchio as pin

from vla_ros.core.errors import ConfigError
from vla_ros.core.kinematics import (
    ArmKinematics,
    JointStateError,
    rotation_to_quat_xyzw,
    solve_twist,
)
from vla_ros.sim.contact import Contact, ContactSolver, external_torque, tool_wrench

__all__ = ['ArmCounters', 'SimArm', 'rotation_to_quat_xyzw']

logger = logging.getLogger(__name__)

# Longest interval one apply call may integrate; a larger one is a caller bug (a stalled timer).
MAX_APPLY_DT = 2.0


@dataclass
class ArmCounters:
    """What the arm had to refuse or limit since the last reset (for tests and diagnostics).

    ``velocity_clamps`` and ``position_clamps`` count integration sub-steps in which the joint
    velocity had to be scaled down or a joint was stopped at its position limit;
    ``nonfinite_ignored`` counts commands (twists, deltas, gripper values) that were not
    finite and were ignored.
    """

    velocity_clamps: int = 0
    position_clamps: int = 0
    nonfinite_ignored: int = 0


def _finite_vector(value: object, size: int, name: str) -> np.ndarray:
    """Return ``value`` as a float vector of ``size`` (entries may be non-finite).

    Raises:
        ConfigError: ``value`` is not ``size`` numbers.

    """
    try:
        array = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'{name} must be {size} numbers, got {value!r}') from exc
    if array.shape != (size,):
        raise ConfigError(f'{name} must be {size} numbers, got shape {array.shape}')
    return array


def _check_interval(dt: object, name: str = 'dt') -> float:
    """Return ``dt`` as a float in (0, MAX_APPLY_DT] or raise ConfigError."""
    try:
        value = float(dt)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'{name} must be a number of seconds, got {dt!r}') from exc
    if not (math.isfinite(value) and 0.0 < value <= MAX_APPLY_DT):
        raise ConfigError(f'{name} must be in (0, {MAX_APPLY_DT}] s, got {dt!r}')
    return value


class SimArm:
    """A kinematic arm driven by end-effector twists or pose deltas, plus a gripper.

    Args:
        kinematics: the arm model (joint order, limits, FK and Jacobian).
        q0: the initial joint positions in ``kinematics.joint_names`` order; default the
            model's ``neutral()`` pose. Must lie within the joint limits.
        dt: the longest integration sub-step [s].
        damping: the damped-least-squares factor [m] (larger: smoother near singularities,
            less exact tracking).
        gripper_speed: how fast the gripper closedness may change [1/s] (1 / full-stroke time).
        action_period: the default period of ``apply_delta`` [s] (0.2 s for a 5 Hz policy).
        velocity_scale: the fraction of the URDF joint velocity limits the arm may use.
        contact: settles the actual configuration against obstacles (None: kinematic arm).

    ``on_substep``, when set, is called after every integration sub-step (the world attaches
    grasped blocks and records contact there).

    Raises:
        ConfigError: a parameter is out of range.
        JointStateError: ``q0`` has the wrong size, is not finite or is outside the limits.

    """

    def __init__(self, kinematics: ArmKinematics, q0: Sequence[float] | None = None,
                 dt: float = 0.01, damping: float = 0.02, gripper_speed: float = 2.5,
                 action_period: float = 0.2, velocity_scale: float = 1.0,
                 contact: ContactSolver | None = None) -> None:
        """Build the arm at ``q0`` with the gripper open."""
        if not isinstance(kinematics, ArmKinematics):
            raise ConfigError(f'SimArm needs an ArmKinematics, got {type(kinematics)!r}')
        self.kinematics = kinematics
        self.dt = _check_interval(dt)
        self.action_period = _check_interval(action_period, 'action_period')
        try:
            damping, gripper_speed, velocity_scale = (
                float(damping), float(gripper_speed), float(velocity_scale))
        except (TypeError, ValueError) as exc:
            raise ConfigError('damping, gripper_speed and velocity_scale must be numbers: '
                              f'{exc}') from exc
        if not (0.0 <= damping < math.inf and 0.0 < gripper_speed < math.inf
                and 0.0 < velocity_scale <= 1.0):
            raise ConfigError('need damping >= 0, gripper_speed > 0 and velocity_scale in '
                              f'(0, 1], got {damping!r}, {gripper_speed!r}, {velocity_scale!r}')
        self.damping = damping
        self.gripper_speed = gripper_speed
        self._vmax = kinematics.velocity_limits * velocity_scale
        if contact is not None and not isinstance(contact, ContactSolver):
            raise ConfigError(f'contact must be a ContactSolver or None, got {type(contact)!r}')
        self.contact = contact
        self.on_substep: Callable[[], None] | None = None
        self.contacts: list[Contact] = []
        self.counters = ArmCounters()
        self.time = 0.0
        self._q = kinematics.neutral()
        self._q_ref = self._q.copy()
        self._qdot = np.zeros(kinematics.n_joints)
        self._gripper = 0.0
        self._gripper_target = 0.0
        self._gripper_stop: float | None = None
        self.last_clamped = False
        self.reset(q0)

    # ------------------------------------------------------------------ state
    @property
    def joint_names(self) -> list[str]:
        """The joint names in the order of every ``q`` here."""
        return list(self.kinematics.joint_names)

    @property
    def q(self) -> np.ndarray:
        """The joint positions (a copy)."""
        return self._q.copy()

    @property
    def q_ref(self) -> np.ndarray:
        """The commanded (reference) joint positions (a copy); ``q`` except in contact."""
        return self._q_ref.copy()

    @property
    def qdot(self) -> np.ndarray:
        """The joint velocities of the last integration sub-step (a copy)."""
        return self._qdot.copy()

    @property
    def gripper(self) -> float:
        """The gripper closedness now: 0 = fully open, 1 = fully closed."""
        return self._gripper

    @property
    def gripper_target(self) -> float:
        """The commanded gripper closedness (0 = open, 1 = closed)."""
        return self._gripper_target

    def reset(self, q0: Sequence[float] | None = None, gripper: float = 0.0) -> None:
        """Place the arm at ``q0`` (default ``neutral()``), at rest, gripper at ``gripper``.

        Raises:
            JointStateError: ``q0`` has the wrong size, is not finite or is outside the limits.
            ConfigError: ``gripper`` is not in [0, 1].

        """
        kin = self.kinematics
        q = kin.neutral() if q0 is None else np.array(q0, dtype=float).reshape(-1)
        if q.shape != (kin.n_joints,) or not np.all(np.isfinite(q)):
            raise JointStateError(f'q0 must be {kin.n_joints} finite joint positions in order '
                                  f'{kin.joint_names}, got {q0!r}')
        if not kin.within_limits(q):
            raise JointStateError(f'q0 {q.tolist()} is outside the joint limits '
                                  f'[{kin.lower.tolist()}, {kin.upper.tolist()}]')
        if not (math.isfinite(gripper) and 0.0 <= gripper <= 1.0):
            raise ConfigError(f'gripper must be in [0, 1], got {gripper!r}')
        self._q = q
        self._q_ref = q.copy()
        self.contacts = []
        self._qdot = np.zeros(kin.n_joints)
        self._gripper = self._gripper_target = float(gripper)
        self._gripper_stop = None
        self.counters = ArmCounters()
        self.time = 0.0
        self.last_clamped = False

    def joint_state(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Return ``(names, positions, velocities)`` as a JointState would carry them."""
        return self.joint_names, self.q, self.qdot

    def external_torque(self) -> np.ndarray:
        """Return the joint torques the contacts exert now, ``sum J_i^T f_i`` [N m]."""
        return external_torque(self.contacts, self.kinematics.n_joints)

    def tool_wrench(self) -> np.ndarray:
        """Return the contact wrench on the tool now: force [N], torque about the TCP [N m].

        Both in base-frame axes; only the hand, the fingers and a held block count.
        """
        return tool_wrench(self.contacts, self.kinematics.fk(self._q)[0])

    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the end-effector position [m] and orientation quaternion (x, y, z, w)."""
        position, rotation = self.kinematics.fk(self._q)
        return position, rotation_to_quat_xyzw(rotation)

    def ee_transform(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the end-effector position (3,) [m] and rotation matrix (3, 3)."""
        return self.kinematics.fk(self._q)

    # ------------------------------------------------------------------ gripper
    def set_gripper(self, closedness: float) -> bool:
        """Command the gripper: 0 = open, 1 = closed (clipped to [0, 1]).

        The gripper moves there at ``gripper_speed`` while the arm integrates. A non-finite
        value is ignored and counted; returns whether the command was taken.
        """
        try:
            value = float(closedness)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f'gripper closedness must be a number, got {closedness!r}') from exc
        if not math.isfinite(value):
            self.counters.nonfinite_ignored += 1
            logger.warning('ignoring non-finite gripper command %r', closedness)
            return False
        self._gripper_target = min(max(value, 0.0), 1.0)
        return True

    def set_gripper_stop(self, closedness: float | None) -> None:
        """Stop the fingers at ``closedness`` (an object between them), or None to free them."""
        if closedness is not None and not (math.isfinite(closedness)
                                           and 0.0 <= closedness <= 1.0):
            raise ConfigError(f'gripper stop must be in [0, 1] or None, got {closedness!r}')
        self._gripper_stop = None if closedness is None else float(closedness)
        if self._gripper_stop is not None:
            self._gripper = min(self._gripper, self._gripper_stop)

    def _advance_gripper(self, dt: float) -> None:
        """Move the gripper towards its target for ``dt`` seconds at the rate limit."""
        target = self._gripper_target
        if self._gripper_stop is not None:
            target = min(target, self._gripper_stop)
        step = self.gripper_speed * dt
        self._gripper += float(np.clip(target - self._gripper, -step, step))

    # ------------------------------------------------------------------ motion
    def _substep(self, twist: np.ndarray | None, h: float) -> None:
        """Integrate one sub-step of ``h`` seconds of a finite base-frame ``twist`` (None: hold).

        The reference follows the twist within the limits, the gripper moves, then the actual
        configuration settles against the obstacles (or is the reference, without contact).
        """
        kin = self.kinematics
        q_ref_prev = self._q_ref
        if twist is not None and np.any(twist):
            qdot = solve_twist(kin.jacobian(self._q_ref), twist, self.damping)
            ratio = float(np.max(np.abs(qdot) / self._vmax))
            if ratio > 1.0:
                qdot /= ratio
                self.counters.velocity_clamps += 1
                self.last_clamped = True
            q_new = self._q_ref + qdot * h
            clamped = np.clip(q_new, kin.lower, kin.upper)
            if np.any(clamped != q_new):
                self.counters.position_clamps += 1
                self.last_clamped = True
            self._q_ref = clamped
        self._advance_gripper(h)
        q_prev = self._q
        if self.contact is None:
            self._q = self._q_ref.copy()
        else:
            self._q, self._q_ref, self.contacts = self.contact.settle(
                self._q_ref, q_ref_prev, q_prev, kin.lower, kin.upper, self._vmax * h)
        self._qdot = (self._q - q_prev) / h
        self.time += h
        if self.on_substep is not None:
            self.on_substep()

    def _substeps(self, dt: float) -> tuple[int, float]:
        """Return how many sub-steps of what length integrate ``dt`` seconds."""
        count = max(1, math.ceil(dt / self.dt - 1e-9))
        return count, dt / count

    def apply_twist(self, twist: Sequence[float], dt: float) -> bool:
        """Move for ``dt`` seconds with a constant end-effector twist.

        ``twist`` is (vx, vy, vz [m/s], wx, wy, wz [rad/s]) in the base frame, the velocity of
        the end-effector frame's origin and its angular velocity. A non-finite twist is ignored
        (the arm holds still) and counted; the gripper keeps moving either way. Returns whether
        the twist was applied.

        Raises:
            ConfigError: ``twist`` is not 6 numbers or ``dt`` is not in (0, 2] s.

        """
        tw = _finite_vector(twist, 6, 'twist')
        dt = _check_interval(dt)
        self.last_clamped = False
        count, h = self._substeps(dt)
        finite = bool(np.all(np.isfinite(tw)))
        if not finite:
            self.counters.nonfinite_ignored += 1
            logger.warning('ignoring non-finite twist %s', tw.tolist())
        for _ in range(count):
            self._substep(tw if finite else None, h)
        return finite

    def hold(self, dt: float) -> None:
        """Stay still for ``dt`` seconds (the gripper keeps moving towards its target)."""
        self.apply_twist(np.zeros(6), dt)

    def apply_delta(self, delta7: Sequence[float], period: float | None = None) -> bool:
        """Move the end effector by one 7D delta over ``period`` (default ``action_period``).

        ``delta7`` is (dx, dy, dz [m], droll, dpitch, dyaw [rad], gripper) with the translation
        and the rotation (``R_target = Rz(dyaw) Ry(dpitch) Rx(droll) R``) in the base frame and
        the gripper raw in [0, 1], 1 = open (the Bridge convention). The pose target is tracked
        in closed loop over the period, within the same velocity and position limits as
        ``apply_twist``. A non-finite delta is ignored (the arm holds for the period) and
        counted. Returns whether the delta was applied.

        Raises:
            ConfigError: ``delta7`` is not 7 numbers or ``period`` is not in (0, 2] s.

        """
        delta = _finite_vector(delta7, 7, 'delta7')
        period = self.action_period if period is None else _check_interval(period, 'period')
        if not np.all(np.isfinite(delta)):
            self.counters.nonfinite_ignored += 1
            logger.warning('ignoring non-finite delta %s', delta.tolist())
            self.last_clamped = False
            count, h = self._substeps(period)
            for _ in range(count):
                self._substep(None, h)
            return False
        self.set_gripper(1.0 - min(max(delta[6], 0.0), 1.0))
        position, rotation = self.kinematics.fk(self._q)
        target_p = position + delta[:3]
        target_r = pin.rpy.rpyToMatrix(*delta[3:6]) @ rotation
        self.last_clamped = False
        count, h = self._substeps(period)
        for k in range(count):
            remaining = period - k * h
            position, rotation = self.kinematics.fk(self._q_ref)
            twist = np.concatenate([target_p - position,
                                    pin.log3(target_r @ rotation.T)]) / remaining
            self._substep(twist, h)
        return True

    def move_to_pose(self, position: Sequence[float], rotation: np.ndarray,
                     iterations: int = 500, tolerance: float = 1e-5) -> bool:
        """Teleport the arm to joint positions that put the end effector at a pose (IK).

        Damped-least-squares iterations from the current joint positions, within the joint
        limits; for resets and test set-up, not for motion. Returns whether the pose was reached
        within ``tolerance`` (position [m] and rotation [rad]); the arm keeps the best found.
        """
        target_p = _finite_vector(position, 3, 'position')
        target_r = np.asarray(rotation, dtype=float)
        if target_r.shape != (3, 3) or not np.all(np.isfinite(target_p)) \
                or not np.all(np.isfinite(target_r)):
            raise ConfigError('move_to_pose needs a finite position (3,) and rotation (3, 3)')
        kin = self.kinematics
        q = self._q.copy()
        error = np.inf
        for _ in range(iterations):
            pos, rot, jac = kin.fk_and_jacobian(q)
            err = np.concatenate([target_p - pos, pin.log3(target_r @ rot.T)])
            error = float(np.max(np.abs(err)))
            if error < tolerance:
                break
            norm = float(np.linalg.norm(err))
            if norm > 0.05:
                err *= 0.05 / norm  # small steps: full Gauss-Newton steps can diverge
            q = np.clip(q + solve_twist(jac, err, 0.01), kin.lower, kin.upper)
        self._q = q
        self._q_ref = q.copy()
        self.contacts = []
        self._qdot = np.zeros(kin.n_joints)
        return error < tolerance
