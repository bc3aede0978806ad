"""Demonstrations for the simulated tasks, seen exactly as the deployed policy sees the camera.

Recording and rendering are two steps. ``generate`` runs the scripted expert of
``vla_ros.sim.tasks`` in a ``World`` and keeps, at the policy rate, the *scene* of every step
(tool centre point pose, finger width, block poses), the task and the expert's 7D action for
that state (dx dy dz [m], droll dpitch dyaw [rad], gripper raw with 1 = open, the Bridge
convention). It needs the arm model (pinocchio) but no pixels, so it is fast and small.
``render`` then draws each kept scene with the simulator's renderer and camera and applies the
camera node's own preprocessing (``core.image.preprocess`` with the node's defaults: JPEG
round trip, lanczos resize to 224): the frames are pixel for pixel what the VLA node receives
in the ROS graph. Rendering needs numpy and Pillow only, so it can run where training runs,
in parallel processes.

What is *executed* need not be what is recorded: most episodes execute the expert's action plus
Gaussian noise and, now and then, a short excursion in a random direction, while every recorded
label is the clean expert action at the state actually visited (DAgger-style perturbations, so
the policy sees off-course states and learns to recover). A ``Behaviour`` callable decides what
is executed, so a trained policy can drive the rollouts (DAgger proper) with the expert still
labelling. All tasks share the same layout seeds, so one scene appears under each instruction
and only the instruction tells the targets apart. Rotation corrections of the expert below
``ROTATION_DEADBAND`` (integration drift of a few 1e-4 rad, invisible at 224 px) are recorded
as 0.

``compute_norm_stats`` stores the action statistics the OpenVLA way (``norm_stats[key] =
{"action": {mean, std, max, min, q01, q99, mask}, "proprio": ..., "num_transitions",
"num_trajectories"}``, mask ``[True] * 6 + [False]``: the gripper stays raw) and
``normalize_actions`` is OpenVLA's BOUNDS_Q99 training-side normalization, the inverse of
``core.actions.unnormalize``: ``clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)`` where the
mask is true, the raw value where it is false, and 0 on normalized dimensions that never vary
(min == max). OpenVLA zeroes *every* constant dimension, the masked-off gripper included; for a
data set whose gripper never changes (the reach tasks: always 1 = open) that would teach a raw 0,
i.e. "closed", so here the rule applies only where the mask is true.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_ros.core.errors import ConfigError
from vla_ros.core.image import ImageConfig, preprocess
from vla_ros.sim.scene import BLOCK_COLOURS, BLOCK_SIZE, Block, Camera, Renderer, Scene

__all__ = [
    'ALL_TASKS',
    'EEF_MASK',
    'Behaviour',
    'DataConfig',
    'Demonstrations',
    'NoisyExpert',
    'compute_norm_stats',
    'expert_label',
    'generate',
    'normalize_actions',
    'record_episode',
    'render',
]

logger = logging.getLogger(__name__)

#: OpenVLA's mask for end-effector datasets: xyz and rpy deltas are normalized, the gripper raw.
EEF_MASK: tuple[bool, ...] = (True,) * 6 + (False,)
#: The instruction-conditioned tasks the shipped checkpoint is trained on.
ALL_TASKS: tuple[str, ...] = ('reach_red', 'reach_green', 'reach_blue', 'pick_red')
#: OpenVLA's guard against a zero q01..q99 range in the normalization.
_RANGE_EPS = 1e-8
#: Expert rotation corrections smaller than this [rad] are recorded as 0.
ROTATION_DEADBAND = 2e-3
#: Order of the blocks in the scene arrays.
BLOCK_ORDER: tuple[str, ...] = tuple(BLOCK_COLOURS)

#: What is executed in a state: ``(image, instruction, state, expert_label, rng) -> 7D action``;
#: ``image`` is None while recording (frames are rendered afterwards), ``state`` a
#: ``vla_ros.sim.tasks.WorldState``.
Behaviour = Callable[[Any, str, Any, np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class DataConfig:
    """How many demonstrations, from which seeds, with which perturbations.

    Attributes:
        tasks: task names (keys of ``vla_ros.sim.tasks.TASKS``).
        episodes_per_task: episodes per task; episode ``e`` of every task uses layout seed
            ``seed + e``, so the tasks share their scenes.
        seed: first layout seed (keep training and evaluation seeds apart).
        perturb_fraction: fraction of episodes whose executed actions are perturbed.
        noise_std: standard deviation of the Gaussian noise on the executed dx, dy, dz [m].
        excursion_prob: per-step chance of starting an excursion in a perturbed episode.
        excursion_steps: (shortest, longest) excursion, in steps; an excursion moves the
            expert's largest step per step in one random direction.
        max_steps: steps per episode at most (the task's own ``max_steps`` caps it too).
        steps_after_success: steps still recorded once the task succeeds (the expert's
            converging, near-zero actions at the goal).

    """

    tasks: tuple[str, ...] = ALL_TASKS
    episodes_per_task: int = 200
    seed: int = 100_000
    perturb_fraction: float = 0.75
    noise_std: float = 0.006
    excursion_prob: float = 0.08
    excursion_steps: tuple[int, int] = (1, 4)
    max_steps: int = 60
    steps_after_success: int = 3

    def __post_init__(self) -> None:
        """Validate every field; ConfigError names the first bad one."""
        from vla_ros.sim.tasks import TASKS

        object.__setattr__(self, 'tasks', tuple(self.tasks))
        object.__setattr__(self, 'excursion_steps', tuple(int(s) for s in self.excursion_steps))
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f'tasks must be distinct names from {sorted(TASKS)}, got '
                              f'{self.tasks!r}')
        if self.episodes_per_task < 1:
            raise ConfigError(f'episodes_per_task must be >= 1, got {self.episodes_per_task}')
        if not 0.0 <= self.perturb_fraction <= 1.0:
            raise ConfigError(f'perturb_fraction must be in [0, 1], got {self.perturb_fraction}')
        if not 0.0 <= self.noise_std <= 0.05:
            raise ConfigError(f'noise_std must be in [0, 0.05] m, got {self.noise_std}')
        if not 0.0 <= self.excursion_prob <= 1.0:
            raise ConfigError(f'excursion_prob must be in [0, 1], got {self.excursion_prob}')
        lo, hi = self.excursion_steps if len(self.excursion_steps) == 2 else (0, -1)
        if not 1 <= lo <= hi:
            raise ConfigError(f'excursion_steps must be (lo, hi) with 1 <= lo <= hi, got '
                              f'{self.excursion_steps!r}')
        if self.max_steps < 1 or self.steps_after_success < 0:
            raise ConfigError('max_steps must be >= 1 and steps_after_success >= 0')


class NoisyExpert:
    """The expert's action plus Gaussian noise on dx, dy, dz, with occasional excursions.

    Rotations and the gripper are executed as labelled: the expert keeps the gripper pointing
    down, and tilts would be hard to see at 224 px.
    """

    def __init__(self, noise_std: float, excursion_prob: float,
                 excursion_steps: tuple[int, int], max_step: float = 0.02) -> None:
        """Set the perturbation sizes (see ``DataConfig``)."""
        self.noise_std = float(noise_std)
        self.excursion_prob = float(excursion_prob)
        self.excursion_steps = excursion_steps
        self.max_step = float(max_step)
        self._left = 0
        self._direction = np.zeros(3)

    def __call__(self, image: Any, instruction: str, state: Any, label: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Return the action to execute for ``label`` (the expert's action) in ``state``."""
        action = np.array(label, dtype=float)
        if self._left == 0 and rng.random() < self.excursion_prob:
            self._left = int(rng.integers(self.excursion_steps[0], self.excursion_steps[1] + 1))
            direction = rng.normal(size=3)
            direction[2] = abs(direction[2]) * (1 if rng.random() < 0.5 else -0.5)
            self._direction = direction / max(float(np.linalg.norm(direction)), 1e-9)
        if self._left > 0:
            self._left -= 1
            action[:3] = self._direction * self.max_step
        else:
            action[:3] += rng.normal(0.0, self.noise_std, size=3)
        return action


def _clean_expert(image: Any, instruction: str, state: Any, label: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    return np.array(label, dtype=float)


_SCENE_FIELDS = ('tcp', 'rotation', 'width', 'blocks', 'yaws')


@dataclass
class Demonstrations:
    """Recorded samples: the scene of each step, its task and the expert's action.

    ``actions`` (N, 7) float32 raw actions; ``task_ids`` index ``task_names``; ``episodes`` and
    ``steps`` say where each sample came from; ``successes`` holds one flag per episode (did the
    executed rollout succeed). The scene: ``tcp`` (N, 3) tool centre point [m], ``rotation``
    (N, 3, 3) tool orientation, ``width`` (N,) finger distance [m], ``blocks`` (N, 3, 3) and
    ``yaws`` (N, 3) block centres [m] and headings [rad] in ``BLOCK_ORDER``; ``instructions``
    the instruction of each task name (default: ``TASKS``'). ``images``
    (N, 224, 224, 3) uint8 are the preprocessed frames once ``render`` has drawn them.
    """

    actions: np.ndarray
    task_ids: np.ndarray
    episodes: np.ndarray
    steps: np.ndarray
    task_names: tuple[str, ...]
    tcp: np.ndarray
    rotation: np.ndarray
    width: np.ndarray
    blocks: np.ndarray
    yaws: np.ndarray
    successes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    images: np.ndarray | None = None
    instructions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check that the arrays agree in length and shape."""
        n = len(self.actions)
        shapes = {'actions': (n, 7), 'tcp': (n, 3), 'rotation': (n, 3, 3), 'width': (n,),
                  'blocks': (n, len(BLOCK_ORDER), 3), 'yaws': (n, len(BLOCK_ORDER)),
                  'task_ids': (n,), 'episodes': (n,), 'steps': (n,)}
        for name, shape in shapes.items():
            if np.shape(getattr(self, name)) != shape:
                raise ConfigError(f'{name} must have shape {shape}, got '
                                  f'{np.shape(getattr(self, name))}')
        if self.images is not None and (self.images.ndim != 4 or len(self.images) != n
                                        or self.images.shape[-1] != 3
                                        or self.images.dtype != np.uint8):
            raise ConfigError(f'images must be ({n}, H, W, 3) uint8, got {self.images.shape} '
                              f'{self.images.dtype}')
        self.task_names = tuple(self.task_names)
        if not self.instructions:
            from vla_ros.sim.tasks import TASKS

            self.instructions = tuple(TASKS[name].instruction for name in self.task_names)
        self.instructions = tuple(self.instructions)
        if len(self.instructions) != len(self.task_names):
            raise ConfigError('instructions must give one instruction per task name')
        if len(self.task_ids) and not 0 <= int(self.task_ids.min()) <= int(
                self.task_ids.max()) < len(self.task_names):
            raise ConfigError('task_ids must index task_names')

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self.actions)

    @property
    def num_episodes(self) -> int:
        """Return the number of episodes the samples came from."""
        return len(np.unique(self.episodes)) if len(self) else 0

    def instruction(self, index: int) -> str:
        """Return the instruction of sample ``index``."""
        return self.instructions[int(self.task_ids[index])]

    def scene(self, index: int) -> Scene:
        """Return the scene of sample ``index`` (what ``World.scene`` showed at that step)."""
        return _scene({k: getattr(self, k)[index] for k in _SCENE_FIELDS})

    def concat(self, other: Demonstrations) -> Demonstrations:
        """Return these samples followed by ``other``'s (episode ids renumbered after ours)."""
        names = list(self.task_names)
        texts = list(self.instructions)
        for name, text in zip(other.task_names, other.instructions, strict=True):
            if name not in names:
                names.append(name)
                texts.append(text)
        remap = np.array([names.index(n) for n in other.task_names], dtype=np.int16)
        offset = int(self.episodes.max()) + 1 if len(self) else 0
        images = None
        if self.images is not None and other.images is not None:
            images = np.concatenate([self.images, other.images])
        return Demonstrations(
            actions=np.concatenate([self.actions, other.actions]),
            task_ids=np.concatenate([self.task_ids, remap[other.task_ids]]).astype(np.int16),
            episodes=np.concatenate([self.episodes, other.episodes + offset]).astype(np.int32),
            steps=np.concatenate([self.steps, other.steps]).astype(np.int16),
            task_names=tuple(names), instructions=tuple(texts),
            successes=np.concatenate([self.successes, other.successes]),
            images=images,
            **{k: np.concatenate([getattr(self, k), getattr(other, k)]) for k in _SCENE_FIELDS})

    def first_episodes(self, n: int) -> Demonstrations:
        """Return the samples of the first ``n`` >= 1 episodes (by id)."""
        if n < 1:
            raise ConfigError(f'first_episodes needs n >= 1, got {n}')
        keep = self.episodes < np.unique(self.episodes)[:n].max() + 1 if len(self) else []
        return Demonstrations(
            actions=self.actions[keep], task_ids=self.task_ids[keep],
            episodes=self.episodes[keep], steps=self.steps[keep], task_names=self.task_names,
            instructions=self.instructions, successes=self.successes[:n],
            images=None if self.images is None else self.images[keep],
            **{k: getattr(self, k)[keep] for k in _SCENE_FIELDS})

    def save(self, path: str | Path) -> Path:
        """Write a compressed ``.npz`` of everything but the images (they are re-rendered)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, actions=self.actions, task_ids=self.task_ids,
                            episodes=self.episodes, steps=self.steps, successes=self.successes,
                            task_names=np.array(self.task_names),
                            instructions=np.array(self.instructions),
                            **{k: getattr(self, k) for k in _SCENE_FIELDS})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Demonstrations:
        """Read what ``save`` wrote (images not included)."""
        with np.load(Path(path)) as f:
            return cls(actions=f['actions'], task_ids=f['task_ids'], episodes=f['episodes'],
                       steps=f['steps'], task_names=tuple(str(s) for s in f['task_names']),
                       instructions=tuple(str(s) for s in f.get('instructions', ())),
                       successes=f['successes'], **{k: f[k] for k in _SCENE_FIELDS})


def _scene(row: Mapping[str, np.ndarray]) -> Scene:
    blocks = [Block(name, row['blocks'][k], BLOCK_COLOURS[name], BLOCK_SIZE,
                    float(row['yaws'][k])) for k, name in enumerate(BLOCK_ORDER)]
    return Scene(blocks=blocks, table_height=0.0, gripper_position=row['tcp'],
                 gripper_rotation=row['rotation'], gripper_width=float(row['width']))


def expert_label(task: Any, state: Any) -> np.ndarray:
    """Return the expert's action with rotations below ``ROTATION_DEADBAND`` set to 0."""
    from vla_ros.sim.tasks import expert_action

    label = expert_action(task, state)
    label[3:6] = np.where(np.abs(label[3:6]) < ROTATION_DEADBAND, 0.0, label[3:6])
    return label


def record_episode(world: Any, task: Any, seed: int, behaviour: Behaviour,
                   rng: np.random.Generator, max_steps: int, steps_after_success: int = 0,
                   observe: Callable[[Any], Any] | None = None
                   ) -> tuple[dict[str, list[np.ndarray]], bool]:
    """Run one episode in ``world`` (a ``vla_ros.sim.tasks.World``); return (columns, success).

    Each step keeps the scene arrays and the expert's label of the current state, executes what
    ``behaviour`` returns for one action period (as the constant twist the safety node would
    send) and stops ``steps_after_success`` steps after the task first succeeds, or after
    ``min(max_steps, task.max_steps)`` steps. ``observe(world)`` makes the image handed to
    ``behaviour`` (None when not given: the expert needs none).
    """
    world.reset(seed, task)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ('actions',) + _SCENE_FIELDS}
    succeeded_at: int | None = None
    for step in range(min(max_steps, task.max_steps)):
        state = world.state()
        scene = world.scene()
        label = expert_label(task, state)
        cols['actions'].append(label.astype(np.float32))
        cols['tcp'].append(np.asarray(state.tcp_position, np.float32))
        cols['rotation'].append(np.asarray(state.tcp_rotation, np.float32))
        cols['width'].append(np.float32(scene.gripper_width))
        by_name = {b.name: b for b in scene.blocks}
        cols['blocks'].append(np.stack([by_name[n].position for n in BLOCK_ORDER]
                                       ).astype(np.float32))
        cols['yaws'].append(np.array([by_name[n].yaw for n in BLOCK_ORDER], np.float32))
        image = observe(world) if observe is not None else None
        world.step_delta(behaviour(image, task.instruction, state, label, rng))
        if succeeded_at is None and world.success():
            succeeded_at = step
        if succeeded_at is not None and step - succeeded_at >= steps_after_success:
            break
    return cols, succeeded_at is not None


def generate(config: DataConfig, behaviour_factory: Callable[[], Behaviour] | None = None,
             world: Any = None, observe: Callable[[Any], Any] | None = None
             ) -> Demonstrations:
    """Record ``config.episodes_per_task`` episodes of every task (see the module docstring).

    ``behaviour_factory`` returns the behaviour of one episode; by default a ``NoisyExpert`` for
    ``perturb_fraction`` of the episodes and the clean expert for the rest.
    """
    from vla_ros.sim.tasks import EXPERT_MAX_STEP, TASKS, World

    world = world or World()
    if world.table_height != 0.0 or world.camera.key() != Camera.default().key():
        raise ConfigError('render() draws the default scene (table at 0, Camera.default()); '
                          'record with such a world')
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ('actions',) + _SCENE_FIELDS}
    task_ids: list[int] = []
    episodes: list[int] = []
    steps: list[int] = []
    successes: list[bool] = []
    start = time.perf_counter()
    for e in range(config.episodes_per_task):
        for t, name in enumerate(config.tasks):
            rng = np.random.default_rng([config.seed, e, t])
            if behaviour_factory is not None:
                behaviour = behaviour_factory()
            elif rng.random() < config.perturb_fraction:
                behaviour = NoisyExpert(config.noise_std, config.excursion_prob,
                                        config.excursion_steps, EXPERT_MAX_STEP)
            else:
                behaviour = _clean_expert
            ep, ok = record_episode(world, TASKS[name], config.seed + e, behaviour, rng,
                                    config.max_steps, config.steps_after_success, observe)
            n = len(ep['actions'])
            for k, v in ep.items():
                cols[k] += v
            task_ids += [t] * n
            episodes += [len(successes)] * n
            steps += list(range(n))
            successes.append(ok)
        if (e + 1) % 50 == 0:
            logger.info('recorded %d episodes, %d samples (%.0f s)', len(successes),
                        len(task_ids), time.perf_counter() - start)
    return Demonstrations(
        task_ids=np.asarray(task_ids, dtype=np.int16), episodes=np.asarray(episodes, np.int32),
        steps=np.asarray(steps, dtype=np.int16), task_names=config.tasks,
        successes=np.asarray(successes, dtype=bool),
        **{k: np.stack(v).astype(np.float32) for k, v in cols.items()})


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _one_thread() -> None:
    """Keep each render process to one BLAS thread (N processes x N threads thrash)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn, scipy
        return
    threadpool_limits(1)


def _render_chunk(args: tuple[dict[str, np.ndarray], ImageConfig, int, int]) -> np.ndarray:
    cols, image_config, width, height = args
    renderer = Renderer(Camera.default(width, height))
    n = len(cols['tcp'])
    return np.stack([preprocess(renderer.render(_scene({k: v[i] for k, v in cols.items()})),
                                image_config) for i in range(n)])


def render(demos: Demonstrations, image_config: ImageConfig | None = None,
           workers: int | None = None, camera_size: tuple[int, int] = (224, 224)
           ) -> np.ndarray:
    """Draw every sample's scene as the simulated camera node does and preprocess it.

    ``camera_size`` is the sim node's (image_width, image_height); ``image_config`` the camera
    node's preprocessing (default: its defaults). ``workers`` processes share the work
    (default: every CPU). Returns (N, S, S, 3) uint8 and stores it in ``demos.images``.
    """
    config = image_config or ImageConfig()
    workers = max(1, workers or os.cpu_count() or 1)
    n = len(demos)
    bounds = np.linspace(0, n, min(n, workers * 8) + 1).astype(int)
    jobs = [({k: getattr(demos, k)[a:b] for k in _SCENE_FIELDS}, config, *camera_size)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    start = time.perf_counter()
    if workers == 1 or len(jobs) == 1:
        chunks = [_render_chunk(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
            chunks = list(pool.map(_render_chunk, jobs))
    demos.images = np.concatenate(chunks) if chunks else np.zeros((0, config.size,
                                                                    config.size, 3), np.uint8)
    logger.info('rendered %d frames in %.1f s with %d processes', n,
                time.perf_counter() - start, workers)
    return demos.images


# --------------------------------------------------------------------------------------------
# Statistics and normalization
# --------------------------------------------------------------------------------------------


def _as_actions(actions: Any) -> np.ndarray:
    arr = np.asarray(actions, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or not np.isfinite(arr).all():
        raise ConfigError(f'actions must be a non-empty finite (N, D) array, got {arr.shape}')
    return arr


def compute_norm_stats(actions: Any, mask: Sequence[bool] = EEF_MASK,
                       num_trajectories: int = 0) -> dict[str, Any]:
    """Return one dataset's entry of OpenVLA's ``norm_stats`` for raw ``actions`` (N, D).

    ``q01``/``q99`` are the 1st/99th percentiles (numpy's linear interpolation, as the RLDS
    pipeline computes them), ``mask`` is stored with them (default: gripper not normalized);
    ``proprio`` is zeros (the policy uses no proprioception). Values are plain Python floats.
    """
    arr = _as_actions(actions)
    mask = [bool(m) for m in mask]
    if len(mask) != arr.shape[1]:
        raise ConfigError(f'mask has {len(mask)} entries, actions have {arr.shape[1]} dims')

    def floats(values: np.ndarray) -> list[float]:
        return [float(v) for v in values]

    zeros = [0.0] * arr.shape[1]
    return {
        'action': {
            'mean': floats(arr.mean(axis=0)),
            'std': floats(arr.std(axis=0)),
            'max': floats(arr.max(axis=0)),
            'min': floats(arr.min(axis=0)),
            'q01': floats(np.quantile(arr, 0.01, axis=0)),
            'q99': floats(np.quantile(arr, 0.99, axis=0)),
            'mask': mask,
        },
        'proprio': {k: list(zeros) for k in ('mean', 'std', 'max', 'min', 'q01', 'q99')},
        'num_transitions': int(arr.shape[0]),
        'num_trajectories': int(num_trajectories),
    }


def normalize_actions(actions: Any, stats: Mapping[str, Any]) -> np.ndarray:
    """Map raw actions (N, D) to [-1, 1] with OpenVLA's BOUNDS_Q99 rule (see the module doc).

    ``stats`` is the ``"action"`` mapping of one ``norm_stats`` entry (``q01``, ``q99``, optional
    ``mask``, ``min``/``max`` for the never-varying dimensions, which become 0 where the mask is
    true and stay raw where it is false).
    """
    arr = _as_actions(actions)
    q01 = np.asarray(stats['q01'], dtype=np.float64)
    q99 = np.asarray(stats['q99'], dtype=np.float64)
    mask = np.asarray(stats.get('mask', [True] * len(q01)), dtype=bool)
    if not (len(q01) == len(q99) == len(mask) == arr.shape[1]):
        raise ConfigError(f'statistics have {len(q01)} dims, actions {arr.shape[1]}')
    scaled = np.clip(2.0 * (arr - q01) / (q99 - q01 + _RANGE_EPS) - 1.0, -1.0, 1.0)
    out = np.where(mask, scaled, arr)
    if 'min' in stats and 'max' in stats:
        constant = np.asarray(stats['min'], dtype=np.float64) == np.asarray(stats['max'],
                                                                           dtype=np.float64)
        out = np.where(constant & mask, 0.0, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Record expert demonstrations (scenes, tasks, labels) into a ``.npz`` file."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog='python -m vla_ros.train.data',
                                description=main.__doc__)
    p.add_argument('--out', required=True)
    p.add_argument('--tasks', default=','.join(ALL_TASKS))
    p.add_argument('--episodes-per-task', type=int, default=DataConfig.episodes_per_task)
    p.add_argument('--seed', type=int, default=DataConfig.seed, help='first layout seed')
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', stream=sys.stdout)
    demos = generate(DataConfig(tasks=tuple(t for t in opts.tasks.split(',') if t),
                                episodes_per_task=opts.episodes_per_task, seed=opts.seed))
    demos.save(opts.out)
    logger.info('%d samples, %d episodes (%.1f%% of the executed rollouts succeeded); wrote %s',
                len(demos), demos.num_episodes, 100 * demos.successes.mean(), opts.out)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
