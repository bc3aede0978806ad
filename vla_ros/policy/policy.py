"""The narrow policy interface the VLA node uses: ``predict(image, instruction) -> PolicyOutput``.

``OpenVLAPolicy.from_pretrained`` loads a checkpoint directory (optionally a peft LoRA adapter,
merged or not, and a weight-only quantization from ``vla_ros.policy.quant``), selects the dataset
statistics (``unnorm_key``, checked before any weight is read) and picks a decoder: ``'plain'`` is
a straightforward greedy loop over the transformers Llama with its dynamic KV cache, ``'fast'``
hands the prefix to ``vla_ros.policy.engine.DecodeEngine`` (static cache, CUDA graphs). ``predict``
runs OpenVLA's inference contract once: resize-naive bicubic to the backbone size when needed,
per-backbone normalization from ``preprocessor_config.json``, the prompt template, the trailing
``▁`` token (looked up in the tokenizer: 29871 for Llama-2), ``[BOS] + patches + prompt`` and
greedy decoding of exactly ``action_dim`` tokens, constrained to the 256 action ids by default;
the ids are de-tokenized with the tokenizer's vocabulary size and un-normalized with the selected
``q01``/``q99``/``mask``. Timing, chunking and serving are wrappers around this class, not flags.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from vla_ros.core.actions import ActionStats, ActionTokenizer, NormStats, unnormalize
from vla_ros.core.errors import CheckpointError, ConfigError, ImageError, InstructionError
from vla_ros.core.image import (
    normalization_from_preprocessor_config,
    normalize_for_backbones,
    resize_square,
)
from vla_ros.core.prompt import DEFAULT_MAX_CHARS, build_prompt
from vla_ros.policy.checkpoint import (
    LoadedCheckpoint,
    load_checkpoint,
    resolve_device,
    resolve_dtype,
    space_token_id,
)
from vla_ros.policy.model import OpenVLA

logger = logging.getLogger(__name__)

ENGINES = ('plain', 'fast')
ADAPTER_CONFIG_FILE = 'adapter_config.json'
ADAPTER_WEIGHTS_FILES = ('adapter_model.safetensors', 'adapter_model.bin')
_OPENVLA_MODULE_PREFIXES = ('vision_backbone.', 'projector.', 'language_model.')
_LLAMA_MODULE_PREFIXES = ('model.', 'lm_head')


@dataclass(frozen=True, eq=False)
class PolicyOutput:
    """One prediction.

    ``action``: the un-normalized action (float64, ``(action_dim,)``, robot units; the gripper
    raw where the dataset's mask is false). ``normalized``: the de-tokenized action in [-1, 1].
    ``token_ids``: the generated ids. ``token_probs``: the probability of each chosen token
    (softmax over the 256 action ids when decoding is constrained, over the whole vocabulary
    otherwise); ``token_margins``: each one's lead over the runner-up token (``p_chosen -
    p_second``, in [0, 1]); both for confidence gating. ``timings``: milliseconds for
    ``preprocess``, ``vision``, ``llm`` (prefill + decode; the plain engine also reports
    ``prefill`` and ``decode``) and ``total``, measured after a device synchronization. Arrays
    are read-only.
    """

    action: np.ndarray
    normalized: np.ndarray
    token_ids: tuple[int, ...]
    token_probs: np.ndarray
    token_margins: np.ndarray
    timings: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Freeze the arrays and the timings."""
        for name in ('action', 'normalized', 'token_probs', 'token_margins'):
            arr = np.array(getattr(self, name), dtype=np.float64, copy=True)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, 'token_ids', tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, 'timings', MappingProxyType(dict(self.timings)))


class _Clock:
    """Wall-clock lap timer that synchronizes ``device`` before each reading."""

    def __init__(self, device: torch.device) -> None:
        """Start the clock."""
        self._cuda = device.type == 'cuda'
        self._device = device
        self._start = self._last = self._now()
        self.laps: dict[str, float] = {}

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the milliseconds since the previous lap under ``name``."""
        now = self._now()
        self.laps[name] = (now - self._last) * 1e3
        self._last = now

    def total(self) -> dict[str, float]:
        """Return the laps plus ``total`` (start to last lap)."""
        return dict(self.laps, total=(self._last - self._start) * 1e3)


def load_lora_adapter(model: OpenVLA, lora_path: str | os.PathLike[str],
                      merge: bool = False) -> OpenVLA:
    """Apply a peft LoRA adapter directory to ``model`` in place; return the model.

    Adapters saved from the whole OpenVLA model (as openvla's ``finetune.py`` does: keys
    ``base_model.model.language_model...``, ``...projector...``, ``...vision_backbone...``) are
    applied to ``model``; adapters saved from the bare Llama (``base_model.model.model.layers...``)
    to ``model.language_model``. ``target_modules='all-linear'`` is resolved to the modules the
    adapter holds weights for. Every adapter tensor must load (CheckpointError naming the file
    otherwise). ``merge=True`` folds the weights in (``merge_and_unload``); otherwise the LoRA
    layers stay active in ``model``.
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    directory = Path(lora_path)
    config_file = directory / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f'missing {ADAPTER_CONFIG_FILE} in LoRA adapter directory '
                              f'{directory}')
    weights_file = next((directory / n for n in ADAPTER_WEIGHTS_FILES
                         if (directory / n).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f'missing {ADAPTER_WEIGHTS_FILES[0]} in LoRA adapter directory '
                              f'{directory}')
    weights = _read_adapter_weights(weights_file)
    prefix = 'base_model.model.'
    inner = [k[len(prefix):] for k in weights if k.startswith(prefix)]
    if not inner or len(inner) != len(weights):
        raise CheckpointError(f'{weights_file}: keys must start with {prefix!r}, got '
                              f'{sorted(weights)[:5]}')
    if all(k.startswith(_OPENVLA_MODULE_PREFIXES) for k in inner):
        target: torch.nn.Module = model
    elif all(k.startswith(_LLAMA_MODULE_PREFIXES) for k in inner):
        target = model.language_model
    else:
        raise CheckpointError(f'{weights_file}: keys name neither OpenVLA modules '
                              f'({", ".join(_OPENVLA_MODULE_PREFIXES)}) nor bare Llama modules, '
                              f'e.g. {sorted(inner)[:5]}')
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except Exception as exc:  # peft raises ValueError/TypeError/JSON errors for bad configs
        raise CheckpointError(f'invalid {config_file}: {exc}') from exc
    if getattr(config, 'peft_type', None) is None or str(config.peft_type.value) != 'LORA':
        raise CheckpointError(f'{config_file}: peft_type {getattr(config, "peft_type", None)} is '
                              'not LORA')
    if getattr(config, 'target_modules', None) == 'all-linear':
        modules = sorted({re.sub(r'\.lora_[AB](\.[^.]+)?\.weight$', '', k) for k in inner
                          if '.lora_' in k})
        config.target_modules = '|'.join(re.escape(m) for m in modules)
    config.task_type = None
    config.inference_mode = True
    try:
        peft_model = PeftModel(target, config, adapter_name='default',
                               autocast_adapter_dtype=False)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f'cannot apply LoRA adapter {directory}: {exc}') from exc
    result = set_peft_model_state_dict(peft_model, weights, adapter_name='default')
    unexpected = [k for k in result.unexpected_keys if 'lora_' in k]
    missing = [k for k in result.missing_keys if 'lora_' in k]
    if unexpected or missing:
        raise CheckpointError(
            f'LoRA adapter {weights_file} does not fit the model: {len(unexpected)} unexpected '
            f'({sorted(unexpected)[:10]}), {len(missing)} missing ({sorted(missing)[:10]})')
    peft_model.eval()
    if merge:
        merged = peft_model.merge_and_unload()
        if target is not model:
            model.language_model = merged
        logger.info('merged LoRA adapter %s', directory)
    else:
        logger.info('applied LoRA adapter %s (unmerged)', directory)
    return model


def _read_adapter_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == '.safetensors':
            from safetensors.torch import load_file

            return load_file(str(file), device='cpu')
        return torch.load(str(file), map_location='cpu', weights_only=True)
    except Exception as exc:  # corrupt files raise library-specific errors
        raise CheckpointError(f'corrupt LoRA adapter weights {file}: {exc}') from exc


class OpenVLAPolicy:
    """OpenVLA behind ``predict(image, instruction) -> PolicyOutput``; build with from_pretrained.

    The instance is stateless between calls (``reset`` exists for the policy interface); it is
    not thread-safe, so call it from one worker.
    """

    def __init__(self, checkpoint: LoadedCheckpoint, *, unnorm_key: str | None = None,
                 constrain_actions: bool = True, engine: str = 'plain',
                 max_seq_len: int | None = None, max_instruction_chars: int = DEFAULT_MAX_CHARS,
                 compile_step: bool = False) -> None:
        """Wrap a loaded checkpoint (see ``from_pretrained`` for the arguments)."""
        if engine not in ENGINES:
            raise ConfigError(f'engine must be one of {", ".join(ENGINES)}, got {engine!r}')
        self._ckpt = checkpoint
        self._model = checkpoint.model
        self._tokenizer = checkpoint.tokenizer
        self._norm_stats = checkpoint.norm_stats
        self._stats: ActionStats = checkpoint.norm_stats.select(unnorm_key)
        self._unnorm_key = unnorm_key if unnorm_key is not None else checkpoint.norm_stats.keys[0]
        self._constrain = bool(constrain_actions)
        self._max_chars = max_instruction_chars
        config = checkpoint.config
        strategy = config.get('image_resize_strategy', 'resize-naive')
        if strategy != 'resize-naive':
            raise CheckpointError(f'{checkpoint.path / "config.json"}: image_resize_strategy '
                                  f'{strategy!r} is not supported (only resize-naive)')
        self._means, self._stds = normalization_from_preprocessor_config(
            checkpoint.preprocessor_config)
        self._image_size = self._model.vision_backbone.image_size
        self._space_id = space_token_id(self._tokenizer)
        self._bos_id = int(self._tokenizer.bos_token_id)
        n_bins = int(config.get('n_action_bins', 256))
        self._action_tokenizer = ActionTokenizer(vocab_size=int(self._tokenizer.vocab_size),
                                                 n_bins=n_bins)
        padded = self._model.padded_vocab_size
        first, last = self._action_tokenizer.action_token_range
        if last >= padded:
            raise CheckpointError(f'action ids {first}..{last} exceed the model vocabulary '
                                  f'({padded})')
        self._device = self._model.device
        self._logit_bias = torch.full((padded,), float('-inf'), device=self._device)
        self._logit_bias[first:last + 1] = 0.0
        limit = int(config.get('llm_max_length', 2048))
        self._max_seq_len = int(max_seq_len) if max_seq_len is not None else limit
        if self._max_seq_len <= self._model.num_patches + self.action_dim:
            raise ConfigError(f'max_seq_len {self._max_seq_len} leaves no room for a prompt')
        self._engine_name = engine
        self._engine: Any = None
        self._vision: Any = self._model.project_patches
        if engine == 'fast':
            self._build_fast_engine(compile_step)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, unnorm_key: str | None = None,
                        device: torch.device | str = 'cpu',
                        dtype: torch.dtype | str | None = None, constrain_actions: bool = True,
                        lora_path: str | os.PathLike[str] | None = None,
                        merge_lora: bool = False, quantization: str | None = None,
                        engine: str = 'plain', keep_vision_unquantized: bool = True,
                        max_seq_len: int | None = None, compile_step: bool = False,
                        attn_implementation: str | None = None) -> OpenVLAPolicy:
        """Load a checkpoint directory and return a ready policy.

        Args:
            path: OpenVLA checkpoint directory (HF layout).
            unnorm_key: Dataset statistics to un-normalize with; required when the checkpoint
                has several (UnnormKeyError lists them, before any weight is read).
            device: 'cpu', 'cuda', 'cuda:N'.
            dtype: Compute dtype (None: float32 on the CPU, bfloat16 on a GPU).
            constrain_actions: Mask every logit except the 256 action ids (the reference does
                not; turn off for reference-equivalence checks).
            lora_path: A peft LoRA adapter directory to apply.
            merge_lora: Merge the adapter into the weights (required with quantization).
            quantization: None or a ``vla_ros.policy.quant`` method ('int8', 'nf4', 'fp4',
                'int4_fast'); the bitsandbytes ones need a CUDA device.
            engine: 'plain' (transformers, dynamic cache) or 'fast' (``DecodeEngine``).
            keep_vision_unquantized: Quantize only the Llama (the default) or everything.
            max_seq_len: Longest prefix + action tokens (default ``llm_max_length``).
            compile_step: With the fast engine, ``torch.compile`` its decode step.
            attn_implementation: Llama attention implementation ('sdpa', 'eager', ...).

        Raises:
            CheckpointError, UnnormKeyError, ConfigError: see the message.

        """
        if engine not in ENGINES:
            raise ConfigError(f'engine must be one of {", ".join(ENGINES)}, got {engine!r}')
        dev = resolve_device(device)
        if quantization is not None:
            methods = _quant_methods()
            if quantization not in methods:
                raise ConfigError(f'quantization must be None or one of {", ".join(methods)}, '
                                  f'got {quantization!r}')
            if dev.type != 'cuda' and quantization != 'int4_fast':
                raise ConfigError(f'quantization {quantization!r} uses bitsandbytes, which needs '
                                  f'a CUDA device (got {dev}); on the CPU load unquantized')
            if lora_path is not None and not merge_lora:
                raise ConfigError('a LoRA adapter on a quantized model must be merged first: '
                                  'pass merge_lora=True')
        NormStats.from_checkpoint_dir(path).select(unnorm_key)  # fail before loading weights
        if quantization is None:
            ckpt = load_checkpoint(path, device=dev, dtype=dtype,
                                   attn_implementation=attn_implementation)
        else:
            # Load on the CPU and quantize layer by layer onto the device: the GPU never holds
            # the whole bf16 model.
            ckpt = load_checkpoint(path, device='cpu', dtype=resolve_dtype(dtype, dev),
                                   attn_implementation=attn_implementation)
        if lora_path is not None:
            load_lora_adapter(ckpt.model, lora_path, merge=merge_lora)
        if quantization is not None:
            from vla_ros.policy.quant import quantize_model

            quantize_model(ckpt.model, quantization,
                           keep_vision_unquantized=keep_vision_unquantized, device=dev)
            ckpt.model.materialize_buffers(dev)
        return cls(ckpt, unnorm_key=unnorm_key, constrain_actions=constrain_actions,
                   engine=engine, max_seq_len=max_seq_len, compile_step=compile_step)

    def _build_fast_engine(self, compile_step: bool) -> None:
        try:
            from vla_ros.policy.engine import DecodeEngine, GraphedModule
        except ImportError as exc:
            raise ConfigError(f"engine='fast' needs vla_ros.policy.engine ({exc}); use "
                              "engine='plain'") from exc
        allowed = None
        if self._constrain:
            allowed = torch.as_tensor(self._action_tokenizer.allowed_token_ids(),
                                      device=self._device)
        cuda = self._device.type == 'cuda'
        self._engine = DecodeEngine(self._model.language_model, self._max_seq_len,
                                    allowed_token_ids=allowed, use_cuda_graph=cuda,
                                    compile_step=compile_step)
        if cuda:
            example = torch.zeros(1, self._model.vision_backbone.in_channels, self._image_size,
                                  self._image_size, device=self._device, dtype=self._model.dtype)
            self._vision = GraphedModule(self._model.project_patches, example)
            self._engine.warmup()

    # -- the policy interface --------------------------------------------------------------

    @property
    def action_dim(self) -> int:
        """Number of action tokens decoded per call (``len(q01)``, 7 for OpenVLA)."""
        return self._stats.action_dim

    @property
    def unnorm_key(self) -> str:
        """The dataset whose statistics un-normalize the actions."""
        return self._unnorm_key

    @property
    def norm_stats(self) -> ActionStats:
        """The selected dataset's action statistics."""
        return self._stats

    @property
    def all_norm_stats(self) -> NormStats:
        """Every dataset's statistics in the checkpoint."""
        return self._norm_stats

    @property
    def model(self) -> OpenVLA:
        """The underlying model."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The Llama tokenizer."""
        return self._tokenizer

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        """The de-tokenizer (vocab size of the tokenizer, not of the padded embedding)."""
        return self._action_tokenizer

    @property
    def checkpoint(self) -> LoadedCheckpoint:
        """What was loaded."""
        return self._ckpt

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self._device

    @property
    def image_size(self) -> int:
        """Side of the square image the backbones take (224)."""
        return self._image_size

    @property
    def constrain_actions(self) -> bool:
        """Whether decoding is restricted to the action ids."""
        return self._constrain

    @property
    def engine(self) -> str:
        """'plain' or 'fast'."""
        return self._engine_name

    def reset(self) -> None:
        """Start a new episode. OpenVLA is memoryless between calls, so this only logs."""
        logger.debug('policy reset (stateless)')

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the prompt for ``instruction``: BOS first, the space token last."""
        prompt = build_prompt(instruction, self._max_chars)
        ids = [int(i) for i in self._tokenizer(prompt).input_ids]
        if not ids or ids[0] != self._bos_id:
            ids.insert(0, self._bos_id)
        if ids[-1] != self._space_id:  # OpenVLA's predict_action appends 29871 when missing
            ids.append(self._space_id)
        return ids

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """Validate, resize (bicubic, resize-naive) and normalize ``image`` to ``(1, C, S, S)``."""
        if not isinstance(image, np.ndarray):
            raise ImageError(f'image must be a numpy array, got {type(image).__name__}')
        if image.dtype != np.uint8:
            raise ImageError(f'image must be uint8 RGB, got dtype {image.dtype}')
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ImageError(f'image must be (H, W, 3) RGB, got shape {image.shape}')
        size = self._image_size
        if image.shape[:2] != (size, size):
            image = resize_square(image, size, 'bicubic')
        pixels = normalize_for_backbones(image, self._means, self._stds)
        return torch.from_numpy(pixels)[None].to(self._device)

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        """Predict one action for an RGB uint8 ``image`` (224x224; others are resized).

        Raises ImageError for a malformed image and InstructionError for an unusable or too long
        instruction.
        """
        clock = _Clock(self._device)
        ids = self.prompt_ids(instruction)
        prefix_len = self._model.prefix_length(len(ids))
        if prefix_len + self.action_dim - 1 > self._max_seq_len:
            raise InstructionError(f'the prompt is {len(ids)} tokens; with the image it exceeds '
                                   f'the {self._max_seq_len}-token limit')
        pixels = self.pixel_values(image)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        clock.lap('preprocess')
        with torch.inference_mode():
            patches = self._vision(pixels.to(self._model.dtype))
            clock.lap('vision')
            embeds = self._model.embed_prefix(pixels, input_ids, patch_embeddings=patches)
            if self._engine is not None:
                tokens, probs, margins = self._engine.generate(embeds, n_tokens=self.action_dim)
                clock.lap('llm')
            else:
                tokens, probs, margins = self._greedy(embeds, clock)
            probs, margins = probs.cpu().numpy(), margins.cpu().numpy()
        token_ids = [int(t) for t in tokens.flatten().tolist()]
        normalized = self._action_tokenizer.decode(np.asarray(token_ids, dtype=np.int64))
        action = unnormalize(normalized, self._stats)
        timings = clock.total()
        if 'prefill' in timings:
            timings['llm'] = timings['prefill'] + timings['decode']
        return PolicyOutput(action=action, normalized=normalized, token_ids=tuple(token_ids),
                            token_probs=probs, token_margins=margins, timings=timings)

    __call__ = predict

    # -- decoding --------------------------------------------------------------------------

    def _greedy(self, inputs_embeds: torch.Tensor,
                clock: _Clock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy-decode ``action_dim`` tokens with the transformers Llama and its KV cache."""
        from vla_ros.policy.engine import pick_tokens

        bias = self._logit_bias if self._constrain else None
        logits, cache = self._model.prefill(inputs_embeds)
        picked = [pick_tokens(logits, bias)]
        clock.lap('prefill')
        for _ in range(self.action_dim - 1):
            logits, cache = self._model.decode_step(picked[-1][0], cache)
            picked.append(pick_tokens(logits, bias))
        clock.lap('decode')
        return tuple(torch.cat(parts) for parts in zip(*picked, strict=True))


def _quant_methods() -> tuple[str, ...]:
    try:
        from vla_ros.policy.quant import METHODS
    except ImportError as exc:
        raise ConfigError(f'quantization needs vla_ros.policy.quant ({exc})') from exc
    return tuple(METHODS)
