"""Tests of the simulated scene renderer, the kinematic arm and the table-top tasks."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest

from vla_ros.core.errors import ConfigError, InstructionError
from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.sim.arm import SimArm, rotation_to_quat_xyzw
from vla_ros.sim.scene import (
    BLUE,
    GREEN,
    GRIPPER_DOWN,
    RED,
    Block,
    Camera,
    Renderer,
    Scene,
    render,
)
from vla_ros.sim.tasks import (
    TASKS,
    World,
    expert_action,
    random_action,
    success,
    task_for_instruction,
)

logger = logging.getLogger(__name__)

STEP_BUDGET = 60
EXPERT_SEEDS = range(100, 120)


@pytest.fixture(scope='module')
def kin() -> ArmKinematics:
    return ArmKinematics.from_urdf_file(default_urdf_path())


@pytest.fixture(scope='module')
def world(kin: ArmKinematics) -> World:
    return World(kinematics=kin)


def _scene(gripper_width: float = 0.08, gripper_at: tuple[float, ...] | None = None) -> Scene:
    blocks = [Block('red', (0.50, 0.10, 0.02), RED), Block('green', (0.40, -0.15, 0.02), GREEN),
              Block('blue', (0.60, -0.05, 0.02), BLUE, yaw=0.3)]
    return Scene(blocks=blocks, gripper_position=None if gripper_at is None else
                 np.array(gripper_at), gripper_width=gripper_width)


# ---------------------------------------------------------------------------- camera / scene
def test_project_known_points() -> None:
    cam = Camera(fx=100.0, fy=120.0, cx=50.0, cy=40.0, width=100, height=80, pose=np.eye(4))
    uv = cam.project(np.array([[0.1, -0.2, 2.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]))
    np.testing.assert_allclose(uv[0], [55.0, 28.0])
    np.testing.assert_allclose(uv[1], [50.0, 40.0])
    assert np.all(np.isnan(uv[2])), 'a point behind the camera must not project'


def test_look_at_frames_target_and_sides() -> None:
    cam = Camera.default()
    centre = (cam.width - 1) / 2.0
    np.testing.assert_allclose(cam.project(np.array([[0.46, 0.0, 0.16]]))[0], [centre, centre],
                               atol=1e-9)
    # The default view faces the robot from the front: the robot's left (+y) is image right,
    # the far side of the table (smaller x) is higher in the image.
    uv = cam.project(np.array([[0.5, 0.2, 0.0], [0.5, -0.2, 0.0], [0.3, 0.0, 0.0],
                               [0.6, 0.0, 0.0]]))
    assert uv[0, 0] > centre > uv[1, 0]
    assert uv[2, 1] < uv[3, 1]
    for corner in ([0.36, -0.22, 0.0], [0.64, 0.22, 0.0]):  # the block area is in view
        u, v = cam.project(np.array([corner]))[0]
        assert 0 <= u < cam.width and 0 <= v < cam.height


def test_camera_rejects_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        Camera(fx=-1.0, fy=100.0, cx=0.0, cy=0.0, width=10, height=10, pose=np.eye(4))
    with pytest.raises(ConfigError):
        Camera(fx=1.0, fy=1.0, cx=0.0, cy=0.0, width=10, height=10, pose=np.ones((4, 4)))
    with pytest.raises(ConfigError):
        Camera.look_at((1.0, 0.0, 0.0), (1.0, 0.0, 0.0))
    with pytest.raises(ConfigError):
        Scene(gripper_position=np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ConfigError):
        Block('red', (0.0, 0.0), RED)


def test_rendered_red_block_colour_at_its_projection() -> None:
    cam = Camera.default()
    image = render(_scene(), cam)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    u, v = np.rint(cam.project(np.array([[0.50, 0.10, 0.04]]))[0]).astype(int)  # top face
    r, g, b = image[v, u].astype(int)
    assert r > 120 and g < 80 and b < 80, (r, g, b)
    big = render(_scene(), Camera.default(640, 480))
    assert big.shape == (480, 640, 3)


def test_nearer_block_occludes_farther_one() -> None:
    cam = Camera.default()
    # Two blocks on one line of sight from the camera: the nearer (larger x) hides the farther.
    eye = cam.position
    far_centre = np.array([0.45, 0.0, 0.02])
    ray = far_centre - eye
    near_centre = eye + ray * 0.93
    u, v = np.rint(cam.project(far_centre[None])[0]).astype(int)
    for first_red in (True, False):  # the list order must not matter
        near = Block('red', near_centre, RED)
        far = Block('blue', far_centre, BLUE)
        blocks = [near, far] if first_red else [far, near]
        r, g, b = render(Scene(blocks=blocks), cam)[v, u].astype(int)
        assert r > 120 and b < 80, (first_red, (r, g, b))
    r, g, b = render(Scene(blocks=[Block('blue', far_centre, BLUE)]), cam)[v, u].astype(int)
    assert b > 120 and r < 80


def test_gripper_opening_changes_image() -> None:
    cam = Camera.default()
    tcp = (0.45, 0.0, 0.15)
    open_img = render(_scene(0.08, tcp), cam).astype(int)
    closed_img = render(_scene(0.0, tcp), cam).astype(int)
    diff = np.abs(open_img - closed_img).sum(-1) > 0
    assert diff.sum() > 20
    u, v = np.rint(cam.project(np.array([tcp]))[0]).astype(int)
    assert diff[v - 8:v + 9, u - 12:u + 13].any(), 'the change must be at the fingers'
    # Pixels far from the gripper (the bottom rows) do not change.
    assert not diff[200:].any()


def test_render_is_deterministic_and_timed(world: World, record_property) -> None:
    world.reset(7, 'pick_red')
    first = world.observe()
    again = World(kinematics=world.arm.kinematics)
    again.reset(7, 'pick_red')
    np.testing.assert_array_equal(first, again.observe())
    np.testing.assert_array_equal(first, render(world.scene(), world.camera))
    for width, height in ((224, 224), (640, 480)):
        renderer = Renderer(Camera.default(width, height))
        scene = world.scene()
        renderer.render(scene)
        start = time.perf_counter()
        n = 20
        for _ in range(n):
            renderer.render(scene)
        ms = (time.perf_counter() - start) / n * 1e3
        record_property(f'render_ms_{width}x{height}', round(ms, 3))
        logger.info('render %dx%d: %.2f ms/frame', width, height, ms)


# ---------------------------------------------------------------------------- arm
def test_pure_x_twist_moves_ee_along_x(kin: ArmKinematics) -> None:
    arm = SimArm(kin)
    p0, r0 = arm.ee_transform()
    assert arm.apply_twist([0.05, 0.0, 0.0, 0.0, 0.0, 0.0], 1.0)
    p1, r1 = arm.ee_transform()
    np.testing.assert_allclose(p1 - p0, [0.05, 0.0, 0.0], atol=2e-3)
    assert np.abs(r1 - r0).max() < 1e-2
    q = arm.q
    arm.apply_twist(np.zeros(6), 0.5)
    np.testing.assert_array_equal(arm.q, q)
    np.testing.assert_array_equal(arm.qdot, np.zeros(kin.n_joints))
    names, positions, velocities = arm.joint_state()
    assert names == kin.joint_names and positions.shape == velocities.shape == (7,)


def test_ee_pose_quaternion_at_home(kin: ArmKinematics) -> None:
    arm = SimArm(kin)
    _, quat = arm.ee_pose()
    _, rotation = arm.ee_transform()
    np.testing.assert_allclose(quat, rotation_to_quat_xyzw(rotation))
    np.testing.assert_allclose(np.abs(quat), [1.0, 0.0, 0.0, 0.0], atol=1e-3)  # pointing down


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_limits_never_crossed_under_random_twists(kin: ArmKinematics, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arm = SimArm(kin)
    vmax = kin.velocity_limits
    for _ in range(400):
        twist = np.concatenate([rng.normal(0, 0.6, 3), rng.normal(0, 2.0, 3)])
        arm.apply_twist(twist, float(rng.uniform(0.01, 0.3)))
        q, qdot = arm.q, arm.qdot
        assert np.all(q >= kin.lower) and np.all(q <= kin.upper)
        assert np.all(np.abs(qdot) <= vmax * (1 + 1e-9))
    assert arm.counters.position_clamps > 0 and arm.counters.velocity_clamps > 0, \
        'the sequence must have pushed against both limits'


def test_non_finite_twists_and_deltas_are_ignored(kin: ArmKinematics) -> None:
    arm = SimArm(kin)
    arm.apply_twist([0.02, 0.0, 0.0, 0.0, 0.0, 0.0], 0.2)
    q = arm.q
    for bad in ([np.nan, 0, 0, 0, 0, 0], [0, 0, np.inf, 0, 0, 0], [0, 0, 0, 0, -np.inf, 0]):
        assert not arm.apply_twist(bad, 0.2)
        np.testing.assert_array_equal(arm.q, q)
        np.testing.assert_array_equal(arm.qdot, np.zeros(7))
    assert not arm.apply_delta([0.01, np.nan, 0, 0, 0, 0, 1.0])
    assert not arm.set_gripper(math.nan)
    np.testing.assert_array_equal(arm.q, q)
    assert arm.counters.nonfinite_ignored == 5
    with pytest.raises(ConfigError):
        arm.apply_twist([0.0, 0.0], 0.1)
    with pytest.raises(ConfigError):
        arm.apply_twist(np.zeros(6), -0.1)


def test_pose_delta_mode_reaches_the_target(kin: ArmKinematics) -> None:
    arm = SimArm(kin)
    p0, r0 = arm.ee_transform()
    assert arm.apply_delta([0.01, -0.02, 0.015, 0.0, 0.0, 0.1, 0.0])
    p1, r1 = arm.ee_transform()
    np.testing.assert_allclose(p1 - p0, [0.01, -0.02, 0.015], atol=1e-4)
    yaw = math.atan2(r1[1, 0], r1[0, 0]) - math.atan2(r0[1, 0], r0[0, 0])
    assert yaw == pytest.approx(0.1, abs=1e-3)
    assert arm.gripper_target == 1.0  # raw 0 = closed in the Bridge convention


def test_gripper_is_rate_limited(kin: ArmKinematics) -> None:
    arm = SimArm(kin, gripper_speed=2.5)
    arm.set_gripper(1.0)
    arm.hold(0.1)
    assert arm.gripper == pytest.approx(0.25)
    arm.hold(1.0)
    assert arm.gripper == pytest.approx(1.0)


# ---------------------------------------------------------------------------- tasks
def test_instructions_map_to_tasks() -> None:
    assert task_for_instruction('Pick up the red block.').name == 'pick_red'
    assert task_for_instruction('move to the  blue block').name == 'reach_blue'
    with pytest.raises(InstructionError):
        task_for_instruction('make coffee')


def test_same_seed_same_layout_different_seed_different(world: World) -> None:
    a = world.reset(3, 'reach_red')
    b = world.reset(3, 'pick_red')
    c = world.reset(4, 'reach_red')
    for name in a.blocks:
        np.testing.assert_array_equal(a.blocks[name], b.blocks[name])
    assert not np.allclose(a.blocks['red'], c.blocks['red'])
    assert not success('reach_red', a)


def _run(world: World, task: str, seed: int, policy) -> tuple[bool, int]:
    state = world.reset(seed, task)
    for step in range(1, STEP_BUDGET + 1):
        state = world.step_delta(policy(state))
        if success(world.task, state):
            return True, step
    return False, STEP_BUDGET


@pytest.mark.parametrize('control', ['twist', 'pose'])
@pytest.mark.parametrize('task', sorted(TASKS))
def test_expert_solves_every_task(kin: ArmKinematics, task: str, control: str,
                                  record_property) -> None:
    world = World(kinematics=kin, control=control)
    largest = 0.0

    def expert(state):
        nonlocal largest
        action = expert_action(world.task, state)
        largest = max(largest, float(np.linalg.norm(action[:3])))
        assert np.linalg.norm(action[3:6]) <= 0.1 + 1e-9 and action[6] in (0.0, 1.0)
        return action

    results = [_run(world, task, seed, expert) for seed in EXPERT_SEEDS]
    solved = [steps for ok, steps in results if ok]
    record_property('expert_success', f'{len(solved)}/{len(results)}')
    record_property('expert_mean_steps', float(np.mean(solved)) if solved else None)
    assert len(solved) == len(results), results
    assert largest <= 0.02 + 1e-9
    assert world.arm.counters.nonfinite_ignored == 0


@pytest.mark.parametrize('task', sorted(TASKS))
def test_random_policy_mostly_fails(world: World, task: str) -> None:
    rng = np.random.default_rng(123)
    results = [_run(world, task, seed, lambda _s: random_action(rng)) for seed in EXPERT_SEEDS]
    assert sum(ok for ok, _ in results) <= 4


def test_grasp_attaches_only_at_the_block_and_release_drops_it(kin: ArmKinematics) -> None:
    world = World(kinematics=kin, control='pose')
    state = world.reset(5, 'pick_red')
    red = state.blocks['red'].copy()
    # Closing in the air grasps nothing.
    world.step_delta([0, 0, 0, 0, 0, 0, 0.0])
    world.step_delta([0, 0, 0, 0, 0, 0, 0.0])
    assert world.held is None and world.arm.gripper == pytest.approx(1.0)
    world.step_delta([0, 0, 0, 0, 0, 0, 1.0])
    world.step_delta([0, 0, 0, 0, 0, 0, 1.0])
    # Teleport to the grasp point, close: the red block attaches and follows the hand up.
    world.arm.move_to_pose(red, GRIPPER_DOWN)
    world.step_delta([0, 0, 0, 0, 0, 0, 0.0])
    assert world.held == 'red'
    assert world.gripper_width() == pytest.approx(0.04)
    for _ in range(4):
        state = world.step_delta([0, 0, 0.02, 0, 0, 0, 0.0])
    assert state.blocks['red'][2] == pytest.approx(red[2] + 0.08, abs=1e-3)
    assert success('pick_red', state)
    image = world.observe()
    assert image.shape == (224, 224, 3)
    # Opening drops it back onto the table where it is.
    state = world.step_delta([0, 0, 0, 0, 0, 0, 1.0])
    assert world.held is None
    assert state.blocks['red'][2] == pytest.approx(red[2])
    assert not success('pick_red', state)


def test_world_ignores_non_finite_delta(world: World) -> None:
    state = world.reset(1, 'reach_green')
    after = world.step_delta([np.nan, 0, 0, 0, 0, 0, 1.0])
    np.testing.assert_array_equal(state.tcp_position, after.tcp_position)
    assert world.arm.counters.nonfinite_ignored == 1
    with pytest.raises(ConfigError):
        world.step_delta([0.0] * 6)
