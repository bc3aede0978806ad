"""The narrow policy interface the VLA node uses: ``predict(image, instruction) -> PolicyOutput``.

``OpenVLAPolicy.from_pretrained`` loads a checkpoint directory, streaming (optionally merging a
peft LoRA adapter into the weights and quantizing the Llama to int4 as they arrive), after
selecting the dataset statistics (``unnorm_key``, checked before any weight is read). One engine
serves every device: ``vla_ros.policy.engine`` (static KV cache; on a GPU compiled and replayed
as CUDA graphs, vision on two streams; on the CPU the same code eagerly). ``predict`` runs
OpenVLA's inference contract once: resize-naive bicubic to the backbone size when needed,
per-backbone normalization from ``preprocessor_config.json``, the prompt template, the trailing
``▁`` token (looked up in the tokenizer: 29871 for Llama-2), ``[BOS] + patches + prompt`` and
greedy decoding of exactly ``action_dim`` tokens, constrained to the 256 action ids by default,
with each token's probability and margin; the ids are de-tokenized with the tokenizer's
vocabulary size and un-normalized with the selected ``q01``/``q99``/``mask``. ``predict_batch``
does the same for several (image, instruction) pairs in one batched pass (one GPU serving many
arms), validating each sample first so that one bad input fails only its own entry. Timing,
chunking and serving are wrappers around this class, not flags.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


class OpenVLAPolicy:
    """OpenVLA behind ``predict(image, instruction) -> PolicyOutput``; build with from_pretrained.

    The instance is stateless between calls (``reset`` exists for the policy interface); it is
    not thread-safe, so call it from one worker. The engine is built at the first prediction
    (or ``warmup``), so ``model`` is the untouched loaded model until then.
    """

    def __init__(self, checkpoint: LoadedCheckpoint, *, unnorm_key: str | None = None,
                 constrain_actions: bool = True, max_seq_len: int | None = None,
                 max_instruction_chars: int = DEFAULT_MAX_CHARS) -> None:
        """Wrap a loaded checkpoint (see ``from_pretrained`` for the arguments)."""
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
        limit = int(config.get('llm_max_length', 2048))
        self._max_seq_len = int(max_seq_len) if max_seq_len is not None else limit
        if self._max_seq_len <= self._model.num_patches + self.action_dim:
            raise ConfigError(f'max_seq_len {self._max_seq_len} leaves no room for a prompt')
        self._engine: Any = None
        self._vision: Any = None
        self._vision_one: Any = None

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, unnorm_key: str | None = None,
                        device: torch.device | str = 'cpu',
                        dtype: torch.dtype | str | None = None, constrain_actions: bool = True,
                        lora_path: str | os.PathLike[str] | None = None,
                        quantization: str | None = None, max_seq_len: int | None = None,
                        progress: Callable[[str], None] | None = logger.info,
                        ) -> OpenVLAPolicy:
        """Load a checkpoint directory and return a ready policy.

        Args:
            path: OpenVLA checkpoint directory (HF layout).
            unnorm_key: Dataset statistics to un-normalize with; required when the checkpoint
                has several (UnnormKeyError lists them, before any weight is read).
            device: 'cpu', 'cuda', 'cuda:N'.
            dtype: Compute dtype (None: float32 on the CPU, bfloat16 on a GPU).
            constrain_actions: Mask every logit except the 256 action ids (the reference does
                not; turn off for reference-equivalence checks).
            lora_path: A peft LoRA adapter directory, merged into the weights as they load.
            quantization: None (bf16 on a GPU) or 'int4' (``vla_ros.policy.quant``: the Llama
                quantized while it streams in, about 6 GB for openvla-7b).
            max_seq_len: Longest prefix + action tokens (default ``llm_max_length``).
            progress: Receives load progress lines (GB, MB/s, ETA); None: silent.

        Raises:
            CheckpointError, UnnormKeyError, ConfigError: see the message.

        """
        dev = resolve_device(device)
        if quantization is not None:
            from vla_ros.policy.quant import METHODS, check_int4_device

            if quantization not in METHODS:
                raise ConfigError(f'quantization must be None or one of {", ".join(METHODS)}, '
                                  f'got {quantization!r}')
            check_int4_device(dev)
        NormStats.from_checkpoint_dir(path).select(unnorm_key)  # fail before loading weights
        lora = None
        if lora_path is not None:
            from vla_ros.policy.lora import LoraAdapter

            lora = LoraAdapter.read(lora_path)
        ckpt = load_checkpoint(path, device=dev, dtype=dtype, quantization=quantization,
                               lora=lora, progress=progress)
        if lora is not None:
            logger.info('merged LoRA adapter %s (%d weights)', lora.directory, len(lora))
        return cls(ckpt, unnorm_key=unnorm_key, constrain_actions=constrain_actions,
                   max_seq_len=max_seq_len)

    def _ensure_engine(self) -> None:
        if self._engine is not None:
            return
        from vla_ros.policy.engine import DecodeEngine, GraphedModule, vision_fn

        allowed = None
        if self._constrain:
            allowed = torch.as_tensor(self._action_tokenizer.allowed_token_ids())
        cuda = self._device.type == 'cuda'
        if cuda:
            from vla_ros.policy import cache

            cache.activate(self._ckpt.config, self._device)
        self._engine = DecodeEngine(self._model.language_model, self._max_seq_len,
                                    allowed_token_ids=allowed)
        if cuda:
            # compiled for one arm; batches use the uncompiled graphs (no recompile per size)
            self._vision = GraphedModule(vision_fn(self._model))
            self._vision_one = GraphedModule(vision_fn(self._model, torch_compile=True),
                                             fallback=vision_fn(self._model))
        else:
            self._vision = self._vision_one = self._model.project_patches

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_tokens: Sequence[int] = ()) -> None:
        """Build the engine and, on a GPU, compile and capture it for these shapes now.

        ``prompt_tokens``: prompt lengths to prepare prefill graphs for (default: the length
        buckets of prompts of 12..40 tokens, everyday instructions). Otherwise the first
        prediction of a new shape does it (a fraction of a second once compiled).
        """
        self._ensure_engine()
        if self._device.type != 'cuda':
            return
        lengths = prompt_tokens or range(12, 41)
        buckets = sorted({self._engine.padded_length(self._model.prefix_length(n))
                          for n in lengths})
        pixels = torch.zeros(1, self._model.vision_backbone.in_channels, self._image_size,
                             self._image_size, device=self._device, dtype=self._model.dtype)
        with torch.inference_mode():
            for b in sorted(set(batch_sizes), reverse=True):
                vision = self._vision_one if b == 1 else self._vision
                vision(pixels.expand(b, -1, -1, -1).contiguous())
        self._engine.warmup(buckets, batch_sizes, self.action_dim)

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
    def decode_engine(self) -> Any:
        """The ``DecodeEngine`` (built at the first prediction; None before)."""
        return self._engine

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

    def _normalized_pixels(self, image: np.ndarray) -> np.ndarray:
        """Validate, resize (bicubic, resize-naive) and normalize ``image`` to ``(C, S, S)``."""
        if not isinstance(image, np.ndarray):
            raise ImageError(f'image must be a numpy array, got {type(image).__name__}')
        if image.dtype != np.uint8:
            raise ImageError(f'image must be uint8 RGB, got dtype {image.dtype}')
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ImageError(f'image must be (H, W, 3) RGB, got shape {image.shape}')
        size = self._image_size
        if image.shape[:2] != (size, size):
            image = resize_square(image, size, 'bicubic')
        return normalize_for_backbones(image, self._means, self._stds)

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """Validate, resize and normalize ``image`` to ``(1, C, S, S)`` on the model's device."""
        return torch.from_numpy(self._normalized_pixels(image))[None].to(self._device)

    def _checked_prompt(self, instruction: str) -> list[int]:
        ids = self.prompt_ids(instruction)
        if self._model.prefix_length(len(ids)) + self.action_dim - 1 > self._max_seq_len:
            raise InstructionError(f'the prompt is {len(ids)} tokens; with the image it exceeds '
                                   f'the {self._max_seq_len}-token limit')
        return ids

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        """Predict one action for an RGB uint8 ``image`` (224x224; others are resized).

        Raises ImageError for a malformed image and InstructionError for an unusable or too long
        instruction.
        """
        result = self.predict_batch([image], [instruction])[0]
        if isinstance(result, Exception):
            raise result
        return result

    __call__ = predict

    def predict_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str]
                      ) -> list[PolicyOutput | ImageError | InstructionError]:
        """Predict one action per (image, instruction) pair, all samples in one batched pass.

        Each sample is validated and preprocessed first (what ``predict`` checks); a sample
        that fails gets its ``ImageError`` or ``InstructionError`` in its place in the result
        and the others run without it. Vision, the prefill (each prompt at its own length, the
        batch padded to the longest) and the decode steps run batched; decoding is constrained
        per sample as in ``predict``. Returns a list aligned with the inputs, each entry a
        ``PolicyOutput`` (its ``timings`` are the batch's, plus ``batch_size``) or the
        exception of that sample. For a fixed model, sample i's tokens equal what
        ``predict(images[i], instructions[i])`` gives, up to the floating-point effects of the
        batch size on the GPU kernels (exactly, in fp32 on the CPU).

        Raises ConfigError if the two sequences differ in length.
        """
        if len(images) != len(instructions):
            raise ConfigError(f'{len(images)} images but {len(instructions)} instructions')
        clock = _Clock(self._device)
        results: list[PolicyOutput | ImageError | InstructionError | None] = [None] * len(images)
        valid: list[tuple[int, list[int], np.ndarray]] = []
        for i, (image, instruction) in enumerate(zip(images, instructions, strict=True)):
            try:
                valid.append((i, self._checked_prompt(instruction),
                              self._normalized_pixels(image)))
            except (ImageError, InstructionError) as exc:
                results[i] = exc
        if not valid:
            return results  # type: ignore[return-value]
        self._ensure_engine()
        b = len(valid)
        width = max(len(ids) for _, ids, _ in valid)
        ids = torch.zeros(b, width, dtype=torch.long)
        for row, (_, sample_ids, _) in enumerate(valid):
            ids[row, :len(sample_ids)] = torch.tensor(sample_ids)
        # float32 to the device, cast there (a bf16 cast on the host costs milliseconds)
        pixels = torch.from_numpy(np.stack([px for _, _, px in valid])).to(
            self._device).to(self._model.dtype)
        lengths = [self._model.prefix_length(len(sample_ids)) for _, sample_ids, _ in valid]
        clock.lap('preprocess')
        with torch.inference_mode():
            patches = (self._vision_one if b == 1 else self._vision)(pixels)
            clock.lap('vision')
            embeds = self._model.embed_prefix(None, ids.to(self._device),
                                              patch_embeddings=patches)
            decoded = self._engine.generate(embeds, lengths, n_tokens=self.action_dim)
            tokens, probs, margins = (t.cpu().numpy() for t in decoded)
        clock.lap('llm')
        timings = dict(clock.total(), batch_size=float(b))
        for row, (i, _, _) in enumerate(valid):
            normalized = self._action_tokenizer.decode(tokens[row].astype(np.int64))
            results[i] = PolicyOutput(
                action=unnormalize(normalized, self._stats), normalized=normalized,
                token_ids=tuple(int(t) for t in tokens[row]), token_probs=probs[row],
                token_margins=margins[row], timings=timings)
        return results  # type: ignore[return-value]
