"""Instruction-conditioned table-top tasks, their scripted expert, and the world that runs them.

Four tasks share one scene of three coloured blocks: "move to the red / green / blue block"
(success: the tool centre point within 3 cm of the point 3 cm above the block's top face) and
"pick up the red block" (success: the block held and lifted 5 cm). ``World`` combines a
``SimArm``, the blocks and the renderer: ``reset(seed, task)`` draws block positions and a
start pose from the seed, ``step_delta`` applies one 7D end-effector delta at the policy rate
(dx dy dz [m], droll dpitch dyaw [rad], gripper raw in [0, 1] with 1 = open, the Bridge
convention) either as the constant twist the safety node would send for one action period or
as a pose target, and ``observe`` renders the camera frame. The arm touches the table and the
blocks (``vla_ros.sim.contact``): pressing on them it meets a penalty force and yields like a
joint-impedance controlled arm, and a block pushed from the side slides along the table (without
friction) instead of resisting. Grasping is kinematic: a block whose centre is within a small
tolerance of the tool centre point when the closing fingers reach its width attaches to the
hand until the gripper opens, then drops to the table. The scripted expert is a pure function
of the world state, bounded to 2 cm and 0.1 rad per step (0.1 m/s at 5 Hz, gentle enough for a
safety limiter); it makes the demonstrations and the baseline, next to a random policy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pinocchio as pin

from vla_ros.core.errors import ConfigError, InstructionError
from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.sim.arm import SimArm
from vla_ros.sim.contact import ArmGeometry, Contact, ContactSolver, default_joint_stiffness
from vla_ros.sim.scene import (
    BLOCK_COLOURS,
    BLOCK_SIZE,
    GRIPPER_DOWN,
    GRIPPER_MAX_WIDTH,
    Block,
    Camera,
    Renderer,
    Scene,
    yaw_matrix,
)
from vla_ros.sim.state import ContactPair, ContactTruth, WorldState

__all__ = [
    'TASKS',
    'Task',
    'World',
    'WorldState',
    'expert_action',
    'random_action',
    'sample_layout',
    'success',
    'task_for_instruction',
]

logger = logging.getLogger(__name__)

#: Policy rate of the tasks: one 7D delta every 0.2 s (5 Hz).
ACTION_PERIOD = 0.2
#: Reach tasks: the goal is this far above the block's top face [m] ...
REACH_HOVER = 0.03
#: ... and success is the tool centre point within this distance of it [m].
REACH_TOLERANCE = 0.03
#: Pick task: success is the held block lifted this far above its resting height [m].
LIFT_HEIGHT = 0.05
#: A block attaches when its centre is this close to the tool centre point, per axis [m].
GRASP_TOLERANCE = 0.015
#: Largest expert translation [m] and rotation [rad] per step.
EXPERT_MAX_STEP = 0.02
EXPERT_MAX_ROTATION = 0.1
#: Where blocks are placed (base frame, x range and y range [m]) and how far apart at least.
BLOCK_X_RANGE = (0.38, 0.62)
BLOCK_Y_RANGE = (-0.20, 0.20)
BLOCK_MIN_SEPARATION = 0.08
#: Where the tool centre point starts (x, y, z ranges [m]), gripper down and open.
START_RANGE = ((0.35, 0.50), (-0.10, 0.10), (0.22, 0.32))

_PREGRASP_HEIGHT = 0.08  # tool centre point above the block centre before descending [m]
_ALIGN_TOLERANCE = 0.012  # horizontal alignment before descending [m]
_AT_GRASP = 0.008  # the expert closes the gripper within this distance of the grasp point [m]
# A block contact whose normal is at least this horizontal pushes the block instead of the arm,
# which slides it this much further than the penetration [m].
_SLIDE_NORMAL = 0.7
_SLIDE_CLEARANCE = 1e-4
_ONSET_BISECTIONS = 8  # contact onset located to 1/256 of an integration sub-step


@dataclass(frozen=True)
class Task:
    """One instruction-conditioned task: a kind (``reach`` or ``pick``) and a target block."""

    name: str
    instruction: str
    kind: str
    target: str
    max_steps: int = 60

    def __post_init__(self) -> None:
        """Validate the fields."""
        if self.kind not in ('reach', 'pick'):
            raise ConfigError(f'task {self.name!r}: kind must be reach or pick, got {self.kind!r}')
        if self.target not in BLOCK_COLOURS:
            raise ConfigError(f'task {self.name!r}: target must be one of '
                              f'{sorted(BLOCK_COLOURS)}, got {self.target!r}')
        if self.max_steps < 1:
            raise ConfigError(f'task {self.name!r}: max_steps must be >= 1')


TASKS: dict[str, Task] = {
    task.name: task for task in (
        Task('reach_red', 'move to the red block', 'reach', 'red'),
        Task('reach_green', 'move to the green block', 'reach', 'green'),
        Task('reach_blue', 'move to the blue block', 'reach', 'blue'),
        Task('pick_red', 'pick up the red block', 'pick', 'red'),
    )
}


def _normalise(text: str) -> str:
    """Return ``text`` lower-cased, with single spaces and no trailing punctuation."""
    return ' '.join(text.lower().split()).rstrip('.!?')


def task_for_instruction(instruction: str) -> Task:
    """Return the task whose instruction matches ``instruction`` (case and spaces ignored).

    Raises:
        InstructionError: no task has this instruction (the message lists the known ones).

    """
    if not isinstance(instruction, str):
        raise InstructionError(f'instruction must be text, got {type(instruction)!r}')
    wanted = _normalise(instruction)
    for task in TASKS.values():
        if _normalise(task.instruction) == wanted:
            return task
    known = [task.instruction for task in TASKS.values()]
    raise InstructionError(f'no simulated task for instruction {instruction!r}; known: {known}')


def _resolve_task(task: Task | str) -> Task:
    """Return ``task`` itself, or the task with this name or instruction."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in TASKS:
        return TASKS[task]
    if isinstance(task, str):
        return task_for_instruction(task)
    raise ConfigError(f'task must be a Task, a task name {sorted(TASKS)} or an instruction, '
                      f'got {task!r}')


def sample_layout(rng: np.random.Generator, table_height: float = 0.0,
                  block_size: float = BLOCK_SIZE) -> dict[str, np.ndarray]:
    """Return block centres (by colour name) drawn uniformly in the block area, spread apart."""
    for _ in range(1000):
        xy = np.column_stack([rng.uniform(*BLOCK_X_RANGE, size=len(BLOCK_COLOURS)),
                              rng.uniform(*BLOCK_Y_RANGE, size=len(BLOCK_COLOURS))])
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy))
        if gaps.min() >= BLOCK_MIN_SEPARATION:
            break
    else:  # pragma: no cover - the area holds three blocks easily
        raise ConfigError('cannot place the blocks apart; the block area is too small')
    z = table_height + block_size / 2.0
    return {name: np.array([x, y, z]) for name, (x, y) in zip(BLOCK_COLOURS, xy, strict=True)}


def _reach_goal(task: Task, state: WorldState) -> np.ndarray:
    """Return the point above the target block that a reach task aims at."""
    return state.blocks[task.target] + np.array([0.0, 0.0, state.block_size / 2 + REACH_HOVER])


def success(task: Task | str, state: WorldState) -> bool:
    """Return whether ``state`` completes ``task``."""
    task = _resolve_task(task)
    if task.kind == 'reach':
        return bool(np.linalg.norm(state.tcp_position - _reach_goal(task, state))
                    <= REACH_TOLERANCE)
    rest = state.table_height + state.block_size / 2.0
    block = state.blocks[task.target]
    return state.held == task.target and bool(block[2] - rest >= LIFT_HEIGHT)


def _towards(goal: np.ndarray, state: WorldState, max_step: float) -> np.ndarray:
    """Return the translation towards ``goal``, at most ``max_step`` long."""
    move = goal - state.tcp_position
    norm = float(np.linalg.norm(move))
    return move * (max_step / norm) if norm > max_step else move


def _level(state: WorldState, max_rotation: float) -> np.ndarray:
    """Return the rotation (roll, pitch, yaw) that brings the gripper back to pointing down."""
    error = np.array(pin.log3(GRIPPER_DOWN @ state.tcp_rotation.T))
    norm = float(np.linalg.norm(error))
    return error * (max_rotation / norm) if norm > max_rotation else error


def expert_action(task: Task | str, state: WorldState, max_step: float = EXPERT_MAX_STEP,
                  max_rotation: float = EXPERT_MAX_ROTATION) -> np.ndarray:
    """Return the scripted expert's 7D delta for ``state`` (a pure function of the state).

    Reach: fly to the point above the target block with the gripper open. Pick: align above
    the block with the gripper open, descend, close at the grasp point, then lift; a gripper
    that closed anywhere else opens first. Translations are at most ``max_step`` [m] long,
    rotations (always a correction back to pointing down) at most ``max_rotation`` [rad]; the
    last entry is the gripper, 1 = open, 0 = closed.
    """
    task = _resolve_task(task)
    if not (0.0 < max_step and 0.0 <= max_rotation):
        raise ConfigError('max_step must be > 0 and max_rotation >= 0')
    block = state.blocks[task.target]
    gripper = 1.0
    if task.kind == 'reach':
        goal = _reach_goal(task, state)
    elif state.held == task.target:
        goal = np.array([block[0], block[1],
                         state.table_height + state.block_size / 2 + LIFT_HEIGHT + 0.02])
        goal = state.tcp_position + (goal - block)  # move the block, not the tool point
        gripper = 0.0
    else:
        grasp = block.copy()
        above = block + np.array([0.0, 0.0, _PREGRASP_HEIGHT])
        at_grasp = float(np.linalg.norm(state.tcp_position - grasp)) < _AT_GRASP
        aligned = float(np.linalg.norm(state.tcp_position[:2] - block[:2])) < _ALIGN_TOLERANCE
        if state.held is not None:
            goal = state.tcp_position + np.array([0.0, 0.0, max_step])  # let the wrong one go
        elif at_grasp and state.gripper < 0.9:
            goal, gripper = grasp, 0.0
        elif state.gripper > 0.05:
            goal = state.tcp_position  # closed away from the grasp point: open in place first
        elif not aligned:
            goal = above
        else:
            goal = grasp
    action = np.zeros(7)
    action[:3] = _towards(goal, state, max_step)
    action[3:6] = _level(state, max_rotation)
    action[6] = gripper
    return action


def random_action(rng: np.random.Generator, max_step: float = EXPERT_MAX_STEP,
                  max_rotation: float = 0.05) -> np.ndarray:
    """Return a uniformly random 7D delta within the expert's bounds (the baseline policy)."""
    action = np.empty(7)
    action[:3] = rng.uniform(-max_step, max_step, size=3)
    action[3:6] = rng.uniform(-max_rotation, max_rotation, size=3)
    action[6] = float(rng.integers(0, 2))
    return action


class World:
    """A simulated arm, three blocks and a camera, stepped by 7D deltas at the policy rate.

    Args:
        kinematics: the arm model; default the bundled ``panda.urdf``.
        camera: the camera that ``observe`` renders; default ``Camera.default()``.
        period: the action period [s] (0.2 s = 5 Hz).
        control: ``'twist'`` applies each delta as the constant twist ``delta / period`` for
            one period, as the safety node does through Servo; ``'pose'`` tracks the delta as a
            pose target (``SimArm.apply_delta``).
        table_height: the height of the table top in the base frame [m].
        dt: the arm's integration sub-step [s].
        contact: whether the arm touches the table and the blocks; without it the arm is
            kinematic and passes through everything.
        urdf_path: the URDF of the collision model; default ``kinematics.source`` (the file the
            kinematics was loaded from).

    """

    def __init__(self, kinematics: ArmKinematics | None = None, camera: Camera | None = None,
                 period: float = ACTION_PERIOD, control: str = 'twist',
                 table_height: float = 0.0, dt: float = 0.01, contact: bool = True,
                 urdf_path: str | None = None) -> None:
        """Build the world; call ``reset`` before stepping."""
        if control not in ('twist', 'pose'):
            raise ConfigError(f"control must be 'twist' or 'pose', got {control!r}")
        if not math.isfinite(table_height):
            raise ConfigError(f'table_height must be finite, got {table_height!r}')
        kin = kinematics or ArmKinematics.from_urdf_file(default_urdf_path())
        self.table_height = float(table_height)
        self.block_size = BLOCK_SIZE
        self.geometry: ArmGeometry | None = None
        solver = None
        if contact:
            self.geometry = ArmGeometry(urdf_path or kin.source, kin.joint_names,
                                        list(BLOCK_COLOURS), self.block_size)
            self.geometry.set_table(self.table_height)
            solver = ContactSolver(self._contacts_at, default_joint_stiffness(kin.n_joints),
                                   self.geometry.effort_limits)
        self.arm = SimArm(kin, dt=dt, action_period=period, contact=solver)
        self.arm.on_substep = self._on_substep
        self.camera = camera or Camera.default()
        self.renderer = Renderer(self.camera)
        self.period = self.arm.action_period
        self.control = control
        self.task: Task = TASKS['reach_red']
        self.seed: int | None = None
        self.blocks: dict[str, np.ndarray] = {}
        self.held: str | None = None
        self.steps = 0
        self._held_offset = np.zeros(3)
        self._held_yaw = 0.0
        self._yaws: dict[str, float] = {}
        self._place_blocks(sample_layout(np.random.default_rng(0), self.table_height))
        self._last_width = self.gripper_width()
        self._last_q = self.arm.q
        self._last_time = 0.0
        self._contact = ContactTruth()

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int, task: Task | str | None = None) -> WorldState:
        """Start an episode: blocks and the start pose from ``seed``, gripper open, at rest.

        The same seed gives the same layout for every task.
        """
        if task is not None:
            self.task = _resolve_task(task)
        rng = np.random.default_rng(seed)
        self.seed = int(seed)
        self.held = None
        if self.geometry is not None:
            self.geometry.hold(None)
        self._place_blocks(sample_layout(rng, self.table_height, self.block_size))
        start = np.array([rng.uniform(*bounds) for bounds in START_RANGE])
        start[2] += self.table_height
        self.arm.reset()
        if not self.arm.move_to_pose(start, GRIPPER_DOWN):
            logger.warning('start pose %s not reached exactly', start.tolist())
        self.arm.set_gripper_stop(None)
        self.steps = 0
        self._last_width = self.gripper_width()
        self._last_q = self.arm.q
        self._last_time = self.arm.time
        self._contact = ContactTruth()
        return self.state()

    def place_tool(self, position: Sequence[float], rotation: np.ndarray = GRIPPER_DOWN) -> bool:
        """Teleport the tool centre point to a pose (IK, at rest); for tests and benchmarks.

        Contact bookkeeping restarts from there (no contact event spans the jump). Returns
        whether the pose was reached exactly.
        """
        reached = self.arm.move_to_pose(position, rotation)
        self._last_q = self.arm.q
        self._last_time = self.arm.time
        self._contact = ContactTruth()
        return reached

    def _place_blocks(self, blocks: dict[str, np.ndarray]) -> None:
        """Put the blocks at the given centres, unturned."""
        self.blocks = blocks
        self._yaws = dict.fromkeys(blocks, 0.0)
        for name in blocks:
            self._block_moved(name)

    def _block_moved(self, name: str) -> None:
        """Tell the collision model where block ``name`` is now."""
        if self.geometry is not None:
            self.geometry.set_block(name, self.blocks[name], self._yaws[name])

    def state(self) -> WorldState:
        """Return a snapshot of the world now (time: the arm's sim time since the reset)."""
        position, rotation = self.arm.ee_transform()
        return WorldState(tcp_position=position, tcp_rotation=rotation,
                          gripper=self.arm.gripper, gripper_width=self.gripper_width(),
                          blocks={k: v.copy() for k, v in self.blocks.items()}, held=self.held,
                          table_height=self.table_height, step=self.steps,
                          block_size=self.block_size, task=self.task.name, seed=self.seed,
                          time=self.arm.time, contact=self._contact)

    def success(self) -> bool:
        """Return whether the current state completes the current task."""
        return success(self.task, self.state())

    def gripper_width(self) -> float:
        """Return the distance between the fingers now [m]."""
        return GRIPPER_MAX_WIDTH * (1.0 - self.arm.gripper)

    # ------------------------------------------------------------------ commands
    def step_delta(self, delta7: Sequence[float]) -> WorldState:
        """Apply one 7D delta over one action period and return the new state.

        A non-finite delta is ignored: the arm holds for the period (counted in
        ``arm.counters``).
        """
        delta = np.asarray(delta7, dtype=float).reshape(-1)
        if delta.shape != (7,):
            raise ConfigError(f'delta7 must be 7 numbers, got shape {delta.shape}')
        if self.control == 'pose':
            self.arm.apply_delta(delta, self.period)
        else:
            if np.all(np.isfinite(delta)):
                self.arm.set_gripper(1.0 - min(max(float(delta[6]), 0.0), 1.0))
            self.arm.apply_twist(delta[:6] / self.period, self.period)
        self.steps += 1
        return self.state()

    def apply_twist(self, twist: Sequence[float], dt: float) -> bool:
        """Integrate a base-frame end-effector twist for ``dt`` seconds (the Servo path)."""
        return self.arm.apply_twist(twist, dt)

    def set_gripper(self, closedness: float) -> bool:
        """Command the gripper: 0 = open, 1 = closed (the ``/vla/gripper_command`` value)."""
        return self.arm.set_gripper(closedness)

    # ------------------------------------------------------------------ contact
    def _contacts_at(self, q: np.ndarray) -> list[Contact]:
        """Return the contacts that press on the arm at ``q``; blocks pushed sideways slide.

        A block touched with a mostly horizontal normal moves along the table out of the way
        (by the horizontal distance that ends the penetration); what presses from above or
        below stays a contact.
        """
        geometry = self.geometry
        if geometry is None:
            return []
        geometry.set_gripper_width(self.gripper_width())
        contacts = geometry.contacts(q)
        for _ in range(4):
            pushed = False
            for c in contacts:
                block = self.blocks.get(c.obstacle)
                horizontal = float(np.hypot(c.normal[0], c.normal[1]))
                if block is None or c.obstacle == self.held or horizontal < _SLIDE_NORMAL:
                    continue
                block[:2] -= (c.depth + _SLIDE_CLEARANCE) * c.normal[:2] / horizontal ** 2
                self._block_moved(c.obstacle)
                pushed = True
            if not pushed:
                break
            contacts = geometry.contacts(q)
        return contacts

    def _onset(self, q_prev: np.ndarray, q_now: np.ndarray) -> float:
        """Return when, inside the last sub-step, the arm first touched (bisection on the path)."""
        geometry = self.geometry
        lo, hi = 0.0, 1.0
        if geometry is None:
            return self.arm.time
        if geometry.contacts(q_prev):
            hi = 0.0
        for _ in range(_ONSET_BISECTIONS if hi > 0.0 else 0):
            mid = 0.5 * (lo + hi)
            if geometry.contacts(q_prev + mid * (q_now - q_prev)):
                hi = mid
            else:
                lo = mid
        return self._last_time + hi * (self.arm.time - self._last_time)

    def _record_contact(self) -> None:
        """Update the contact ground truth after a sub-step."""
        contacts = sorted(self.arm.contacts, key=lambda c: -c.depth)
        truth = self._contact
        pairs = tuple(ContactPair(c.body, c.obstacle, c.depth, c.force) for c in contacts)
        wrench = self.arm.tool_wrench() if contacts else np.zeros(6)
        if contacts and not truth.active:
            # The reference path of this sub-step, from where the arm was to where it was sent.
            onset = self._onset(self._last_q, self.arm.q_ref)
            truth = ContactTruth(pairs, wrench, onset, None,
                                 (contacts[0].body, contacts[0].obstacle), contacts[0].depth)
        elif contacts:
            truth = ContactTruth(pairs, wrench, truth.onset, None, truth.pair,
                                 max(truth.peak_depth, contacts[0].depth))
        elif truth.active:
            truth = ContactTruth((), wrench, truth.onset, self.arm.time, truth.pair,
                                 truth.peak_depth)
        else:
            return
        self._contact = truth

    def _on_substep(self) -> None:
        """After every integration sub-step: grasp or release, contact ground truth."""
        self._update_grasp(self._last_width)
        if self.geometry is not None:
            self._record_contact()
        self._last_width = self.gripper_width()
        self._last_q = self.arm.q
        self._last_time = self.arm.time

    def _update_grasp(self, width_before: float) -> None:
        """Attach a block the fingers closed on, move the held one, drop it when released."""
        position, rotation = self.arm.ee_transform()
        size = self.block_size
        if self.held is None:
            width = self.gripper_width()
            if not (width_before >= size - 1e-3 and width <= size + 1e-3):
                return
            near = [(float(np.linalg.norm(p - position)), name) for name, p in self.blocks.items()
                    if np.all(np.abs(p - position) <= GRASP_TOLERANCE)]
            if not near:
                return
            self.held = min(near)[1]
            self._held_offset = rotation.T @ (self.blocks[self.held] - position)
            self._held_yaw = self._yaws[self.held] - _yaw_of(rotation)
            self.arm.set_gripper_stop(1.0 - size / GRIPPER_MAX_WIDTH)
            if self.geometry is not None:
                self.geometry.hold(self.held, rotation.T @ yaw_matrix(self._yaws[self.held]),
                                   self._held_offset)
            logger.debug('grasped the %s block', self.held)
            return
        if self.arm.gripper_target < 1.0 - size / GRIPPER_MAX_WIDTH - 1e-6 \
                and self.gripper_width() > size + 2e-3:
            name = self.held
            self.blocks[name][2] = self.table_height + size / 2.0
            logger.debug('released the %s block', name)
            self.held = None
            self.arm.set_gripper_stop(None)
            if self.geometry is not None:
                self.geometry.hold(None)
            self._block_moved(name)
            return
        self.blocks[self.held] = position + rotation @ self._held_offset
        self._yaws[self.held] = self._held_yaw + _yaw_of(rotation)

    # ------------------------------------------------------------------ rendering
    def scene(self) -> Scene:
        """Return the scene to render now."""
        position, rotation = self.arm.ee_transform()
        blocks = [Block(name, pos, BLOCK_COLOURS[name], self.block_size, self._yaws[name])
                  for name, pos in self.blocks.items()]
        width = min(max(self.gripper_width(), 0.0), GRIPPER_MAX_WIDTH)
        return Scene(blocks=blocks, table_height=self.table_height, gripper_position=position,
                     gripper_rotation=rotation, gripper_width=width)

    def observe(self) -> np.ndarray:
        """Return the camera frame now: (height, width, 3) uint8 RGB."""
        return self.renderer.render(self.scene())


def _yaw_of(rotation: np.ndarray) -> float:
    """Return the heading of a rotation's x axis about the base z axis [rad]."""
    return math.atan2(float(rotation[1, 0]), float(rotation[0, 0]))
