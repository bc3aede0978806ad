"""Persistent caches that make a restart fast: compiled graphs, Triton binaries, kernel choices.

A first start on a GPU compiles the engine (``torch.compile``: one decoder layer, the head and
the two ViTs) and times the int4 kernel candidates of each weight shape; a restart on the same
machine should reach its first fast action within seconds. Everything lives under one folder in
the user's cache directory (``$VLA_ROS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vla_ros``, else
``~/.cache/vla_ros``; never in the package), in a subfolder keyed by the GPU model, the torch and
Triton versions and the model's architecture (``config.json`` minus its statistics), so that a
new driver stack or another checkpoint shape starts clean instead of loading stale artifacts:

* ``inductor/``: ``TORCHINDUCTOR_CACHE_DIR`` (FX graph and AOT caches), ``triton/``:
  ``TRITON_CACHE_DIR``; both set only when the user has not set them.
* ``tuning.json``: which kernel candidate won for each shape (``tuned``).

``activate`` selects the folder for a model (``OpenVLAPolicy`` calls it before the first
compile); ``tuned`` picks and remembers the fastest of several equivalent ways to compute a
product.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TUNING_FILE = 'tuning.json'
_IGNORED_CONFIG_FIELDS = ('norm_stats', 'transformers_version', '_name_or_path')

_choices: dict[str, str] = {}
_folder: Path | None = None


def cache_root() -> Path:
    """The user cache folder of vla_ros (not created)."""
    if os.environ.get('VLA_ROS_CACHE_DIR'):
        return Path(os.environ['VLA_ROS_CACHE_DIR'])
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'vla_ros'


def cache_key(config: Mapping[str, Any], device: torch.device) -> str:
    """A short key for (GPU model, torch and Triton versions, model architecture)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'none'
    gpu = 'cpu'
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        gpu = f'{props.name}-sm{props.major}{props.minor}-{props.multi_processor_count}'
    arch = {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_FIELDS}
    text = json.dumps([gpu, torch.__version__, triton_version, arch], sort_keys=True,
                      default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    safe_gpu = ''.join(c if c.isalnum() or c in '-_' else '_' for c in gpu)
    return f'{safe_gpu}-{digest}'


def activate(config: Mapping[str, Any], device: torch.device) -> Path | None:
    """Use the cache folder for this model on ``device``; return it (None if not writable).

    Sets the inductor and Triton cache folders unless the environment names them, and loads
    the kernel choices saved there.
    """
    global _folder
    folder = cache_root() / cache_key(config, device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning('cache folder %s is not writable (%s): every start compiles anew',
                       folder, exc)
        return None
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', str(folder / 'inductor'))
    os.environ.setdefault('TRITON_CACHE_DIR', str(folder / 'triton'))
    _folder = folder
    file = folder / TUNING_FILE
    if file.is_file():
        try:
            saved = json.loads(file.read_text(encoding='utf-8'))
            if isinstance(saved, dict):
                _choices.update({str(k): str(v) for k, v in saved.items()})
        except (OSError, ValueError) as exc:
            logger.warning('ignoring unreadable kernel tuning cache %s: %s', file, exc)
    logger.info('compile and tuning cache: %s', folder)
    return folder


def choices() -> dict[str, str]:
    """The kernel choices made or loaded so far (for benchmark records)."""
    return dict(_choices)


def _save() -> None:
    if _folder is None:
        return
    file = _folder / TUNING_FILE
    tmp = file.with_suffix('.tmp')
    try:
        tmp.write_text(json.dumps(_choices, indent=1, sort_keys=True), encoding='utf-8')
        tmp.replace(file)
    except OSError as exc:
        logger.warning('cannot save kernel choices to %s: %s', file, exc)


_scratch: dict[str, torch.Tensor] = {}


def _time_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    """Median time of ``fn`` with the L2 cache flushed before each run.

    In a decode step every weight comes from device memory (the model is far larger than the
    L2), so a candidate timed on a weight left in L2 by its previous run would look faster
    than it is; a 256 MB write before each run evicts it.
    """
    device = torch.cuda.current_device()
    key = str(device)
    if key not in _scratch:
        _scratch[key] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    pairs = []
    for _ in range(reps):
        _scratch[key].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in pairs)[reps // 2]


def _as_product(out: Any) -> torch.Tensor:
    out = out.float()
    return out.sum(0) if out.dim() == 3 else out


def tuned(key: str, candidates: Mapping[str, Callable[[], Any]]) -> Callable[[], Any]:
    """The fastest of ``candidates`` (equivalent computations) for ``key``, chosen once.

    The first call per key (outside CUDA-graph capture) runs each candidate, drops those that
    fail or disagree with the first one (relative difference above 1e-2), times the rest and
    remembers the winner (in the tuning cache when one is active). During a capture, an
    untimed key takes the first candidate.
    """
    name = _choices.get(key)
    if name in candidates:
        return candidates[name]
    first = next(iter(candidates))
    if torch.cuda.is_current_stream_capturing():
        logger.debug('%s: untimed during graph capture, using %s', key, first)
        return candidates[first]
    times: dict[str, float] = {}
    reference = None
    for cand, fn in candidates.items():
        try:
            out = _as_product(fn())
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a config the compiler rejects: skip it
            logger.debug('%s: candidate %s failed: %s', key, cand, exc)
            continue
        if reference is None:
            reference = out
        elif float((out - reference).norm()) > 1e-2 * float(reference.norm()) + 1e-6:
            logger.warning('%s: candidate %s disagrees with %s; not used', key, cand, first)
            continue
        times[cand] = _time_ms(fn)
    if not times:
        raise RuntimeError(f'{key}: no kernel candidate ran')
    name = min(times, key=times.get)
    _choices[key] = name
    _save()
    logger.debug('%s: %s (%s)', key, name,
                 ', '.join(f'{k} {v * 1e3:.0f} us' for k, v in sorted(times.items())))
    return candidates[name]
