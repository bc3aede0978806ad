"""Fuzz tests of SafetyLimiter with the real URDF: adversarial actions, then a closed loop.

Part one pushes more than 100000 random and adversarial actions (huge, NaN, +-inf, denormals,
sign flips, alternating extremes, bursts, out-of-order, future and zero stamps, wrong episodes,
instructions and frames, stale gaps, e-stops, bad joint states) through a limiter with
kinematics and checks every output, vectorized afterwards, against every bound at zero
tolerance (floating-point rounding only): finite, per-axis, speed, acceleration per second
between consecutive commands, workspace prediction (linear and through the forward kinematics of
the predicted joint step), joint velocity (now and predicted) and joint margin. Part two
integrates the commanded twists through the Jacobian like a simulated arm (sub-steps at four
times the output rate, the joint state one tick old) over long random sequences that drive into
the walls and joint limits, and checks at every sub-step that the joints never cross their margins
or exceed their speed bounds and that the end effector never leaves the box. Counts go into the
assertion messages; nothing is printed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_ros.core.kinematics import ArmKinematics, default_urdf_path
from vla_ros.core.safety import SafetyConfig, SafetyLimiter, SafetyState

SEED = 20261126
N_ACTIONS = 102_400
# Per-axis bounds tighter than the speed bounds on some axes, so that every stage can bind.
CFG = SafetyConfig(max_delta_xyz=(0.02, 0.03, 0.01), max_delta_rpy=(0.1, 0.2, 0.15),
                   still_count=10, max_steps=400, min_token_prob=0.0,
                   min_mean_token_prob=0.0)


@pytest.fixture(scope='module')
def kin() -> ArmKinematics:
    return ArmKinematics.from_urdf_file(default_urdf_path())


# ------------------------------------------------------------------------------ generators
def adversarial_actions(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(deltas (n, 7), gripper closedness (n,))`` drawn from adversarial families."""
    scale = np.array([0.02, 0.02, 0.02, 0.1, 0.1, 0.1, 1.0])
    deltas = rng.normal(0.0, 1.0, (n, 7)) * scale
    grips = rng.uniform(-0.2, 1.2, n)
    kind = rng.choice(9, size=n, p=[0.40, 0.08, 0.08, 0.08, 0.08, 0.08, 0.08, 0.06, 0.06])
    idx = np.arange(n)
    # 1: huge magnitudes up to 1e308
    m = kind == 1
    deltas[m] = rng.choice([-1.0, 1.0], (m.sum(), 7)) * 10.0 ** rng.uniform(0, 308, (m.sum(), 7))
    # 2: one non-finite entry (NaN, inf, -inf), the gripper included
    m = np.flatnonzero(kind == 2)
    col = rng.integers(0, 8, m.size)
    bad = rng.choice([math.nan, math.inf, -math.inf], m.size)
    in_delta = col < 7
    deltas[m[in_delta], col[in_delta]] = bad[in_delta]
    grips[m[~in_delta]] = bad[~in_delta]
    # 3: denormals and signed zeros
    m = kind == 3
    deltas[m] = rng.choice([5e-324, -5e-324, 1e-310, -1e-310, 0.0, -0.0], (m.sum(), 7))
    # 4: alternating extremes (+max float / -max float, flipping every action)
    m = kind == 4
    deltas[m] = np.where(idx[m, None] % 2 == 0, 1.0, -1.0) * np.finfo(float).max
    # 5: sign flips of a large in-range action
    m = kind == 5
    deltas[m] = np.where(idx[m, None] % 2 == 0, 1.0, -1.0) * scale * 1.5
    # 6: near-still actions (stop detection)
    m = kind == 6
    deltas[m] *= 1e-3
    # 7: just beyond the per-axis limit on every axis
    m = kind == 7
    deltas[m] = rng.choice([-1.0, 1.0], (m.sum(), 7)) * np.r_[CFG.max_delta_xyz,
                                                               CFG.max_delta_rpy, 1.0] * 1.01
    # 8: gripper out of range / at the thresholds
    m = kind == 8
    grips[m] = rng.choice([CFG.gripper_close_above, CFG.gripper_open_below, -1e9, 1e9, 0.5],
                          m.sum())
    return deltas, grips


def random_configurations(kin: ArmKinematics, rng: np.random.Generator, n: int) -> np.ndarray:
    """Joint states: mostly inside the margins, some near or past them, some past the limits."""
    lo, hi, m = kin.lower, kin.upper, CFG.joint_position_margin
    q = rng.uniform(lo + m, hi - m, (n, kin.n_joints))
    near = rng.random(n) < 0.2
    j = rng.integers(0, kin.n_joints, n)
    side = rng.random(n) < 0.5
    offset = rng.uniform(-0.08, 0.1, n)  # negative: past the margin (or the limit)
    q[near, j[near]] = np.where(side[near], hi[j[near]] - m - offset[near],
                                lo[j[near]] + m + offset[near])
    return q


# ------------------------------------------------------------------------------ part one
FRAME = CFG.frame_id
OUTPUT_EVENTS = ('action', 'tick', 'episode', 'estop', 'reset')


def run_adversarial(kin: ArmKinematics, seed: int, n_actions: int) -> dict[str, object]:
    """Drive the limiter with adversarial inputs; return the records of every command."""
    rng = np.random.default_rng(seed)
    lim = SafetyLimiter(CFG, kin)
    deltas, grips = adversarial_actions(rng, n_actions)
    block = 50
    qs = random_configurations(kin, rng, n_actions // block + 1)
    gap = rng.choice([CFG.action_period, 0.0001, 0.6, 0.01, 0.02], n_actions,
                     p=[0.75, 0.1, 0.03, 0.07, 0.05])
    gap *= rng.uniform(0.9, 1.1, n_actions)
    events = rng.random((n_actions, 9))
    n_ticks = rng.choice([0, 1, 3, 12], n_actions, p=[0.5, 0.3, 0.15, 0.05])

    rec: dict[str, list] = {k: [] for k in ('blk', 'h', 'tw', 'prev', 'dt', 'kind', 'jt', 'ev')}
    stats = dict(actions=0, ticks=0, accepted=0, nonzero=0, estops=0, resets=0,
                 nonzero_when_not_active=0, nonzero_before_fresh_action=0, nonfinite_outputs=0,
                 accepted_from_before_reset=0, accepted_bad_header=0, accel_stops=0,
                 states={s.name: 0 for s in SafetyState}, limits={})
    limits: dict[str, int] = stats['limits']  # type: ignore[assignment]
    t = 1.0
    ep = 0
    text = 'fuzz'
    last_stamp = 0.0
    q_blk = 0  # the block of the joint state the limiter holds
    q_time = t
    awaiting_fresh = False  # after a reset: no motion until an accepted action
    reset_at = -math.inf
    lim.on_episode(ep, text, t)
    prev = np.zeros(6)
    prev_time = t
    tick = 1.0 / CFG.output_rate_hz

    def record(d: object, now: float) -> None:
        nonlocal prev, prev_time
        tw = d.twist  # type: ignore[attr-defined]
        stats['states'][d.state.name] += 1  # type: ignore[attr-defined,index]
        if not (np.isfinite(tw).all() and np.isfinite(d.applied_delta).all()):  # type: ignore
            stats['nonfinite_outputs'] += 1  # type: ignore[operator]
        for name in d.limits_applied:  # type: ignore[attr-defined]
            key = name.split(':')[0]
            limits[key] = limits.get(key, 0) + 1
            if name.endswith(':cannot_brake'):
                stats['accel_stops'] += 1  # type: ignore[operator]
        output = d.event in OUTPUT_EVENTS or not np.array_equal(tw, prev)  # type: ignore
        if tw.any():
            stats['nonzero'] += 1  # type: ignore[operator]
            if d.state is not SafetyState.ACTIVE:  # type: ignore[attr-defined]
                stats['nonzero_when_not_active'] += 1  # type: ignore[operator]
            if awaiting_fresh:
                stats['nonzero_before_fresh_action'] += 1  # type: ignore[operator]
        if output:
            # Kinematic checks for commands computed against the joint state held now (a refused
            # action or a joint state repeats the command in force, computed before).
            computed = tw.any() and (d.event == 'tick'  # type: ignore[attr-defined]
                                     or (d.event == 'action' and d.accepted))  # type: ignore
            rec['blk'].append(q_blk)
            rec['h'].append(CFG.action_period + max(0.0, now - q_time))
            rec['tw'].append(tw)
            rec['prev'].append(prev)
            rec['dt'].append(min(now - prev_time, tick))
            rec['kind'].append(1 if computed else 0)
            rec['jt'].append(q_time)
            rec['ev'].append((d.event, d.limits_applied, now))  # type: ignore[attr-defined]
            prev, prev_time = tw, now

    for i in range(n_actions):
        blk = i // block
        q = qs[blk]
        t += gap[i]
        ev = events[i]
        if ev[0] > 0.02:  # camera frames, sometimes missing
            lim.on_camera_frame(t - 0.01, t)
        if ev[1] < 0.005:  # a broken joint state
            record(lim.on_joint_state(np.full(kin.n_joints, math.nan), t, t), t)
        elif ev[1] < 0.008:  # an unstamped, a future or an old one
            stamp = [0.0, t + 5.0, t - 5.0][int(ev[1] * 1000) % 3]
            if stamp == t - 5.0:  # held, but stale: no motion until a fresh one
                q_blk, q_time = blk, stamp
            record(lim.on_joint_state(q, stamp, t), t)
        elif ev[1] > 0.01:
            q_blk, q_time = blk, t
            record(lim.on_joint_state(q, t, t), t)
        if ev[2] < 0.002 and lim.state is not SafetyState.ESTOP:
            record(lim.estop(t, 'fuzz'), t)
            stats['estops'] += 1  # type: ignore[operator]
        elif ev[2] > 0.95 and lim.state is SafetyState.ESTOP:
            record(lim.reset(t), t)
            stats['resets'] += 1  # type: ignore[operator]
            awaiting_fresh = True
            reset_at = t
        if lim.state is SafetyState.DONE or ev[3] < 0.003:
            ep += 1
            text = f'fuzz {ep}'
            record(lim.on_episode(ep, text, t), t)
        if ev[4] < 0.03:
            stamp = last_stamp - rng.uniform(0.0, 1.0)  # out of order / duplicate
        elif ev[4] < 0.035:
            stamp = t + rng.choice([2.0, 1e6, 0.06])  # ahead of the clock
        else:
            stamp = t - 0.05
        episode, instruction, frame, bad = ep, text, FRAME, False
        if ev[5] < 0.01:
            episode, bad = rng.choice([ep - 1, ep + 1, 4294967295]), True
        elif ev[5] < 0.015:
            instruction, bad = rng.choice(['', 'other task', text + ' ']), instruction != text
        elif ev[5] < 0.02:
            frame, bad = rng.choice(['', 'world', 'panda_link0/']), True
        if ev[8] < 0.005:
            stamp, bad = 0.0, True
        bad = bad or stamp > t + CFG.max_stamp_ahead
        d = lim.on_action(deltas[i], grips[i], int(episode), stamp, t,
                          instruction=str(instruction).strip() if instruction != text + ' '
                          else instruction, frame_id=frame)
        stats['actions'] += 1  # type: ignore[operator]
        if d.accepted:
            stats['accepted'] += 1  # type: ignore[operator]
            if stamp <= reset_at:
                stats['accepted_from_before_reset'] += 1  # type: ignore[operator]
            if bad and instruction != text + ' ':
                stats['accepted_bad_header'] += 1  # type: ignore[operator]
            last_stamp = max(last_stamp, stamp)
            awaiting_fresh = False
        record(d, t)
        now = t
        for k in range(n_ticks[i]):
            now = t + 0.02 * (k + 1) * (1.0 + ev[6])
            record(lim.tick(now), now)
            stats['ticks'] += 1  # type: ignore[operator]
        t = max(t, now)
    arr = {k: np.array(v) for k, v in rec.items() if k != 'ev'}
    return dict(stats=stats, blk=arr['blk'].astype(int), horizon=arr['h'],
                twist=arr['tw'].reshape(-1, 6), prev=arr['prev'].reshape(-1, 6),
                dt=arr['dt'], kind=arr['kind'].astype(int), qs=qs, events=rec['ev'])


def check_records(kin: ArmKinematics, run: dict[str, object]) -> dict[str, int]:
    """Count violations of every bound over all recorded commands (vectorized)."""
    c = CFG
    tw: np.ndarray = run['twist']  # type: ignore[assignment]
    prev: np.ndarray = run['prev']  # type: ignore[assignment]
    dt: np.ndarray = run['dt']  # type: ignore[assignment]
    kind: np.ndarray = run['kind']  # type: ignore[assignment]
    horizon: np.ndarray = run['horizon']  # type: ignore[assignment]
    blk: np.ndarray = run['blk']  # type: ignore[assignment]
    qs: np.ndarray = run['qs']  # type: ignore[assignment]
    rel = 1.0 + 1e-9  # floating-point rounding only
    out: dict[str, int] = {}
    bound = np.r_[c.max_delta_xyz, c.max_delta_rpy] / c.action_period
    out['per_axis'] = int(np.sum(np.abs(tw) > bound * rel))
    lin = np.linalg.norm(tw[:, :3], axis=1)
    ang = np.linalg.norm(tw[:, 3:], axis=1)
    out['linear_speed'] = int(np.sum(lin > c.max_linear_speed * rel))
    out['angular_speed'] = int(np.sum(ang > c.max_angular_speed * rel))
    # Acceleration between every two consecutive commands, per second of the time between
    # them, whenever the later one moves (a stop commands zero at once).
    moving = np.linalg.norm(tw, axis=1) > 0.0
    out['linear_accel'] = int(np.sum(moving & (np.linalg.norm(tw[:, :3] - prev[:, :3], axis=1)
                                               > c.max_linear_accel * dt * rel + 1e-15)))
    out['angular_accel'] = int(np.sum(moving & (np.linalg.norm(tw[:, 3:] - prev[:, 3:], axis=1)
                                                > c.max_angular_accel * dt * rel + 1e-15)))
    # kinematics of every joint-state block, once
    poses = np.empty((len(qs), 3))
    pinvs = np.empty((len(qs), kin.n_joints, 6))
    for b, q in enumerate(qs):
        pos, _, jac = kin.fk_and_jacobian(q)
        poses[b] = pos
        pinvs[b] = np.linalg.pinv(jac)
    sel = kind == 1
    pos = poses[blk]
    pred = pos + tw[:, :3] * horizon[:, None]
    lo, hi = np.array(c.workspace_min), np.array(c.workspace_max)
    inside = (pos >= lo) & (pos <= hi)
    bad = inside & ((pred > hi) | (pred < lo))
    bad |= (pos > hi) & ((tw[:, :3] > 0.0) | (pred < lo))
    bad |= (pos < lo) & ((tw[:, :3] < 0.0) | (pred > hi))
    out['workspace'] = int(np.sum(sel & bad.any(axis=1)))
    qd = np.einsum('nij,nj->ni', pinvs[blk], tw)
    qd_max = c.joint_velocity_scale * kin.velocity_limits
    out['joint_velocity'] = int(np.sum(sel & (np.abs(qd) > qd_max * rel).any(axis=1)))
    q = qs[blk]
    q_lo = kin.lower + c.joint_position_margin
    q_hi = kin.upper - c.joint_position_margin
    q_next = q + qd * horizon[:, None]
    in_band = (q >= q_lo) & (q <= q_hi)
    bad = in_band & ((q_next > q_hi) | (q_next < q_lo))
    bad |= (q > q_hi) & (qd > 0.0)
    bad |= (q < q_lo) & (qd < 0.0)
    out['joint_margin'] = int(np.sum(sel & bad.any(axis=1)))
    # The predicted joint step through the forward kinematics, and the joint speeds there.
    fk_bad = qd_bad = 0
    for n in np.flatnonzero(sel & inside.all(axis=1)):
        p_next, _, jac = kin.fk_and_jacobian(q_next[n])
        fk_bad += bool(((p_next < lo) | (p_next > hi)).any())
        qd_bad += bool((np.abs(np.linalg.pinv(jac) @ tw[n]) > qd_max * rel).any())
    out['predicted_step_workspace'] = fk_bad
    out['predicted_joint_velocity'] = qd_bad
    return out


def test_adversarial_actions_never_exceed_a_limit(kin: ArmKinematics) -> None:
    run = run_adversarial(kin, SEED, N_ACTIONS)
    stats = run['stats']
    violations = check_records(kin, run)
    figures = f'stats={stats} violations={violations}'
    assert stats['actions'] >= 100_000, figures  # type: ignore[index]
    assert sum(violations.values()) == 0, figures
    assert stats['nonfinite_outputs'] == 0, figures  # type: ignore[index]
    assert stats['nonzero_when_not_active'] == 0, figures  # type: ignore[index]
    assert stats['nonzero_before_fresh_action'] == 0, figures  # type: ignore[index]
    assert stats['accepted_from_before_reset'] == 0, figures  # type: ignore[index]
    assert stats['accepted_bad_header'] == 0, figures  # type: ignore[index]
    # the fuzz reached every stage and state (otherwise it proves little)
    for key in ('reject_non_finite', 'per_axis_clamp', 'speed', 'accel', 'workspace',
                'joint_margin', 'joint_velocity', 'joint'):
        assert stats['limits'].get(key, 0) > 0, figures  # type: ignore[index,union-attr]
    for state in SafetyState:
        assert stats['states'][state.name] > 0, figures  # type: ignore[index]
    assert stats['nonzero'] > 10_000, figures  # type: ignore[index,operator]


# ------------------------------------------------------------------------------ part two
def start_configuration(kin: ArmKinematics, rng: np.random.Generator) -> np.ndarray:
    """A random configuration inside the joint margins with the end effector in the box."""
    lo, hi = np.array(CFG.workspace_min), np.array(CFG.workspace_max)
    m = CFG.joint_position_margin
    while True:
        q = kin.neutral() + rng.normal(0.0, 0.4, kin.n_joints)
        if not kin.within_limits(q, m):
            continue
        pos, _, jac = kin.fk_and_jacobian(q)
        if np.all(pos > lo) and np.all(pos < hi) and np.linalg.svd(jac, compute_uv=False)[
                -1] > 0.05:
            return q


SUBSTEPS = 4


def run_closed_loop(kin: ArmKinematics, seed: int, n_actions: int) -> dict[str, float]:
    """Integrate the limiter's twists like a simulated arm; return the worst excursions.

    The arm follows each command with ``q += pinv(J(q)) twist h`` in ``SUBSTEPS`` sub-steps per
    output tick, and the limiter sees the joint state of the previous tick (a driver's delay).
    """
    rng = np.random.default_rng(seed)
    cfg = SafetyConfig(still_count=0, max_steps=0, min_mean_token_prob=0.0)
    lim = SafetyLimiter(cfg, kin)
    dt = 1.0 / cfg.output_rate_hz
    h = dt / SUBSTEPS
    ticks = round(cfg.action_period / dt)
    q = start_configuration(kin, rng)
    q_seen, t_seen = q.copy(), 0.0
    q_lo = kin.lower + cfg.joint_position_margin
    q_hi = kin.upper - cfg.joint_position_margin
    qd_max = cfg.joint_velocity_scale * kin.velocity_limits
    lo, hi = np.array(cfg.workspace_min), np.array(cfg.workspace_max)
    t = 1.0
    lim.on_episode(0, 'drive into the walls', t)
    deltas, grips = adversarial_actions(rng, n_actions)
    # A persistent drift that pushes into walls and joint limits, with adversarial spikes.
    drift = np.zeros(6)
    normal = rng.random(n_actions) < 0.85
    skip = rng.random(n_actions) < 0.05  # the VLA is late: the held twist keeps running
    worst = dict(joint_margin=-math.inf, workspace=-math.inf, joint_speed=-math.inf, ticks=0.0,
                 moving_ticks=0.0, actions=0.0, accel_stops=0.0)
    for i in range(n_actions):
        if i % 40 == 0:
            drift = np.r_[rng.normal(0, 0.03, 3), rng.normal(0, 0.15, 3)]
        for k in range(ticks):
            now = t + k * dt
            lim.on_joint_state(q_seen, t_seen, now)
            lim.on_camera_frame(now, now)
            if k == 0 and not skip[i]:
                delta = np.r_[drift + rng.normal(0, 0.005, 6), 0.0] if normal[i] else deltas[i]
                d = lim.on_action(delta, grips[i], 0, now, now, instruction='drive into the walls',
                                  frame_id=cfg.frame_id)
                worst['actions'] += 1
            else:
                d = lim.tick(now)
            worst['accel_stops'] += any(n.endswith('cannot_brake') for n in d.limits_applied)
            tw = d.twist
            worst['ticks'] += 1
            q_seen, t_seen = q.copy(), now
            if not tw.any():
                continue
            worst['moving_ticks'] += 1
            for _ in range(SUBSTEPS):
                pos, _, jac = kin.fk_and_jacobian(q)
                qd = np.linalg.pinv(jac) @ tw
                worst['joint_speed'] = max(worst['joint_speed'],
                                           float((np.abs(qd) / qd_max).max()) - 1.0)
                q = q + qd * h
            pos, _ = kin.fk(q)
            worst['joint_margin'] = max(worst['joint_margin'], float((q - q_hi).max()),
                                        float((q_lo - q).max()))
            worst['workspace'] = max(worst['workspace'], float((pos - hi).max()),
                                     float((lo - pos).max()))
        t += cfg.action_period
    return worst


def test_closed_loop_never_crosses_joint_margins_or_leaves_the_box(kin: ArmKinematics) -> None:
    """Defect 3: joint speed, joint margins and the box hold with zero tolerance on the arm."""
    results = [run_closed_loop(kin, SEED + s, 500) for s in range(8)]
    joint = max(r['joint_margin'] for r in results)
    ws = max(r['workspace'] for r in results)
    speed = max(r['joint_speed'] for r in results)
    figures = (f'sequences={len(results)} actions={sum(r["actions"] for r in results):.0f} '
               f'ticks={sum(r["ticks"] for r in results):.0f} '
               f'moving={sum(r["moving_ticks"] for r in results):.0f} '
               f'accel stops={sum(r["accel_stops"] for r in results):.0f} '
               f'worst joint past margin={joint:.3e} rad, worst EE outside box={ws:.3e} m, '
               f'worst joint speed over its bound={speed:.3e} (relative)')
    # zero tolerance: floating-point rounding only (1e-9 rad, 1e-9 m, 1e-9 relative)
    assert joint <= 1e-9, figures
    assert ws <= 1e-9, figures
    assert speed <= 1e-9, figures
    assert sum(r['moving_ticks'] for r in results) > 20_000, figures


# ------------------------------------------------------------------------------ small properties
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(6)), st.floats(-1.0, 1.0)), min_size=1,
                max_size=30))
def test_property_short_walks_stay_within_margins(walk: list[tuple[int, float]]) -> None:
    kin = ArmKinematics.from_urdf_file(default_urdf_path())
    lim = SafetyLimiter(CFG, kin)
    q = kin.neutral()
    q[0] = kin.upper[0] - CFG.joint_position_margin - 0.01  # start near joint 1's limit
    t = 1.0
    lim.on_episode(0, 'walk', t)
    dt = 1.0 / CFG.output_rate_hz
    for axis, size in walk:
        delta = np.zeros(7)
        delta[axis] = size * (0.05 if axis < 3 else 0.3)
        lim.on_joint_state(q, t, t)
        lim.on_camera_frame(t, t)
        lim.on_action(delta, 0.5, 0, t, t, instruction='walk', frame_id=CFG.frame_id)
        for k in range(round(CFG.action_period / dt)):
            lim.on_joint_state(q, t + k * dt, t + k * dt)
            tw = lim.tick(t + k * dt).twist
            q = q + np.linalg.pinv(kin.jacobian(q)) @ tw * dt
        t += CFG.action_period
        assert kin.within_limits(q, CFG.joint_position_margin - 1e-9), q
