"""Weight-only quantization by swapping linear layers: bitsandbytes int8/NF4/FP4 and a fast int4.

``quantize_model(model, method)`` replaces ``nn.Linear`` layers in place, one at a time, each
quantized on the target device, so the GPU never holds the whole bf16 model (a 7B model loaded
on the CPU and quantized to int4 peaks at its int4 size plus one layer).

Methods:
* ``'int8'``: bitsandbytes ``Linear8bitLt`` (LLM.int8(), outlier threshold 6.0), as the
  reference ``load_in_8bit``.
* ``'nf4'`` / ``'fp4'``: bitsandbytes ``Linear4bit`` with bf16 compute (the reference
  ``load_in_4bit`` is FP4 with fp32 compute; NF4 + bf16 is the better choice).
* ``'int4_fast'``: ``Int4Linear``: group-wise (128) asymmetric int4 weights with fp16 scales
  and offsets, bf16 activations, run by this package's Triton kernels (``int4_kernels.py``): a
  GEMV for decoding and a fused dequantize-GEMM for the prefill. No third-party package; a torch
  custom op, so it is captured in CUDA graphs and passes through ``torch.compile``.
* ``'int4_tinygemm'``: ``TinyGemmLinear``: the same quantization in the tile layout of
  PyTorch's built-in int4 GEMM (``aten._weight_int4pack_mm``, "tinygemm", the kernel torchao's
  int4 weight-only mode uses). Fast for decoding, but about 30x slower than bf16 for the
  ~280-row prefill on an H100 (measured, bench/NOTES.md), so not the default.

Both int4 kinds also run on the CPU (slowly; used by the tests).

What is quantized: for an OpenVLA model (anything with a ``language_model``), the Llama's linear
layers except ``lm_head``; with ``keep_vision_unquantized=False`` also the vision backbone and
projector (layers whose shapes the method cannot take stay in bf16). For any other module, every
linear except ``lm_head``.

LoRA: merge adapters first (peft ``merge_and_unload()``), then quantize. Merging a LoRA delta
into already-quantized weights either fails or re-rounds the weights twice.

Heavy imports (bitsandbytes) are lazy; a missing library or a CPU-only machine for a
bitsandbytes method raises ``ConfigError`` with what to do.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from vla_ros.core.errors import ConfigError

logger = logging.getLogger(__name__)

METHODS = ('int8', 'nf4', 'fp4', 'int4_fast', 'int4_tinygemm')
_BNB_METHODS = ('int8', 'nf4', 'fp4')


# ---------------------------------------------------------------------------------------------
# Fast int4 (tinygemm layout)
# ---------------------------------------------------------------------------------------------

def quantize_int4_groupwise(weight: Tensor,
                            group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit quantization per group of ``group_size`` input columns.

    Returns (q, scale, zero): q in [0, 15] as int32 (N, K), scale and zero (N, K/group) fp32,
    with the dequantization tinygemm uses: ``w = (q - 8) * scale + zero``.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    zero = lo + 8 * scale
    return q.reshape(n, k), scale, zero


def dequantize_int4_groupwise(q: Tensor, scale: Tensor, zero: Tensor,
                              group_size: int) -> Tensor:
    """Inverse of ``quantize_int4_groupwise`` (fp32 weights)."""
    n, k = q.shape
    w = q.reshape(n, k // group_size, group_size).float() - 8
    return (w * scale[..., None] + zero[..., None]).reshape(n, k)


_NIBBLE_HIGH_FIRST: dict[str, bool] = {}


def _pack_cuda(q: Tensor, inner_k_tiles: int, high_first: bool) -> Tensor:
    even, odd = q[:, ::2], q[:, 1::2]
    byte = (even << 4 | odd) if high_first else (odd << 4 | even)
    return torch.ops.aten._convert_weight_to_int4pack(byte.to(torch.uint8).contiguous(),
                                                      inner_k_tiles)


def _cuda_nibble_order(device: torch.device) -> bool:
    """Which nibble of the packed byte holds the even column for this PyTorch's int4 packer.

    The byte layout the private aten op expects is not documented; a tiny product on the device
    settles it once per process.
    """
    key = str(device)
    if key not in _NIBBLE_HIGH_FIRST:
        gen = torch.Generator(device='cpu').manual_seed(0)
        w = torch.randn(64, 256, generator=gen).to(device)
        x = torch.randn(4, 256, generator=gen).to(device, torch.bfloat16)
        q, scale, zero = quantize_int4_groupwise(w, 128)
        ref = x.float() @ dequantize_int4_groupwise(q, scale, zero, 128).T
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        errs = {}
        for high_first in (True, False):
            y = torch.ops.aten._weight_int4pack_mm(x, _pack_cuda(q, 8, high_first), 128, sz)
            errs[high_first] = float((y.float() - ref).norm() / ref.norm())
        best = min(errs, key=errs.get)
        if errs[best] > 2e-2:
            raise ConfigError(f'int4_fast: this PyTorch build\'s int4 GEMM gives wrong results '
                              f'(relative errors {errs}); use nf4 instead')
        _NIBBLE_HIGH_FIRST[key] = best
    return _NIBBLE_HIGH_FIRST[key]


class TinyGemmLinear(nn.Module):
    """A bias-optional linear with int4 group-quantized weights, bf16 activations (tinygemm).

    Buffers are packed for the device type they were built on; to move the model to another
    device type, quantize again there.
    """

    def __init__(self, in_features: int, out_features: int, packed: Tensor, scales_zeros: Tensor,
                 bias: Tensor | None, group_size: int, inner_k_tiles: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.inner_k_tiles = group_size, inner_k_tiles
        self.register_buffer('packed', packed)
        self.register_buffer('scales_zeros', scales_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed_for = packed.device.type

    @staticmethod
    def supports(linear: nn.Linear, group_size: int = 128, inner_k_tiles: int = 8) -> bool:
        """Whether tinygemm takes this layer's shape."""
        k, n = linear.in_features, linear.out_features
        return k % group_size == 0 and k % (inner_k_tiles * 16) == 0 and n % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None,
                    group_size: int = 128, inner_k_tiles: int = 8) -> TinyGemmLinear:
        """Quantize ``linear`` on ``device`` (default: where its weight is)."""
        device = torch.device(device) if device is not None else linear.weight.device
        if not cls.supports(linear, group_size, inner_k_tiles):
            raise ConfigError(f'int4_tinygemm needs in_features divisible by {group_size} and '
                              f'{inner_k_tiles * 16} and out_features by 8, got '
                              f'{linear.in_features}->{linear.out_features}')
        with torch.no_grad():
            w = linear.weight.detach().to(device)
            q, scale, zero = quantize_int4_groupwise(w, group_size)
            del w
            # tinygemm wants (K/group, N, 2) bf16 with [..., 0] = scale, [..., 1] = zero
            sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            if device.type == 'cuda':
                packed = _pack_cuda(q, inner_k_tiles, _cuda_nibble_order(device))
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
            bias = None
            if linear.bias is not None:
                bias = linear.bias.detach().to(device, torch.bfloat16)
        return cls(linear.in_features, linear.out_features, packed, sz, bias, group_size,
                   inner_k_tiles)

    def forward(self, x: Tensor) -> Tensor:
        """Return x W^T (+ bias) computed with the int4 weights, in bf16."""
        if x.device.type != self.packed_for:
            raise ConfigError(f'TinyGemmLinear was packed for {self.packed_for}, input is on '
                              f'{x.device.type}: quantize again on the target device')
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.packed_for == 'cuda':
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size,
                                                   self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                           self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:  # noqa: D102
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'group_size={self.group_size}, bias={self.bias is not None}')


_CONCAT_OK: dict[tuple, bool] = {}


def _packed_concat_ok(device: torch.device, rows: tuple[int, ...], inner_k_tiles: int) -> bool:
    """Whether packing stacked rows equals stacking packed rows, for these row counts.

    The packers tile the output rows (by 8 on CUDA, by larger blocks on the CPU), so a fused
    projection can be built from packed weights (without the float weights) when the split
    points fall on tile boundaries; checked once per device and split on random codes.
    """
    key = (str(device), rows, inner_k_tiles)
    if key not in _CONCAT_OK:
        gen = torch.Generator(device='cpu').manual_seed(1)
        k = inner_k_tiles * 32
        q = torch.randint(0, 16, (sum(rows), k), generator=gen, dtype=torch.int32).to(device)
        parts = list(q.split(list(rows), dim=0))
        if device.type == 'cuda':
            hf = _cuda_nibble_order(device)
            pack = lambda t: _pack_cuda(t.contiguous(), inner_k_tiles, hf)  # noqa: E731
        else:
            pack = lambda t: torch.ops.aten._convert_weight_to_int4pack_for_cpu(  # noqa: E731
                t.contiguous(), inner_k_tiles)
        _CONCAT_OK[key] = torch.equal(pack(q), torch.cat([pack(t) for t in parts], 0))
    return _CONCAT_OK[key]


def _fuse_tinygemm(mods: list[TinyGemmLinear]) -> TinyGemmLinear | None:
    """One TinyGemmLinear computing the concatenated outputs of ``mods`` (same input, no bias).

    The modules' packed weights become views of the fused tensor (no extra memory for weights;
    the small scale tables are copied). None if the modules cannot be fused.
    """
    first = mods[0]
    if any(m.bias is not None or m.in_features != first.in_features
           or m.group_size != first.group_size or m.inner_k_tiles != first.inner_k_tiles
           or m.packed.device != first.packed.device or m.out_features % 8 for m in mods):
        return None
    rows = tuple(m.out_features for m in mods)
    if not _packed_concat_ok(first.packed.device, rows, first.inner_k_tiles):
        logger.info('int4 projections %s not fused: packed tiles do not split there', rows)
        return None
    packed = torch.cat([m.packed for m in mods], dim=0)
    start = 0
    for m in mods:
        n = m.packed.shape[0]
        m.packed = packed[start:start + n]
        start += n
    scales = torch.cat([m.scales_zeros for m in mods], dim=1).contiguous()
    return TinyGemmLinear(first.in_features, sum(m.out_features for m in mods), packed, scales,
                      None, first.group_size, first.inner_k_tiles)


class Int4Linear(nn.Module):
    """A linear with group-wise int4 weights (``int4_kernels`` layout), bf16 activations.

    ``qweight`` uint8 (N, K/2), ``scales``/``offsets`` fp16 (K/group, N): w = q * scale + offset.
    """

    def __init__(self, in_features: int, out_features: int, qweight: Tensor, scales: Tensor,
                 offsets: Tensor, bias: Tensor | None, group_size: int) -> None:
        super().__init__()
        import vla_ros.policy.int4_kernels  # noqa: F401  (registers torch.ops.vla_ros.int4_linear)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.register_buffer('qweight', qweight)
        self.register_buffer('scales', scales)
        self.register_buffer('offsets', offsets)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        from vla_ros.policy.int4_kernels import gemv_split
        self._split = gemv_split(out_features, in_features, group_size)

    @staticmethod
    def supports(linear: nn.Linear, group_size: int = 128) -> bool:
        """Whether the kernels take this layer's shape (K a multiple of the group)."""
        return linear.in_features % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None,
                    group_size: int = 128) -> Int4Linear:
        """Quantize ``linear`` on ``device`` (default: where its weight is)."""
        device = torch.device(device) if device is not None else linear.weight.device
        if not cls.supports(linear, group_size):
            raise ConfigError(f'int4_fast needs in_features divisible by {group_size}, got '
                              f'{linear.in_features}')
        from vla_ros.policy.int4_kernels import pack_int4
        with torch.no_grad():
            w = linear.weight.detach().to(device).float()
            n, k = w.shape
            wg = w.reshape(n, k // group_size, group_size)
            lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
            scale = ((hi - lo).clamp(min=1e-8) / 15).to(torch.float16)
            offset = lo.to(torch.float16)
            # round against the stored (fp16) scale and offset
            q = ((wg - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
            qweight = pack_int4(q.reshape(n, k))
            del w, wg, q
            bias = None
            if linear.bias is not None:
                bias = linear.bias.detach().to(device, torch.bfloat16)
        return cls(linear.in_features, linear.out_features, qweight,
                   scale.t().contiguous(), offset.t().contiguous(), bias, group_size)

    def forward(self, x: Tensor) -> Tensor:
        """Return x W^T (+ bias) computed with the int4 weights, in bf16."""
        xb = x.to(torch.bfloat16)
        split = self._split
        if split > 1 and x.numel() == x.shape[-1] and x.is_cuda:  # one row, split K
            y = torch.ops.vla_ros.int4_gemv_partials(xb, self.qweight, self.scales,
                                                     self.offsets, self.group_size, split)
            y = y.sum(0).view(*x.shape[:-1], self.out_features)
        else:
            y = torch.ops.vla_ros.int4_linear(xb, self.qweight, self.scales, self.offsets,
                                              self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """The float weights (N, K) this layer computes with (fp32)."""
        from vla_ros.policy.int4_kernels import dequantize_torch
        return dequantize_torch(self.qweight, self.scales, self.offsets, self.group_size,
                                torch.float32)

    def extra_repr(self) -> str:  # noqa: D102
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'group_size={self.group_size}, bias={self.bias is not None}')


def _fuse_int4(mods: list[Int4Linear]) -> Int4Linear | None:
    first = mods[0]
    if any(m.bias is not None or m.in_features != first.in_features
           or m.group_size != first.group_size or m.qweight.device != first.qweight.device
           for m in mods):
        return None
    qweight = torch.cat([m.qweight for m in mods], dim=0)
    start = 0
    for m in mods:  # the modules keep working, on views of the fused codes
        n = m.qweight.shape[0]
        m.qweight = qweight[start:start + n]
        start += n
    scales = torch.cat([m.scales for m in mods], dim=1).contiguous()
    offsets = torch.cat([m.offsets for m in mods], dim=1).contiguous()
    return Int4Linear(first.in_features, sum(m.out_features for m in mods), qweight, scales,
                      offsets, None, first.group_size)


def fuse_int4_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One int4 module computing ``cat([m(x) for m in mods], -1)`` (same input, no bias), or None.

    The modules' codes become views of the fused tensor, so the weights are not duplicated
    (the small scale tables are).
    """
    if all(type(m) is Int4Linear for m in mods):
        return _fuse_int4(mods)
    if all(type(m) is TinyGemmLinear for m in mods):
        return _fuse_tinygemm(mods)
    return None


# ---------------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------------

def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError('quantization int8/nf4/fp4 needs bitsandbytes: pip install '
                          'bitsandbytes (or use quantization int4_fast, which needs none)'
                          ) from exc
    return bnb


def _bnb_linear(linear: nn.Linear, method: str, device: torch.device) -> nn.Module:
    bnb = _import_bnb()
    w = linear.weight.detach()
    has_bias = linear.bias is not None
    if method == 'int8':
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=6.0, device='meta')
        param = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False,
                                  has_fp16_weights=False)
        # Int8Params quantizes when moved from the CPU; for a weight already on the GPU the
        # same quantization is called directly.
        new.weight = param.to(device) if w.device.type == 'cpu' else param._quantize(device)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=torch.bfloat16, quant_type=method,
                                device='meta')
        param = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, quant_type=method,
                                  blocksize=64, compress_statistics=True, module=new)
        new.weight = param.to(device)  # quantizes on the device, from CPU or GPU data
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().to(device, torch.bfloat16),
                                requires_grad=False)
    return new


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------

def _resolve_device(method: str, device) -> torch.device:
    if device is not None:
        device = torch.device(device)
    elif torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    if device.type == 'cuda' and device.index is None and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    if method in _BNB_METHODS and device.type != 'cuda':
        raise ConfigError(f'quantization {method!r} (bitsandbytes) runs on a CUDA GPU only; '
                          f'on {device.type} run unquantized (fp32 on the CPU)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'quantization {method!r} was asked for on {device} but CUDA is not '
                          'available')
    return device


def quantize_linears(module: nn.Module, method: str, device=None,
                     skip: tuple[str, ...] = ('lm_head',)) -> int:
    """Swap every ``nn.Linear`` under ``module`` (names in ``skip`` excepted) for a quantized one.

    Returns how many layers were swapped. Layers whose shape the method cannot take stay as
    they are (logged). Each layer is quantized on ``device`` and its float weight dropped before
    the next, so peak memory stays near the quantized size.
    """
    if method not in METHODS:
        raise ConfigError(f'unknown quantization {method!r}; choose one of {", ".join(METHODS)}')
    device = _resolve_device(method, device)
    if method in _BNB_METHODS:
        _import_bnb()
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Linear and name.rsplit('.', 1)[-1] not in skip]
    swapped = 0
    for name, linear in targets:
        if linear.weight.device.type == 'meta':
            raise ConfigError(f'layer {name} is still on the meta device: load weights first')
        if method in ('int4_fast', 'int4_tinygemm'):
            cls = Int4Linear if method == 'int4_fast' else TinyGemmLinear
            if not cls.supports(linear):
                logger.info('%s: keeping %s (%d->%d) in %s', method, name, linear.in_features,
                            linear.out_features, linear.weight.dtype)
                continue
            new = cls.from_linear(linear, device)
        else:
            new = _bnb_linear(linear, method, device)
        parent_name, _, child = name.rpartition('.')
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
        del linear
        swapped += 1
    return swapped


def quantize_model(model: nn.Module, method: str, keep_vision_unquantized: bool = True,
                   device=None) -> nn.Module:
    """Quantize ``model`` in place and move the rest of it to ``device``; return the model.

    See the module docstring for what is swapped. ``device`` defaults to the current CUDA
    device (the int4 methods also run on the CPU). Merge LoRA adapters before calling this.
    """
    if method not in METHODS:
        raise ConfigError(f'unknown quantization {method!r}; choose one of {", ".join(METHODS)}')
    device = _resolve_device(method, device)
    language_model = getattr(model, 'language_model', None)
    if language_model is None:
        parts = [model]
    else:
        parts = [language_model]
        if not keep_vision_unquantized:
            parts += [getattr(model, n) for n in ('vision_backbone', 'projector')
                      if getattr(model, n, None) is not None]
    swapped = sum(quantize_linears(p, method, device) for p in parts)
    if swapped == 0:
        raise ConfigError(f'quantization {method!r} found no linear layer to quantize')
    _move_rest(model, device)
    logger.info('quantized %d linear layers with %s', swapped, method)
    return model


def _move_rest(model: nn.Module, device: torch.device) -> None:
    """Move parameters and buffers that are not quantized state to ``device``."""
    for mod in model.modules():
        if isinstance(mod, (Int4Linear, TinyGemmLinear)) \
                or type(mod).__module__.startswith('bitsandbytes'):
            continue
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.device != device:
                setattr(mod, name, nn.Parameter(p.detach().to(device), requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.device != device:
                mod._buffers[name] = b.to(device)
