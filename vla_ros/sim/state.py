"""The simulator's ground truth, ``WorldState``, and its JSON form on the ``world_state`` topic.

One snapshot of the simulated world holds what the scripted expert, the success test, the
evaluation baselines and the benchmarks read and a policy never sees: the tool centre point's
pose, the gripper, the block centres and the held block, the table height, the task and layout
seed of the episode, and the contact ground truth (``ContactTruth``: the pairs touching now with
their penetration depth and force, the tool wrench, and the latest contact event's onset, end,
first pair and peak depth). ``to_json`` / ``from_json`` are the one definition of the message
format (``std_msgs/String`` carrying a JSON object, ``"version": 1``); ``from_json`` rejects a
malformed or foreign document with a ``WorldStateError`` that says what is wrong. Times are
seconds on the producer's clock: sim time in ``World``, ROS time in ``sim_arm_node`` (the node
shifts them with ``retimed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_ros.core.errors import VlaRosError
from vla_ros.sim.scene import BLOCK_SIZE

__all__ = [
    'FORMAT_VERSION',
    'ContactPair',
    'ContactTruth',
    'WorldState',
    'WorldStateError',
    'from_json',
    'retimed',
    'to_json',
]

#: Version of the JSON document; a reader refuses others.
FORMAT_VERSION = 1


class WorldStateError(VlaRosError, ValueError):
    """A world-state document that is not JSON of this format (the message says why)."""


@dataclass(frozen=True, eq=False)
class ContactPair:
    """An arm body touching an obstacle now: penetration ``depth`` [m] and ``force`` [N].

    ``force`` is what the obstacle exerts on the arm, base-frame axes.
    """

    body: str
    obstacle: str
    depth: float
    force: np.ndarray


@dataclass(frozen=True, eq=False)
class ContactTruth:
    """Contact ground truth: now, and the latest contact event (onset to end).

    ``pairs`` touch now, deepest first; ``wrench`` is the contact wrench on the tool now (force
    [N], torque about the tool centre point [N m], base axes); ``onset`` is when the latest
    contact event began (interpolated within the integration sub-step), ``end`` when it ended
    (None while it lasts or before any contact), ``pair`` its first (body, obstacle) and
    ``peak_depth`` its deepest penetration [m].
    """

    pairs: tuple[ContactPair, ...] = ()
    wrench: np.ndarray = field(default_factory=lambda: np.zeros(6))
    onset: float | None = None
    end: float | None = None
    pair: tuple[str, str] | None = None
    peak_depth: float = 0.0

    @property
    def active(self) -> bool:
        """Whether anything touches now."""
        return bool(self.pairs)

    @property
    def depth(self) -> float:
        """The deepest penetration now [m] (0 without contact)."""
        return max((p.depth for p in self.pairs), default=0.0)


@dataclass(frozen=True, eq=False)
class WorldState:
    """A snapshot of the world: what the expert, the success test and the benchmarks look at.

    ``gripper`` is the closedness (0 = open, 1 = closed), ``gripper_width`` the finger distance
    [m], ``blocks`` the block centres by name, ``held`` the name of the block in the hand,
    ``step`` the actions applied in this episode, ``time`` the clock of the snapshot [s].
    """

    tcp_position: np.ndarray
    tcp_rotation: np.ndarray
    gripper: float
    gripper_width: float
    blocks: Mapping[str, np.ndarray]
    held: str | None
    table_height: float
    step: int
    block_size: float = BLOCK_SIZE
    task: str | None = None
    seed: int | None = None
    time: float = 0.0
    contact: ContactTruth = field(default_factory=ContactTruth)


def retimed(state: WorldState, now: float) -> WorldState:
    """Return ``state`` moved onto another clock whose reading at ``state.time`` is ``now``."""
    offset = float(now) - state.time
    c = state.contact
    contact = dataclasses.replace(
        c, onset=None if c.onset is None else c.onset + offset,
        end=None if c.end is None else c.end + offset)
    return dataclasses.replace(state, time=float(now), contact=contact)


def _floats(values: np.ndarray | Sequence[float]) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=float).reshape(-1)]


def to_json(state: WorldState) -> str:
    """Return the JSON document of ``state`` (the ``world_state`` topic's payload)."""
    c = state.contact
    doc = {
        'version': FORMAT_VERSION,
        'task': state.task, 'seed': state.seed, 'time': float(state.time),
        'step': int(state.step),
        'tcp_position': _floats(state.tcp_position),
        'tcp_rotation': np.asarray(state.tcp_rotation, dtype=float).tolist(),
        'gripper': float(state.gripper), 'gripper_width': float(state.gripper_width),
        'blocks': {name: _floats(pos) for name, pos in state.blocks.items()},
        'block_size': float(state.block_size), 'held': state.held,
        'table_height': float(state.table_height),
        'contact': {
            'active': c.active, 'depth': float(c.depth), 'wrench': _floats(c.wrench),
            'pairs': [{'body': p.body, 'obstacle': p.obstacle, 'depth': float(p.depth),
                       'force': _floats(p.force)} for p in c.pairs],
            'onset': c.onset, 'end': c.end, 'pair': None if c.pair is None else list(c.pair),
            'peak_depth': float(c.peak_depth)},
    }
    return json.dumps(doc, allow_nan=False)


def _get(doc: Mapping[str, Any], key: str, where: str = '') -> Any:
    if key not in doc:
        raise WorldStateError(f'world state lacks {where}{key!r}')
    return doc[key]


def _number(value: Any, name: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise WorldStateError(f'world state {name} must be a finite number, got {value!r}')
    return float(value)


def _vector(value: Any, size: int, name: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise WorldStateError(f'world state {name} must be a list of {size} numbers, '
                              f'got {value!r}')
    return np.array([_number(v, name) for v in value])


def _text(value: Any, name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise WorldStateError(f'world state {name} must be text, got {value!r}')
    return value


def from_json(text: str | bytes) -> WorldState:
    """Parse a ``world_state`` document.

    Raises:
        WorldStateError: not JSON, another version, or a field missing or of the wrong type.

    """
    try:
        doc = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise WorldStateError(f'world state is not JSON: {exc}') from exc
    if not isinstance(doc, dict):
        raise WorldStateError(f'world state must be a JSON object, got {type(doc).__name__}')
    if doc.get('version') != FORMAT_VERSION:
        raise WorldStateError(f'world state version {doc.get("version")!r} is not '
                              f'{FORMAT_VERSION}')
    blocks = _get(doc, 'blocks')
    if not isinstance(blocks, dict):
        raise WorldStateError(f'world state blocks must be an object, got {blocks!r}')
    rotation = _get(doc, 'tcp_rotation')
    if not isinstance(rotation, list) or len(rotation) != 3:
        raise WorldStateError(f'world state tcp_rotation must be 3 rows, got {rotation!r}')
    c = _get(doc, 'contact')
    if not isinstance(c, dict) or not isinstance(_get(c, 'pairs', 'contact.'), list):
        raise WorldStateError(f'world state contact must be an object with pairs, got {c!r}')
    pairs = []
    for p in c['pairs']:
        if not isinstance(p, dict):
            raise WorldStateError(f'world state contact pair must be an object, got {p!r}')
        pairs.append(ContactPair(
            _text(_get(p, 'body', 'contact pair '), 'contact body'),
            _text(_get(p, 'obstacle', 'contact pair '), 'contact obstacle'),
            _number(_get(p, 'depth', 'contact pair '), 'contact depth'),
            _vector(_get(p, 'force', 'contact pair '), 3, 'contact force')))
    pair = _get(c, 'pair', 'contact.')
    if pair is not None:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise WorldStateError(f'world state contact.pair must be two names, got {pair!r}')
        pair = (pair[0], pair[1])
    seed = _get(doc, 'seed')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise WorldStateError(f'world state seed must be an integer or null, got {seed!r}')
    step = _get(doc, 'step')
    if isinstance(step, bool) or not isinstance(step, int):
        raise WorldStateError(f'world state step must be an integer, got {step!r}')
    contact = ContactTruth(
        pairs=tuple(pairs), wrench=_vector(_get(c, 'wrench', 'contact.'), 6, 'contact.wrench'),
        onset=_number(_get(c, 'onset', 'contact.'), 'contact.onset', optional=True),
        end=_number(_get(c, 'end', 'contact.'), 'contact.end', optional=True), pair=pair,
        peak_depth=_number(_get(c, 'peak_depth', 'contact.'), 'contact.peak_depth'))
    return WorldState(
        tcp_position=_vector(_get(doc, 'tcp_position'), 3, 'tcp_position'),
        tcp_rotation=np.array([_vector(row, 3, 'tcp_rotation') for row in rotation]),
        gripper=_number(_get(doc, 'gripper'), 'gripper'),
        gripper_width=_number(_get(doc, 'gripper_width'), 'gripper_width'),
        blocks={_text(name, 'block name'): _vector(pos, 3, f'block {name!r}')
                for name, pos in blocks.items()},
        held=_text(_get(doc, 'held'), 'held', optional=True),
        table_height=_number(_get(doc, 'table_height'), 'table_height'),
        step=step, block_size=_number(_get(doc, 'block_size'), 'block_size'),
        task=_text(_get(doc, 'task'), 'task', optional=True), seed=seed,
        time=_number(_get(doc, 'time'), 'time'), contact=contact)
