"""OpenVLA's action contract: 256-bin tokens, dataset statistics, un-normalization and grippers.

OpenVLA emits seven tokens from the tail of the Llama vocabulary; each maps to the center of one of
255 bins spanning [-1, 1], and the resulting normalized vector is scaled back to robot units with
the 1st/99th percentiles (``q01``/``q99``) of the dataset chosen by ``unnorm_key``, except on
dimensions whose ``mask`` is false (the gripper of end-effector datasets), which stay raw. This
module encodes those rules once, exactly as ``openvla/openvla`` computes them, and adds what the
reference leaves implicit: the valid token range for constrained decoding, typed errors instead of
silent garbage or bare asserts, and a named gripper convention that says how the raw gripper output
turns into the "0 = open, 1 = closed" value on ``/vla/gripper_command``. Only numpy and the
standard library are imported.
"""

from __future__ import annotations

import difflib
import enum
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_ros.core.errors import CheckpointError, ConfigError, UnnormKeyError, VlaRosError

logger = logging.getLogger(__name__)

#: Size of the Llama-2 tokenizer vocabulary, the ``vocab_size`` OpenVLA's de-tokenizer uses (the
#: model's embedding is padded to 32064, but the padded ids are not action tokens).
LLAMA_TOKENIZER_VOCAB_SIZE = 32000
#: Number of bin edges (``n_action_bins`` in an OpenVLA ``config.json``).
DEFAULT_N_BINS = 256
#: Dimension of an OpenVLA end-effector action: xyz delta, roll/pitch/yaw delta, gripper.
ACTION_DIM_7D = 7

CONFIG_FILENAME = 'config.json'
DATASET_STATISTICS_FILENAME = 'dataset_statistics.json'


class ActionError(VlaRosError, ValueError):
    """A malformed action or token input: non-finite values, wrong length, non-integer ids."""


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f'{name} must be an int, got {value!r} ({type(value).__name__})')
    if value < minimum:
        raise ConfigError(f'{name} must be >= {minimum}, got {value}')
    return int(value)


class ActionTokenizer:
    """Maps continuous actions in [-1, 1] to OpenVLA's action token ids and back.

    ``bins = linspace(-1, 1, n_bins)`` are bin *edges*; ``bin_centers`` are their ``n_bins - 1``
    midpoints. Encoding clips to [-1, 1], takes ``d = digitize(a, bins)`` (1..n_bins, where
    ``n_bins`` only for ``a == 1``) and returns ``vocab_size - d``; decoding inverts that with
    ``bin_centers[clip(vocab_size - id - 1, 0, n_bins - 2)]``. For the defaults the action ids are
    31744..31999, and a *larger* action gives a *smaller* id.

    ``vocab_size`` is the tokenizer's (32000 for Llama-2), not the model's padded embedding size
    (32064): OpenVLA computes it as ``text_config.vocab_size - pad_to_multiple_of``.
    """

    def __init__(
        self, vocab_size: int = LLAMA_TOKENIZER_VOCAB_SIZE, n_bins: int = DEFAULT_N_BINS
    ) -> None:
        """Build the bins; raise ConfigError unless ``n_bins >= 2`` and ``vocab_size > n_bins``."""
        self._n_bins = _check_int('n_bins', n_bins, 2)
        self._vocab_size = _check_int('vocab_size', vocab_size, 1)
        if self._vocab_size <= self._n_bins:
            raise ConfigError(
                f'vocab_size ({self._vocab_size}) must exceed n_bins ({self._n_bins}) so that '
                'the action ids lie inside the vocabulary'
            )
        self._bins = np.linspace(-1.0, 1.0, self._n_bins)
        self._bin_centers = (self._bins[:-1] + self._bins[1:]) / 2.0
        self._bins.setflags(write=False)
        self._bin_centers.setflags(write=False)

    def __repr__(self) -> str:
        """Return a constructor-like representation."""
        return f'ActionTokenizer(vocab_size={self._vocab_size}, n_bins={self._n_bins})'

    @property
    def vocab_size(self) -> int:
        """The tokenizer vocabulary size the ids count down from."""
        return self._vocab_size

    @property
    def n_bins(self) -> int:
        """The number of bin edges (``n_action_bins``)."""
        return self._n_bins

    @property
    def bins(self) -> np.ndarray:
        """The bin edges, ``linspace(-1, 1, n_bins)`` (read-only)."""
        return self._bins

    @property
    def bin_centers(self) -> np.ndarray:
        """The ``n_bins - 1`` bin midpoints that decoding returns (read-only)."""
        return self._bin_centers

    @property
    def bin_width(self) -> float:
        """The width of one bin, ``2 / (n_bins - 1)``; decoding errs by at most half of it."""
        return 2.0 / (self._n_bins - 1)

    @property
    def action_token_range(self) -> tuple[int, int]:
        """The (first, last) action token ids, both inclusive: (31744, 31999) by default."""
        return self._vocab_size - self._n_bins, self._vocab_size - 1

    def allowed_token_ids(self) -> np.ndarray:
        """Return every id ``encode`` can produce, ascending (int64), for constrained decoding."""
        first, last = self.action_token_range
        return np.arange(first, last + 1, dtype=np.int64)

    def is_action_token(self, token_ids: Any) -> np.ndarray | bool:
        """Return whether each id is an action token (a bool for a scalar, else a bool array)."""
        ids = np.asarray(token_ids)
        first, last = self.action_token_range
        result = (ids >= first) & (ids <= last)
        return bool(result) if result.ndim == 0 else result

    def encode(self, actions: Any) -> np.ndarray:
        """Return the int64 token ids of ``actions`` (any shape), clipping them to [-1, 1].

        Raises ActionError for NaN or a non-numeric input: numpy would silently digitize NaN into
        the last bin. Infinities are clipped like any out-of-range value.
        """
        try:
            a = np.asarray(actions, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ActionError(f'actions must be numeric, got {actions!r}') from exc
        if np.isnan(a).any():
            raise ActionError(f'cannot encode NaN actions: {a.tolist()}')
        d = np.digitize(np.clip(a, -1.0, 1.0), self._bins)
        return (self._vocab_size - d).astype(np.int64)

    def decode(self, token_ids: Any, *, strict: bool = False) -> np.ndarray:
        """Return the normalized actions (float64, same shape) for ``token_ids``.

        With ``strict=False`` this matches the reference exactly, including its silent handling
        of ids outside ``action_token_range``: an id below the range (any ordinary text token,
        e.g. id 0) decodes to the top bin center ``1 - 1/255``, and an id at or above
        ``vocab_size`` (e.g. ``<PAD>`` 32000 or the padded ids up to 32063) to the bottom one
        ``-1 + 1/255``. The action id 31744 (only produced by ``a == 1``) shares the top bin with
        31745. With ``strict=True`` a non-action id raises ActionError instead.
        """
        ids = np.asarray(token_ids)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise ActionError(f'token ids must be integers, got dtype {ids.dtype}')
        if strict:
            bad = ~np.asarray(self.is_action_token(ids))
            if bad.any():
                first, last = self.action_token_range
                raise ActionError(
                    f'non-action token ids {np.unique(ids[bad]).tolist()} '
                    f'(action ids are {first}..{last})'
                )
        index = np.clip(self._vocab_size - ids.astype(np.int64) - 1, 0, self._n_bins - 2)
        return self._bin_centers[index]


# --------------------------------------------------------------------------------------------
# Normalization statistics
# --------------------------------------------------------------------------------------------


def _vector(where: str, field: str, value: object) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f'{where}: {field} must be a list of numbers, got {value!r}'
        ) from exc
    if arr.ndim != 1 or arr.size == 0:
        raise CheckpointError(f'{where}: {field} must be a non-empty flat list, shape {arr.shape}')
    return arr


def _mask_vector(where: str, value: object) -> np.ndarray:
    items = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise CheckpointError(f'{where}: mask must be a non-empty list of booleans, got {value!r}')
    for item in items:
        if not (isinstance(item, (bool, np.bool_)) or (isinstance(item, int) and item in (0, 1))):
            raise CheckpointError(f'{where}: mask entries must be booleans, got {item!r}')
    return np.asarray(items, dtype=bool)


def _frozen(arr: np.ndarray | None) -> np.ndarray | None:
    if arr is not None:
        arr = np.array(arr, copy=True)
        arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class ActionStats:
    """Action statistics of one dataset, as OpenVLA stores them under ``norm_stats[key].action``.

    ``q01``/``q99`` bound the BOUNDS_Q99 un-normalization; ``mask`` (all true when absent) says
    which dimensions are un-normalized at all. ``mean``/``std``/``min``/``max`` are kept when
    present but are not used. Arrays are float64 (mask bool) read-only copies; invalid values
    raise CheckpointError naming the field. Equality is identity (arrays do not compare to bool).
    """

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Convert, validate and freeze the arrays (see ``from_mapping`` for the rules)."""
        fields = _validated_fields(self.__dict__, 'ActionStats')
        for name, value in fields.items():
            object.__setattr__(self, name, _frozen(value))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = 'action stats') -> ActionStats:
        """Build from a ``{"q01": [...], "q99": [...], "mask": [...], ...}`` mapping.

        ``where`` names the source in errors (file and key). Rules: q01 and q99 present, flat,
        finite, of equal length, ``q99 >= q01``; ``mask`` booleans of that length (all true when
        absent); optional mean/std/min/max flat numeric lists of that length. Other entries are
        ignored.
        """
        if not isinstance(raw, Mapping):
            raise CheckpointError(f'{where} must be a mapping, got {type(raw).__name__}')
        known = ('q01', 'q99', 'mask', 'mean', 'std', 'min', 'max')
        return cls(**_validated_fields({k: raw.get(k) for k in known}, where))

    @property
    def action_dim(self) -> int:
        """The action dimension, ``len(q01)``."""
        return int(self.q01.shape[0])


def _validated_fields(raw: Mapping[str, Any], where: str) -> dict[str, np.ndarray | None]:
    for field in ('q01', 'q99'):
        if raw.get(field) is None:
            raise CheckpointError(f'{where}: missing {field}')
    q01 = _vector(where, 'q01', raw['q01'])
    q99 = _vector(where, 'q99', raw['q99'])
    dim = q01.shape[0]
    if q99.shape[0] != dim:
        raise CheckpointError(f'{where}: q01 has {dim} entries but q99 has {q99.shape[0]}')
    for field, arr in (('q01', q01), ('q99', q99)):
        if not np.isfinite(arr).all():
            raise CheckpointError(f'{where}: {field} has non-finite entries {arr.tolist()}')
    if (q99 < q01).any():
        bad = np.flatnonzero(q99 < q01).tolist()
        raise CheckpointError(f'{where}: q99 < q01 at dimensions {bad}')
    out: dict[str, np.ndarray | None] = {'q01': q01, 'q99': q99}
    mask = raw.get('mask')
    out['mask'] = np.ones(dim, dtype=bool) if mask is None else _mask_vector(where, mask)
    for field in ('mean', 'std', 'min', 'max'):
        value = raw.get(field)
        out[field] = None if value is None else _vector(where, field, value)
    for field, arr in out.items():
        if arr is not None and arr.shape[0] != dim:
            raise CheckpointError(
                f'{where}: {field} has {arr.shape[0]} entries but q01 has {dim}'
            )
    return out


class NormStats:
    """The per-dataset action statistics of a checkpoint, ``{unnorm_key: ActionStats}``.

    Read from ``config.json``'s ``norm_stats`` or from ``dataset_statistics.json`` (same layout:
    ``{key: {"action": {...}, "proprio": {...}, "num_transitions": n, ...}}``; only ``action``
    is used). ``select`` implements OpenVLA's ``unnorm_key`` rule, failing closed.
    """

    def __init__(self, stats: Mapping[str, ActionStats], source: str = '<memory>') -> None:
        """Wrap ``stats``; ``source`` (a path) is named in errors; CheckpointError if empty."""
        if not stats:
            raise CheckpointError(f'{source}: no dataset statistics (norm_stats is empty)')
        for key, value in stats.items():
            if not isinstance(key, str) or not isinstance(value, ActionStats):
                raise CheckpointError(f'{source}: entry {key!r} is not str -> ActionStats')
        self._stats = dict(stats)
        self._source = source

    def __repr__(self) -> str:
        """Return the source and the keys."""
        return f'NormStats(source={self._source!r}, keys={self.keys})'

    def __len__(self) -> int:
        """Return the number of datasets."""
        return len(self._stats)

    def __contains__(self, key: object) -> bool:
        """Return whether ``key`` is a known dataset."""
        return key in self._stats

    def __iter__(self) -> Iterator[str]:
        """Iterate over the dataset keys in sorted order."""
        return iter(self.keys)

    def __getitem__(self, key: str) -> ActionStats:
        """Return the statistics of ``key`` (UnnormKeyError when unknown)."""
        return self.select(key)

    @property
    def keys(self) -> list[str]:
        """The dataset keys, sorted."""
        return sorted(self._stats)

    @property
    def source(self) -> str:
        """Where these statistics were read from."""
        return self._source

    @classmethod
    def from_norm_stats(cls, norm_stats: Any, source: str = '<memory>') -> NormStats:
        """Build from a ``{key: {"action": {...}, ...}}`` mapping; errors name source and key."""
        if not isinstance(norm_stats, Mapping):
            raise CheckpointError(
                f'{source}: norm_stats must be a mapping of dataset keys, '
                f'got {type(norm_stats).__name__}'
            )
        stats = {}
        for key, entry in norm_stats.items():
            where = f'{source}: [{key!r}]'
            if not isinstance(entry, Mapping) or 'action' not in entry:
                raise CheckpointError(f'{where} has no "action" statistics')
            stats[str(key)] = ActionStats.from_mapping(entry['action'], f'{where}["action"]')
        return cls(stats, source)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = CONFIG_FILENAME) -> NormStats:
        """Build from a parsed checkpoint ``config.json`` (its ``norm_stats`` field)."""
        if not isinstance(config, Mapping):
            raise CheckpointError(f'{source}: expected a JSON object, got {type(config).__name__}')
        if config.get('norm_stats') is None:
            raise CheckpointError(
                f'{source} has no norm_stats; add a {DATASET_STATISTICS_FILENAME} next to it'
            )
        return cls.from_norm_stats(config['norm_stats'], source)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> NormStats:
        """Read a ``dataset_statistics.json`` file."""
        return cls.from_norm_stats(_read_json(path), os.fspath(path))

    @classmethod
    def from_checkpoint_dir(cls, path: str | os.PathLike[str]) -> NormStats:
        """Read the statistics of a checkpoint directory.

        ``dataset_statistics.json``, when present, replaces ``config.json``'s ``norm_stats``
        entirely (as OpenVLA's evaluation scripts do; keys are not merged) and ``config.json`` is
        then not read. Missing files or directories raise CheckpointError naming the path.
        """
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise CheckpointError(f'checkpoint directory not found: {directory}')
        override = os.path.join(directory, DATASET_STATISTICS_FILENAME)
        if os.path.isfile(override):
            logger.info('Using action statistics from %s (overrides norm_stats)', override)
            return cls.from_json_file(override)
        config_path = os.path.join(directory, CONFIG_FILENAME)
        if not os.path.isfile(config_path):
            raise CheckpointError(
                f'missing {config_path} (and no {DATASET_STATISTICS_FILENAME} in {directory})'
            )
        return cls.from_config(_read_json(config_path), config_path)

    def select(self, unnorm_key: str | None = None) -> ActionStats:
        """Return the statistics of ``unnorm_key``.

        ``None`` is allowed only when there is a single dataset. Otherwise, and for an unknown
        key, UnnormKeyError lists the available keys (sorted), suggesting close matches.
        """
        if unnorm_key is None:
            if len(self._stats) == 1:
                return next(iter(self._stats.values()))
            raise UnnormKeyError(
                f'{self._source} holds statistics of {len(self._stats)} datasets; set unnorm_key '
                f'to one of: {", ".join(self.keys)}'
            )
        if not isinstance(unnorm_key, str):
            raise UnnormKeyError(f'unnorm_key must be a string, got {unnorm_key!r}')
        if unnorm_key not in self._stats:
            close = difflib.get_close_matches(unnorm_key, self.keys, n=3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise UnnormKeyError(
                f'unknown unnorm_key {unnorm_key!r}{hint}; {self._source} has: '
                f'{", ".join(self.keys)}'
            )
        return self._stats[unnorm_key]


def _read_json(path: str | os.PathLike[str]) -> Any:
    name = os.fspath(path)
    try:
        with open(name, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f'missing file: {name}') from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f'invalid JSON in {name}: {exc}') from exc
    except OSError as exc:
        raise CheckpointError(f'cannot read {name}: {exc}') from exc


def unnormalize(normalized: Any, stats: ActionStats) -> np.ndarray:
    """Map normalized actions (``(..., action_dim)``, in [-1, 1]) to robot units (BOUNDS_Q99).

    ``a = where(mask, 0.5 * (a_n + 1) * (q99 - q01) + q01, a_n)``: -1 maps to q01, +1 to q99, and
    masked-off dimensions (the gripper of EEF datasets) pass through unchanged. Raises ActionError
    for a wrong last dimension or non-finite input.
    """
    try:
        a_n = np.asarray(normalized, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ActionError(f'normalized actions must be numeric, got {normalized!r}') from exc
    if a_n.ndim == 0 or a_n.shape[-1] != stats.action_dim:
        raise ActionError(
            f'normalized actions have shape {a_n.shape}; expected last dimension '
            f'{stats.action_dim} (len(q01))'
        )
    if not np.isfinite(a_n).all():
        raise ActionError(f'non-finite normalized actions: {a_n.tolist()}')
    scaled = 0.5 * (a_n + 1.0) * (stats.q99 - stats.q01) + stats.q01
    return np.where(stats.mask, scaled, a_n)


# --------------------------------------------------------------------------------------------
# Gripper
# --------------------------------------------------------------------------------------------


class GripperConvention(str, enum.Enum):
    """How a checkpoint's downstream reads the raw gripper output ``x`` of the model.

    The raw output is the un-normalized last action dimension; the training data (RLDS) aligns it
    to [0, 1] with 1 = open, and EEF datasets mask it so it is not rescaled. Values are the
    config strings.

    ========  ==========================================  =========================
    name      ``apply_gripper_convention(x)``              meaning of the result
    ========  ==========================================  =========================
    RAW       ``x`` (Bridge evaluation)                    [0, 1], 1 = open
    BINARIZE  ``1.0 if x > 0.5 else 0.0``                  {0, 1}, 1 = open
    LIBERO    ``-sign(2x - 1)`` (LIBERO evaluation)        {-1, 0, +1}, -1 = open,
                                                           +1 = closed, 0 at x = 0.5
    ========  ==========================================  =========================
    """

    RAW = 'raw'
    BINARIZE = 'binarize'
    LIBERO = 'libero'

    @classmethod
    def parse(cls, value: str | GripperConvention) -> GripperConvention:
        """Return the convention named ``value`` (case-insensitive), else raise ConfigError."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        choices = ', '.join(c.value for c in cls)
        raise ConfigError(f'unknown gripper convention {value!r}; choose one of: {choices}')


def _finite_scalar(value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ActionError(f'gripper value must be a number, got {value!r}') from exc
    if not math.isfinite(x):
        raise ActionError(f'gripper value must be finite, got {x}')
    return x


def apply_gripper_convention(value: float, convention: GripperConvention | str) -> float:
    """Return the gripper command the checkpoint's downstream expects (see GripperConvention).

    LIBERO follows OpenVLA's LIBERO evaluation exactly: ``2x - 1``, then ``sign``, then ``* -1``
    (a 0 command, from ``x == 0.5`` exactly, is returned as +0.0 rather than -0.0). Raises
    ActionError for a non-finite value and ConfigError for an unknown convention.
    """
    conv = GripperConvention.parse(convention)
    x = _finite_scalar(value)
    if conv is GripperConvention.RAW:
        return x
    if conv is GripperConvention.BINARIZE:
        return 1.0 if x > 0.5 else 0.0
    return float(np.sign(2.0 * x - 1.0)) * -1.0 + 0.0


def gripper_closedness(value: float, convention: GripperConvention | str) -> float:
    """Convert the raw model gripper output to the topic contract: 0 = open, 1 = closed.

    =========  ====================================  ====  ====  ====  ====  ====
    x (raw)                                           0.0   0.3   0.5   0.7   1.0
    =========  ====================================  ====  ====  ====  ====  ====
    RAW        ``1 - clip(x, 0, 1)`` (proportional)  1.0   0.7   0.5   0.3   0.0
    BINARIZE   ``1 - (x > 0.5)``                     1.0   1.0   1.0   0.0   0.0
    LIBERO     1 iff the LIBERO command is +1        1.0   1.0   0.0   0.0   0.0
    =========  ====================================  ====  ====  ====  ====  ====

    At exactly ``x == 0.5`` BINARIZE says closed while LIBERO's command is 0 (not +1), read here
    as open; in LIBERO/robosuite a 0 command leaves the gripper moving neither way.
    """
    conv = GripperConvention.parse(convention)
    x = _finite_scalar(value)
    if conv is GripperConvention.RAW:
        return 1.0 - min(max(x, 0.0), 1.0)
    if conv is GripperConvention.BINARIZE:
        return 0.0 if x > 0.5 else 1.0
    return 1.0 if apply_gripper_convention(x, conv) == 1.0 else 0.0


# --------------------------------------------------------------------------------------------
# 7D action
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action7D:
    """One un-normalized OpenVLA end-effector action.

    Translation deltas ``dx, dy, dz`` in metres, rotation deltas ``droll, dpitch, dyaw`` in
    radians, and the raw ``gripper`` output (its meaning depends on the GripperConvention).
    """

    dx: float
    dy: float
    dz: float
    droll: float
    dpitch: float
    dyaw: float
    gripper: float

    @classmethod
    def from_array(cls, values: Sequence[float] | np.ndarray) -> Action7D:
        """Build from 7 numbers in field order; raise ActionError for another length."""
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ActionError(f'action must be 7 numbers, got {values!r}') from exc
        if arr.shape != (ACTION_DIM_7D,):
            raise ActionError(f'action must have shape (7,), got {arr.shape}')
        return cls(*(float(v) for v in arr))

    def as_array(self) -> np.ndarray:
        """Return the 7 values in field order as float64."""
        return np.array(
            [self.dx, self.dy, self.dz, self.droll, self.dpitch, self.dyaw, self.gripper],
            dtype=np.float64,
        )

    def is_finite(self) -> bool:
        """Return whether all 7 values are finite."""
        return bool(np.isfinite(self.as_array()).all())
