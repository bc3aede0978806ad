"""Closed-loop evaluation on the simulated arm: success rate per task, steps, safety, speed.

Two loops run the same episodes (episode ``k`` of a run, counting from 1 over the interleaved
tasks, uses layout seed ``seed + k``, the numbering of ``sim_arm_node``, which re-seeds with
``seed + 1`` on each new instruction):

* ``graph`` (the reported figures): the real node processes of ``vla-ros bringup --sim``
  (camera -> VLA -> safety -> simulated arm, over DDS, with ``config/safety_node.yaml``), driven
  by an evaluator node that publishes each instruction, waits for ``/sim/task_success`` or a time
  limit, and reads ``/vla/action`` and ``/vla/safety_status``. The baselines take the VLA node's
  place in the same graph: a stand-in node answers each ``Observation`` with a ``VlaAction``
  from the scripted expert (on the simulator's ground truth ``/sim/world_state``) or from the
  random policy. Each graph keeps its safety nodes' latch files in a state folder of its own;
  an episode that ends latched (a protective stop) fails, and once the next episode's scene is
  in place the evaluator calls the safety node's ``~/reset``, as an operator would.
* ``in-process`` (quick iteration): ``World`` + the camera node's preprocessing + the policy +
  the pure ``SafetyLimiter`` with the same configuration (joint states and ticks at its output
  rate) + the world stepped by the limited twist, on a simulated clock.

With ``arms`` > 1 the graph is ``vla-ros bringup --sim --arg robots:=arm1,...``: one VLA node
serves every arm in one batch, each arm with its own camera, safety and simulated arm. The arms
share the schedule: arm ``a`` runs the ``a``-th of N consecutive parts of it (the same episodes,
layouts included, as one arm running all of them), all arms at the same time, so every arm
works in a scene of its own and the N-arm figures compare episode by episode with a single-arm
run. ``time_scale`` s
slows every time constant of the loop together (camera rate / s; action period, timeouts,
the VLA node's observation age and gripper dwell x s; speed limits / s, acceleration limits /
s^2), so that each action is the same motion taking s times longer: for a CPU that cannot run
a batch within the 0.2 s period. The simulator's physics runs as always.

Per task and policy the report gives the success rate, steps (actions) to success, safety
interventions (actions the limiter changed, and stops: transitions to STOPPED/DONE/ESTOP) and the
inference time and rate, and with several arms the same per arm. Run
``vla-ros eval --sim --episodes N [--arms 4 --time-scale 8]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_ros.bringup import default_checkpoint
from vla_ros.core.actions import gripper_closedness
from vla_ros.core.errors import ConfigError
from vla_ros.core.image import ImageConfig, preprocess
from vla_ros.core.safety import SafetyConfig, SafetyLimiter, SafetyState
from vla_ros.sim.state import WorldStateError, from_json
from vla_ros.sim.tasks import TASKS, Task, World, WorldState, expert_action, random_action

__all__ = [
    'POLICIES',
    'EpisodeResult',
    'EvalConfig',
    'TaskSummary',
    'format_report',
    'load_safety_config',
    'run_graph',
    'run_in_process',
    'summarize',
]

logger = logging.getLogger(__name__)

#: Policies an evaluation can run: the checkpoint, and the two baselines.
POLICIES = ('vla', 'expert', 'random')
#: SafetyConfig fields in seconds, in m/s or rad/s, and in m/s^2 or rad/s^2 (``time_scale``).
_TIMES = ('action_period', 'action_timeout', 'camera_timeout', 'vla_heartbeat_timeout',
          'joint_state_timeout', 'gripper_min_dwell')
_SPEEDS = ('max_linear_speed', 'max_angular_speed')
_ACCELS = ('max_linear_accel', 'max_angular_accel')
_STOP_STATES = (SafetyState.STOPPED, SafetyState.DONE, SafetyState.ESTOP)


def load_safety_config(path: str | os.PathLike[str] | None = None) -> SafetyConfig:
    """Return the limiter settings of a safety node parameter file (default: the package's)."""
    import yaml

    from vla_ros.bringup import config_dir

    file = Path(path) if path else config_dir() / 'safety_node.yaml'
    with open(file, encoding='utf-8') as f:
        data = yaml.safe_load(f)
    params = next(iter(data.values()))['ros__parameters']
    names = {f.name for f in dataclasses.fields(SafetyConfig)}
    return SafetyConfig.from_dict({k: v for k, v in params.items() if k in names})


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate: tasks, episodes per task, seeds, limits and preprocessing.

    ``max_steps`` bounds the actions of one episode (the tasks' own budget by default);
    ``baseline_episodes`` (None: ``episodes``) is the count for the expert and random policies.
    ``arms``: simulated arms served by the one VLA node (graph mode), sharing the schedule
    (``arm_schedule``); ``time_scale``: see the module docstring. ``safety``
    holds the limits as configured (``safety_file`` is where they came from, '' = the
    package's); ``loop_safety`` the ones the loop runs with, time-scaled.
    """

    tasks: tuple[str, ...] = tuple(TASKS)
    episodes: int = 50
    seed: int = 0
    max_steps: int | None = None
    policies: tuple[str, ...] = POLICIES
    baseline_episodes: int | None = None
    checkpoint: str = ''
    unnorm_key: str | None = None
    safety: SafetyConfig = field(default_factory=load_safety_config)
    image: ImageConfig = field(default_factory=ImageConfig)
    gripper_convention: str = 'raw'
    random_seed: int = 12345
    arms: int = 1
    time_scale: float = 1.0
    safety_file: str = ''

    def __post_init__(self) -> None:
        """Validate the fields (ConfigError names the bad one)."""
        object.__setattr__(self, 'tasks', tuple(self.tasks))
        object.__setattr__(self, 'policies', tuple(self.policies))
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ConfigError(f'tasks must be names from {sorted(TASKS)}, got {self.tasks!r}')
        bad = [p for p in self.policies if p not in POLICIES]
        if not self.policies or bad:
            raise ConfigError(f'policies must be from {POLICIES}, got {self.policies!r}')
        if self.episodes < 1 or (self.baseline_episodes is not None
                                 and self.baseline_episodes < 0):
            raise ConfigError('episodes must be >= 1 and baseline_episodes >= 0')
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f'max_steps must be >= 1, got {self.max_steps}')
        if not 1 <= self.arms <= 64:
            raise ConfigError(f'arms must be 1..64, got {self.arms}')
        if not (math.isfinite(self.time_scale) and 0.1 <= self.time_scale <= 100.0):
            raise ConfigError(f'time_scale must be in [0.1, 100], got {self.time_scale}')

    @property
    def loop_safety(self) -> SafetyConfig:
        """The limits the loop runs with: ``safety`` with its time constants scaled."""
        if self.time_scale == 1.0:
            return self.safety
        return SafetyConfig.from_dict({**self.safety.to_dict(), **self.scaled_safety()})

    def scaled_safety(self) -> dict[str, float]:
        """The safety parameters ``time_scale`` changes, with their new values ({} at 1)."""
        if self.time_scale == 1.0:
            return {}
        s, safety = self.time_scale, self.safety
        out = {name: getattr(safety, name) * s for name in _TIMES}
        out.update({name: getattr(safety, name) / s for name in _SPEEDS})
        out.update({name: getattr(safety, name) / s**2 for name in _ACCELS})
        return out

    def arm_names(self) -> list[str]:
        """The arms' namespaces: ``arm1``, ``arm2``, ... ('' alone for a single arm)."""
        return [f'arm{a}' for a in range(1, self.arms + 1)] if self.arms > 1 else ['']

    def arm_schedule(self, policy: str, arm: str) -> list[tuple[int, Task, int]]:
        """Arm ``arm``'s consecutive part of ``schedule(policy)``, numbered from 1 for that arm.

        (local episode number j, task, layout seed): the arm's camera node numbers its episodes
        from 1, and its simulator, started with seed ``arm_seed_base``, lays out episode j with
        the schedule's seed. One arm: the whole schedule.
        """
        schedule = self.schedule(policy)
        index, n = self.arm_names().index(arm), self.arms
        if len(schedule) < n:
            raise ConfigError(f'{len(schedule)} episodes of {policy} cannot be shared by '
                              f'{n} arms')
        start, stop = len(schedule) * index // n, len(schedule) * (index + 1) // n
        return [(j, task, seed) for j, (_, task, seed) in
                enumerate(schedule[start:stop], start=1)]

    def arm_seed_base(self, policy: str, arm: str) -> int:
        """The ``seed`` of arm ``arm``'s simulator (it lays out episode j with seed + j)."""
        first = self.arm_schedule(policy, arm)[0]
        return first[2] - first[0]

    def episodes_for(self, policy: str) -> int:
        """Episodes per task for ``policy``."""
        if policy == 'vla' or self.baseline_episodes is None:
            return self.episodes
        return self.baseline_episodes

    def schedule(self, policy: str) -> list[tuple[int, Task, int]]:
        """(episode number k from 1, task, layout seed) in run order: tasks interleaved."""
        out = []
        for _ in range(self.episodes_for(policy)):
            for name in self.tasks:
                k = len(out) + 1
                out.append((k, TASKS[name], self.seed + k))
        return out

    def steps_for(self, task: Task) -> int:
        """Return the action budget of one episode of ``task``."""
        return self.max_steps if self.max_steps is not None else task.max_steps


@dataclass
class EpisodeResult:
    """One episode: outcome, steps, what the limiter did and how long inference took."""

    policy: str
    task: str
    seed: int
    success: bool
    steps: int
    limited_actions: int = 0
    stops: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    end_reason: str = ''
    inference_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    actions: int = 0
    arm: str = ''
    stop_reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inference times summarized)."""
        out = dataclasses.asdict(self)
        ms = out.pop('inference_ms')
        out['inference_ms_median'] = statistics.median(ms) if ms else None
        return out


def _count_stop(result: EpisodeResult, reason: str) -> None:
    """Count a stop under its kind: the reason up to its first colon ('camera stale')."""
    kind = reason.split(':', 1)[0].strip() or 'unknown'
    result.stop_reasons[kind] = result.stop_reasons.get(kind, 0) + 1


@dataclass
class TaskSummary:
    """Aggregate of one (policy, task)."""

    policy: str
    task: str
    episodes: int
    successes: int
    success_rate: float
    steps_to_success_mean: float | None
    steps_to_success_median: float | None
    limited_actions_per_episode: float
    limited_action_fraction: float
    stops_per_episode: float
    inference_ms_median: float | None
    inference_ms_p95: float | None
    action_rate_hz: float | None
    top_limits: dict[str, int]


def summarize(results: Sequence[EpisodeResult]) -> list[TaskSummary]:
    """Aggregate episodes per (policy, task), in first-seen order."""
    groups: dict[tuple[str, str], list[EpisodeResult]] = {}
    for r in results:
        groups.setdefault((r.policy, r.task), []).append(r)
    out = []
    for (policy, task), rs in groups.items():
        wins = [r.steps for r in rs if r.success]
        ms = sorted(m for r in rs for m in r.inference_ms)
        actions = sum(r.actions for r in rs)
        wall = sum(r.wall_s for r in rs)
        limits: Counter[str] = Counter()
        for r in rs:
            limits.update(r.limits)
        out.append(TaskSummary(
            policy=policy, task=task, episodes=len(rs), successes=len(wins),
            success_rate=len(wins) / len(rs),
            steps_to_success_mean=statistics.fmean(wins) if wins else None,
            steps_to_success_median=statistics.median(wins) if wins else None,
            limited_actions_per_episode=statistics.fmean(r.limited_actions for r in rs),
            limited_action_fraction=(sum(r.limited_actions for r in rs) / actions
                                     if actions else 0.0),
            stops_per_episode=statistics.fmean(r.stops for r in rs),
            inference_ms_median=statistics.median(ms) if ms else None,
            inference_ms_p95=ms[min(len(ms) - 1, int(0.95 * len(ms)))] if ms else None,
            action_rate_hz=actions / wall if wall > 0 else None,
            top_limits=dict(limits.most_common(4))))
    return out


def format_report(summaries: Sequence[TaskSummary], title: str = '') -> str:
    """Return a fixed-width table of the summaries."""
    def num(value: float | None, fmt: str) -> str:
        return '-' if value is None else format(value, fmt)

    lines = [title] if title else []
    lines.append(f'{"policy":<7} {"task":<12} {"success":>11} {"steps":>6} {"limited/ep":>10} '
                 f'{"stops/ep":>8} {"infer ms":>8} {"rate Hz":>7}  top limits')
    for s in summaries:
        lines.append(
            f'{s.policy:<7} {s.task:<12} {s.successes:>3}/{s.episodes:<3}{s.success_rate:>4.0%} '
            f'{num(s.steps_to_success_mean, ".1f"):>6} {s.limited_actions_per_episode:>10.2f} '
            f'{s.stops_per_episode:>8.2f} {num(s.inference_ms_median, ".1f"):>8} '
            f'{num(s.action_rate_hz, ".2f"):>7}  '
            + ', '.join(f'{k} x{v}' for k, v in s.top_limits.items()))
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# Policies as functions of (image, instruction, state)
# --------------------------------------------------------------------------------------------

#: ``policy(image, instruction, state, task) -> (raw 7D action, inference ms, confidence)``;
#: confidence is ``(token_probs, token_margins)`` of the 7 action tokens, or None for the
#: scripted baselines, which the confidence gate takes as certain.
PolicyFn = Callable[[np.ndarray, str, WorldState, Task],
                    tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray] | None]]
CERTAIN = (np.ones(7), np.ones(7))


def _load_vla(config: EvalConfig) -> Any:
    from vla_ros.policy.policy import OpenVLAPolicy

    path = config.checkpoint or str(default_checkpoint())
    return OpenVLAPolicy.from_pretrained(path, unnorm_key=config.unnorm_key, device='cpu')


def make_policy(name: str, config: EvalConfig, vla: Any = None) -> PolicyFn:
    """Return a ``PolicyFn``: ``(raw 7D action, inference ms, confidence or None)``."""
    if name == 'vla':
        policy = vla if vla is not None else _load_vla(config)

        def run_vla(image: np.ndarray, instruction: str, state: WorldState,
                    task: Task) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray]]:
            out = policy.predict(image, instruction)
            return (np.array(out.action, dtype=float), float(out.timings.get('total', math.nan)),
                    (out.token_probs, out.token_margins))
        return run_vla
    if name == 'expert':
        def run_expert(image: np.ndarray, instruction: str, state: WorldState,
                       task: Task) -> tuple[np.ndarray, float, None]:
            start = time.perf_counter()
            action = expert_action(task, state)
            return action, (time.perf_counter() - start) * 1e3, None
        return run_expert
    if name == 'random':
        rng = np.random.default_rng(config.random_seed)

        def run_random(image: np.ndarray, instruction: str, state: WorldState,
                       task: Task) -> tuple[np.ndarray, float, None]:
            return random_action(rng), 0.0, None
        return run_random
    raise ConfigError(f'unknown policy {name!r}; choose from {POLICIES}')


# --------------------------------------------------------------------------------------------
# In-process loop
# --------------------------------------------------------------------------------------------


def run_episode(world: World, limiter: SafetyLimiter, policy: PolicyFn, task: Task, seed: int,
                config: EvalConfig, policy_name: str = 'vla', episode_id: int = 1,
                t0: float = 0.0) -> tuple[EpisodeResult, float]:
    """Run one episode in process; return the result and the simulated clock at its end.

    Per action: render, preprocess as the camera node does, predict, convert the gripper with
    ``gripper_convention``, feed the limiter (camera frame, joint state, action), then execute
    the limited twist for one action period in ``output_rate_hz`` ticks, each with a fresh joint
    state and ``limiter.tick`` as the safety node does; success is checked at every tick.
    """
    start = time.perf_counter()
    world.reset(seed, task)
    s = config.safety
    ticks = max(1, round(s.output_rate_hz * s.action_period))
    dt = s.action_period / ticks
    now = t0
    limiter.on_episode(episode_id, task.instruction, now)
    result = EpisodeResult(policy=policy_name, task=task.name, seed=seed, success=False,
                           steps=0)
    limits: Counter[str] = Counter()
    state = limiter.state

    def track(decision: Any) -> None:
        nonlocal state
        if decision.state is not state and decision.state in _STOP_STATES:
            result.stops += 1
            result.end_reason = decision.reason
            _count_stop(result, decision.reason)
        state = decision.state

    for step in range(config.steps_for(task)):
        image = preprocess(world.observe(), config.image)
        action, ms, confidence = policy(image, task.instruction, world.state(), task)
        probs, margins = CERTAIN if confidence is None else confidence
        result.inference_ms.append(ms)
        result.actions += 1
        closed = gripper_closedness(float(action[6]), config.gripper_convention) \
            if math.isfinite(float(action[6])) else math.nan
        limiter.on_camera_frame(now, now)
        limiter.on_joint_state(world.arm.q, now, now)
        decision = limiter.on_action(action, closed, episode_id, now, now,
                                     instruction=task.instruction, frame_id=s.frame_id,
                                     token_probs=probs, token_margins=margins)
        track(decision)
        step_limits = set(decision.limits_applied)
        if decision.gripper is not None:
            world.set_gripper(decision.gripper)
        for k in range(ticks):
            if k:
                limiter.on_joint_state(world.arm.q, now, now)
                decision = limiter.tick(now)
                track(decision)
                step_limits.update(decision.limits_applied)
            world.apply_twist(decision.twist, dt)
            now += dt
            if world.success():
                result.success = True
                break
        if step_limits:
            result.limited_actions += 1
            limits.update(step_limits)
        if result.success:
            result.steps = step + 1
            result.end_reason = 'success'
            break
        if limiter.state in (SafetyState.DONE, SafetyState.ESTOP):
            break
    else:
        result.end_reason = result.end_reason or 'step budget'
    if not result.success:
        result.steps = result.actions
    result.limits = dict(limits)
    result.wall_s = time.perf_counter() - start
    return result, now


def run_in_process(config: EvalConfig, vla: Any = None,
                   progress: Callable[[EpisodeResult], None] | None = None
                   ) -> list[EpisodeResult]:
    """Evaluate every policy of ``config`` in process; ``vla`` is a loaded policy (optional)."""
    from vla_ros.core.kinematics import ArmKinematics, default_urdf_path

    kinematics = ArmKinematics.from_urdf_file(default_urdf_path())
    world = World()
    results = []
    for name in config.policies:
        policy = make_policy(name, config, vla)
        limiter = SafetyLimiter(config.safety, kinematics)
        now = 0.0
        for k, task, seed in config.schedule(name):
            result, now = run_episode(world, limiter, policy, task, seed, config, name,
                                      episode_id=k, t0=now + 1.0)
            results.append(result)
            if progress is not None:
                progress(result)
    return results


# --------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------


class _GraphEvaluator:
    """The evaluator node: instructions out; success, actions and safety status in.

    For the baselines it also stands in for the VLA node: each ``Observation`` is answered with a
    ``VlaAction`` from the expert or the random policy.
    """

    def __init__(self, context: Any, namespace: str, stand_in: str | None,
                 config: EvalConfig, arm: str = '') -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import Bool, String

        from vla_ros.bringup import arm_namespace, arm_topic
        from vla_ros.msg import Observation, SafetyStatus, VlaAction
        from vla_ros.nodes import qos

        # Deep queues on the listening side: every status transition and action counts.
        keep_all = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)

        ns = '/' + arm_namespace(arm, namespace)
        self.arm = arm
        self.node = rclpy.create_node(f'vla_ros_eval_{arm}' if arm else 'vla_ros_eval',
                                      context=context)
        self._lock = threading.Condition()
        self.success_msgs: list[tuple[float, bool]] = []
        self.actions: list[tuple[float, Any]] = []
        self.statuses: list[tuple[float, Any]] = []
        self.instr_pub = self.node.create_publisher(String, f'{ns}/instruction',
                                                  qos.LATCHED)
        self.node.create_subscription(Bool, arm_topic(arm, '/sim/task_success'),
                                      self._on_success, keep_all)
        self.node.create_subscription(SafetyStatus, f'{ns}/safety_status',
                                      lambda m: self._keep(self.statuses, m), keep_all)
        self.world_state: WorldState | None = None
        self.node.create_subscription(String, arm_topic(arm, '/sim/world_state'),
                                      self._on_world_state, 10)
        #: The VLA node's last diagnostics (its policy status and its arms'), by status name.
        self.vla_diagnostics: dict[str, dict[str, str]] = {}
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.stand_in = stand_in
        self.config = config
        self._seeds: dict[int, tuple[Task, int]] = {}
        self._rng = np.random.default_rng(config.random_seed)
        if stand_in is None:
            self.node.create_subscription(VlaAction, f'{ns}/action',
                                          lambda m: self._keep(self.actions, m), reliable)
        else:
            self.action_pub = self.node.create_publisher(VlaAction, f'{ns}/action', qos.ACTION)
            self.node.create_subscription(Observation, f'{ns}/observation', self._on_observation,
                                          qos.LATEST)
        from std_srvs.srv import Trigger
        self._Trigger = Trigger
        self._reset = self.node.create_client(Trigger, f'{ns}/safety_node/reset')
        self._VlaAction = VlaAction
        self._String = String
        self.executor = rclpy.executors.SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def latched(self) -> bool:
        """Whether the safety node's last status is a latched stop (ESTOP)."""
        with self._lock:
            return bool(self.statuses) and self.statuses[-1][1].state == 4

    def reset(self, timeout: float = 10.0) -> bool:
        """Call the safety node's ``~/reset``; True when it answered with success."""
        if not self._reset.wait_for_service(timeout_sec=timeout):
            return False
        future = self._reset.call_async(self._Trigger.Request())
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            time.sleep(0.02)
        return future.done() and bool(future.result().success)

    def close(self) -> None:
        """Stop spinning and destroy the node."""
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    def _keep(self, where: list, msg: Any) -> None:
        with self._lock:
            where.append((time.monotonic(), msg))
            self._lock.notify_all()

    def _on_success(self, msg: Any) -> None:
        self._keep(self.success_msgs, bool(msg.data))

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if 'vla_node: ' in status.name:
                self.vla_diagnostics[status.name] = {kv.key: kv.value for kv in status.values}

    def _on_world_state(self, msg: Any) -> None:
        try:
            self.world_state = from_json(msg.data)
        except WorldStateError as exc:
            logger.warning('world state ignored: %s', exc)

    def expect(self, episode_id: int, task: Task, seed: int) -> None:
        """Tell the stand-in expert which layout episode ``episode_id`` shows."""
        self._seeds[episode_id] = (task, seed)

    def _expert_state(self, episode_id: int) -> tuple[Task, WorldState] | None:
        """Return the expert's view of the world, or None while it is not this episode's.

        The simulator's ground truth ``/sim/world_state`` (tool pose, blocks, held block,
        gripper of the newest camera frame), once it shows this episode's seed.
        """
        truth = self.world_state
        if episode_id not in self._seeds or truth is None:
            return None
        task, seed = self._seeds[episode_id]
        if truth.seed != seed:
            return None
        return task, truth

    def _on_observation(self, obs: Any) -> None:
        start = time.perf_counter()
        if self.stand_in == 'expert':
            found = self._expert_state(int(obs.episode_id))
            if found is None:
                return
            action = expert_action(*found)
        else:
            action = random_action(self._rng)
        msg = self._VlaAction()
        msg.header = obs.header
        msg.header.frame_id = self.config.safety.frame_id  # the delta's frame, as vla_node does
        msg.token_probs = np.ones(7, dtype=np.float32)  # a scripted policy is certain
        msg.token_margins = np.ones(7, dtype=np.float32)
        msg.episode_id = obs.episode_id
        msg.delta = np.asarray(action, dtype=np.float64)
        msg.inference_ms = float((time.perf_counter() - start) * 1e3)
        msg.instruction = obs.instruction
        self.action_pub.publish(msg)
        self._keep(self.actions, msg)

    def instruct(self, text: str) -> float:
        """Publish an instruction; return the monotonic time it went out."""
        with self._lock:
            t = time.monotonic()
            self.instr_pub.publish(self._String(data=text))
        return t

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (on message arrival) until ``predicate()`` holds or ``timeout`` passes."""
        end = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
        return True


def _graph_specs(config: EvalConfig, policy: str, namespace: str) -> list[Any]:
    from vla_ros.bringup import node_specs

    values = {'use_sim': 'true', 'namespace': namespace, 'device': 'cpu',
              'model_path': config.checkpoint or str(default_checkpoint())}
    if config.unnorm_key:
        values['unnorm_key'] = config.unnorm_key
    if config.safety_file:
        values['safety_config'] = config.safety_file
    if config.arms > 1:
        values['robots'] = ','.join(config.arm_names())
    overrides: dict[str, dict[str, Any]] = {}
    if config.time_scale != 1.0:
        from vla_ros.nodes.camera_node import PARAMS as CAMERA_PARAMS
        from vla_ros.nodes.vla_node import PARAMS as VLA_PARAMS

        def default(params: Sequence[Any], name: str) -> float:
            return float(next(p.default for p in params if p.name == name))

        overrides = {
            'camera_node': {'policy_rate_hz':
                            default(CAMERA_PARAMS, 'policy_rate_hz') / config.time_scale},
            'vla_node': {'max_observation_age':
                         default(VLA_PARAMS, 'max_observation_age') * config.time_scale},
            'safety_node': config.scaled_safety()}
    specs = []
    for spec in node_specs(values):
        if spec.name == 'vla_node' and policy != 'vla':
            continue
        parameters = {**spec.parameters, **overrides.get(spec.name, {})}
        if spec.name == 'sim_arm_node':
            parameters['seed'] = config.arm_seed_base(policy, spec.arm)
        specs.append(dataclasses.replace(spec, parameters=parameters))
    return specs


def _node_env(domain_id: int | None, state_dir: str | None = None) -> dict[str, str]:
    from vla_ros.bringup import config_dir

    env = dict(os.environ)
    if state_dir is not None:  # the safety nodes' latch files: this run's own
        env['XDG_STATE_HOME'] = state_dir
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(config_dir() / 'fastdds_shm.xml'))
    env['PYTHONUNBUFFERED'] = '1'
    # One intra-op thread: on a shared CPU, torch's default pool stalls inference for
    # hundreds of milliseconds whenever another process holds a core.
    env.setdefault('OMP_NUM_THREADS', '1')
    if domain_id is not None:
        env['ROS_DOMAIN_ID'] = str(domain_id)
        env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    return env


def _episode_from_graph(ev: _GraphEvaluator, policy: str, task: Task, seed: int, k: int,
                        timeout: float) -> EpisodeResult:
    """Run episode ``k`` on the graph: instruct, wait for success / DONE / the time limit."""
    n_success = len(ev.success_msgs)
    n_status = len(ev.statuses)
    n_actions = len(ev.actions)
    ev.expect(k, task, seed)
    started = ev.instruct(task.instruction)
    # sim_arm_node republishes task_success (False) after every reset: that is the
    # acknowledgement that this episode's scene is in place.
    acked = ev.wait(lambda: any(not ok for _, ok in ev.success_msgs[n_success:]), 10.0)
    if not acked:
        logger.warning('episode %d: no reset acknowledgement from sim_arm_node', k)
    first_false = next((i for i in range(n_success, len(ev.success_msgs))
                        if not ev.success_msgs[i][1]), len(ev.success_msgs))
    if ev.latched():
        # A stop an earlier episode latched (that episode failed): reset it as an operator
        # would, now that the scene and the arm are back in place (before, the arm may still
        # press into the contact that latched it, and the next action latches it again).
        logger.warning('%s: reset before episode %d: %s', ev.arm or 'the arm', k,
                       ev.statuses[-1][1].reason)
        if not ev.reset():
            logger.warning('%s: the reset was not accepted', ev.arm or 'the arm')
        n_status = len(ev.statuses)

    def mine(msg: Any) -> bool:
        return int(msg.episode_id) == k

    def finished() -> bool:
        if any(ok for _, ok in ev.success_msgs[first_false:]):
            return True
        return any(mine(s) and s.state in (3, 4) for _, s in ev.statuses[n_status:])

    ev.wait(finished, timeout)
    end = time.monotonic()
    success_time = next((t for t, ok in ev.success_msgs[first_false:] if ok), None)
    actions = [(t, a) for t, a in ev.actions[n_actions:] if mine(a)]
    statuses = [(t, s) for t, s in ev.statuses[n_status:] if mine(s)]
    until = success_time if success_time is not None else end
    result = EpisodeResult(policy=policy, task=task.name, seed=seed,
                           success=success_time is not None, steps=0)
    steps = [int(s.step_count) for t, s in statuses if t <= until]
    result.steps = max(steps) if steps else 0
    result.actions = len([1 for t, _ in actions if t <= until])
    result.inference_ms = [float(a.inference_ms) for _, a in actions]
    by_step: dict[int, set[str]] = {}
    previous = None
    for t, s in statuses:
        if t > until:
            break
        if s.limits_applied:
            by_step.setdefault(int(s.step_count), set()).update(s.limits_applied)
        if s.state != previous and s.state in (2, 3, 4):
            result.stops += 1
            result.end_reason = s.reason
            _count_stop(result, s.reason)
        previous = s.state
    result.limited_actions = len(by_step)
    result.limits = dict(Counter(name for names in by_step.values() for name in names))
    result.end_reason = 'success' if result.success else (result.end_reason or 'time limit')
    result.wall_s = until - started
    return result


class _Graph:
    """The node processes of one run, started as ``vla-ros bringup`` starts them; logs kept.

    A thread pumps their output into memory (not to stdout), so no node blocks on its pipe.
    """

    def __init__(self, specs: Sequence[Any], namespace: str, env: dict[str, str]) -> None:
        from vla_ros.cli import Bringup

        self._logs: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.bringup = Bringup(specs, namespace, 'info', env, sink=self._keep)
        self._pumping = threading.Event()
        self._pumping.set()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _keep(self, name: str, line: str) -> None:
        with self._lock:
            self._logs.setdefault(name, []).append(line)

    def _pump(self) -> None:
        while self._pumping.is_set():
            self.bringup.pump(0.1)

    def output(self, name: str) -> str:
        """Everything node ``name`` logged so far."""
        with self._lock:
            return '\n'.join(self._logs.get(name, []))

    def stop(self) -> None:
        """Stop pumping, then stop the nodes (their last words are still kept)."""
        self._pumping.clear()
        self._thread.join(timeout=5.0)
        self.bringup.stop()


def run_graph(config: EvalConfig, namespace: str = 'vla', domain_id: int | None = None,
              progress: Callable[[EpisodeResult], None] | None = None,
              startup_timeout: float = 90.0, log_dir: str | None = None,
              diagnostics: dict[str, dict[str, dict[str, str]]] | None = None
              ) -> list[EpisodeResult]:
    """Evaluate every policy of ``config`` through the real node processes over DDS.

    The graph is started afresh per policy (so every policy sees the same layouts) on
    ``domain_id`` (None: the environment's), torch limited to one thread per process. With
    several arms, each runs its part of the schedule (``EvalConfig.arm_schedule``), all at
    once (one thread each). Episode time limit: the step budget times the loop's action
    period, plus 3 s. ``diagnostics`` (optional) receives the VLA node's last diagnostics per
    policy.
    """
    import rclpy
    from rclpy.context import Context

    results: list[EpisodeResult] = []
    lock = threading.Lock()
    for policy in config.policies:
        schedule = config.schedule(policy)
        if not schedule:
            continue
        # A latch a safety node persisted in another run (of this machine's user) must not
        # start this one latched, and this run's latches must not outlive it.
        state_dir = tempfile.TemporaryDirectory(prefix='vla_ros_eval_')
        env = _node_env(domain_id, state_dir.name)
        graph = _Graph(_graph_specs(config, policy, namespace), namespace, env)
        context = Context()
        rclpy.init(context=context, domain_id=domain_id)
        evaluators: list[_GraphEvaluator] = []
        try:
            stand_in = None if policy == 'vla' else policy
            for arm in config.arm_names():
                evaluators.append(_GraphEvaluator(context, namespace, stand_in, config, arm))
            for ev in evaluators:
                _wait_ready(ev, graph, policy, startup_timeout)
            failures: list[BaseException] = []

            def record(result: EpisodeResult) -> None:
                with lock:
                    results.append(result)
                    if progress is not None:
                        progress(result)

            threads = [threading.Thread(
                target=_run_arm, daemon=True,
                args=(ev, graph, policy, config.arm_schedule(policy, ev.arm), config, record,
                      failures))
                for ev in evaluators]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failures:
                raise failures[0]
            if diagnostics is not None:
                diagnostics[policy] = dict(evaluators[0].vla_diagnostics)
        finally:
            for ev in evaluators:
                ev.close()
            rclpy.try_shutdown(context=context)
            graph.stop()
            state_dir.cleanup()
            if log_dir:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                for name in graph.bringup.procs:
                    (Path(log_dir) / f'{policy}_{name.replace("/", "_")}.log').write_text(
                        graph.output(name))
    return results


def _run_arm(ev: _GraphEvaluator, graph: _Graph, policy: str,
             schedule: Sequence[tuple[int, Task, int]], config: EvalConfig,
             record: Callable[[EpisodeResult], None], failures: list[BaseException]) -> None:
    """Run one arm's part of the schedule, in its own thread.

    An exception goes to ``failures``, which also stops the other arms after their episode.
    """
    period = config.loop_safety.action_period
    try:
        for k, task, seed in schedule:
            if failures:
                return
            timeout = config.steps_for(task) * period + 3.0
            result = _episode_from_graph(ev, policy, task, seed, k, timeout)
            result.arm = ev.arm
            record(result)
            dead = graph.bringup.dead()
            if dead is not None:
                raise RuntimeError(f'node process {dead[0]} died during the evaluation '
                                   f'(code {dead[1]})')
    except BaseException as exc:  # noqa: BLE001 - re-raised by run_graph
        failures.append(exc)


def _wait_ready(ev: _GraphEvaluator, graph: _Graph, policy: str, timeout: float) -> None:
    """Wait until every node is up: the instruction's reader, the action stream, status, sim."""
    def tail(name: str) -> str:
        return '\n'.join(graph.output(name).splitlines()[-30:])

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        dead = graph.bringup.dead()
        if dead is not None:
            raise RuntimeError(f'node process {dead[0]} exited during start-up (code {dead[1]}):'
                               f'\n{tail(dead[0])}')
        vla_ready = policy != 'vla' or 'vla node active' in graph.output('vla_node')
        # The camera node reads the instruction on two subscriptions (volatile, latched).
        if (ev.instr_pub.get_subscription_count() >= 2 and vla_ready and ev.statuses
                and ev.world_state is not None and ev.success_msgs):
            return
        time.sleep(0.1)
    raise RuntimeError(f'the graph did not come up within {timeout:.0f} s:\n'
                       + '\n'.join(f'--- {name}\n{tail(name)}' for name in graph.bringup.procs))


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _print_progress(result: EpisodeResult) -> None:
    logger.info('%-6s %s%-11s seed %-5d %-7s steps %2d  limited %2d  stops %d  %s',
                result.policy, f'{result.arm} ' if result.arm else '', result.task, result.seed,
                'SUCCESS' if result.success else 'fail', result.steps, result.limited_actions,
                result.stops, result.end_reason[:60])


def evaluate(config: EvalConfig, mode: str = 'graph', json_path: str | None = None,
             domain_id: int | None = None, log_dir: str | None = None,
             command: str = '') -> dict[str, Any]:
    """Run the evaluation, log the table, optionally write JSON; return the report."""
    start = time.perf_counter()
    diagnostics: dict[str, dict[str, dict[str, str]]] = {}
    if mode == 'graph':
        results = run_graph(config, domain_id=domain_id, progress=_print_progress,
                            log_dir=log_dir, diagnostics=diagnostics)
    elif mode == 'in-process':
        if config.arms != 1 or config.time_scale != 1.0:
            raise ConfigError('arms and time_scale apply to the graph only (the in-process '
                              'loop runs one arm on a simulated clock)')
        results = run_in_process(config, progress=_print_progress)
    else:
        raise ConfigError(f"mode must be 'graph' or 'in-process', got {mode!r}")
    summaries = summarize(results)
    report: dict[str, Any] = {
        'command': command,
        'mode': mode,
        'checkpoint': config.checkpoint or default_checkpoint().name,  # no machine path
        'episodes_per_task': {p: config.episodes_for(p) for p in config.policies},
        'tasks': list(config.tasks), 'seed': config.seed,
        'arms': config.arm_names() if config.arms > 1 else 1,
        'time_scale': config.time_scale,
        'safety': config.safety.to_dict(),
        'loop_safety_changes': config.scaled_safety(),
        'seconds': round(time.perf_counter() - start, 1),
        'summary': [dataclasses.asdict(s) for s in summaries],
    }
    title = f'closed-loop evaluation ({mode}), {report["seconds"]:.0f} s'
    if config.arms > 1:
        report['per_arm'] = {
            arm: [dataclasses.asdict(s) for s in summarize([r for r in results if r.arm == arm])]
            for arm in config.arm_names()}
        title += f', {config.arms} arms served by one VLA node'
        if config.time_scale != 1.0:
            title += f', time x{config.time_scale:g}'
    report['vla_diagnostics'] = diagnostics
    report['episodes'] = [r.to_dict() for r in results]
    print(format_report(summaries, title), flush=True)
    for arm, rows in report.get('per_arm', {}).items():
        print(format_report([TaskSummary(**row) for row in rows], f'-- {arm}'), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + '\n', encoding='utf-8')
    return report


def _iter_csv(text: str) -> Iterator[str]:
    return (part.strip() for part in text.split(',') if part.strip())


def add_arguments(parser: Any) -> None:
    """Options of ``vla-ros eval`` (shared by ``python -m vla_ros.eval``)."""
    parser.add_argument('--sim', action='store_true', required=True,
                        help='evaluate on the simulated arm (the only target so far)')
    parser.add_argument('--episodes', type=int, default=50, help='episodes per task')
    parser.add_argument('--baseline-episodes', type=int, default=None,
                        help='episodes per task of the expert/random baselines (default: same)')
    parser.add_argument('--tasks', default=','.join(TASKS))
    parser.add_argument('--policies', default=','.join(POLICIES))
    parser.add_argument('--model-path', dest='model_path', default='',
                        help='checkpoint directory (default: checkpoints/sim_tabletop)')
    parser.add_argument('--unnorm-key', dest='unnorm_key', default=None)
    parser.add_argument('--seed', type=int, default=0, help='episode k uses layout seed seed+k')
    parser.add_argument('--max-steps', type=int, default=None)
    parser.add_argument('--in-process', action='store_true',
                        help='World + limiter loop instead of the node graph (fast)')
    parser.add_argument('--safety-config', default=None, help='safety_node YAML file')
    parser.add_argument('--domain-id', type=int, default=None)
    parser.add_argument('--json', default=None, help='write the full report here')
    parser.add_argument('--log-dir', default=None, help='keep the node logs here (graph mode)')
    parser.add_argument('--arms', type=int, default=1,
                        help='simulated arms served by one VLA node in one batch (graph mode): '
                             'they share the episodes (arm a runs the a-th part), all at once')
    parser.add_argument('--time-scale', dest='time_scale', type=float, default=1.0,
                        help='run the loop this many times slower, every time constant '
                             'together (graph mode; for a CPU too slow for the 0.2 s period)')


def run_from_args(opts: Any) -> int:
    """Build the configuration from parsed options and evaluate; 0 on completion."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    if opts.in_process:
        import torch
        torch.set_num_threads(1)
    config = EvalConfig(tasks=tuple(_iter_csv(opts.tasks)), episodes=opts.episodes,
                        baseline_episodes=opts.baseline_episodes,
                        policies=tuple(_iter_csv(opts.policies)), seed=opts.seed,
                        max_steps=opts.max_steps, checkpoint=opts.model_path,
                        unnorm_key=opts.unnorm_key,
                        safety=load_safety_config(opts.safety_config),
                        safety_file=opts.safety_config or '', arms=opts.arms,
                        time_scale=opts.time_scale)
    evaluate(config, 'in-process' if opts.in_process else 'graph', opts.json, opts.domain_id,
             opts.log_dir, command=getattr(opts, 'command', ''))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = 'python -m vla_ros.eval') -> int:
    """``vla-ros eval --sim ...`` and ``python -m vla_ros.eval --sim ...``."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n')[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parser.parse_args(argv)
    opts.command = ' '.join([prog, *map(shlex.quote, argv)])
    return run_from_args(opts)


if __name__ == '__main__':
    raise SystemExit(main())

