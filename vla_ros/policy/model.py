"""Native OpenVLA in PyTorch: fused timm ViT featurizer, MLP projector and a transformers Llama.

The module tree mirrors the published OpenVLA checkpoints so that their safetensors load strictly,
key for key, without remote code: ``vision_backbone.featurizer`` (timm DINOv2 with registers) and
``vision_backbone.fused_featurizer`` (timm SigLIP, whose unused ``attn_pool`` is kept so its keys
load), ``projector.fc1/fc2/fc3`` and ``language_model`` (``LlamaForCausalLM`` with an untied head
and a vocabulary padded to ``pad_to_multiple_of``). Everything is built from ``config.json`` as
stored (``timm_model_ids``, ``image_sizes``, ``timm_override_act_layers``, ``text_config``), plus
one optional field that real checkpoints lack, ``timm_model_kwargs`` (a list of per-backbone dicts
of timm overrides such as ``embed_dim``/``depth``/``num_heads``) that the tiny test checkpoints
use. timm's LayerScale parameter ``gamma`` is stored as ``scale_factor`` in OpenVLA checkpoints, so
the featurizers use a LayerScale whose parameter carries that name; ``timm_to_checkpoint_key`` and
``checkpoint_to_timm_key`` convert the names of timm-native state dicts. Vision features are the
output of the second-to-last block with prefix tokens dropped and no final norm; the multimodal
sequence is ``[BOS] + projected patches + prompt[1:]``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vla_ros.core.errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

#: The ``LlamaConfig`` defaults that OpenVLA's ``PrismaticConfig`` relied on (transformers 4.40):
#: real ``config.json`` files store only ``vocab_size``/``pad_token_id`` in ``text_config``. They
#: are spelled out so that another transformers release with other defaults builds the same model.
LLAMA2_7B_TEXT_DEFAULTS: dict[str, Any] = {
    'vocab_size': 32000,
    'hidden_size': 4096,
    'intermediate_size': 11008,
    'num_hidden_layers': 32,
    'num_attention_heads': 32,
    'hidden_act': 'silu',
    'max_position_embeddings': 2048,
    'initializer_range': 0.02,
    'rms_norm_eps': 1e-6,
    'rope_theta': 10000.0,
    'attention_bias': False,
    'attention_dropout': 0.0,
    'bos_token_id': 1,
    'eos_token_id': 2,
    'tie_word_embeddings': False,
}

#: Fields of ``text_config`` that describe the saved file rather than the architecture.
_TEXT_CONFIG_IGNORED = frozenset(
    {'torch_dtype', 'dtype', 'architectures', '_name_or_path', 'transformers_version',
     'model_type', 'auto_map', 'attn_implementation', '_attn_implementation'}
)

_SCALE_KEY = re.compile(r'^(vision_backbone\.(?:fused_)?featurizer\.blocks\.\d+\.ls[12])\.(\w+)$')


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenVLAArchitecture:
    """The architecture fields of an OpenVLA ``config.json``, validated.

    ``timm_model_kwargs`` is the optional, non-standard list of per-backbone timm overrides (one
    dict per backbone; absent in real checkpoints, where it defaults to empty dicts).
    """

    timm_model_ids: tuple[str, ...]
    image_sizes: tuple[int, ...]
    timm_override_act_layers: tuple[str | None, ...]
    timm_model_kwargs: tuple[dict[str, Any], ...]
    use_fused_vision_backbone: bool
    arch_specifier: str
    text_config: dict[str, Any]
    pad_token_id: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any],
                    source: str = 'config.json') -> OpenVLAArchitecture:
        """Validate ``config`` (a parsed ``config.json``); ConfigError names the bad field."""
        if not isinstance(config, Mapping):
            raise ConfigError(f'{source}: expected a JSON object, got {type(config).__name__}')
        for field in ('timm_model_ids', 'image_sizes', 'use_fused_vision_backbone',
                      'arch_specifier', 'text_config'):
            if field not in config:
                raise ConfigError(f'{source}: missing required field {field!r}')
        fused = config['use_fused_vision_backbone']
        if not isinstance(fused, bool):
            raise ConfigError(f'{source}: use_fused_vision_backbone must be a bool, got {fused!r}')
        n = 2 if fused else 1
        ids = _str_list(config['timm_model_ids'], 'timm_model_ids', source)
        sizes = config['image_sizes']
        if (not isinstance(sizes, Sequence) or isinstance(sizes, str)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                           for s in sizes)):
            raise ConfigError(f'{source}: image_sizes must be a list of positive ints, got '
                              f'{sizes!r}')
        acts = config.get('timm_override_act_layers') or [None] * len(ids)
        kwargs = config.get('timm_model_kwargs') or [{}] * len(ids)
        if (not isinstance(acts, Sequence) or isinstance(acts, str)
                or not all(a is None or isinstance(a, str) for a in acts)):
            raise ConfigError(f'{source}: timm_override_act_layers must be a list of str or '
                              f'null, got {acts!r}')
        if (not isinstance(kwargs, Sequence) or isinstance(kwargs, str)
                or not all(isinstance(k, Mapping) for k in kwargs)):
            raise ConfigError(f'{source}: timm_model_kwargs must be a list of objects, got '
                              f'{kwargs!r}')
        for name, value in (('timm_model_ids', ids), ('image_sizes', sizes),
                            ('timm_override_act_layers', acts), ('timm_model_kwargs', kwargs)):
            if len(value) < n:
                raise ConfigError(
                    f'{source}: {name} needs {n} entries (use_fused_vision_backbone={fused}), '
                    f'got {len(value)}'
                )
        if len(set(sizes[:n])) != 1:
            raise ConfigError(f'{source}: image_sizes must be equal for fused backbones, got '
                              f'{list(sizes)}')
        arch = config['arch_specifier']
        if not isinstance(arch, str) or not arch.endswith('gelu-mlp'):
            raise ConfigError(
                f'{source}: unsupported arch_specifier {arch!r}; supported projectors end in '
                "'gelu-mlp' or 'fused-gelu-mlp' (e.g. 'no-align+fused-gelu-mlp')"
            )
        text = config['text_config']
        if not isinstance(text, Mapping):
            raise ConfigError(f'{source}: text_config must be an object, got {text!r}')
        model_type = text.get('model_type', 'llama')
        if model_type != 'llama':
            raise ConfigError(f'{source}: text_config.model_type {model_type!r} is not supported '
                              "(only 'llama')")
        pad = config.get('pad_token_id', text.get('pad_token_id', 32000))
        if not isinstance(pad, int) or isinstance(pad, bool):
            raise ConfigError(f'{source}: pad_token_id must be an int, got {pad!r}')
        return cls(
            timm_model_ids=tuple(ids[:n]),
            image_sizes=tuple(int(s) for s in sizes[:n]),
            timm_override_act_layers=tuple(acts[:n]),
            timm_model_kwargs=tuple(dict(k) for k in kwargs[:n]),
            use_fused_vision_backbone=fused,
            arch_specifier=arch,
            text_config=dict(text),
            pad_token_id=pad,
        )

    @property
    def fused_projector(self) -> bool:
        """Whether the projector is the three-layer fused GELU MLP."""
        return self.arch_specifier.endswith('fused-gelu-mlp')


def _str_list(value: Any, name: str, source: str) -> list[str]:
    if (not isinstance(value, Sequence) or isinstance(value, str)
            or not all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f'{source}: {name} must be a list of non-empty strings, got {value!r}')
    return list(value)


def build_llama_config(text_config: Mapping[str, Any], pad_token_id: int | None = None,
                       attn_implementation: str | None = None) -> Any:
    """Return the ``transformers.LlamaConfig`` of an OpenVLA ``text_config``.

    Missing fields take the Llama-2-7B values OpenVLA relied on (LLAMA2_7B_TEXT_DEFAULTS);
    serialization-only fields (dtype, architectures, ...) are dropped. Newer transformers
    releases accept ``rope_theta`` and fold it into ``rope_parameters``.
    """
    from transformers import LlamaConfig

    fields = dict(LLAMA2_7B_TEXT_DEFAULTS)
    fields.update({k: v for k, v in text_config.items() if k not in _TEXT_CONFIG_IGNORED})
    if 'rope_parameters' in text_config:
        fields.pop('rope_theta', None)
    if pad_token_id is not None:
        fields['pad_token_id'] = pad_token_id
    if attn_implementation is not None:
        fields['attn_implementation'] = attn_implementation
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'text_config is not a valid Llama configuration: {exc}') from exc


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------


class ScaleFactorLayerScale(nn.Module):
    """timm's LayerScale with its parameter named ``scale_factor`` as in OpenVLA checkpoints.

    (HF ``from_pretrained`` renames any ``gamma`` key, so OpenVLA renamed the parameter.) The
    computation is timm's non-inplace ``x * gamma``.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        """Create an uninitialized (ones) per-channel scale of size ``dim``."""
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale ``x`` channel-wise (last dimension)."""
        return x * self.scale_factor


def _swap_layer_scales(vit: nn.Module) -> int:
    """Replace every timm LayerScale of ``vit`` by a ScaleFactorLayerScale with the same values."""
    from timm.layers import LayerScale

    count = 0
    for module in list(vit.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LayerScale):
                gamma = child.gamma
                new = ScaleFactorLayerScale(gamma.shape[0], device=gamma.device, dtype=gamma.dtype)
                with torch.no_grad():
                    if gamma.device.type != 'meta':
                        new.scale_factor.copy_(gamma)
                setattr(module, child_name, new)
                count += 1
    return count


def timm_to_checkpoint_key(key: str) -> str:
    """Map a model key that uses timm's LayerScale name (``...ls1.gamma``) to the checkpoint name.

    Only ``vision_backbone.(fused_)featurizer.blocks.N.ls{1,2}.gamma`` changes (to
    ``scale_factor``); every other key is returned unchanged.
    """
    match = _SCALE_KEY.match(key)
    if match and match.group(2) == 'gamma':
        return f'{match.group(1)}.scale_factor'
    return key


def checkpoint_to_timm_key(key: str) -> str:
    """Inverse of ``timm_to_checkpoint_key``: ``...ls1.scale_factor`` -> ``...ls1.gamma``."""
    match = _SCALE_KEY.match(key)
    if match and match.group(2) == 'scale_factor':
        return f'{match.group(1)}.gamma'
    return key


def create_timm_vit(model_id: str, image_size: int, act_layer: str | None = None,
                    overrides: Mapping[str, Any] | None = None,
                    skip_init: bool = False) -> nn.Module:
    """Create one featurizer with ``timm.create_model`` (no pretrained download), OpenVLA-style.

    The classifier head is removed (``num_classes=0``) but pooling modules such as SigLIP's
    ``attn_pool`` stay, so checkpoint keys match; LayerScale parameters are renamed
    ``scale_factor``. ``overrides`` are extra ``create_model`` keyword arguments; ``skip_init``
    skips timm's weight initialization (for meta-device construction).
    """
    import timm

    kwargs: dict[str, Any] = {'pretrained': False, 'num_classes': 0, 'img_size': image_size}
    if act_layer is not None:
        kwargs['act_layer'] = act_layer
    if skip_init:
        kwargs['weight_init'] = 'skip'
    kwargs.update(overrides or {})
    try:
        vit = timm.create_model(model_id, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f'cannot create timm model {model_id!r} with {kwargs}: {exc}') from exc
    if not hasattr(vit, 'blocks') or not hasattr(vit, 'forward_intermediates'):
        raise ConfigError(f'timm model {model_id!r} is not a ViT with blocks and '
                          'forward_intermediates')
    if len(vit.blocks) < 2:
        raise ConfigError(f'timm model {model_id!r} has {len(vit.blocks)} blocks; OpenVLA takes '
                          'the second-to-last, so it needs at least 2')
    _swap_layer_scales(vit)
    return vit


class FusedVisionBackbone(nn.Module):
    """OpenVLA's featurizer: DINOv2 (``featurizer``) and optionally SigLIP (``fused_featurizer``).

    Input ``pixel_values`` is ``(B, 3 * n_backbones, H, W)`` (channels 0:3 for the featurizer,
    3:6 for the fused one); output is ``(B, num_patches, sum(embed_dims))``: the tokens after
    block ``len(blocks) - 2`` of each ViT, prefix (class/register) tokens dropped, no final norm,
    concatenated on the feature axis (1024 + 1152 = 2176 for openvla-7b).
    """

    def __init__(self, arch: OpenVLAArchitecture, skip_init: bool = False) -> None:
        """Build the timm ViTs described by ``arch`` (``skip_init``: no weight init)."""
        super().__init__()
        self.use_fused_vision_backbone = arch.use_fused_vision_backbone
        self.image_size = arch.image_sizes[0]
        self.featurizer = create_timm_vit(arch.timm_model_ids[0], arch.image_sizes[0],
                                          arch.timm_override_act_layers[0],
                                          arch.timm_model_kwargs[0], skip_init)
        self.fused_featurizer: nn.Module | None = None
        if self.use_fused_vision_backbone:
            self.fused_featurizer = create_timm_vit(arch.timm_model_ids[1], arch.image_sizes[1],
                                                    arch.timm_override_act_layers[1],
                                                    arch.timm_model_kwargs[1], skip_init)
            counts = [v.patch_embed.num_patches for v in self.featurizers]
            if counts[0] != counts[1]:
                raise ConfigError(f'fused backbones give different patch counts: {counts}')

    @property
    def featurizers(self) -> list[nn.Module]:
        """The ViTs in channel order."""
        if self.fused_featurizer is None:
            return [self.featurizer]
        return [self.featurizer, self.fused_featurizer]

    @property
    def embed_dims(self) -> list[int]:
        """Feature width of each ViT (1024 and 1152 for openvla-7b)."""
        return [int(v.embed_dim) for v in self.featurizers]

    @property
    def embed_dim(self) -> int:
        """Width of the concatenated features."""
        return sum(self.embed_dims)

    @property
    def num_patches(self) -> int:
        """Number of patch tokens per image (256 at 224 px with patch 14)."""
        return int(self.featurizer.patch_embed.num_patches)

    @property
    def in_channels(self) -> int:
        """Channels ``pixel_values`` must have: 3 per backbone."""
        return 3 * len(self.featurizers)

    @staticmethod
    def vit_features(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Return the second-to-last block's patch tokens of ``vit`` (prefix dropped, no norm)."""
        index = len(vit.blocks) - 2
        return vit.forward_intermediates(
            images, indices=[index], norm=False, stop_early=True, output_fmt='NLC',
            intermediates_only=True,
        )[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Featurize ``pixel_values`` ``(B, 3 * n_backbones, H, W)``; ImageError on bad shapes."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.in_channels:
            raise ImageError(f'pixel_values must be (B, {self.in_channels}, H, W), got '
                             f'{tuple(pixel_values.shape)}')
        if tuple(pixel_values.shape[2:]) != (self.image_size, self.image_size):
            raise ImageError(f'pixel_values must be {self.image_size}x{self.image_size}, got '
                             f'{tuple(pixel_values.shape[2:])}')
        features = [self.vit_features(vit, pixel_values[:, 3 * i:3 * i + 3])
                    for i, vit in enumerate(self.featurizers)]
        return features[0] if len(features) == 1 else torch.cat(features, dim=2)


class Projector(nn.Module):
    """The MLP from vision features to the LLM width.

    ``fused=True`` ('...fused-gelu-mlp'): fc1 (D -> 4D), GELU, fc2 (4D -> H), GELU, fc3 (H -> H).
    ``fused=False`` ('...gelu-mlp'): fc1 (D -> H), GELU, fc2 (H -> H). GELU is exact (erf).
    """

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool = True) -> None:
        """Create the linear layers."""
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim, bias=True)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim, bias=True)
            self.fc3: nn.Linear | None = nn.Linear(llm_dim, llm_dim, bias=True)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim, bias=True)
            self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)
            self.fc3 = None
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``(B, N, D)`` features to ``(B, N, H)``."""
        x = self.act_fn1(self.fc1(features))
        x = self.fc2(x)
        if self.fc3 is not None:
            x = self.fc3(self.act_fn2(x))
        return x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """Transformers' ``no_init_weights`` context (its module moved in 5.x), else a no-op."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _cache_argument(decoder: nn.Module) -> str:
    """Return the KV-cache keyword of a transformers decoder: ``cache`` (5.x) or the old name."""
    params = inspect.signature(decoder.forward).parameters
    return 'cache' if 'cache' in params else 'past_key_values'


def _output_cache(outputs: Any) -> Any:
    cache = getattr(outputs, 'cache', None)
    return cache if cache is not None else getattr(outputs, 'past_key_values', None)


class OpenVLA(nn.Module):
    """OpenVLA: ``vision_backbone`` -> ``projector`` -> ``language_model`` (Llama, untied head).

    ``config`` is the parsed ``config.json`` (a dict; extra fields are kept). Build with
    ``from_config``; load weights with ``vla_ros.policy.checkpoint.load_checkpoint``. State-dict
    keys equal the real checkpoints' keys.
    """

    def __init__(self, config: Mapping[str, Any], *, attn_implementation: str | None = None,
                 skip_init: bool = False) -> None:
        """Build the modules on the current default device (see ``from_config``).

        ``skip_init`` skips the random initialization of timm and transformers (meta builds).
        """
        super().__init__()
        from transformers import LlamaForCausalLM

        self.arch = OpenVLAArchitecture.from_config(config)
        self.config: dict[str, Any] = dict(config)
        self.vision_backbone = FusedVisionBackbone(self.arch, skip_init)
        llama_config = build_llama_config(self.arch.text_config, self.arch.pad_token_id,
                                          attn_implementation)
        self.projector = Projector(self.vision_backbone.embed_dim, llama_config.hidden_size,
                                   fused=self.arch.fused_projector)
        with _no_init_weights() if skip_init else contextlib.nullcontext():
            self.language_model = LlamaForCausalLM(llama_config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                    device: torch.device | str = 'cpu', *,
                    attn_implementation: str | None = None) -> OpenVLA:
        """Build a randomly initialized OpenVLA in eval mode.

        ``device='meta'`` allocates nothing (the 7B shapes build in seconds), for benchmarks and
        for memory-mapped loading with ``load_state_dict(assign=True)``; non-persistent buffers
        (the rotary frequencies) are then restored by ``materialize_buffers``.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f'dtype must be a floating torch.dtype, got {dtype!r}')
        device = torch.device(device)
        with torch.device(device):
            model = cls(config, attn_implementation=attn_implementation,
                        skip_init=device.type == 'meta')
        model.to(dtype=dtype)
        if device.type != 'meta':
            model.materialize_buffers(device)
        return model.eval()

    # -- properties ------------------------------------------------------------------------

    @property
    def llm_dim(self) -> int:
        """Hidden width of the language model (4096 for openvla-7b)."""
        return int(self.language_model.config.hidden_size)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / lm_head (32064 for openvla-7b)."""
        return int(self.language_model.get_output_embeddings().weight.shape[0])

    @property
    def num_patches(self) -> int:
        """Projected patch tokens inserted after BOS (256)."""
        return self.vision_backbone.num_patches

    @property
    def device(self) -> torch.device:
        """Device of the projector weights."""
        return self.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the projector weights."""
        return self.projector.fc1.weight.dtype

    def prefix_length(self, n_prompt_tokens: int) -> int:
        """Length of ``embed_prefix`` for a prompt of ``n_prompt_tokens`` ids (BOS included)."""
        return n_prompt_tokens + self.num_patches

    # -- buffers -------------------------------------------------------------------------

    def materialize_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers (rotary ``inv_freq``) left on the meta device."""
        device = torch.device(device)
        for name, module in self.named_modules():
            inv_freq = getattr(module, 'inv_freq', None)
            if not isinstance(inv_freq, torch.Tensor):
                continue
            if inv_freq.device.type != 'meta' and inv_freq.device == device:
                continue
            fresh = _rotary_inv_freq(module, self.language_model.config, device)
            module.register_buffer('inv_freq', fresh, persistent=False)
            if isinstance(getattr(module, 'original_inv_freq', None), torch.Tensor):
                if 'original_inv_freq' in module._buffers:
                    module.register_buffer('original_inv_freq', fresh.clone(), persistent=False)
                else:
                    module.original_inv_freq = fresh.clone()
            logger.debug('recomputed %s.inv_freq on %s', name, device)

    def meta_tensor_names(self) -> list[str]:
        """Names of parameters and buffers still on the meta device (empty once loaded)."""
        names = [n for n, p in self.named_parameters() if p.device.type == 'meta']
        names += [n for n, b in self.named_buffers() if b.device.type == 'meta']
        return names

    # -- forward pieces ------------------------------------------------------------------

    def project_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return projected patch embeddings ``(B, num_patches, llm_dim)``."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.projector(self.vision_backbone(pixel_values))

    def embed_prefix(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                     patch_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Return the OpenVLA multimodal sequence ``[BOS] + patches + embed(input_ids[:, 1:])``.

        ``input_ids`` ``(B, T)`` must start with BOS (as the Llama tokenizer adds it); the result
        is ``(B, T + num_patches, llm_dim)``. ``patch_embeddings`` (from ``project_patches``)
        skips the vision pass when given.
        """
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(f'input_ids must be (B, T >= 1), got {tuple(input_ids.shape)}')
        if patch_embeddings is None:
            if pixel_values is None:
                raise ValueError('embed_prefix needs pixel_values or patch_embeddings')
            patch_embeddings = self.project_patches(pixel_values)
        embeddings = self.language_model.get_input_embeddings()(input_ids.to(self.device))
        if patch_embeddings.shape[0] != embeddings.shape[0]:
            raise ValueError(f'batch mismatch: {patch_embeddings.shape[0]} images, '
                             f'{embeddings.shape[0]} prompts')
        return torch.cat([embeddings[:, :1], patch_embeddings.to(embeddings.dtype),
                          embeddings[:, 1:]], dim=1)

    def forward_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, T + num_patches, padded_vocab)`` of the whole multimodal prefix."""
        inputs_embeds = self.embed_prefix(pixel_values, input_ids)
        return self.language_model(inputs_embeds=inputs_embeds, use_cache=False).logits

    def prefill(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the LLM over ``inputs_embeds`` with a fresh dynamic KV cache.

        Returns the last position's logits ``(B, padded_vocab)`` and the cache object.
        """
        decoder = self.language_model.get_decoder()
        out = decoder(inputs_embeds=inputs_embeds, use_cache=True)
        logits = self.language_model.get_output_embeddings()(out.last_hidden_state[:, -1])
        return logits, _output_cache(out)

    def decode_step(self, token_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token per row ``(B,)`` through the LLM with ``cache``; return logits, cache."""
        decoder = self.language_model.get_decoder()
        kwargs = {_cache_argument(decoder): cache}
        out = decoder(input_ids=token_ids.view(-1, 1), use_cache=True, **kwargs)
        logits = self.language_model.get_output_embeddings()(out.last_hidden_state[:, -1])
        return logits, _output_cache(out)


def _rotary_inv_freq(module: nn.Module, llama_config: Any, device: torch.device) -> torch.Tensor:
    """Recompute a rotary embedding's ``inv_freq`` (default RoPE, or the module's own init fn)."""
    init = getattr(module, 'rope_init_fn', None)
    config = getattr(module, 'config', None) or llama_config
    if callable(init):  # transformers 4.45..4.5x keep the init function on the module
        inv_freq, _ = init(config, device)
        return inv_freq.to(device=device, dtype=torch.float32)
    params = getattr(config, 'rope_parameters', None) or {}
    rope_type = params.get('rope_type', 'default') if isinstance(params, Mapping) else 'default'
    if rope_type != 'default':
        raise ConfigError(f'rope type {rope_type!r} needs its own init; only default RoPE is '
                          'supported for meta-device loading')
    base = params.get('rope_theta') if isinstance(params, Mapping) else None
    base = float(base if base is not None else getattr(config, 'rope_theta', 10000.0))
    dim = getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base ** exponent)
