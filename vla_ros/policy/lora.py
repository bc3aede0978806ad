"""LoRA adapters in peft's file layout, merged into the weights while they load.

An adapter directory holds ``adapter_config.json`` (peft's ``LoraConfig``: ``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``/``alpha_pattern``, ...) and
``adapter_model.safetensors`` (or ``.bin``) with keys ``base_model.model.<module>.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r). ``<module>`` names a module of the whole OpenVLA
model (as openvla's ``finetune.py`` and ``vla_ros.train`` save it: ``language_model...``,
``projector...``, ``vision_backbone...``) or of the bare Llama (``model.layers...``).

``LoraAdapter.read`` parses and checks the directory; ``check`` compares every tensor with the
checkpoint's weight shapes before any weight is read (a ``CheckpointError`` naming the file and
the first tensor that does not fit: an adapter made for another base model, or an ``r`` in the
config that disagrees with the tensors); ``merge`` returns ``W + scaling * B @ A`` for one
checkpoint weight as it streams in (on its device, in fp32, cast back), so a quantized model
quantizes the merged weights and the merged bf16 model never has to exist anywhere. peft
applies the same arithmetic (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA); the
tests hold the two against each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vla_ros.core.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILES = ('adapter_model.safetensors', 'adapter_model.bin')
_PREFIX = 'base_model.model.'
_OPENVLA_PREFIXES = ('vision_backbone.', 'projector.', 'language_model.')
_LLAMA_PREFIXES = ('model.', 'lm_head')
_KEY = re.compile(r'^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$')


@dataclass
class LoraAdapter:
    """A parsed adapter: per checkpoint weight key, its (A, B, scaling)."""

    directory: Path
    weights_file: Path
    r: int
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> LoraAdapter:
        """Parse an adapter directory (CheckpointError naming what is wrong)."""
        directory = Path(path)
        if not directory.is_dir():
            raise CheckpointError(f'LoRA adapter directory not found: {directory}')
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f'missing {CONFIG_FILE} in LoRA adapter directory {directory}')
        try:
            config = json.loads(config_file.read_text(encoding='utf-8'))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f'invalid {config_file}: {exc}') from exc
        if not isinstance(config, dict):
            raise CheckpointError(f'{config_file} must hold a JSON object')
        if str(config.get('peft_type', '')).upper() != 'LORA':
            raise CheckpointError(f'{config_file}: peft_type {config.get("peft_type")!r} is not '
                                  'LORA')
        for key, what in (('use_dora', 'DoRA'), ('fan_in_fan_out', 'fan_in_fan_out')):
            if config.get(key):
                raise CheckpointError(f'{config_file}: {what} adapters are not supported')
        if config.get('lora_bias'):
            raise CheckpointError(f'{config_file}: lora_bias adapters are not supported')
        r, alpha = config.get('r'), config.get('lora_alpha', config.get('r'))
        if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
            raise CheckpointError(f'{config_file}: r must be a positive int and lora_alpha a '
                                  f'number, got r={r!r}, lora_alpha={alpha!r}')
        weights_file = next((directory / n for n in WEIGHTS_FILES
                             if (directory / n).is_file()), None)
        if weights_file is None:
            raise CheckpointError(f'missing {WEIGHTS_FILES[0]} in LoRA adapter directory '
                                  f'{directory}')
        tensors = _read_tensors(weights_file)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key.removeprefix(_PREFIX)) if key.startswith(_PREFIX) else None
            if match is None:
                raise CheckpointError(f'{weights_file}: unsupported tensor {key!r} (expected '
                                      f'{_PREFIX}<module>.lora_A/lora_B.weight)')
            pairs.setdefault(match['module'], {})[match['part']] = tensor
        if not pairs:
            raise CheckpointError(f'{weights_file}: no LoRA tensors')
        modules = sorted(pairs)
        if all(m.startswith(_OPENVLA_PREFIXES) for m in modules):
            to_checkpoint = lambda m: m  # noqa: E731
        elif all(m.startswith(_LLAMA_PREFIXES) for m in modules):
            to_checkpoint = lambda m: f'language_model.{m}'  # noqa: E731
        else:
            raise CheckpointError(f'{weights_file}: keys name neither OpenVLA modules '
                                  f'({", ".join(_OPENVLA_PREFIXES)}) nor bare Llama modules, '
                                  f'e.g. {modules[:3]}')
        adapter = cls(directory, weights_file, r)
        ranks, alphas = config.get('rank_pattern') or {}, config.get('alpha_pattern') or {}
        for module in modules:
            part = pairs[module]
            if set(part) != {'A', 'B'}:
                raise CheckpointError(f'{weights_file}: {module} has lora_{"".join(part)} only')
            mr = _pattern_value(ranks, module, r)
            ma = _pattern_value(alphas, module, alpha)
            a, b = part['A'], part['B']
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != mr or b.shape[1] != mr:
                bad, shape = ('lora_A', a.shape) if a.dim() != 2 or a.shape[0] != mr else \
                    ('lora_B', b.shape)
                raise CheckpointError(f'{weights_file}: {module}.{bad} has shape {list(shape)}, '
                                      f'but r = {mr} in {CONFIG_FILE}')
            scaling = ma / (math.sqrt(mr) if config.get('use_rslora') else mr)
            adapter.deltas[f'{to_checkpoint(module)}.weight'] = (a, b, float(scaling))
        return adapter

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Compare with the checkpoint's weight shapes ``{key: shape}``; CheckpointError if off."""
        for key, (a, b, _) in sorted(self.deltas.items()):
            module = key.removesuffix('.weight')
            if key not in shapes:
                raise CheckpointError(f'LoRA adapter {self.weights_file}: the model has no '
                                      f'linear layer {module}')
            shape = shapes[key]
            if len(shape) != 2 or a.shape[1] != shape[1]:
                raise CheckpointError(f'LoRA adapter {self.weights_file}: {module}.lora_A is '
                                      f'{list(a.shape)}, but {module} takes {shape[-1]} inputs '
                                      '(an adapter of another base model?)')
            if b.shape[0] != shape[0]:
                raise CheckpointError(f'LoRA adapter {self.weights_file}: {module}.lora_B is '
                                      f'{list(b.shape)}, but {module} has {shape[0]} outputs '
                                      '(an adapter of another base model?)')

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with this adapter's delta added (unchanged if it has none for ``key``)."""
        entry = self.deltas.get(key)
        if entry is None:
            return weight
        a, b, scaling = entry
        dev = weight.device
        merged = weight.float() + scaling * (b.to(dev, torch.float32) @ a.to(dev, torch.float32))
        return merged.to(weight.dtype)

    def __len__(self) -> int:
        """Number of adapted weights."""
        return len(self.deltas)


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """Return peft's per-module override: the pattern whose regex matches the module's end."""
    for pattern, value in patterns.items():
        if re.match(rf'(.*\.)?({pattern})$', module):
            return value
    return default


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == '.safetensors':
            from safetensors.torch import load_file

            return load_file(str(file), device='cpu')
        return torch.load(str(file), map_location='cpu', weights_only=True)
    except Exception as exc:  # corrupt files raise library-specific errors
        raise CheckpointError(f'corrupt LoRA adapter weights {file}: {exc}') from exc
