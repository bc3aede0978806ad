"""Tests of ArmKinematics against the bundled Panda-like URDF and small hand-written URDFs."""

from __future__ import annotations

import math

import numpy as np
import pinocchio as pin
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_ros.core.errors import ConfigError
from vla_ros.core.kinematics import (
    PANDA_HOME,
    ArmKinematics,
    JointStateError,
    default_urdf_path,
    solve_twist,
)

PANDA_LOWER = [-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973]
PANDA_UPPER = [2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973]
PANDA_VEL = [2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61]
NAMES = [f'panda_joint{i}' for i in range(1, 8)]

TWO_LINK = """<?xml version="1.0"?>
<robot name="two_link">
  <link name="base"/>
  <joint name="j1" type="revolute">
    <parent link="base"/><child link="l1"/>
    <origin xyz="0 0 0.1"/><axis xyz="0 0 1"/>
    <limit lower="-1.0" upper="2.0" effort="1" velocity="1.5"/>
  </joint>
  <link name="l1"><inertial><mass value="1"/>
    <inertia ixx="0.01" ixy="0" ixz="0" iyy="0.01" iyz="0" izz="0.01"/></inertial></link>
  <joint name="j2" type="{j2_type}">
    <parent link="l1"/><child link="l2"/>
    <origin xyz="0.5 0 0"/><axis xyz="0 0 1"/>
    {j2_limit}
  </joint>
  <link name="l2"><inertial><mass value="1"/>
    <inertia ixx="0.01" ixy="0" ixz="0" iyy="0.01" iyz="0" izz="0.01"/></inertial></link>
  <joint name="tip_joint" type="fixed">
    <parent link="l2"/><child link="tip"/><origin xyz="0.3 0 0"/>
  </joint>
  <link name="tip"/>
</robot>
"""
J2_LIMIT = '<limit lower="-0.5" upper="0.5" effort="1" velocity="3.0"/>'


def two_link(j2_type: str = 'revolute', j2_limit: str = J2_LIMIT) -> str:
    return TWO_LINK.format(j2_type=j2_type, j2_limit=j2_limit)


@pytest.fixture(scope='module')
def kin() -> ArmKinematics:
    return ArmKinematics.from_urdf_file(default_urdf_path())


def test_default_urdf_path_points_at_bundled_file() -> None:
    path = default_urdf_path()
    assert path.is_file()
    assert path.name == 'panda.urdf'
    assert '<robot name="panda_like">' in path.read_text()


def test_joint_names_and_limits_come_from_the_urdf(kin: ArmKinematics) -> None:
    assert kin.joint_names == NAMES
    assert kin.n_joints == 7
    np.testing.assert_allclose(kin.lower, PANDA_LOWER)
    np.testing.assert_allclose(kin.upper, PANDA_UPPER)
    np.testing.assert_allclose(kin.velocity_limits, PANDA_VEL)
    assert kin.ee_frame == 'panda_tcp'
    with pytest.raises(ValueError):
        kin.lower[0] = 0.0  # read-only: the limiter relies on these never changing


def test_neutral_is_the_panda_home_inside_limits(kin: ArmKinematics) -> None:
    q = kin.neutral()
    np.testing.assert_allclose(q, PANDA_HOME)
    assert kin.within_limits(q, margin=0.05)
    q[0] = 99.0  # a fresh copy each call
    assert kin.neutral()[0] == 0.0


def test_fk_at_zero_matches_the_dh_chain(kin: ArmKinematics) -> None:
    # All joints at zero: the arm is straight up with the flange folded down by a7 and d_flange.
    pos, rot = kin.fk(np.zeros(7))
    np.testing.assert_allclose(pos, [0.088, 0.0, 0.333 + 0.316 + 0.384 - 0.107 - 0.1034],
                               atol=1e-9)
    np.testing.assert_allclose(rot[:, 2], [0.0, 0.0, -1.0], atol=1e-9)  # tool z points down


def test_fk_at_home(kin: ArmKinematics) -> None:
    pos, rot = kin.fk(kin.neutral())
    np.testing.assert_allclose(pos, [0.307, 0.0, 0.487], atol=2e-3)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert rot[2, 2] < -0.999


def test_jacobian_matches_finite_differences(kin: ArmKinematics) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = rng.uniform(kin.lower + 0.1, kin.upper - 0.1)
        jac = kin.jacobian(q)
        assert jac.shape == (6, 7)
        p0, r0 = kin.fk(q)
        eps = 1e-6
        for i in range(7):
            dq = np.zeros(7)
            dq[i] = eps
            p1, r1 = kin.fk(q + dq)
            np.testing.assert_allclose((p1 - p0) / eps, jac[:3, i], atol=1e-5)
            # angular velocity in world axes: log of R1 R0^T
            np.testing.assert_allclose(pin.log3(r1 @ r0.T) / eps, jac[3:, i], atol=1e-5)


def test_jacobian_rows_are_linear_then_angular(kin: ArmKinematics) -> None:
    jac = kin.jacobian(kin.neutral())
    # joint 1 spins about world z: angular rows (0, 0, 1), linear motion along +y at x > 0
    np.testing.assert_allclose(jac[3:, 0], [0.0, 0.0, 1.0], atol=1e-12)
    assert jac[1, 0] > 0.25
    np.testing.assert_allclose(kin.fk_and_jacobian(kin.neutral())[2], jac)


def test_joint_velocity_realizes_the_twist(kin: ArmKinematics) -> None:
    q = kin.neutral()
    twist = np.array([0.05, -0.02, 0.03, 0.1, -0.2, 0.3])
    qd = kin.joint_velocity(q, twist)
    np.testing.assert_allclose(kin.jacobian(q) @ qd, twist, atol=1e-12)
    np.testing.assert_allclose(qd, np.linalg.pinv(kin.jacobian(q)) @ twist, atol=1e-12)
    damped = kin.joint_velocity(q, twist, damping=0.5)
    assert np.linalg.norm(damped) < np.linalg.norm(qd)
    with pytest.raises(ValueError):
        solve_twist(kin.jacobian(q), [0.0] * 5)
    with pytest.raises(ValueError):
        solve_twist(kin.jacobian(q), [math.nan] + [0.0] * 5)
    with pytest.raises(ValueError):
        solve_twist(kin.jacobian(q), np.zeros(6), damping=-1.0)


def test_singular_jacobian_pinv_stays_finite() -> None:
    jac = np.zeros((6, 7))
    jac[0, 0] = 1.0
    qd = solve_twist(jac, np.array([1.0, 1.0, 0, 0, 0, 0]))
    np.testing.assert_allclose(qd, [1.0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize('q', [np.zeros(6), np.zeros(8), [0.0] * 6 + [math.nan],
                               [0.0] * 6 + [math.inf]])
def test_fk_rejects_bad_configurations(kin: ArmKinematics, q: object) -> None:
    with pytest.raises(JointStateError):
        kin.fk(q)
    with pytest.raises(JointStateError):
        kin.jacobian(q)


def test_order_joint_state_reorders_and_ignores_extra_joints(kin: ArmKinematics) -> None:
    q = np.arange(7) * 0.1 - 0.3
    names = ['panda_finger_joint1'] + NAMES[::-1]
    positions = [0.04] + list(q[::-1])
    np.testing.assert_allclose(kin.order_joint_state(names, positions), q)
    with pytest.raises(JointStateError, match='panda_finger_joint1'):
        kin.order_joint_state(names, positions, allow_extra=False)


def test_order_joint_state_names_missing_joints(kin: ArmKinematics) -> None:
    with pytest.raises(JointStateError, match=r"\['panda_joint3'\]"):
        kin.order_joint_state([n for n in NAMES if n != 'panda_joint3'], [0.0] * 6)


@pytest.mark.parametrize('names, positions, match', [
    (NAMES, [0.0] * 6, '7 names but 6 positions'),
    (NAMES[:6] + ['panda_joint1'], [0.0] * 7, 'appears twice'),
    (NAMES, [0.0] * 6 + [math.nan], 'panda_joint7'),
    (NAMES, ['a'] * 7, 'not numbers'),
])
def test_order_joint_state_rejects_bad_messages(kin: ArmKinematics, names: list[str],
                                                positions: list[object], match: str) -> None:
    with pytest.raises(JointStateError, match=match):
        kin.order_joint_state(names, positions)
    assert issubclass(JointStateError, ValueError)


def test_missing_file_is_a_config_error_naming_it(tmp_path: object) -> None:
    missing = f'{tmp_path}/nope.urdf'
    with pytest.raises(ConfigError, match='nope.urdf'):
        ArmKinematics.from_urdf_file(missing)


def test_unparsable_urdf_is_a_config_error_naming_the_file(tmp_path: object) -> None:
    bad = tmp_path / 'bad.urdf'
    bad.write_text('<robot name="x"><link')
    with pytest.raises(ConfigError, match='bad.urdf'):
        ArmKinematics.from_urdf_file(bad)
    with pytest.raises(ConfigError, match='empty'):
        ArmKinematics.from_urdf_string('   ')


def test_unknown_ee_frame_lists_the_frames() -> None:
    with pytest.raises(ConfigError, match=r"'hand'.*'tip'"):
        ArmKinematics.from_urdf_string(two_link(), ee_frame='hand')


def test_multi_coordinate_joints_are_rejected() -> None:
    with pytest.raises(ConfigError, match='j2'):
        ArmKinematics.from_urdf_string(two_link('continuous', ''), ee_frame='tip')


def test_zero_velocity_limit_is_rejected() -> None:
    limit = '<limit lower="-0.5" upper="0.5" effort="1" velocity="0"/>'
    with pytest.raises(ConfigError, match="'j2'.*velocity"):
        ArmKinematics.from_urdf_string(two_link(j2_limit=limit), ee_frame='tip')


def test_other_arms_use_the_middle_of_their_ranges_as_neutral() -> None:
    kin = ArmKinematics.from_urdf_string(two_link(), ee_frame='tip')
    assert kin.joint_names == ['j1', 'j2']
    np.testing.assert_allclose(kin.neutral(), [0.5, 0.0])
    np.testing.assert_allclose(kin.velocity_limits, [1.5, 3.0])
    pos, _ = kin.fk([0.0, 0.0])
    np.testing.assert_allclose(pos, [0.8, 0.0, 0.1], atol=1e-12)
    pos, _ = kin.fk([math.pi / 2, 0.0])
    np.testing.assert_allclose(pos, [0.0, 0.8, 0.1], atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=7, max_size=7))
def test_property_fk_rotation_is_orthonormal_and_jacobian_consistent(fractions: list[float]
                                                                     ) -> None:
    kin = ArmKinematics.from_urdf_file(default_urdf_path())
    q = kin.lower + np.asarray(fractions) * (kin.upper - kin.lower)
    pos, rot, jac = kin.fk_and_jacobian(q)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert abs(np.linalg.det(rot) - 1.0) < 1e-9
    np.testing.assert_allclose(kin.fk(q)[0], pos)
    assert np.all(np.isfinite(jac))
    assert np.linalg.norm(pos) < 1.4964  # sum of all link offsets


def test_link_lowest_is_the_lowest_point_of_each_urdf_shape() -> None:
    """Analytic lowest points of the link cylinders and boxes against sampled surfaces."""
    xml = default_urdf_path().read_text(encoding='utf-8')
    kin = ArmKinematics.from_urdf_string(xml)
    assert kin.link_shapes == tuple(f'panda_link{i}' for i in range(1, 8)) + ('panda_hand',)
    model = pin.buildModelFromXML(xml)
    geometry = pin.buildGeomFromUrdfString(model, xml, pin.GeometryType.VISUAL)
    data = model.createData()
    rng = np.random.default_rng(4)
    for _ in range(10):
        q = np.clip(kin.neutral() + rng.normal(0.0, 0.8, 7), kin.lower, kin.upper)
        pin.forwardKinematics(model, data, q)
        sampled = []
        for obj in geometry.geometryObjects:
            if obj.parentJoint == 0:
                continue
            pose, shape = data.oMi[obj.parentJoint] * obj.placement, obj.geometry
            if hasattr(shape, 'halfLength'):
                th = rng.uniform(0.0, 2.0 * np.pi, 5000)
                z = rng.choice([-1.0, 1.0], 5000) * shape.halfLength
                pts = np.stack([shape.radius * np.cos(th), shape.radius * np.sin(th), z], 1)
            else:
                h = shape.halfSide
                pts = np.array([[a * h[0], b * h[1], c * h[2]] for a in (-1, 1)
                                for b in (-1, 1) for c in (-1, 1)])
            sampled.append(float(((pose.rotation @ pts.T).T + pose.translation)[:, 2].min()))
        low = kin.link_lowest(q)
        assert np.all(low <= np.array(sampled) + 1e-12)  # never above a surface point
        np.testing.assert_allclose(low, sampled, atol=2e-5)  # and it is the lowest one
