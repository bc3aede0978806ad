"""Weight-only int4 quantization by swapping linear layers, and the weights the engine reads.

One quantized mode, ``'int4'``: group-wise asymmetric 4-bit weights (groups of 128 input
columns, or 64/32 where K is not a multiple of 128) with fp16 scales and offsets, bf16
activations, run by this package's Triton kernels (``int4_kernels.py``); no third-party
quantization library. It replaces the Llama's linear layers except ``lm_head``; the vision
backbone, the projector, the embeddings and ``lm_head`` stay in bf16 (about 3.9 GB of int4
weights plus 2.0 GB of bf16 ones for openvla-7b). bitsandbytes NF4/int8 and PyTorch's tinygemm
int4 layout were measured slower in the user path and removed (bench/NOTES.md).

Two ways in: ``Int4Linear.from_weight`` quantizes one weight tensor where it lies (the streaming
checkpoint loader calls it for each Llama projection as it arrives, on the GPU, so the bf16
model never exists there), and ``quantize_linears`` swaps the layers of a model already in memory
(tests, small models). LoRA adapters are merged into the bf16 weights before they are quantized.

For the engine: ``Dense`` and ``Int4Weight`` are the tensors of one linear layer, ``linear``
computes with either, ``layer_weights`` reads them off a module and ``fuse_weights``
concatenates several projections of the same input (q/k/v, gate/up) into one.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vla_ros.core.errors import ConfigError
from vla_ros.policy.int4_kernels import (
    dequantize_torch,
    group_size_for,
    int4_mm,
    quantize_weight,
    split_for,
)

logger = logging.getLogger(__name__)

METHODS = ('int4',)
#: Compute capability the int4 kernels need on a GPU (bf16 tensor-core products).
INT4_MIN_CAPABILITY = (8, 0)


class Dense(NamedTuple):
    """A float linear layer: ``y = x @ weight.T + bias``."""

    weight: Tensor
    bias: Tensor | None


class Int4Weight(NamedTuple):
    """An int4 linear layer in the ``int4_kernels`` layout (plus an optional bf16 bias).

    ``split``: K chunks of its skinny products (``int4_kernels.split_for``), fixed per shape.
    """

    qweight: Tensor
    scales: Tensor
    offsets: Tensor
    bias: Tensor | None
    split: int = 1


LinearWeights = Dense | Int4Weight


def linear(x: Tensor, w: LinearWeights) -> Tensor:
    """``x @ W.T + b`` for float or int4 weights; x (..., K), result in x's dtype."""
    if isinstance(w, Dense):
        return nn.functional.linear(x, w.weight, w.bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    n = w.qweight.shape[0]
    y = int4_mm(x2, w.qweight, w.scales, w.offsets, w.split)
    if y.dim() == 3:  # fp32 partial sums over K chunks
        y = y.sum(0)
    if w.bias is not None:
        y = y + w.bias
    return y.to(x.dtype).reshape(*shape[:-1], n)


def check_int4_device(device: torch.device) -> None:
    """ConfigError naming the alternatives if the int4 kernels cannot run on ``device``."""
    if device.type != 'cuda':
        return  # the CPU runs the torch reference (slow, for tests)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ConfigError("quantization 'int4' needs Triton (it ships with CUDA builds of "
                          "PyTorch); install it, or load unquantized (quantization none, "
                          'about 15.5 GB of GPU memory for openvla-7b)') from exc
    cap = torch.cuda.get_device_capability(device)
    if cap < INT4_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"quantization 'int4' needs a GPU of compute capability "
            f'{INT4_MIN_CAPABILITY[0]}.{INT4_MIN_CAPABILITY[1]} or newer (bf16 tensor cores); '
            f'{name} is {cap[0]}.{cap[1]}. Alternatives: quantization none (bf16, about '
            '15.5 GB), or the CPU (device cpu, slow)')


class Int4Linear(nn.Module):
    """A linear layer with group-wise int4 weights (``int4_kernels`` layout), bf16 activations."""

    def __init__(self, in_features: int, out_features: int, weights: Int4Weight) -> None:
        """Wrap packed weights (see ``from_weight``)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer('qweight', weights.qweight)
        self.register_buffer('scales', weights.scales)
        self.register_buffer('offsets', weights.offsets)
        self.bias = None if weights.bias is None else nn.Parameter(weights.bias,
                                                                   requires_grad=False)

    @property
    def group_size(self) -> int:
        """Input columns per quantization group."""
        return self.in_features // self.scales.shape[0]

    @staticmethod
    def supports(in_features: int) -> bool:
        """Whether the kernels take this many input columns (a multiple of 32)."""
        return group_size_for(in_features) is not None

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> Int4Linear:
        """Quantize an (N, K) float weight where it lies (its device); the result lives there."""
        n, k = weight.shape
        group = group_size_for(k)
        if group is None:
            raise ConfigError(f"quantization 'int4' needs in_features divisible by 32, got {k}")
        with torch.no_grad():
            qweight, scales, offsets = quantize_weight(weight.detach(), group)
            b = None if bias is None else bias.detach().to(torch.bfloat16)
        return cls(k, n, Int4Weight(qweight, scales, offsets, b))

    @property
    def weights(self) -> Int4Weight:
        """The tensors the kernels read."""
        split = split_for(self.out_features, self.in_features, self.qweight.device)
        return Int4Weight(self.qweight, self.scales, self.offsets, self.bias, split)

    def forward(self, x: Tensor) -> Tensor:
        """Return x W^T (+ bias), computed with the int4 weights in bf16."""
        return linear(x, self.weights)

    def dequantize(self) -> Tensor:
        """The float weights (N, K) this layer computes with (fp32)."""
        return dequantize_torch(self.qweight, self.scales, self.offsets, torch.float32)

    def extra_repr(self) -> str:  # noqa: D102
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'group_size={self.group_size}, bias={self.bias is not None}')


# ---------------------------------------------------------------------------------------------
# The engine's view of a layer
# ---------------------------------------------------------------------------------------------

def layer_weights(module: nn.Module, name: str = '') -> LinearWeights:
    """The tensors of a plain ``nn.Linear`` or an ``Int4Linear`` (ConfigError for others)."""
    if type(module) is nn.Linear:
        return Dense(module.weight, module.bias)
    if isinstance(module, Int4Linear):
        return module.weights
    raise ConfigError(f'layer {name or type(module).__name__} is a {type(module).__name__}; '
                      'the engine reads plain or int4 linear layers (LoRA adapters are merged '
                      'on load)')


def fuse_weights(modules: list[nn.Module], names: list[str]) -> LinearWeights:
    """One layer computing ``cat([m(x) for m in modules], -1)`` (the same input for all).

    Float weights are concatenated and each module's weight becomes a view of the result, so
    the modules compute what they did and no memory is added; int4 codes likewise. Biases are
    concatenated (zeros where a module has none).
    """
    parts = [layer_weights(m, n) for m, n in zip(modules, names, strict=True)]
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        raise ConfigError(f'{", ".join(names)} mix float and int4 weights; quantize all or none')
    bias = None
    if any(p.bias is not None for p in parts):
        rows = [(p.weight if isinstance(p, Dense) else p.qweight).shape[0] for p in parts]
        ref = next(p.bias for p in parts if p.bias is not None)
        bias = torch.cat([p.bias if p.bias is not None else ref.new_zeros(r)
                          for p, r in zip(parts, rows, strict=True)])
    if isinstance(parts[0], Dense):
        fused = torch.cat([p.weight.detach() for p in parts], dim=0)
        start = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
            start += rows
        return Dense(fused, bias)
    qweight = torch.cat([p.qweight for p in parts], dim=0)
    start = 0
    for m in modules:
        rows = m.qweight.shape[0]
        m.qweight = qweight[start:start + rows]
        start += rows
    scales = torch.cat([p.scales for p in parts], dim=1).contiguous()
    offsets = torch.cat([p.offsets for p in parts], dim=1).contiguous()
    split = split_for(qweight.shape[0], 2 * qweight.shape[1], qweight.device)
    return Int4Weight(qweight, scales, offsets, bias, split)


# ---------------------------------------------------------------------------------------------
# Quantizing a model in memory
# ---------------------------------------------------------------------------------------------

def quantizes(name: str) -> bool:
    """Whether the layer of this (model-relative) name is quantized: Llama linears, not the head.

    ``name`` is a module name of an OpenVLA model (``language_model.model.layers.3.mlp.
    down_proj``) or of a bare Llama (``model.layers.3.mlp.down_proj``).
    """
    inner = name.removeprefix('language_model.')
    return inner.startswith('model.layers.') and name.rsplit('.', 1)[-1].endswith('_proj')


def quantize_linears(model: nn.Module, method: str = 'int4',
                     device: torch.device | str | None = None) -> int:
    """Swap the quantized layers of ``model`` (see ``quantizes``) for int4 ones, in place.

    Each layer is quantized on ``device`` (default: where its weight is) and its float weight
    dropped before the next. Returns how many layers were swapped; layers whose shape the
    kernels cannot take stay in float (logged).
    """
    if method not in METHODS:
        raise ConfigError(f'unknown quantization {method!r}; choose one of {", ".join(METHODS)}')
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and quantizes(n)]
    swapped = 0
    for name, lin in targets:
        dev = torch.device(device) if device is not None else lin.weight.device
        if lin.weight.device.type == 'meta':
            raise ConfigError(f'layer {name} is still on the meta device: load weights first')
        if not Int4Linear.supports(lin.in_features):
            logger.info('int4: keeping %s (%d->%d) in %s', name, lin.in_features,
                        lin.out_features, lin.weight.dtype)
            continue
        new = Int4Linear.from_weight(lin.weight.detach().to(dev), lin.bias)
        parent_name, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped += 1
    if swapped == 0:
        raise ConfigError(f'quantization {method!r} found no linear layer to quantize')
    return swapped
