"""Tests of contact in the simulator: forces, compliance, penetration bounds, ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_ros.core.errors import ConfigError
from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.sim.contact import CONTACT_STIFFNESS, ArmGeometry, default_joint_stiffness
from vla_ros.sim.scene import GRIPPER_DOWN
from vla_ros.sim.state import WorldStateError, from_json, retimed, to_json
from vla_ros.sim.tasks import TASKS, World, expert_action, success

# The fingertips end this far past the tool centre point (scene.gripper_boxes).
TIP = 0.005
DOWN = np.array([0.0, 0.0, -0.05, 0.0, 0.0, 0.0])


@pytest.fixture(scope='module')
def kin() -> ArmKinematics:
    return ArmKinematics.from_urdf_file(default_urdf_path())


def _world(kin: ArmKinematics, seed: int = 3, **kwargs: object) -> World:
    world = World(kinematics=kin, **kwargs)
    world.reset(seed, 'reach_red')
    return world


def _clear_spot(world: World) -> np.ndarray:
    """A table point at least 12 cm from every block."""
    for x in np.linspace(0.35, 0.65, 13):
        for y in np.linspace(-0.25, 0.25, 11):
            p = np.array([x, y])
            if all(np.linalg.norm(p - b[:2]) > 0.12 for b in world.blocks.values()):
                return p
    raise AssertionError('no clear spot')


def _press_table(world: World, seconds: float, twist: np.ndarray = DOWN) -> None:
    xy = _clear_spot(world)
    assert world.place_tool([xy[0], xy[1], 0.02], GRIPPER_DOWN)
    for _ in range(round(seconds / 0.01)):
        world.apply_twist(twist, 0.01)


def test_free_motion_never_touches(kin: ArmKinematics) -> None:
    world = World(kinematics=kin)
    for task in sorted(TASKS):
        if TASKS[task].kind != 'reach':
            continue
        state = world.reset(11, task)
        for _ in range(60):
            state = world.step_delta(expert_action(world.task, state))
            assert not world.arm.contacts and not state.contact.active
            np.testing.assert_array_equal(world.arm.q, world.arm.q_ref)
            np.testing.assert_array_equal(world.arm.external_torque(), np.zeros(7))
            if success(world.task, state):
                break
        assert success(world.task, state)
        assert state.contact.onset is None and state.contact.peak_depth == 0.0


def test_fingers_pressing_the_table_meet_resistance(kin: ArmKinematics) -> None:
    world = _world(kin)
    _press_table(world, 1.0)  # 5 cm of commanded travel, the tips start 1.5 cm above
    tcp = world.arm.ee_transform()[0]
    assert tcp[2] - TIP > -0.002, 'the fingers went through the table'
    names = {(c.body, c.obstacle) for c in world.arm.contacts}
    assert names and names <= {('panda_leftfinger', 'table'), ('panda_rightfinger', 'table')}
    wrench = world.arm.tool_wrench()
    assert wrench[2] > 20.0, f'the table must push the tool up, got {wrench[:3]}'
    assert np.abs(wrench[:2]).max() < 1e-9 * wrench[2], 'no friction: normal force only'
    # The commanded configuration went further down than the actual one (the arm yields).
    ref_tcp = kin.fk(world.arm.q_ref)[0]
    assert ref_tcp[2] < tcp[2] - 0.001


def test_effort_equals_jacobian_transpose_of_the_tool_wrench(kin: ArmKinematics) -> None:
    world = _world(kin)
    tilted = GRIPPER_DOWN @ np.array([[1.0, 0.0, 0.0], [0.0, 0.96, -0.28], [0.0, 0.28, 0.96]])
    xy = _clear_spot(world)
    assert world.place_tool([xy[0], xy[1], 0.03], tilted)
    for _ in range(60):
        world.apply_twist([0.01, 0.0, -0.05, 0.0, 0.0, 0.0], 0.01)
    contacts = world.arm.contacts
    assert contacts and all(c.tool for c in contacts)
    effort = world.arm.external_torque()
    jac = kin.jacobian(world.arm.q)
    np.testing.assert_allclose(effort, jac.T @ world.arm.tool_wrench(), atol=1e-9)
    assert np.abs(effort).max() > 1.0
    # The torque part is not trivial (a tilted hand touches with one edge, off the axis).
    assert np.linalg.norm(world.arm.tool_wrench()[3:]) > 0.1


def test_link_contact_is_effort_but_not_tool_wrench(kin: ArmKinematics) -> None:
    geometry = ArmGeometry(default_urdf_path(), kin.joint_names, ['red'], 0.04)
    geometry.set_gripper_width(0.08)
    q = kin.neutral()
    # A block pressed into the side of link 4's cylinder (its axis through the joint origin).
    geometry.set_block('red', np.array([2.0, 0.0, 0.02]))
    assert not geometry.contacts(q)
    import pinocchio as pin
    model = pin.buildModelFromUrdf(str(default_urdf_path()))
    data = model.createData()
    pin.forwardKinematics(model, data, q)
    origin = np.array(data.oMi[4].translation)
    geometry.set_block('red', origin + np.array([0.0, 0.0, 0.07]))
    contacts = geometry.contacts(q)
    assert [c.body for c in contacts] == ['panda_link4'] and not contacts[0].tool
    tau = sum(c.jacobian.T @ c.force for c in contacts)
    assert np.abs(tau[:4]).max() > 1.0
    np.testing.assert_allclose(tau[4:], 0.0, atol=1e-12)  # the wrist joints cannot feel it


def test_force_follows_the_arm_compliance(kin: ArmKinematics) -> None:
    world = _world(kin)
    _press_table(world, 0.5)  # touch at 0.3 s, then 1 cm more of commanded travel
    contacts = world.arm.contacts
    assert contacts
    q, q_ref = world.arm.q, world.arm.q_ref
    stiffness = default_joint_stiffness(7)
    # Equilibrium: the joint springs between the commanded and the actual configuration hold
    # exactly the contact torques, K (q - q_ref) = sum J^T f.
    np.testing.assert_allclose(stiffness * (q - q_ref), world.arm.external_torque(),
                               rtol=1e-3, atol=1e-3)
    # In Cartesian terms (linearised): the depths of the commanded configuration split between
    # the arm's compliance at the contact points and the contact springs,
    # f = (A K^-1 A^T + I / k)^-1 d_ref with A the normal rows of the point Jacobians.
    at_ref = {(c.body, c.obstacle): c.depth for c in world.geometry.contacts(q_ref)}
    d_ref = np.array([at_ref[(c.body, c.obstacle)] for c in contacts])
    rows = np.array([c.normal @ c.jacobian for c in contacts])
    coupling = rows @ np.diag(1.0 / stiffness) @ rows.T + np.eye(len(contacts)) / CONTACT_STIFFNESS
    predicted = np.linalg.solve(coupling, d_ref)
    actual = np.array([c.depth * c.stiffness for c in contacts])
    assert d_ref.max() > 0.005
    np.testing.assert_allclose(actual, predicted, rtol=0.1)


def test_penetration_and_force_stay_bounded_when_pushing_on(kin: ArmKinematics) -> None:
    world = _world(kin)
    deepest = 0.0
    push = np.array([0.0, 0.0, -0.25, 0.0, 0.0, 0.0])
    _press_table(world, 0.01, push)
    for _ in range(400):  # 4 s at 0.25 m/s: 1 m into the table
        world.apply_twist(push, 0.01)
        deepest = max([deepest] + [c.depth for c in world.arm.contacts])
        tau = world.arm.external_torque()
        assert np.all(np.abs(tau) <= world.geometry.effort_limits * 1.001), tau
    solver = world.arm.contact
    assert solver is not None and solver.yields > 300, 'the servo must stall'
    contacts = world.arm.contacts
    assert contacts and {c.body for c in contacts} <= {'panda_leftfinger', 'panda_rightfinger'}
    depth = max(c.depth for c in contacts)
    force = world.arm.tool_wrench()[2]
    assert depth * CONTACT_STIFFNESS * len(contacts) == pytest.approx(force, rel=0.05)
    assert force > 100.0 and deepest < 0.0025
    state = world.state()
    assert state.contact.peak_depth == pytest.approx(depth, rel=0.05)
    assert state.contact.pair is not None and state.contact.pair[1] == 'table'
    assert state.contact.end is None and state.contact.active


def test_lifting_off_ends_the_contact_within_the_velocity_limits(kin: ArmKinematics) -> None:
    world = _world(kin)
    _press_table(world, 3.0, np.array([0.0, 0.0, -0.25, 0.0, 0.0, 0.0]))
    onset = world.state().contact.onset
    vmax = kin.velocity_limits
    t_free = None
    for k in range(100):
        world.apply_twist([0.0, 0.0, 0.05, 0.0, 0.0, 0.0], 0.01)
        assert np.all(np.abs(world.arm.qdot) <= vmax * (1 + 1e-9))
        if t_free is None and not world.arm.contacts:
            t_free = (k + 1) * 0.01
    # The stalled reference lies about 2 cm below the arm (the stall force over the arm's
    # stiffness): at 5 cm/s the load comes off within half a second or so.
    assert t_free is not None and t_free < 1.0
    np.testing.assert_allclose(world.arm.q, world.arm.q_ref, atol=1e-12)
    truth = world.state().contact
    assert not truth.active and truth.onset == onset and truth.end is not None
    assert truth.end > truth.onset


def test_contact_onset_is_interpolated_inside_the_substep(kin: ArmKinematics) -> None:
    world = _world(kin)
    xy = _clear_spot(world)
    assert world.place_tool([xy[0], xy[1], 0.05], GRIPPER_DOWN)
    track = [(world.arm.time, world.arm.ee_transform()[0][2] - TIP)]
    for _ in range(100):
        world.apply_twist([0.0, 0.0, -0.07, 0.0, 0.0, 0.0], 0.01)
        if not world.arm.contacts:
            track.append((world.arm.time, world.arm.ee_transform()[0][2] - TIP))
    t0, z0 = track[-1]
    # Where the free flight would have crossed the table: extrapolate the last free sub-step.
    speed = (track[-2][1] - z0) / (t0 - track[-2][0])
    expected = t0 + z0 / speed
    truth = world.state().contact
    assert t0 < expected < t0 + 0.01  # inside a sub-step, not at its end
    assert truth.onset == pytest.approx(expected, abs=2e-4)
    assert truth.pair[1] == 'table' and 'finger' in truth.pair[0]


def test_pressing_on_a_block_from_above(kin: ArmKinematics) -> None:
    world = _world(kin)
    world.arm.set_gripper(1.0)
    world.arm.hold(0.5)  # closed fingers: the tips meet under the tool centre point
    red = world.blocks['red'].copy()
    assert world.place_tool(red + np.array([0.0, 0.0, 0.035]), GRIPPER_DOWN)
    for _ in range(50):
        world.apply_twist(DOWN, 0.01)
    assert {c.obstacle for c in world.arm.contacts} == {'red'}
    assert world.arm.tool_wrench()[2] > 10.0
    np.testing.assert_allclose(world.blocks['red'], red)  # pressed from above: it stays


def test_a_block_pushed_sideways_slides(kin: ArmKinematics) -> None:
    world = _world(kin)
    world.arm.set_gripper(1.0)
    world.arm.hold(0.5)  # closed: the fingers meet under the tool centre point
    red = world.blocks['red'].copy()
    assert world.place_tool(red + np.array([-0.08, 0.0, 0.02]), GRIPPER_DOWN)
    largest = 0.0
    for _ in range(160):  # 8 cm towards +x at finger height: the fingers meet it after 5 cm
        world.apply_twist([0.05, 0.0, 0.0, 0.0, 0.0, 0.0], 0.01)
        largest = max(largest, float(np.linalg.norm(world.arm.tool_wrench()[:3])))
    moved = world.blocks['red'] - red
    assert moved[0] > 0.02 and abs(moved[2]) < 1e-12
    assert largest < 1e-6, 'a sliding block offers no resistance (no friction)'
    assert world.arm.q_ref.tolist() == world.arm.q.tolist()


def test_without_contact_the_arm_goes_through_the_table(kin: ArmKinematics) -> None:
    world = _world(kin, contact=False)
    _press_table(world, 1.0)
    assert world.arm.ee_transform()[0][2] < -0.02
    assert world.geometry is None and not world.state().contact.active


def test_geometry_rejects_a_foreign_model(kin: ArmKinematics) -> None:
    with pytest.raises(ConfigError, match='differ'):
        ArmGeometry(default_urdf_path(), kin.joint_names[::-1], ['red'], 0.04)
    with pytest.raises(ConfigError):
        ArmGeometry('/nonexistent.urdf', kin.joint_names, ['red'], 0.04)


def test_world_state_json_round_trip(kin: ArmKinematics) -> None:
    world = _world(kin)
    _press_table(world, 1.0)
    sim = world.state()
    state = retimed(sim, 1234.5)
    assert state.time == 1234.5 and sim.contact.onset is not None
    assert state.contact.onset == pytest.approx(1234.5 - (sim.time - sim.contact.onset))
    back = from_json(to_json(state))
    for name in ('gripper', 'gripper_width', 'held', 'table_height', 'step', 'block_size',
                 'task', 'seed', 'time'):
        assert getattr(back, name) == getattr(state, name), name
    np.testing.assert_array_equal(back.tcp_position, state.tcp_position)
    np.testing.assert_array_equal(back.tcp_rotation, state.tcp_rotation)
    for name, pos in state.blocks.items():
        np.testing.assert_array_equal(back.blocks[name], pos)
    c, b = state.contact, back.contact
    assert (b.onset, b.end, b.pair, b.peak_depth, b.active, b.depth) == \
        (c.onset, c.end, c.pair, c.peak_depth, True, c.depth)
    np.testing.assert_array_equal(b.wrench, c.wrench)
    assert [(p.body, p.obstacle, p.depth) for p in b.pairs] == \
        [(p.body, p.obstacle, p.depth) for p in c.pairs]
    np.testing.assert_array_equal(b.pairs[0].force, c.pairs[0].force)
    assert success('reach_red', back) == success('reach_red', state)


@pytest.mark.parametrize('mutate, message', [
    (lambda d: 'not json', 'not JSON'),
    (lambda d: [1, 2], 'object'),
    (lambda d: {**d, 'version': 2}, 'version'),
    (lambda d: {k: v for k, v in d.items() if k != 'blocks'}, 'blocks'),
    (lambda d: {**d, 'tcp_position': [0.0, 'x', 0.0]}, 'tcp_position'),
    (lambda d: {**d, 'gripper': True}, 'gripper'),
    (lambda d: {**d, 'seed': 1.5}, 'seed'),
    (lambda d: {**d, 'contact': {**d['contact'], 'pair': ['a']}}, 'pair'),
    (lambda d: {**d, 'contact': {**d['contact'], 'pairs': [{'body': 'x'}]}}, 'obstacle'),
])
def test_world_state_json_rejects_malformed_documents(kin: ArmKinematics, mutate, message
                                                      ) -> None:  # noqa: ANN001
    doc = json.loads(to_json(_world(kin).state()))
    bad = mutate(doc)
    with pytest.raises(WorldStateError, match=message):
        from_json(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(WorldStateError, match='finite'):
        from_json(json.dumps(doc).replace('"gripper": 0.0', '"gripper": NaN'))


def test_the_step_time_benchmark_runs(tmp_path) -> None:  # noqa: ANN001
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / 'bench' / 'bench_sim.py'
    spec = importlib.util.spec_from_file_location('bench_sim', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'sim_step.json'
    assert bench.main(['--ticks', '30', '--episodes', '1', '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['command'].startswith('python bench/bench_sim.py')
    results = report['results']
    assert set(results) == {'tick_free_contact_on', 'tick_free_contact_off',
                            'tick_pressing_table', 'node_tick_free', 'node_tick_pressing_table',
                            'step_delta_contact_on', 'step_delta_contact_off'}
    assert all(r['n'] > 0 and r['mean_us'] > 0 for r in results.values())
