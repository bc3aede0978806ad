"""Int4 weight-only matmul kernels (Triton) for ``quant.Int4Linear``, and their CPU reference.

One fused kernel computes ``y = x @ W.T`` for any number of rows: it reads each packed weight
tile once, turns the 4-bit codes into bf16 in registers and feeds the tensor cores with the
weight tile as the left operand (``y^T = W x^T``), so that few activation rows (decoding: one per
arm) still fill the matrix units' wide dimension. The per-group scale is applied to the product
of the raw codes, not to every weight:
``sum_k w x = scale * sum_k q x + offset * sum_k x`` within a group, so the inner loop does no
floating-point work per weight beyond the conversion. On Hopper the conversion is four logic
instructions per eight codes (each code OR-ed into the mantissa of the bf16 number 128, giving
``128 + q`` exactly, two codes per 32-bit register); elsewhere, and where that inline assembly
fails its self-check, plain integer-to-bf16 conversions (the inline assembly is an eight-
instruction PTX block; the prmt/lop3 trick is the standard one for int4 -> half types). For many
rows (the prefill) the same kernel competes with "dequantize into a bf16 scratch, then cuBLAS".
Which one runs, and with which tiles, is decided per shape by timing the candidates at first use
(outside graph capture, with the L2 flushed) and remembered in the tuning cache
(``vla_ros.policy.cache``), so a restart does not time them again. Few output rows and a long K
split K (``split_for``) so that the grid fills the SMs.

Layout (chosen for these kernels):

* ``qweight`` uint8 (N, K/2). Within each group of ``G`` input columns, byte ``j`` (0 <= j <
  G/2) holds column ``j`` of the group in its low nibble and column ``G/2 + j`` in its high
  nibble: the two halves of a group are two contiguous runs of activations, so no interleaving
  is needed anywhere. Codes q in [0, 15].
* ``scales``, ``offsets`` (K/G, N) fp16: ``w[n, k] = q[n, k] * scale[g, n] + offset[g, n]``,
  ``g = k // G`` (asymmetric, ``offset = min``), group-major so that one group's values for a
  block of rows are contiguous. ``G`` is ``K // scales.shape[0]`` (128 for 7B; smaller models
  with K not a multiple of 128 use 64 or 32).

``int4_mm`` is a torch custom op (``vla_ros::int4_mm``): ``torch.compile`` treats it as one
opaque call and CUDA graphs capture it. On the CPU it dequantizes with torch and calls
``F.linear`` (slow, for tests). Under ``TRITON_INTERPRET=1`` the same Triton kernels run on the
CPU (the tests check them that way against a float64 reference).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None

logger = logging.getLogger(__name__)

#: Group sizes the quantizer uses, largest first (the first that divides K).
GROUP_SIZES = (128, 64, 32)
#: Rows up to which the product is "skinny" (decode of a batch): split K, no dequantize path.
SKINNY_ROWS = 64


def group_size_for(k: int) -> int | None:
    """The quantization group for ``k`` input columns (None: no supported group divides it)."""
    return next((g for g in GROUP_SIZES if k % g == 0), None)


# ---------------------------------------------------------------------------------------------
# Packing and the reference (torch)
# ---------------------------------------------------------------------------------------------

def pack_int4(q: Tensor, group_size: int) -> Tensor:
    """Codes (N, K) in [0, 15] -> uint8 (N, K/2) in the layout of the module docstring."""
    n, k = q.shape
    q = q.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(qweight: Tensor, group_size: int) -> Tensor:
    """uint8 (N, K/2) -> codes (N, K) as uint8 (inverse of ``pack_int4``)."""
    n = qweight.shape[0]
    b = qweight.reshape(n, -1, group_size // 2)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(n, -1)


def quantize_weight(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit quantization of (N, K) ``weight`` per group of ``group_size`` columns.

    Returns ``(qweight, scales, offsets)`` in the kernels' layout, computed where ``weight`` is
    (in fp32). Codes round against the stored fp16 scale and offset.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo).clamp(min=1e-8) / 15).to(torch.float16)
    offset = lo.to(torch.float16)
    q = ((w - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
    qweight = pack_int4(q.reshape(n, k), group_size)
    return qweight, scale.t().contiguous(), offset.t().contiguous()


def dequantize_torch(qweight: Tensor, scales: Tensor, offsets: Tensor,
                     dtype: torch.dtype) -> Tensor:
    """Reference dequantization (N, K) in ``dtype``, computed in fp32."""
    k = 2 * qweight.shape[1]
    group = k // scales.shape[0]
    q = unpack_int4(qweight, group).float()
    s = scales.float().t().repeat_interleave(group, dim=1)
    m = offsets.float().t().repeat_interleave(group, dim=1)
    return (q * s + m).to(dtype)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'

if triton is not None:

    @triton.jit
    def _codes(b, USE_ASM: tl.constexpr):
        """uint8 tile -> (low-nibble codes, high-nibble codes) as bf16 (128 + q with USE_ASM)."""
        if USE_ASM:
            # 4 bytes per register: spread bytes 0,1 (2,3) into the two 16-bit halves, mask a
            # nibble per half and OR in bf16 128.0 (0x4300), whose last mantissa bit is 1.0.
            lo, hi = tl.inline_asm_elementwise(
                asm="""
                {
                .reg .b32 t0, t1, z;
                mov.b32 z, 0;
                prmt.b32 t0, $4, z, 0x4140;
                prmt.b32 t1, $4, z, 0x4342;
                lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
                lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
                shr.u32 t0, t0, 4;
                shr.u32 t1, t1, 4;
                lop3.b32 $2, t0, 0x000F000F, 0x43004300, 0xEA;
                lop3.b32 $3, t1, 0x000F000F, 0x43004300, 0xEA;
                }
                """,
                constraints='=r,=r,=r,=r,r',
                args=[b],
                dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=4,
            )
        else:
            lo = (b & 0xF).to(tl.float32).to(tl.bfloat16)
            hi = (b >> 4).to(tl.float32).to(tl.bfloat16)
        return lo, hi

    @triton.jit
    def _group_step(acc, w_rows, x_rows, s_ptr, m_ptr, g, valid, N, rn, nmask, mmask,
                    GROUP: tl.constexpr, USE_ASM: tl.constexpr, DOT_F32: tl.constexpr):
        """Add group g's product to acc: scale * (codes @ x^T) + (offset - bias*scale) * sum(x)."""
        HALF: tl.constexpr = GROUP // 2
        b = tl.load(w_rows + g * HALF, mask=nmask[:, None] & valid, other=0)
        lo, hi = _codes(b, USE_ASM)
        xlo = tl.load(x_rows + g * GROUP, mask=mmask[:, None] & valid, other=0.0)
        xhi = tl.load(x_rows + g * GROUP + HALF, mask=mmask[:, None] & valid, other=0.0)
        xs = tl.sum(xlo.to(tl.float32), axis=1) + tl.sum(xhi.to(tl.float32), axis=1)
        s = tl.load(s_ptr + g * N + rn, mask=nmask & valid, other=0.0).to(tl.float32)
        o = tl.load(m_ptr + g * N + rn, mask=nmask & valid, other=0.0).to(tl.float32)
        if USE_ASM:  # the codes came out as 128 + q
            o = o - 128.0 * s
        if DOT_F32:  # Triton's interpreter multiplies bf16 tiles wrongly; fp32 there
            lo, hi = lo.to(tl.float32), hi.to(tl.float32)
            xlo, xhi = xlo.to(tl.float32), xhi.to(tl.float32)
        # acc[n, m]: the weight tile is the wide left operand
        d = tl.dot(lo, tl.trans(xlo))
        d = tl.dot(hi, tl.trans(xhi), d)
        return acc + s[:, None] * d + o[:, None] * xs[None, :]

    @triton.jit
    def _mm_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, M, N, K, stride_xm, GROUPS_PER_SPLIT,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   USE_ASM: tl.constexpr, PARTIALS: tl.constexpr, DOT_F32: tl.constexpr,
                   GPI: tl.constexpr = 1):
        # Program (n, m, s): BLOCK_N weight rows x BLOCK_M activation rows over the groups of
        # split s, GPI groups per loop iteration (more bytes in flight per program).
        HALF: tl.constexpr = GROUP // 2
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rh = tl.arange(0, HALF)
        nmask = rn < N
        mmask = rm < M
        g_begin = pid_s * GROUPS_PER_SPLIT
        g_end = tl.minimum(g_begin + GROUPS_PER_SPLIT, K // GROUP)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        w_rows = qw_ptr + rn[:, None] * (K // 2) + rh[None, :]
        x_rows = x_ptr + rm[:, None] * stride_xm + rh[None, :]
        for g0 in range(g_begin, g_end, GPI):
            for j in tl.static_range(GPI):
                acc = _group_step(acc, w_rows, x_rows, s_ptr, m_ptr, g0 + j, g0 + j < g_end, N,
                                  rn, nmask, mmask, GROUP, USE_ASM, DOT_F32)
        offs = rm[None, :] * N + rn[:, None]
        out_mask = nmask[:, None] & mmask[None, :]
        if PARTIALS:  # fp32 partial sums y[split, m, n], summed by the caller
            tl.store(y_ptr + pid_s * M * N + offs, acc, mask=out_mask)
        else:
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, m_ptr, w_ptr, N, K, stride_s, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
        HALF: tl.constexpr = GROUP // 2
        pid_n = tl.program_id(0)
        g = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rh = tl.arange(0, HALF)
        b = tl.load(qw_ptr + rn[:, None] * (K // 2) + g * HALF + rh[None, :],
                    mask=nmask[:, None], other=0)
        lo, hi = _codes(b, USE_ASM)
        s = tl.load(s_ptr + g * stride_s + rn, mask=nmask, other=0.0).to(tl.float32)
        o = tl.load(m_ptr + g * stride_s + rn, mask=nmask, other=0.0).to(tl.float32)
        if USE_ASM:
            o = o - 128.0 * s
        out = w_ptr + rn[:, None] * K + g * GROUP + rh[None, :]
        dt = w_ptr.dtype.element_ty
        tl.store(out, (lo.to(tl.float32) * s[:, None] + o[:, None]).to(dt), mask=nmask[:, None])
        tl.store(out + HALF, (hi.to(tl.float32) * s[:, None] + o[:, None]).to(dt),
                 mask=nmask[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_ASM_OK: dict[str, bool] = {}


def _use_asm(device: torch.device) -> bool:
    """Whether the inline-assembly code conversion runs and is right on this device.

    Checked once per device against the plain conversion on random codes (and never under the
    interpreter, which cannot run PTX). A failure logs one warning and the plain path is used.
    """
    if _INTERPRET or device.type != 'cuda':
        return False
    key = str(device)
    if key not in _ASM_OK:
        ok = False
        try:
            if torch.cuda.get_device_capability(device) >= (8, 0):
                gen = torch.Generator(device=device).manual_seed(0)
                qw = torch.randint(0, 256, (64, 128), device=device, generator=gen,
                                   dtype=torch.int32).to(torch.uint8)
                s = torch.rand(2, 64, device=device, generator=gen).half() + 0.5
                m = torch.randn(2, 64, device=device, generator=gen).half()
                x = torch.randn(32, 256, device=device, generator=gen).bfloat16()
                ref = x.float() @ dequantize_torch(qw, s, m, torch.float32).T
                outs = []
                for asm in (True, False):
                    y = torch.empty(32, 64, device=device, dtype=torch.float32)
                    _mm_kernel[(1, 1, 1)](x, qw, s, m, y, 32, 64, 256, x.stride(0), 2,
                                          GROUP=128, BLOCK_N=64, BLOCK_M=32, USE_ASM=asm,
                                          PARTIALS=True, DOT_F32=False, num_warps=4)
                    outs.append(float((y - ref).norm() / ref.norm()))
                ok = outs[0] < 1e-3
                if not ok:
                    logger.warning('int4: the inline-assembly code conversion is wrong on %s '
                                   '(relative error %.2e, plain path %.2e); using the plain '
                                   'conversion', device, outs[0], outs[1])
        except Exception as exc:  # noqa: BLE001 - a PTX the driver rejects: plain path
            logger.warning('int4: the inline-assembly code conversion does not build on %s '
                           '(%s); using the plain conversion', device, exc)
        _ASM_OK[key] = ok
    return _ASM_OK[key]


def _fused(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor, split: int,
           block_n: int, block_m: int, warps: int, stages: int, gpi: int = 1) -> Tensor:
    m, k = x2.shape
    n = qweight.shape[0]
    groups = scales.shape[0]
    per_split = -(-groups // split)
    partials = split > 1
    y = torch.empty((split, m, n) if partials else (m, n), device=x2.device,
                    dtype=torch.float32 if partials else x2.dtype)
    if partials and per_split * (split - 1) >= groups:
        y.zero_()  # a split with no groups writes nothing
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    _mm_kernel[grid](x2, qweight, scales, offsets, y, m, n, k, x2.stride(0), per_split,
                     GROUP=k // groups, BLOCK_N=block_n, BLOCK_M=block_m,
                     USE_ASM=_use_asm(x2.device), PARTIALS=partials, DOT_F32=_INTERPRET,
                     GPI=gpi, num_warps=warps, num_stages=stages)
    return y


def _dequant_into(qweight: Tensor, scales: Tensor, offsets: Tensor, w: Tensor) -> Tensor:
    """Dequantize rows of packed weights (scales/offsets may be column slices) into ``w``."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    grid = (triton.cdiv(n, 32), scales.shape[0])
    _dequant_kernel[grid](qweight, scales, offsets, w, n, k, scales.stride(0),
                          GROUP=k // scales.shape[0], BLOCK_N=32,
                          USE_ASM=_use_asm(qweight.device), num_warps=4)
    return w


def dequantize_triton(qweight: Tensor, scales: Tensor, offsets: Tensor,
                      dtype: torch.dtype) -> Tensor:
    """Dequantize with the Triton kernel into a new (N, K) tensor of ``dtype``."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    return _dequant_into(qweight, scales, offsets,
                         torch.empty(n, k, device=qweight.device, dtype=dtype))


_SMS: dict[str, int] = {}


def split_for(n: int, k: int, device: torch.device) -> int:
    """How many K chunks a skinny product (decoding: at most ``SKINNY_ROWS`` rows) runs in.

    Few output columns and a long K (Llama's o and down projections) leave too few programs
    for the SMs; splitting K multiplies them, at the price of fp32 partial sums that the caller
    adds (fused into the next element-wise kernel under torch.compile). Fixed per weight shape
    (so that compiled graphs see a constant); 1 on the CPU. Products of more rows never split.
    """
    group = group_size_for(k)
    if device.type != 'cuda' or group is None:
        return 1
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, k // group, -(-2 * _SMS[key] // -(-n // 64))))


def output_shape(m: int, n: int, split: int) -> tuple[int, ...]:
    """Shape of ``int4_mm``'s result: fp32 partials (split, m, n) for skinny split products."""
    return (split, m, n) if split > 1 and m <= SKINNY_ROWS else (m, n)


def candidates(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor,
               split: int) -> dict[str, Callable[[], Tensor]]:
    """The ways to compute this product on CUDA, by name; the first is the untimed default.

    What survived the H200 measurements (bench/NOTES.md): for skinny products the fused kernel
    with 64-row tiles, one group per iteration (or four, for more rows in flight); for the
    prefill, dequantize + cuBLAS and the fused kernel with 128x128 tiles (each wins some
    shapes). A CUDA-core GEMV, the other operand orientation, larger skinny tiles and a
    dequantization overlapped with cuBLAS on a side stream were slower everywhere and were
    removed.
    """
    m = x2.shape[0]
    if m <= SKINNY_ROWS:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        return {f'fused_n64_m{bm}_w4_s{st}_g{g}': functools.partial(
            _fused, x2, qweight, scales, offsets, split, 64, bm, 4, st, g)
            for st, g in ((4, 1), (3, 4))}
    return {'dequant_cublas': lambda: F.linear(
                x2, dequantize_triton(qweight, scales, offsets, x2.dtype)),
            'fused_n128_m128_w8_s3': functools.partial(_fused, x2, qweight, scales, offsets,
                                                       1, 128, 128, 8, 3)}


def int4_matmul_reference(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor,
                          split: int) -> Tensor:
    """What ``int4_mm`` returns, computed with torch (fp32 partials for skinny splits)."""
    w = dequantize_torch(qweight, scales, offsets, torch.float32)
    if len(output_shape(x2.shape[0], w.shape[0], split)) == 2:
        return F.linear(x2, w.to(x2.dtype))
    k = x2.shape[1]
    group = k // scales.shape[0]
    chunk = -(-(k // group) // split) * group
    parts = [F.linear(x2.float()[:, i:i + chunk], w[:, i:i + chunk])
             for i in range(0, chunk * split, chunk)]
    parts += [parts[0].new_zeros(parts[0].shape)] * (split - len(parts))
    return torch.stack(parts[:split])


def fused_triton(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor, split: int = 1,
                 block_n: int = 64, block_m: int = 16, gpi: int = 1) -> Tensor:
    """The fused kernel with given tiles (no tuning), e.g. for ``TRITON_INTERPRET=1`` tests."""
    return _fused(x2, qweight, scales, offsets, split, block_n, block_m, 4, 2, gpi)


@torch.library.custom_op('vla_ros::int4_mm', mutates_args=())
def int4_mm(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor, split: int) -> Tensor:
    """Return ``x @ W.T`` for int4 W: (M, N) in x's dtype, or (split, M, N) fp32 partial sums.

    ``split`` is ``split_for(N, K, device)``, used for at most ``SKINNY_ROWS`` rows
    (``output_shape``); the caller adds partials (``quant.linear``).
    """
    if x.is_cuda and triton is not None:
        from vla_ros.policy.cache import tuned

        if len(output_shape(x.shape[0], qweight.shape[0], split)) == 2:
            split = 1
        key = f'int4_mm:{x.shape[0]}x{x.shape[1]}->{qweight.shape[0]}/{split}'
        return tuned(key, candidates(x.contiguous(), qweight, scales, offsets, split))()
    return int4_matmul_reference(x, qweight, scales, offsets, split)


@int4_mm.register_fake
def _int4_mm_fake(x, qweight, scales, offsets, split):
    shape = output_shape(x.shape[0], qweight.shape[0], split)
    return x.new_empty(shape, dtype=torch.float32 if len(shape) == 3 else x.dtype)
