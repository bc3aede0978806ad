"""Load (and save) OpenVLA checkpoint directories in the Hugging Face layout, strictly and lazily.

A checkpoint directory holds ``config.json``, ``preprocessor_config.json``, the Llama tokenizer
files (``tokenizer.model`` plus ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``added_tokens.json``), safetensors weights (``model.safetensors`` or
shards listed in ``model.safetensors.index.json``) and optionally ``dataset_statistics.json``,
whose statistics replace ``norm_stats``. ``load_checkpoint`` builds the model on the meta device
from ``config.json`` (``auto_map`` and remote code are ignored), checks every key and shape against
the safetensors headers before reading any data, then reads one shard at a time through
safetensors' memory map and assigns the tensors (``load_state_dict(assign=True)``), so a 7B model
never exists twice in memory. Every problem raises CheckpointError naming the file (and up to ten
offending keys); running out of memory raises ConfigError suggesting a quantized load.
``save_weights`` writes the same layout, used by the tiny test checkpoints.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vla_ros.core.actions import NormStats
from vla_ros.core.errors import CheckpointError, ConfigError
from vla_ros.core.image import normalization_from_preprocessor_config
from vla_ros.policy.model import OpenVLA, timm_to_checkpoint_key

logger = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
PREPROCESSOR_FILE = 'preprocessor_config.json'
SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_MODEL_FILE = 'tokenizer.model'
TOKENIZER_JSON_FILE = 'tokenizer.json'
DATASET_STATISTICS_FILE = 'dataset_statistics.json'

#: Fields ``config.json`` must have for the model to be built.
REQUIRED_CONFIG_FIELDS = ('timm_model_ids', 'image_sizes', 'use_fused_vision_backbone',
                          'arch_specifier', 'text_config')

_MAX_KEYS_SHOWN = 10
_DTYPE_BYTES = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1,
                'U8': 1, 'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1}
_DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16,
           'bf16': torch.bfloat16, 'float16': torch.float16, 'fp16': torch.float16}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Everything ``load_checkpoint`` read from a checkpoint directory.

    ``tokenizer`` is a transformers Llama tokenizer; ``norm_stats`` already reflects
    ``dataset_statistics.json``; ``config``/``preprocessor_config`` are the parsed JSON files.
    """

    model: OpenVLA
    tokenizer: Any
    norm_stats: NormStats
    config: dict[str, Any]
    preprocessor_config: dict[str, Any]
    path: Path
    weight_files: tuple[Path, ...]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _keys_text(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:_MAX_KEYS_SHOWN])
    more = f' (and {len(keys) - _MAX_KEYS_SHOWN} more)' if len(keys) > _MAX_KEYS_SHOWN else ''
    return shown + more


def read_json_file(path: Path, what: str = 'file') -> Any:
    """Parse a JSON file; CheckpointError naming it when missing, unreadable or corrupt."""
    if not path.is_file():
        raise CheckpointError(f'missing {what} {path.name} in {path.parent}')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f'corrupt JSON in {path}: {exc}') from exc
    except OSError as exc:
        raise CheckpointError(f'cannot read {path}: {exc}') from exc


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``config.json`` of a checkpoint directory (CheckpointError naming it)."""
    file = Path(path) / CONFIG_FILE
    config = read_json_file(file, 'model config')
    if not isinstance(config, dict):
        raise CheckpointError(f'{file} must hold a JSON object, got {type(config).__name__}')
    missing = [f for f in REQUIRED_CONFIG_FIELDS if f not in config]
    if missing:
        raise CheckpointError(f'{file} lacks required fields: {", ".join(missing)}')
    return config


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """Return the compute dtype: as given, else float32 on the CPU and bfloat16 elsewhere."""
    if dtype is None:
        return torch.float32 if device.type == 'cpu' else torch.bfloat16
    if isinstance(dtype, str):
        if dtype.replace('torch.', '') not in _DTYPES:
            raise ConfigError(f'unknown dtype {dtype!r}; choose one of {", ".join(_DTYPES)}')
        return _DTYPES[dtype.replace('torch.', '')]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f'dtype must be a floating torch.dtype or its name, got {dtype!r}')
    return dtype


def resolve_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a torch.device; ConfigError if it names an unavailable CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f'invalid device {device!r}: {exc}') from exc
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'device {device!r} requested but CUDA is not available')
        if dev.index is None:
            dev = torch.device('cuda', torch.cuda.current_device())
    return dev


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def weight_map(path: str | os.PathLike[str]) -> tuple[dict[str, Path], Path]:
    """Return ``{key: shard file}`` and the file that lists the keys (index or single file).

    Checks that the index is valid JSON with a ``weight_map`` and that every shard it names
    exists; without an index, reads the keys of ``model.safetensors``.
    """
    from safetensors import safe_open

    directory = Path(path)
    index_file = directory / SAFETENSORS_INDEX_FILE
    single = directory / SAFETENSORS_FILE
    if index_file.is_file():
        index = read_json_file(index_file, 'weight index')
        raw = index.get('weight_map') if isinstance(index, dict) else None
        if not isinstance(raw, dict) or not raw:
            raise CheckpointError(f'{index_file} has no (or an empty) "weight_map" object')
        mapping: dict[str, Path] = {}
        for key, name in raw.items():
            if not isinstance(name, str) or os.path.basename(name) != name:
                raise CheckpointError(f'{index_file}: bad shard name {name!r} for key {key!r}')
            mapping[key] = directory / name
        for shard in sorted(set(mapping.values())):
            if not shard.is_file():
                raise CheckpointError(f'missing weight shard {shard.name} (listed in '
                                      f'{index_file.name}) in {directory}')
        return mapping, index_file
    if single.is_file():
        try:
            with safe_open(str(single), framework='pt', device='cpu') as f:
                keys = list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f'corrupt safetensors file {single}: {exc}') from exc
        return {k: single for k in keys}, single
    raise CheckpointError(f'no weights in {directory}: missing {SAFETENSORS_INDEX_FILE} '
                          f'(or a single {SAFETENSORS_FILE})')


def _shard_headers(mapping: Mapping[str, Path]
                   ) -> dict[str, tuple[Path, tuple[int, ...], int]]:
    """Read (shard, shape, bytes) of all keys from the shard headers (no tensor data is read).

    Every shard must hold exactly the keys the index assigns to it: a key the index lists
    elsewhere or not at all means the shards and the index disagree (CheckpointError naming
    the shard and the keys).
    """
    from safetensors import safe_open

    by_shard: dict[Path, list[str]] = {}
    for key, shard in mapping.items():
        by_shard.setdefault(shard, []).append(key)
    out: dict[str, tuple[Path, tuple[int, ...], int]] = {}
    for shard, keys in sorted(by_shard.items()):
        try:
            with safe_open(str(shard), framework='pt', device='cpu') as f:
                present = set(f.keys())
                absent = [k for k in keys if k not in present]
                if absent:
                    raise CheckpointError(f'{shard.name} lacks {len(absent)} keys that the index '
                                          f'assigns to it: {_keys_text(absent)}')
                extra = sorted(present - set(keys))
                if extra:
                    raise CheckpointError(f'{shard.name} holds {len(extra)} keys that '
                                          f'{SAFETENSORS_INDEX_FILE} does not assign to it: '
                                          f'{_keys_text(extra)}')
                for key in keys:
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    out[key] = (shard, shape, math.prod(shape) * _DTYPE_BYTES.get(
                        sl.get_dtype(), 0))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f'corrupt safetensors file {shard}: {exc}') from exc
    return out


def check_keys(model: torch.nn.Module, headers: Mapping[str, tuple[Path, tuple[int, ...], int]],
               listing: Path) -> dict[str, str]:
    """Compare checkpoint keys and shapes with ``model``; return ``{checkpoint key: model key}``.

    Raises CheckpointError naming up to ten missing keys (and ``listing``, the index file),
    unexpected keys (and the shards holding them) or shape mismatches (and their shard).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = {k: timm_to_checkpoint_key(k) for k in headers}  # timm 'gamma' accepted too
    present = set(renamed.values())
    if len(present) != len(renamed):
        twice = sorted(k for k in headers if timm_to_checkpoint_key(k) != k
                       and timm_to_checkpoint_key(k) in headers)
        raise CheckpointError(f'{listing.name}: LayerScale weights stored under both gamma and '
                              f'scale_factor: {_keys_text(twice)}')
    missing = sorted(set(expected) - present)
    unexpected = sorted(k for k, m in renamed.items() if m not in expected)
    problems = []
    if missing:
        problems.append(f'{len(missing)} keys the model needs are missing from {listing.name}: '
                        f'{_keys_text(missing)}')
    if unexpected:
        shards = sorted({headers[k][0].name for k in unexpected})
        problems.append(f'{len(unexpected)} unexpected keys in {", ".join(shards)}: '
                        f'{_keys_text(unexpected)}')
    mismatched = [(k, headers[k][0].name, headers[k][1], expected[m]) for k, m in renamed.items()
                  if m in expected and headers[k][1] != expected[m]]
    if mismatched:
        text = '; '.join(f'{k} in {s}: {list(got)} vs model {list(want)}'
                         for k, s, got, want in mismatched[:_MAX_KEYS_SHOWN])
        problems.append(f'{len(mismatched)} shape mismatches (config.json does not describe these '
                        f'weights): {text}')
    if problems:
        raise CheckpointError(f'checkpoint {listing.parent} does not match the model built from '
                              f'{CONFIG_FILE}: ' + ' | '.join(problems))
    return renamed


def _check_total_size(listing: Path, headers: Mapping[str, tuple[Path, tuple, int]]) -> None:
    """CheckpointError if the index's ``metadata.total_size`` differs from the shards' bytes."""
    if listing.name != SAFETENSORS_INDEX_FILE:
        return
    total = (read_json_file(listing, 'weight index').get('metadata') or {}).get('total_size')
    nbytes = sum(h[2] for h in headers.values())
    if isinstance(total, int) and total != nbytes:
        raise CheckpointError(f'{listing.name} says the weights are {total} bytes, but the '
                              f'shards hold {nbytes}: the shards and the index disagree (a '
                              'shard of another checkpoint?)')


class LoadProgress:
    """Reports bytes loaded, MB/s and ETA through ``report`` (a line at most every ``every_s``)."""

    def __init__(self, total_bytes: int, report: Callable[[str], None] | None,
                 label: str, every_s: float = 2.0) -> None:
        """Start counting towards ``total_bytes``."""
        self.total, self.done = max(1, int(total_bytes)), 0
        self.report, self.label, self.every_s = report, label, every_s
        self.start = self._last = time.perf_counter()

    def add(self, nbytes: int, final: bool = False) -> None:
        """Count ``nbytes`` more; report if due (always when ``final``)."""
        self.done += int(nbytes)
        now = time.perf_counter()
        if self.report is None or (not final and now - self._last < self.every_s):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float('inf')
        self.report(f'{self.label}: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB '
                    f'({100 * self.done / self.total:.0f}%), {rate / 1e6:.0f} MB/s, '
                    + (f'done in {elapsed:.1f} s' if final else f'ETA {eta:.0f} s'))


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``key`` (on meta until now)."""
    module_name, _, leaf = key.rpartition('.')
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(
            tensor, requires_grad=bool(old.requires_grad) and tensor.is_floating_point())
    else:
        module._buffers[leaf] = tensor


def load_weights(model: OpenVLA, path: str | os.PathLike[str], device: torch.device,
                 dtype: torch.dtype, *, quantization: str | None = None, lora: Any = None,
                 progress: Callable[[str], None] | None = None) -> tuple[Path, ...]:
    """Strictly load the safetensors weights of ``path`` into ``model`` (built on meta).

    Tensor by tensor, shard by shard: each is read through safetensors (memory-mapped, straight
    to ``device`` on CUDA), cast to ``dtype``, merged with ``lora`` (a ``lora.LoraAdapter``) if
    it adapts that weight, and either assigned or, for a layer ``quantization`` covers
    (``quant.quantizes``), quantized where it lies into an ``Int4Linear`` that replaces the
    module. So neither the bf16 model nor more than one shard is ever held beside the result.
    ``progress`` receives a line with GB, MB/s and ETA every two seconds. Returns the shards.
    """
    from safetensors import safe_open

    mapping, listing = weight_map(path)
    headers = _shard_headers(mapping)
    renamed = check_keys(model, headers, listing)
    _check_total_size(listing, headers)
    if lora is not None:
        lora.check({k: h[1] for k, h in headers.items()})
    quantize = None
    if quantization is not None:
        from vla_ros.policy.quant import Int4Linear, quantizes
        quantize = quantizes
    shards = sorted(set(mapping.values()))
    meter = LoadProgress(sum(h[2] for h in headers.values()), progress,
                         f'loading {Path(path).name}')
    open_device = str(device) if device.type == 'cuda' else 'cpu'
    for shard in shards:
        keys = [k for k, s in mapping.items() if s == shard]
        try:
            with safe_open(str(shard), framework='pt', device=open_device) as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    nbytes = tensor.numel() * tensor.element_size()
                    tensor = tensor.to(device=device, dtype=dtype) \
                        if tensor.is_floating_point() else tensor.to(device=device)
                    name = renamed[key]
                    if lora is not None:
                        tensor = lora.merge(name, tensor)
                    module_name, _, leaf = name.rpartition('.')
                    target = model.get_submodule(module_name) if module_name else model
                    if (quantize is not None and leaf == 'weight' and quantize(module_name)
                            and type(target) is torch.nn.Linear
                            and Int4Linear.supports(target.in_features)):
                        if target.bias is not None:
                            raise CheckpointError(f'{shard.name}: {module_name} has a bias; '
                                                  'int4 layers of the Llama take none')
                        parent, _, child = module_name.rpartition('.')
                        setattr(model.get_submodule(parent), child, Int4Linear.from_weight(tensor))
                    else:
                        _assign(model, name, tensor)
                    del tensor
                    meter.add(nbytes)
        except (torch.OutOfMemoryError, MemoryError, CheckpointError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise CheckpointError(f'corrupt safetensors file {shard}: {exc}') from exc
        logger.debug('loaded %d tensors from %s', len(keys), shard.name)
    meter.add(0, final=True)
    return tuple(shards)


def save_weights(model: torch.nn.Module | Mapping[str, torch.Tensor],
                 path: str | os.PathLike[str], *, n_shards: int = 1,
                 dtype: torch.dtype | None = None) -> tuple[Path, ...]:
    """Write a model's (or state dict's) weights as an OpenVLA/HF safetensors checkpoint.

    ``n_shards == 1`` writes ``model.safetensors``; more writes ``model-0000i-of-0000n
    .safetensors`` plus ``model.safetensors.index.json``. Keys are the model's own (already the
    checkpoint names, ``scale_factor`` included); floating tensors are cast to ``dtype`` if given.
    Returns the files written.
    """
    from safetensors.torch import save_file

    if not isinstance(n_shards, int) or n_shards < 1:
        raise ConfigError(f'n_shards must be a positive int, got {n_shards!r}')
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        t = value.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.to('cpu').contiguous().clone()
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {'format': 'pt'}
    if n_shards == 1:
        file = directory / SAFETENSORS_FILE
        save_file(tensors, str(file), metadata=meta)
        return (file,)
    keys = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    budget = math.ceil(total / n_shards)
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if groups[-1] and size + nbytes > budget and len(groups) < n_shards:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    while len(groups) < n_shards:  # keep the promised count even for lopsided sizes
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) < 2:
            raise ConfigError(f'cannot split {len(keys)} tensors into {n_shards} shards')
        half = len(groups[largest]) // 2
        groups.insert(largest + 1, groups[largest][half:])
        groups[largest] = groups[largest][:half]
    files = []
    weight_map_out: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = f'model-{i:05d}-of-{n_shards:05d}.safetensors'
        save_file({k: tensors[k] for k in group}, str(directory / name), metadata=meta)
        files.append(directory / name)
        weight_map_out.update({k: name for k in group})
    index = {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map_out.items()))}
    with open(directory / SAFETENSORS_INDEX_FILE, 'w', encoding='utf-8') as f:
        json.dump(index, f, indent=2)
        f.write('\n')
    return tuple(files)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def sentencepiece_to_tokenizer_json(model_file: str | os.PathLike[str],
                                    added_tokens: Mapping[str, int] | None = None) -> str:
    """Convert a Llama-style SentencePiece BPE ``tokenizer.model`` to a ``tokenizer.json`` string.

    Needs only ``sentencepiece`` and ``tokenizers`` (no protobuf): the vocabulary and scores come
    from the SentencePiece API, merges are every split of a piece into two pieces ranked by the
    merged piece's score, with byte fallback, SentencePiece's dummy-prefix and space handling
    as a normalizer (Prepend + Replace, Llama-2's own ``tokenizer.json`` layout) and a ``<s> $A``
    post-processor. ``added_tokens`` (e.g. ``{"<PAD>": 32000}``)
    are appended as special tokens. The result is checked against SentencePiece on sample text;
    CheckpointError if they disagree (e.g. a unigram model).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    file = Path(model_file)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(file))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f'corrupt SentencePiece model {file}: {exc}') from exc
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    special_ids = [i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {p: i for p, i in vocab.items()
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    rank = {i: r for r, i in enumerate(sorted(range(size), key=lambda i: (-sp.get_score(i), i)))}
    merges = []
    for piece, pid in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((rank[pid], normal[left], normal[right], left, right))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id())
    model = BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in special_ids])
    for content, index in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size(with_added_tokens=True) != index:
            raise CheckpointError(f'added token {content!r} must have id '
                                  f'{tok.get_vocab_size(with_added_tokens=True)}, not {index}')
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                           normalizers.Replace(' ', '▁')])
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, sp.bos_id())])
    for text in ('In: What action should the robot take to pick up the cup?\nOut:',
                 'Hello  world 1234 ünïcode ✓', ' leading space and trailing '):
        want = [sp.bos_id()] + sp.encode(text)
        got = tok.encode(text).ids
        if want != got:
            raise CheckpointError(f'{file} is not a Llama-style BPE SentencePiece model (its '
                                  f'conversion tokenizes {text!r} differently)')
    return tok.to_str(pretty=True)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the Llama tokenizer of a checkpoint directory, offline and without remote code.

    ``tokenizer.model`` must exist (CheckpointError naming it). The directory is read with
    ``LlamaTokenizerFast.from_pretrained(local_files_only=True)``; the class is named directly
    because ``AutoTokenizer`` would consult ``config.json``, whose ``auto_map`` points at remote
    code. Without ``tokenizer.json`` (which the published checkpoints ship), the SentencePiece
    model is converted here (``sentencepiece_to_tokenizer_json``), since recent transformers
    releases need protobuf to do it themselves.
    """
    import shutil
    import tempfile

    directory = Path(path)
    model_file = directory / TOKENIZER_MODEL_FILE
    if not model_file.is_file():
        raise CheckpointError(f'missing tokenizer file {TOKENIZER_MODEL_FILE} in {directory}')
    side_files = ('tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json')
    for name in side_files + (TOKENIZER_JSON_FILE,):
        if (directory / name).is_file():
            read_json_file(directory / name, 'tokenizer file')  # names a corrupt file early
    tok_config = directory / 'tokenizer_config.json'
    if tok_config.is_file():
        cls_name = read_json_file(tok_config).get('tokenizer_class')
        if cls_name not in (None, 'LlamaTokenizer', 'LlamaTokenizerFast'):
            logger.warning('%s names tokenizer_class %r; loading it as a Llama tokenizer',
                           tok_config, cls_name)
    if (directory / TOKENIZER_JSON_FILE).is_file():
        return _llama_tokenizer(directory)
    added = {}
    if (directory / 'added_tokens.json').is_file():
        added = read_json_file(directory / 'added_tokens.json', 'tokenizer file')
    text = sentencepiece_to_tokenizer_json(model_file, added)
    with tempfile.TemporaryDirectory(prefix='vla_ros_tokenizer_') as tmp:
        for name in side_files + (TOKENIZER_MODEL_FILE,):
            if (directory / name).is_file():
                shutil.copyfile(directory / name, Path(tmp) / name)
        (Path(tmp) / TOKENIZER_JSON_FILE).write_text(text, encoding='utf-8')
        logger.info('%s has no %s; converted %s', directory, TOKENIZER_JSON_FILE, model_file.name)
        return _llama_tokenizer(Path(tmp))


def _llama_tokenizer(directory: Path) -> Any:
    from transformers import LlamaTokenizerFast

    try:
        return LlamaTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unusable tokenizer files
        raise CheckpointError(f'cannot load the tokenizer files of {directory}: {exc}') from exc


def tokenizer_base_vocab_size(tokenizer: Any) -> int:
    """The tokenizer's vocabulary without added tokens (32000 for Llama-2; ``<PAD>`` excluded)."""
    return int(tokenizer.vocab_size)


def space_token_id(tokenizer: Any) -> int:
    """Return the id of the bare SentencePiece space piece ``▁`` (29871 in Llama-2)."""
    token_id = tokenizer.convert_tokens_to_ids('▁')
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise CheckpointError("the tokenizer has no bare '▁' piece, which OpenVLA appends to "
                              'every prompt')
    return token_id


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


def memory_estimates(headers: Mapping[str, tuple[Path, tuple[int, ...], int]]) -> dict[str, int]:
    """Bytes of GPU memory each mode needs for these weights, workspace included (estimates).

    ``none``: bf16 everywhere; ``int4``: the Llama's projections at 0.5 byte per weight plus
    fp16 scale and offset per group, the rest bf16. The workspace (KV cache, activations,
    graphs, compile scratch) is taken as 0.4 GB plus 4% of the weights.
    """
    from vla_ros.policy.int4_kernels import group_size_for
    from vla_ros.policy.quant import quantizes

    dense = int4 = 0
    for key, (_, shape, _) in headers.items():
        n = math.prod(shape)
        dense += 2 * n
        module = timm_to_checkpoint_key(key).rpartition('.')[0]
        group = group_size_for(shape[-1]) if len(shape) == 2 else None
        if key.endswith('.weight') and quantizes(module) and group:
            int4 += n // 2 + 4 * (n // group)
        else:
            int4 += 2 * n
    return {mode: int(b * 1.04 + 0.4e9) for mode, b in (('none', dense), ('int4', int4))}


def _memory_message(directory: Path, dev: torch.device, needs: Mapping[str, int], mode: str,
                    free: int | None, total: int | None) -> str:
    have = '' if free is None else f' ({free / 1e9:.1f} of {total / 1e9:.1f} GB free)'
    if free is None:  # not known (the CPU): the smaller modes
        fit = [m for m, b in needs.items() if b < needs[mode]]
    else:
        fit = [m for m, b in needs.items() if b <= free]
    needs_text = ', '.join(f'{m} about {b / 1e9:.1f} GB' for m, b in needs.items())
    if fit:
        advice = 'modes that fit: ' + ', '.join(f'quantization {m}' for m in fit)
    else:
        advice = 'no mode fits this device: free memory or use a larger GPU, or device cpu'
    return (f'not enough memory to load {directory} with quantization {mode} on '
            f'{dev}{have}: {needs_text}; {advice}')


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = 'cpu',
                    dtype: torch.dtype | str | None = None, *, quantization: str | None = None,
                    lora: Any = None, progress: Callable[[str], None] | None = None,
                    attn_implementation: str | None = None) -> LoadedCheckpoint:
    """Load an OpenVLA checkpoint directory (real or tiny) without remote code or downloads.

    Args:
        path: The checkpoint directory.
        device: Where the weights go ('cpu', 'cuda', 'cuda:1', ...).
        dtype: Compute dtype; None means float32 on the CPU, bfloat16 on a GPU.
        quantization: None or 'int4': the Llama's projections are quantized as they stream in
            (``load_weights``).
        lora: A ``lora.LoraAdapter`` merged into the weights as they stream in.
        progress: Receives load progress lines (GB, MB/s, ETA).
        attn_implementation: Passed to the Llama config ('sdpa', 'eager', ...); None: default.

    Returns:
        A LoadedCheckpoint with the model in eval mode on ``device``.

    Raises:
        CheckpointError: A missing, corrupt or inconsistent file (named in the message).
        ConfigError: A bad device/dtype, or not enough GPU memory (naming the modes that fit,
            checked before any weight is read and again if the allocator runs out).

    Whatever stops a load (an error, or SIGINT's KeyboardInterrupt) leaves nothing behind: the
    partial model is dropped and its GPU memory returned before the exception propagates.
    """
    started = time.perf_counter()
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f'checkpoint directory not found: {directory}')
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = read_config(directory)
    preprocessor = read_json_file(directory / PREPROCESSOR_FILE, 'image preprocessor config')
    if not isinstance(preprocessor, dict):
        raise CheckpointError(f'{directory / PREPROCESSOR_FILE} must hold a JSON object')
    means, _ = normalization_from_preprocessor_config(preprocessor)
    n_backbones = 2 if config['use_fused_vision_backbone'] else 1
    if len(means) != n_backbones:
        raise CheckpointError(f'{directory / PREPROCESSOR_FILE} normalizes for {len(means)} '
                              f'backbones but {CONFIG_FILE} builds {n_backbones}')
    norm_stats = NormStats.from_checkpoint_dir(directory)
    tokenizer = load_tokenizer(directory)
    try:
        model = OpenVLA.from_config(config, dtype=dt, device='meta',
                                    attn_implementation=attn_implementation)
    except ConfigError as exc:
        raise CheckpointError(f'{directory / CONFIG_FILE}: {exc}') from exc
    _check_vocab(tokenizer, model, config, directory)
    mode = quantization or 'none'
    free = total = None
    needs = memory_estimates(_shard_headers(weight_map(directory)[0]))
    if dev.type == 'cuda':
        free, total = torch.cuda.mem_get_info(dev)
        if needs[mode] > free:
            raise ConfigError(_memory_message(directory, dev, needs, mode, free, total))
    try:
        files = load_weights(model, directory, dev, dt, quantization=quantization, lora=lora,
                             progress=progress)
        model.materialize_buffers(dev)
        leftover = model.meta_tensor_names()
        if leftover:
            raise CheckpointError(f'{directory}: tensors never loaded: {_keys_text(leftover)}')
    except BaseException as exc:
        del model  # nothing of a stopped load survives it
        gc.collect()
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            raise ConfigError(_memory_message(directory, dev, needs, mode, free, total)
                              + f' ({type(exc).__name__})') from exc
        raise
    model.eval()
    logger.info('loaded OpenVLA checkpoint %s (%d weight files) on %s as %s%s in %.1f s',
                directory, len(files), dev, dt, f', {quantization}' if quantization else '',
                time.perf_counter() - started)
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, norm_stats=norm_stats,
                            config=config, preprocessor_config=preprocessor, path=directory,
                            weight_files=files)


def _check_vocab(tokenizer: Any, model: OpenVLA, config: Mapping[str, Any],
                 directory: Path) -> None:
    base = tokenizer_base_vocab_size(tokenizer)
    padded = int(model.language_model.config.vocab_size)
    if base > padded:
        raise CheckpointError(f'{directory}: the tokenizer has {base} tokens but the model only '
                              f'{padded} embedding rows ({CONFIG_FILE} text_config.vocab_size)')
    pad_multiple = config.get('pad_to_multiple_of')
    if isinstance(pad_multiple, int) and pad_multiple > 0 and padded - pad_multiple != base:
        logger.warning('%s: tokenizer vocab %d != text_config.vocab_size %d - pad_to_multiple_of '
                       '%d (the reference de-tokenizer assumes equality); using the tokenizer\'s',
                       directory, base, padded, pad_multiple)
