"""Train a small OpenVLA for the simulated arm, the OpenVLA way, and write it as an HF checkpoint.

The model is the published architecture at small scale, built by ``OpenVLA.from_config`` from a
``config.json`` with every openvla-7b field (``timm_model_ids`` of the DINOv2-with-registers and
SigLIP patch-14 families at 224 px, shrunk through ``timm_model_kwargs``; a small Llama
``text_config``; the tiny SentencePiece tokenizer of ``vla_ros.policy.tiny`` whose last 256 ids
are the action tokens). Training is OpenVLA's: the sequence is ``[BOS] + 256 projected patches +
prompt + action tokens``, where the prompt ids come from ``OpenVLAPolicy.prompt_ids`` (the very
function inference uses) and the action ids from ``core.actions.ActionTokenizer`` applied to the
BOUNDS_Q99-normalized action (``train.data.normalize_actions``); the loss is next-token
cross-entropy on the 7 action tokens (OpenVLA also supervises the stop token; decoding here is
exactly 7 tokens, so it is left out). Pixel values are the policy's own per-backbone
normalization of the camera node's preprocessed frames (``train.data.render``).

Two stages:

1. **Base** (``--stage base``): the whole model from scratch (no pretrained DINOv2, SigLIP or
   Llama exist here) on the perturbed expert demonstrations of ``train.data``.
2. **LoRA** (``--stage lora --base DIR``): peft LoRA adapters on the projector and every Llama
   linear layer, trained on new demonstrations (typically DAgger rollouts of the base policy,
   ``vla_ros.train.dagger``, labelled by the expert) mixed with the base data; the vision
   backbone stays frozen. The adapter is saved in peft's layout (``load_lora_adapter`` reads
   it) and merged into the weights of the written checkpoint, which therefore loads through
   ``OpenVLAPolicy.from_pretrained`` like any other.

Recording needs the arm model (pinocchio), rendering and training only numpy, Pillow, torch,
timm and transformers, so recording can run on one machine and training on a GPU machine; the
commands behind ``checkpoints/sim_reach`` are in its README.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from vla_ros.core.actions import NormStats
from vla_ros.core.errors import ConfigError
from vla_ros.core.image import normalization_from_preprocessor_config
from vla_ros.policy.checkpoint import (
    CONFIG_FILE,
    DATASET_STATISTICS_FILE,
    PREPROCESSOR_FILE,
    TOKENIZER_JSON_FILE,
    TOKENIZER_MODEL_FILE,
    LoadedCheckpoint,
    load_tokenizer,
    save_weights,
    sentencepiece_to_tokenizer_json,
)
from vla_ros.policy.model import OpenVLA
from vla_ros.policy.policy import OpenVLAPolicy
from vla_ros.policy.tiny import (
    TINY_PAD_TOKEN_ID,
    preprocessor_config,
    tiny_config,
    tokenizer_files,
)
from vla_ros.train.data import Demonstrations, compute_norm_stats, normalize_actions, render

__all__ = [
    'ACTION_DIM',
    'DEFAULT_UNNORM_KEY',
    'Batches',
    'LoraSpec',
    'ModelSpec',
    'TrainConfig',
    'apply_lora',
    'build_config',
    'init_model',
    'main',
    'policy_for',
    'train',
    'write_checkpoint',
    'write_checkpoint_files',
]

logger = logging.getLogger(__name__)

#: The ``norm_stats`` key of the simulated data (the checkpoint's only ``unnorm_key``).
DEFAULT_UNNORM_KEY = 'sim_tabletop'
#: Number of action tokens OpenVLA decodes (len(q01)).
ACTION_DIM = 7
#: Steps timed before a time budget decides the length of a stage.
_PROBE_STEPS = 30


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the small OpenVLA (the ViTs keep patch 14 at 224 px, hence 256 patches).

    OpenVLA takes the features of the second-to-last ViT block, so a depth-``d`` ViT runs
    ``d - 1`` blocks (the last one is stored, as in the real checkpoints, but never used).
    """

    vision_dim: int = 128
    vision_depth: int = 6
    vision_heads: int = 4
    siglip_mlp_ratio: float = 2.0
    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 6
    intermediate_size: int = 512

    def __post_init__(self) -> None:
        """Validate the sizes (ConfigError names the bad one)."""
        if self.vision_dim % self.vision_heads or self.hidden_size % self.num_heads:
            raise ConfigError('vision_dim and hidden_size must be multiples of their heads')
        if self.vision_depth < 2:
            raise ConfigError('vision_depth must be >= 2 (OpenVLA uses the second-to-last '
                              'block)')
        for name in ('hidden_size', 'num_layers', 'intermediate_size'):
            if getattr(self, name) < 1:
                raise ConfigError(f'{name} must be >= 1')

    def timm_model_kwargs(self) -> list[dict[str, Any]]:
        """Return the per-backbone timm overrides stored in ``config.json``."""
        common = {'embed_dim': self.vision_dim, 'depth': self.vision_depth,
                  'num_heads': self.vision_heads}
        return [dict(common), dict(common, mlp_ratio=self.siglip_mlp_ratio)]

    def text_overrides(self) -> dict[str, Any]:
        """Return the Llama sizes of ``text_config``."""
        return {'hidden_size': self.hidden_size, 'num_hidden_layers': self.num_layers,
                'num_attention_heads': self.num_heads, 'num_key_value_heads': self.num_heads,
                'intermediate_size': self.intermediate_size}


@dataclass(frozen=True)
class TrainConfig:
    """One stage's optimization: AdamW, linear warm-up, cosine decay, gradient clipping.

    ``time_budget_s`` > 0 shortens the stage to what fits in that time, measured over the first
    ``_PROBE_STEPS`` steps; the cosine decay then spans the shortened stage.
    """

    steps: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 300
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 250
    val_fraction: float = 0.03
    time_budget_s: float = 0.0

    def __post_init__(self) -> None:
        """Validate the fields."""
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ConfigError('steps, batch_size and log_every must be >= 1')
        if not (0.0 < self.lr and 0.0 <= self.min_lr <= self.lr):
            raise ConfigError(f'need 0 <= min_lr <= lr and lr > 0, got {self.lr}, {self.min_lr}')
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f'val_fraction must be in [0, 0.5), got {self.val_fraction}')

    def lr_at(self, step: int, steps: int | None = None) -> float:
        """Learning rate of ``step`` (0-based) in a stage of ``steps`` (default ``self.steps``)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, (steps or self.steps) - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft): rank, scaling and the adapted modules.

    The default targets are the projector and every linear layer of the Llama (attention and
    MLP), i.e. OpenVLA's ``all-linear`` minus the vision backbone (frozen) and ``lm_head``
    (which peft's ``all-linear`` leaves out too).
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = (r'.*(projector\.fc[123]|language_model\.model\.layers\.\d+\.'
                           r'(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))')


# --------------------------------------------------------------------------------------------
# Checkpoint directory
# --------------------------------------------------------------------------------------------


def build_config(norm_stats: Mapping[str, Any], spec: ModelSpec = ModelSpec()) -> dict[str, Any]:
    """Return ``config.json`` of the small model: openvla-7b's fields, small sizes."""
    config = tiny_config(norm_stats)
    config['timm_model_kwargs'] = spec.timm_model_kwargs()
    config['text_config'] = dict(config['text_config'], **spec.text_overrides())
    return config


def init_model(config: Mapping[str, Any], seed: int = 0) -> OpenVLA:
    """Build a randomly initialized float32 model (timm's and transformers' initializers).

    DINOv2's LayerScale starts at 1e-5, meant for fine-tuning a pretrained ViT; from scratch
    it starts at 0.1 here so that the blocks learn at a useful pace.
    """
    torch.manual_seed(seed)
    model = OpenVLA.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('scale_factor'):
                param.fill_(0.1)
    return model


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + '\n',
                    encoding='utf-8')


def write_checkpoint(directory: str | Path, model: OpenVLA, config: Mapping[str, Any],
                     dataset_statistics: Mapping[str, Any],
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a complete OpenVLA checkpoint directory (HF layout) for ``model``; return it.

    Files: those of ``write_checkpoint_files`` and ``model.safetensors`` in ``dtype``.
    """
    directory = write_checkpoint_files(directory, config, dataset_statistics)
    save_weights(model, directory, n_shards=1, dtype=dtype)
    return directory


def write_checkpoint_files(directory: str | Path, config: Mapping[str, Any],
                           dataset_statistics: Mapping[str, Any]) -> Path:
    """Write everything of a checkpoint directory but the weights (removing any old ones).

    Files: ``config.json``, ``preprocessor_config.json``, ``generation_config.json``, the tokenizer
    (``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``added_tokens.json``) and ``dataset_statistics.json`` (as
    OpenVLA's fine-tuning writes it). Without weights the directory does not load, so a run that
    fails before its end leaves nothing that looks like a trained checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files().items():
        (directory / name).write_bytes(data)
    text = sentencepiece_to_tokenizer_json(directory / TOKENIZER_MODEL_FILE,
                                           {'<PAD>': TINY_PAD_TOKEN_ID})
    (directory / TOKENIZER_JSON_FILE).write_text(text + '\n', encoding='utf-8')
    _write_json(directory / CONFIG_FILE, dict(config))
    _write_json(directory / PREPROCESSOR_FILE, preprocessor_config())
    _write_json(directory / 'generation_config.json', {
        '_from_model_config': True, 'bos_token_id': 1, 'eos_token_id': 2,
        'pad_token_id': TINY_PAD_TOKEN_ID, 'transformers_version': '4.40.1'})
    _write_json(directory / DATASET_STATISTICS_FILE, dict(dataset_statistics))
    for old in directory.glob('model*.safetensors*'):
        old.unlink()
    return directory


def policy_for(model: OpenVLA, directory: str | Path, unnorm_key: str | None = None
               ) -> OpenVLAPolicy:
    """Wrap an in-memory ``model`` as the ``OpenVLAPolicy`` of a written checkpoint directory.

    The tokenizer, statistics and preprocessing come from ``directory``, the weights are
    ``model``'s own: prompts, pixel values and decoding in training are exactly inference's.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text(encoding='utf-8'))
    preprocessor = json.loads((directory / PREPROCESSOR_FILE).read_text(encoding='utf-8'))
    ckpt = LoadedCheckpoint(model=model, tokenizer=load_tokenizer(directory),
                            norm_stats=NormStats.from_checkpoint_dir(directory), config=config,
                            preprocessor_config=preprocessor, path=directory, weight_files=())
    return OpenVLAPolicy(ckpt, unnorm_key=unnorm_key)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class Batches:
    """Demonstrations as OpenVLA training tensors, built with the policy's own helpers.

    Every row of ``ids`` is ``policy.prompt_ids(instruction) + action_ids[:6]``, right-padded:
    the logits at the last prompt position and at the first six action positions predict the
    seven action ids ``policy.action_tokenizer.encode(normalize_actions(actions))``. Pixel
    values are ``(x / 255 - mean) / std`` per backbone, from the checkpoint's
    ``preprocessor_config.json``. Images and ids live on ``device``.
    """

    def __init__(self, policy: OpenVLAPolicy, demos: Demonstrations,
                 action_stats: Mapping[str, Any], device: torch.device) -> None:
        """Tokenize every sample; move images (uint8) and ids to ``device``."""
        if demos.images is None:
            raise ConfigError('demonstrations have no images: call train.data.render first')
        self.demos = demos
        self.device = device
        pad = int(policy.checkpoint.config.get('pad_token_id', TINY_PAD_TOKEN_ID))
        prompts = [policy.prompt_ids(text) for text in demos.instructions]
        targets = policy.action_tokenizer.encode(normalize_actions(demos.actions, action_stats))
        width = max(len(p) for p in prompts) + ACTION_DIM - 1
        ids = np.full((len(demos), width), pad, dtype=np.int64)
        lengths = np.array([len(prompts[int(t)]) for t in demos.task_ids], dtype=np.int64)
        for t, prompt in enumerate(prompts):
            rows = demos.task_ids == t
            ids[rows, :len(prompt)] = prompt
            ids[rows, len(prompt):len(prompt) + ACTION_DIM - 1] = targets[rows, :-1]
        self.ids = torch.from_numpy(ids).to(device)
        self.lengths = torch.from_numpy(lengths).to(device)
        self.targets = torch.from_numpy(targets.astype(np.int64)).to(device)
        self.images = torch.from_numpy(demos.images).to(device)
        means, stds = normalization_from_preprocessor_config(policy.checkpoint.preprocessor_config)
        scale = np.concatenate([1.0 / (255.0 * np.asarray(s, np.float32)) for s in stds])
        shift = np.concatenate([np.asarray(m, np.float32) / np.asarray(s, np.float32)
                                for m, s in zip(means, stds, strict=True)])
        self._scale = torch.from_numpy(scale.astype(np.float32)).view(1, -1, 1, 1).to(device)
        self._shift = torch.from_numpy(shift.astype(np.float32)).view(1, -1, 1, 1).to(device)
        self._copies = len(means)

    def pixel_values(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, 3 * backbones, 224, 224) float32 pixel values of samples ``idx``."""
        x = self.images[idx].permute(0, 3, 1, 2).float().repeat(1, self._copies, 1, 1)
        return x * self._scale - self._shift


def action_logits(model: OpenVLA, pixel_values: torch.Tensor, ids: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """Return the logits (B, 7, vocab) that predict the seven action tokens.

    The sequence is OpenVLA's ``[BOS] + patches + ids[1:]``; right padding needs no mask under
    causal attention.
    """
    embeds = model.embed_prefix(pixel_values, ids)
    hidden = model.language_model.get_decoder()(inputs_embeds=embeds,
                                                 use_cache=False).last_hidden_state
    first = lengths + model.num_patches - 1  # the last prompt token
    positions = first[:, None] + torch.arange(ACTION_DIM, device=ids.device)[None]
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.language_model.get_output_embeddings()(picked)


def split_episodes(demos: Demonstrations, fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, validation) sample indices, whole episodes held out."""
    episodes = np.unique(demos.episodes)
    n_val = int(round(fraction * len(episodes)))
    held = np.random.default_rng(seed).choice(episodes, size=n_val, replace=False)
    is_val = np.isin(demos.episodes, held)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(model: OpenVLA, batches: Batches, config: TrainConfig, forward: torch.nn.Module,
          tokenizer: Any, label: str) -> list[dict[str, float]]:
    """Minimize the action-token cross-entropy of ``forward`` (``model`` or its peft wrapper).

    Only parameters with ``requires_grad`` are trained. Returns the logged history (train and
    validation loss, validation token accuracy and L1 of the normalized action).
    """
    device = batches.device
    torch.manual_seed(config.seed)
    params = [p for p in forward.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': config.weight_decay},
         {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}],
        lr=config.lr, betas=(0.9, 0.95), fused=device.type == 'cuda')
    train_idx, val_idx = split_episodes(batches.demos, config.val_fraction, config.seed)
    train_idx_t = torch.from_numpy(train_idx).to(device)
    val_idx_t = torch.from_numpy(val_idx[:4096]).to(device)
    logger.info('%s: %d trainable parameters, %d train / %d val samples, %d steps of %d on %s',
                label, sum(p.numel() for p in params), len(train_idx), len(val_idx),
                config.steps, config.batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
    gen = torch.Generator(device=device).manual_seed(config.seed)
    history: list[dict[str, float]] = []
    running = torch.zeros((), device=device)
    start = time.perf_counter()
    forward.train()
    total = config.steps
    step = 0
    while step < total:
        if step == _PROBE_STEPS and config.time_budget_s > 0:
            per_step = (time.perf_counter() - start) / step
            fits = int(step + (config.time_budget_s - (time.perf_counter() - start)) / per_step)
            total = max(step + 1, min(total, fits))
            logger.info('%s: %.1f ms per step, %d steps fit in %.0f s', label, per_step * 1e3,
                        total, config.time_budget_s)
        for group in optimizer.param_groups:
            group['lr'] = config.lr_at(step, total)
        pick = torch.randint(len(train_idx_t), (config.batch_size,), device=device,
                             generator=gen)
        idx = train_idx_t[pick]
        with autocast:
            logits = action_logits(model, batches.pixel_values(idx), batches.ids[idx],
                                   batches.lengths[idx])
        loss = functional.cross_entropy(logits.float().flatten(0, 1),
                                        batches.targets[idx].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        running += loss.detach()
        step += 1
        if step % config.log_every == 0 or step == total:
            n = (step - 1) % config.log_every + 1
            point = {'step': step, 'train_loss': float(running) / n,
                     'lr': config.lr_at(step - 1, total),
                     'seconds': time.perf_counter() - start}
            running.zero_()
            point.update(validate(model, forward, batches, val_idx_t, tokenizer))
            history.append(point)
            logger.info('%s step %d: train %.3f  val %.3f  acc %.3f  L1 %.4f  (%.0f s)', label,
                        step, point['train_loss'], point['val_loss'],
                        point['val_accuracy'], point['val_l1'], point['seconds'])
    forward.eval()
    return history


@torch.no_grad()
def validate(model: OpenVLA, forward: torch.nn.Module, batches: Batches, idx: torch.Tensor,
             tokenizer: Any, batch_size: int = 512) -> dict[str, float]:
    """Return the validation loss, token accuracy and mean L1 of the normalized action.

    Predictions are the argmax over the action tokens, as inference decodes.
    """
    if not len(idx):
        return {'val_loss': math.nan, 'val_accuracy': math.nan, 'val_l1': math.nan}
    was = forward.training
    forward.eval()
    first, last = tokenizer.action_token_range
    loss = correct = l1 = 0.0
    autocast = torch.autocast(idx.device.type, dtype=torch.bfloat16,
                              enabled=idx.device.type == 'cuda')
    for s in range(0, len(idx), batch_size):
        b = idx[s:s + batch_size]
        with autocast:
            logits = action_logits(model, batches.pixel_values(b), batches.ids[b],
                                   batches.lengths[b]).float()
        targets = batches.targets[b]
        loss += float(functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                               reduction='sum'))
        pred = logits[..., first:last + 1].argmax(-1) + first
        correct += float((pred == targets).sum())
        l1 += float(np.abs(tokenizer.decode(pred.cpu().numpy())
                           - tokenizer.decode(targets.cpu().numpy())).sum())
    forward.train(was)
    n = len(idx) * ACTION_DIM
    return {'val_loss': loss / n, 'val_accuracy': correct / n, 'val_l1': l1 / n}


def apply_lora(model: OpenVLA, spec: LoraSpec = LoraSpec()) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _load_demos(paths: Sequence[str], workers: int | None, max_episodes: int = 0
                ) -> Demonstrations:
    demos = None
    for path in paths:
        part = Demonstrations.load(path)
        if max_episodes > 0:
            part = part.first_episodes(max_episodes)
        logger.info('%s: %d samples, %d episodes', path, len(part), part.num_episodes)
        render(part, workers=workers)
        demos = part if demos is None else demos.concat(part)
    if demos is None:
        raise ConfigError('no demonstrations given')
    return demos


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(prog='python -m vla_ros.train.train',
                                description=__doc__.split('\n')[0])
    p.add_argument('--stage', choices=('base', 'lora'), default='base')
    p.add_argument('--data', required=True, nargs='+',
                   help='demonstrations (.npz from vla_ros.train.data or vla_ros.train.dagger)')
    p.add_argument('--out', required=True, help='checkpoint directory to write')
    p.add_argument('--base', default='', help='lora stage: the base checkpoint directory')
    p.add_argument('--unnorm-key', default=DEFAULT_UNNORM_KEY)
    p.add_argument('--steps', type=int, default=TrainConfig.steps)
    p.add_argument('--batch-size', type=int, default=TrainConfig.batch_size)
    p.add_argument('--lr', type=float, default=TrainConfig.lr)
    p.add_argument('--lora-rank', type=int, default=LoraSpec.rank)
    p.add_argument('--minutes', type=float, default=0.0,
                   help='shorten the stage so that the whole command takes about this many '
                   'minutes (0 = no limit)')
    p.add_argument('--max-episodes', type=int, default=0,
                   help='use only the first N episodes of each data file (0 = all)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=0, help='render processes (0 = all CPUs)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train one stage and write the checkpoint (and ``train_report.json`` beside it)."""
    opts = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', stream=sys.stdout)
    device = torch.device(opts.device)
    out = Path(opts.out)
    t0 = time.perf_counter()
    demos = _load_demos(opts.data, opts.workers or None, opts.max_episodes)
    report: dict[str, Any] = {
        'command': 'python -m vla_ros.train.train ' + ' '.join(
            argv if argv is not None else sys.argv[1:]),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'data': {'samples': len(demos), 'episodes': demos.num_episodes,
                 'tasks': list(demos.task_names), 'render_seconds': round(
                     time.perf_counter() - t0, 1)}}
    budget = 0.0
    if opts.minutes > 0:  # the whole command's wall time, less loading, rendering and writing
        budget = max(60.0, 60.0 * opts.minutes - (time.perf_counter() - t0) - 20.0)
    config = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                         seed=opts.seed, time_budget_s=budget,
                         warmup_steps=min(TrainConfig.warmup_steps, max(1, opts.steps // 10)))
    if opts.stage == 'base':
        stats = {opts.unnorm_key: compute_norm_stats(demos.actions,
                                                     num_trajectories=demos.num_episodes)}
        spec = ModelSpec()
        model_config = build_config(stats, spec)
        model = init_model(model_config, opts.seed)
        report['model'] = asdict(spec)
    else:
        if not opts.base:
            raise ConfigError('--stage lora needs --base DIR')
        stats = json.loads((Path(opts.base) / DATASET_STATISTICS_FILE).read_text())
        model_config = json.loads((Path(opts.base) / CONFIG_FILE).read_text())
        model = OpenVLAPolicy.from_pretrained(opts.base, device='cpu', dtype=torch.float32).model
    write_checkpoint_files(out, model_config, stats)  # the tokenizer etc. policy_for reads
    model.to(device)
    policy = policy_for(model, out, opts.unnorm_key)
    batches = Batches(policy, demos, stats[opts.unnorm_key]['action'], device)
    if opts.stage == 'base':
        history = train(model, batches, config, model, policy.action_tokenizer, 'base')
    else:
        peft_model = apply_lora(model, LoraSpec(rank=opts.lora_rank))
        history = train(model, batches, config, peft_model, policy.action_tokenizer, 'lora')
        peft_model.save_pretrained(str(out.parent / f'{out.name}_lora_adapter'))
        model = peft_model.merge_and_unload()
    model.to('cpu')
    write_checkpoint(out, model, model_config, stats)
    report.update({'train': asdict(config), 'history': history,
                   'seconds': round(time.perf_counter() - t0, 1)})
    _write_json(out.parent / f'{out.name}_train_report.json', report)
    logger.info('wrote %s in %.0f s', out, time.perf_counter() - t0)
    return 0


if __name__ == '__main__':
    sys.exit(main())
