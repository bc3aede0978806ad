"""The limit pipeline as ordered, pure stages: ``(twist, context) -> (twist, limits, reason)``.

A stage never raises on finite input and only ever shrinks motion or moves the command towards
the one in effect; each returns the names of the limits that acted. The *target* stages run
once per action (per-axis clamp, Cartesian speed); the *output* stages run on every command the
node publishes, the action's and each re-published tick's, against the newest joint state:

1. ``acceleration``: the command moves from the one in effect by at most ``max_*_accel`` times
   the time since it (per second, whatever the action rate); then ``contact_retreat``: while a
   contact that latched a protective stop lasts (after its reset), only motion away from it;
2. ``workspace``: per axis, the tool centre point must be able to stop inside the box: its speed
   towards a wall is at most the speed from which, after ``horizon`` seconds at that speed, it
   can still brake to rest within the remaining room at a deceleration the acceleration bound
   allows (outside the box only motion straight back);
3. ``table_plane``: the same rule for the downward speed of every contact frame (fingertips)
   above the table plane, by uniform scaling;
4. ``joints``: the same rule for every joint against its position margin, and the joint speeds
   (pseudo-inverse of the Jacobian) within their bounds; near a singularity only motion away
   from it;
5. ``predicted_step``: the joint step itself, ``q + qd * horizon``, is checked with the full
   forward kinematics (box; table plane for the contact frames and the lowest point of every
   link shape of the URDF) and the Jacobian along it (joint speeds), and the command scaled
   down until it passes.

Because stages 2-5 brake no harder than the acceleration bound allows, the pipeline's result
normally keeps the acceleration bound; the limiter checks it once more after the last stage and
stops the arm when it cannot be kept. ``horizon`` is the longer of the action period and the
driver's command timeout, plus the joint state's age: the time the command may stay in force
(the driver executes it until its timeout if the safety node falls silent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vla_ros.core.safety.config import SafetyConfig

if TYPE_CHECKING:  # keeps pinocchio out of a kinematics-free import
    from vla_ros.core.kinematics import ArmKinematics

__all__ = [
    'AXES',
    'OUTPUT_STAGES',
    'TARGET_STAGES',
    'Bounds',
    'Context',
    'JointView',
    'Stage',
    'brake_speed',
    'run_stages',
]

#: Names of the six Cartesian components of a delta or twist, used in ``limits_applied``.
AXES = ('x', 'y', 'z', 'roll', 'pitch', 'yaw')

#: Smallest singular value, relative to the largest, below which the Jacobian counts as singular.
SINGULAR_EPS = 1e-9
#: Joint-space step [rad] used to probe whether a motion approaches a singularity.
SINGULAR_PROBE_RAD = 1e-4
#: Fractions of the horizon at which the predicted step's joint speeds are checked (dense near
#: the start, where the arm is while the command is in force: with the 0.25 s driver timeout as
#: the horizon, a first sample at 1/8 left a 31 ms gap and the closed-loop fuzz measured a joint
#: 0.09 % over its speed bound inside it).
PATH_SAMPLES = (0.0625, 0.125, 0.25, 0.5, 1.0)
#: Along the predicted path the joint speeds keep this fraction below their bounds: the arm is
#: already up to a joint state's age ahead of the state the path starts from.
PATH_SPEED_MARGIN = 0.01
#: Bisection steps of the predicted-step check (the scale is found to 2**-12).
STEP_BISECTIONS = 12
#: The stages brake to limits this much inside the configured ones (the box and the table plane
#: [m], the joint position margins [rad]): the driver's inverse kinematics, its delay and the
#: arm's compliance are not the limiter's linear prediction, so a hard limit keeps a margin for
#: them and holds with zero tolerance on the arm (the graph fuzz measures it).
LINEARIZATION_MARGIN_M = 0.001
LINEARIZATION_MARGIN_RAD = 0.005
#: Twist components below this [m/s, rad/s] are zero (denormal noise, not motion).
FLUSH = 1e-12
#: The acceleration stage keeps this relative margin below the bound (floating-point rounding).
ACCEL_MARGIN = 1e-12


@dataclass(frozen=True)
class Bounds:
    """Numbers of a ``SafetyConfig`` (and the URDF) in the form the stages use them."""

    per_axis: np.ndarray  #: (6,) largest |twist| per component [m/s, rad/s]
    max_linear_speed: float
    max_angular_speed: float
    linear_accel: float
    angular_accel: float
    ws_lo: tuple[float, float, float]  #: the configured box [m]
    ws_hi: tuple[float, float, float]
    table_z: float  #: lowest allowed height of a contact frame [m]
    singularity_threshold: float
    q_lo: tuple[float, ...] = ()  #: joint position bounds (limits minus both margins)
    q_hi: tuple[float, ...] = ()
    qd_max: tuple[float, ...] = ()  #: joint speed bounds
    joint_names: tuple[str, ...] = ()

    @classmethod
    def build(cls, c: SafetyConfig, kin: ArmKinematics | None = None) -> Bounds:
        """Derive the bounds of ``c`` (joint bounds only with ``kin``)."""
        joints: dict[str, tuple] = {}
        if kin is not None:
            m = c.joint_position_margin + LINEARIZATION_MARGIN_RAD
            joints = dict(
                q_lo=tuple((kin.lower + m).tolist()),
                q_hi=tuple((kin.upper - m).tolist()),
                qd_max=tuple((c.joint_velocity_scale * kin.velocity_limits).tolist()),
                joint_names=tuple(kin.joint_names))
        return cls(per_axis=np.array(c.max_delta_xyz + c.max_delta_rpy) / c.action_period,
                   max_linear_speed=c.max_linear_speed, max_angular_speed=c.max_angular_speed,
                   linear_accel=c.max_linear_accel, angular_accel=c.max_angular_accel,
                   ws_lo=c.workspace_min, ws_hi=c.workspace_max,
                   table_z=c.table_height + c.table_clearance,
                   singularity_threshold=c.singularity_threshold, **joints)


@dataclass(frozen=True)
class JointView:
    """The kinematics of one joint state, computed once and shared by every command."""

    q: np.ndarray  #: (n,) joint positions, model order
    position: tuple[float, float, float]  #: tool centre point [m]
    points: np.ndarray  #: (m, 3) contact frame positions [m]
    links: np.ndarray  #: (k,) lowest height of each link shape [m]
    u: np.ndarray  #: SVD of the 6xn Jacobian: J = u @ diag(s) @ vt
    s: np.ndarray
    vt: np.ndarray
    time: float  #: the older of stamp and receipt [s]

    @classmethod
    def build(cls, kin: ArmKinematics, q: np.ndarray, time: float) -> JointView:
        """Compute FK, contact frames and the Jacobian's SVD at ``q``."""
        pos, _, jac = kin.fk_and_jacobian(q)
        u, s, vt = np.linalg.svd(jac, full_matrices=False)
        x, y, z = (float(v) for v in pos)
        return cls(q=q, position=(x, y, z), points=kin.contact_points(q),
                   links=kin.link_lowest(q), u=u, s=s, vt=vt, time=time)

    def joint_velocity(self, v: np.ndarray) -> np.ndarray:
        """Return ``pinv(J) @ v`` (the minimum-norm joint velocities of the twist ``v``)."""
        return self.vt.T @ ((self.u.T @ v) / self.s)


@dataclass
class Context:
    """What a stage may look at besides the twist; stages do not change it."""

    bounds: Bounds
    prev: np.ndarray  #: (6,) the command in effect
    dt: float  #: time since that command was issued [s]
    horizon: float = 0.0  #: time the command may stay in force [s]
    view: JointView | None = None
    kinematics: ArmKinematics | None = None
    contact: np.ndarray | None = None  #: unit contact force on the tool (base frame), if any


StageResult = tuple[np.ndarray, list[str], str]
Stage = Callable[[np.ndarray, Context], StageResult]


def brake_speed(room: float, horizon: float, decel: float) -> float:
    """Return the largest speed ``v`` with ``v * horizon + v**2 / (2 * decel) <= room``.

    ``decel`` may be ``inf`` (then ``room / horizon``); no room gives 0.
    """
    if not room > 0.0:
        return 0.0
    if math.isinf(decel):
        return room / horizon
    return 2.0 * room / (horizon + math.sqrt(horizon * horizon + 2.0 * room / decel))


def scale_rate(v: np.ndarray, b: Bounds) -> float:
    """Return how fast [1/s] a uniform scale of ``v`` may shrink within the accel bounds."""
    rate = math.inf
    lin = math.sqrt(float(v[:3] @ v[:3]))
    ang = math.sqrt(float(v[3:] @ v[3:]))
    if lin > 0.0:
        rate = min(rate, b.linear_accel / lin)
    if ang > 0.0:
        rate = min(rate, b.angular_accel / ang)
    return rate


# ------------------------------------------------------------------------------ target stages
def per_axis_clamp(v: np.ndarray, ctx: Context) -> StageResult:
    """Clip every component to ``max_delta_* / action_period``."""
    bound = ctx.bounds.per_axis
    over = np.abs(v) > bound
    if not over.any():
        return v, [], ''
    return np.clip(v, -bound, bound), [f'per_axis_clamp:{AXES[i]}' for i in np.flatnonzero(over)
                                       ], ''


def cartesian_speed(v: np.ndarray, ctx: Context) -> StageResult:
    """Scale the linear and the angular part uniformly to their speed bounds."""
    b = ctx.bounds
    limits = []
    v = v.copy()
    for sl, vmax, name in ((slice(0, 3), b.max_linear_speed, 'linear'),
                           (slice(3, 6), b.max_angular_speed, 'angular')):
        speed = math.sqrt(float(v[sl] @ v[sl]))
        if speed > vmax:
            v[sl] *= vmax / speed
            limits.append(f'speed:{name}')
    return v, limits, ''


# ------------------------------------------------------------------------------ output stages
def acceleration(v: np.ndarray, ctx: Context) -> StageResult:
    """Move from the command in effect by at most ``accel * dt`` (linear, angular part)."""
    b = ctx.bounds
    limits = []
    v = v.copy()
    for sl, accel, name in ((slice(0, 3), b.linear_accel, 'linear'),
                            (slice(3, 6), b.angular_accel, 'angular')):
        dv = v[sl] - ctx.prev[sl]
        n = math.sqrt(float(dv @ dv))
        room = accel * ctx.dt * (1.0 - ACCEL_MARGIN)
        if n > room:
            v[sl] = ctx.prev[sl] + dv * (room / n)
            limits.append(f'accel:{name}')
    return v, limits, ''


def contact_retreat(v: np.ndarray, ctx: Context) -> StageResult:
    """While a contact lasts, only linear motion along the contact force (away), no rotation."""
    n = ctx.contact
    if n is None or not v.any():
        return v, [], ''
    out = np.zeros(6)
    out[:3] = max(0.0, float(v[:3] @ n)) * n
    if np.array_equal(out, v):
        return v, [], ''
    reason = '' if out.any() else 'in contact: only motion away from it is allowed'
    return out, ['contact:retreat_only'], reason


def workspace(v: np.ndarray, ctx: Context) -> StageResult:
    """Per axis, keep the predicted stop of the tool centre point inside the box.

    The stop must fall ``LINEARIZATION_MARGIN_M`` inside the box; outside the box itself, and in
    the outer half of that margin, only motion straight back is allowed. Commanded motion stops
    at the margin, so the tool reaches its outer half only by what the prediction does not
    model: a driver's inverse kinematics drifts the tool sideways while it slides along a wall
    or rotates there (seen in the graph fuzz with the simulated arm's damped least squares:
    1 mm of drift within a second of sliding and turning at the wall), and sliding on would add
    up that drift without bound; backing off cannot.
    """
    view, b = ctx.view, ctx.bounds
    if view is None:
        return v, [], ''
    pos = view.position
    outside = [not lo <= p <= hi for p, lo, hi in zip(pos, b.ws_lo, b.ws_hi, strict=True)]
    guard = 0.5 * LINEARIZATION_MARGIN_M
    at_wall = [not lo + guard <= p <= hi - guard
               for p, lo, hi in zip(pos, b.ws_lo, b.ws_hi, strict=True)]
    back_only = any(at_wall)
    limits: list[str] = []
    v = v.copy()
    if back_only:
        # Only motion back into the box: the inward components on the axes where it is outside
        # or at the wall; no sliding along the box and no rotation.
        limits.append('workspace:outside' if any(outside) else 'workspace:at_wall')
        v[3:] = 0.0
    decel = b.linear_accel / math.sqrt(3.0)  # per axis, so that the three together keep it
    for i in range(3):
        if back_only and not at_wall[i]:
            v[i] = 0.0
            continue
        w = float(v[i])
        if w > 0.0:
            allowed = brake_speed(b.ws_hi[i] - LINEARIZATION_MARGIN_M - pos[i], ctx.horizon,
                                  decel)
            if w > allowed:
                v[i] = allowed
                limits.append(f'workspace:{AXES[i]}_max')
        elif w < 0.0:
            allowed = brake_speed(pos[i] - b.ws_lo[i] - LINEARIZATION_MARGIN_M, ctx.horizon,
                                  decel)
            if -w > allowed:
                v[i] = -allowed
                limits.append(f'workspace:{AXES[i]}_min')
    reason = ''
    if not v.any() and limits:
        reason = ('outside the workspace or at its wall: only motion back into it is allowed'
                  if back_only else 'workspace: no motion allowed')
    return v, limits, reason


def _downward(v: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Downward speed of points at ``offsets`` from the tool centre point under twist ``v``."""
    return -(v[2] + v[3] * offsets[:, 1] - v[4] * offsets[:, 0])


def table_plane(v: np.ndarray, ctx: Context) -> StageResult:
    """Scale ``v`` so that no contact frame can be carried into the table plane."""
    view, b = ctx.view, ctx.bounds
    if view is None or not len(view.points) or not v.any():
        return v, [], ''
    offsets = view.points - np.asarray(view.position)
    down = _downward(v, offsets)
    room = view.points[:, 2] - b.table_z - LINEARIZATION_MARGIN_M
    rate = scale_rate(v, b)
    scale = 1.0
    worst = -1
    for j in np.flatnonzero(down > 0.0):
        d = float(down[j])
        s = brake_speed(float(room[j]), ctx.horizon, rate * d) / d
        if s < scale:
            scale, worst = s, int(j)
    if worst < 0:
        return v, [], ''
    name = ctx.kinematics.contact_frames[worst] if ctx.kinematics is not None else str(worst)
    if scale <= 0.0:
        return np.zeros(6), [f'table:{name}'], (f'{name} at the table plane: no motion towards '
                                                'it')
    return v * scale, [f'table:{name}'], ''


def joints(v: np.ndarray, ctx: Context) -> StageResult:
    """Joint position margins (braking), joint speed bounds (now and predicted), singularity."""
    view, b, kin = ctx.view, ctx.bounds, ctx.kinematics
    if view is None or kin is None or not v.any():
        return v, [], ''
    s = view.s
    s_min = float(s[-1])
    if not s_min > SINGULAR_EPS * float(s[0]):
        return np.zeros(6), ['joint:singular'], (
            f'at a singularity (smallest singular value {s_min:.2e}): no motion allowed')
    qd = view.joint_velocity(v)
    if not np.isfinite(qd).all():
        return np.zeros(6), ['joint:singular'], 'joint velocities not finite'
    if not qd.any():  # a twist too small to move any joint (denormals)
        return np.zeros(6), [], ''
    q = view.q
    if s_min < b.singularity_threshold:
        # Near a singularity only motion that does not bring the arm closer is allowed:
        # compare the smallest singular value after a small step along qd.
        unit = qd / float(np.abs(qd).max())
        s_next = np.linalg.svd(kin.jacobian(q + unit * SINGULAR_PROBE_RAD),
                               compute_uv=False)[-1]
        if s_next < s_min:
            return np.zeros(6), ['joint:singular'], (
                f'motion towards a singularity (smallest singular value {s_min:.2e} < '
                f'{b.singularity_threshold}): not allowed')
    rate = scale_rate(v, b)
    scale = 1.0
    blocked = ''
    limits: list[str] = []
    names = b.joint_names
    ql = q.tolist()
    for i, w in enumerate(qd.tolist()):
        if w == 0.0:
            continue
        speed = abs(w)
        room = b.q_hi[i] - ql[i] if w > 0.0 else ql[i] - b.q_lo[i]
        f = brake_speed(room, ctx.horizon, rate * speed) / speed
        if f < 1.0:
            limits.append(f'joint_margin:{names[i]}')
            if f < scale:
                scale = f
                blocked = names[i] if f <= 0.0 else blocked
        if speed > b.qd_max[i]:
            limits.append(f'joint_velocity:{names[i]}')
            scale = min(scale, b.qd_max[i] / speed)
    if scale <= 0.0:
        return np.zeros(6), limits, f'joint {blocked} at its position margin: no motion allowed'
    return (v * scale if scale < 1.0 else v), limits, ''


def _step_check(v: np.ndarray, view: JointView, kin: ArmKinematics, ctx: Context,
                inside: Sequence[bool], above: np.ndarray) -> tuple[str, float]:
    """Check the predicted joint path of ``v``: return ('', 1) or (what fails, speed ratio).

    The path is ``q + pinv(J(q)) v t`` for ``t`` up to ``horizon``; at its end the tool centre
    point must stay in the box on the axes where it is inside now and the contact frames above
    the table plane where they are above now; at ``PATH_SAMPLES`` points along it (the arm is
    not linear: near a singularity the joint speeds a twist needs change fast) the joint speeds
    the same twist needs must stay ``PATH_SPEED_MARGIN`` within their bounds. The ratio is the
    largest joint speed over its bound along the path (inf for a box or table failure).
    """
    b = ctx.bounds
    step = view.joint_velocity(v) * ctx.horizon
    q_next = view.q + step
    pos, _ = kin.fk(q_next)
    for i in range(3):
        if inside[i] and not b.ws_lo[i] <= pos[i] <= b.ws_hi[i]:
            return 'workspace', math.inf
    if above.any():
        z = np.concatenate([kin.contact_points(q_next)[:, 2], kin.link_lowest(q_next)])
        if (z[above] < b.table_z).any():
            return 'table', math.inf
    qd_max = np.asarray(b.qd_max) * (1.0 - PATH_SPEED_MARGIN)
    worst, joint = 0.0, 0
    for f in PATH_SAMPLES:
        qd = np.linalg.pinv(kin.jacobian(view.q + step * f)) @ v
        if not np.isfinite(qd).all():
            return 'singular', math.inf
        r = np.abs(qd) / qd_max
        k = int(np.argmax(r))
        if r[k] > worst:
            worst, joint = float(r[k]), k
    if worst > 1.0:
        return f'joint_velocity:{b.joint_names[joint]}', worst
    return '', 1.0


def predicted_step(v: np.ndarray, ctx: Context) -> StageResult:
    """Check the predicted joint step with the full FK and Jacobian; scale down until it holds."""
    view, b, kin = ctx.view, ctx.bounds, ctx.kinematics
    if view is None or kin is None or not v.any():
        return v, [], ''
    inside = [lo <= p <= hi for p, lo, hi in zip(view.position, b.ws_lo, b.ws_hi, strict=True)]
    above = np.concatenate([view.points[:, 2], view.links]) >= b.table_z
    what, ratio = _step_check(v, view, kin, ctx, inside, above)
    if not what:
        return v, [], ''
    limits = [f'step:{what}']
    if math.isfinite(ratio):  # joint speed only: try the ratio's scale first
        guess = (1.0 - 1e-9) / ratio
        if not _step_check(v * guess, view, kin, ctx, inside, above)[0]:
            return v * guess, limits, ''
    lo, hi = 0.0, 1.0  # lo: a scale known to pass (0 always does)
    for _ in range(STEP_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _step_check(v * mid, view, kin, ctx, inside, above)[0]:
            hi = mid
        else:
            lo = mid
    if lo <= 0.0:
        return np.zeros(6), limits, f'predicted step fails ({what}): no motion allowed'
    return v * lo, limits, ''


#: Stages applied once to an action's twist; the result is held as the target.
TARGET_STAGES: tuple[Stage, ...] = (per_axis_clamp, cartesian_speed)
#: Stages applied to the target for every published command, in order.
OUTPUT_STAGES: tuple[Stage, ...] = (acceleration, contact_retreat, workspace, table_plane, joints,
                                    predicted_step)


def run_stages(stages: Sequence[Stage], v: np.ndarray, ctx: Context) -> StageResult:
    """Run ``stages`` in order; return the twist, every limit that acted, the first reason.

    Components below ``FLUSH`` (denormal noise, physically no motion) are set to zero first and
    after every stage.
    """
    limits: list[str] = []
    reason = ''
    v = np.where(np.abs(v) < FLUSH, 0.0, v)
    for stage in stages:
        v, more, why = stage(v, ctx)
        v = np.where(np.abs(v) < FLUSH, 0.0, v)
        limits.extend(more)
        reason = reason or why
        if not v.any() and why:
            break  # nothing left to limit
    return v, limits, reason
