"""Int4 weight-only matmul kernels (Triton) for ``quant.Int4Linear``.

A GEMV for decoding (one row) and, for the prefill, a fused dequantize-GEMM or a dequantize
kernel followed by cuBLAS (whichever is faster for the weight shape, timed at first use).

Layout (chosen for these kernels, simple on purpose):

* ``qweight`` uint8 (N, K/2): byte ``[n, j]`` holds column ``2j`` in its low nibble and ``2j+1``
  in its high nibble; codes q in [0, 15].
* ``scales``, ``offsets`` (K/group, N) fp16, so that ``w[n, k] = q[n, k] * scale[g, n] +
  offset[g, n]`` with ``g = k // group`` (asymmetric, ``offset = min``). Stored group-major so
  that one group's values for a block of rows are contiguous.

The GEMV uses ``sum_k w x = sum_g scale * (sum_{k in g} q x) + offset * (sum_{k in g} x)``, so the
inner loop multiplies integer codes by the activation and applies the scale once per group. The
GEMM dequantizes each weight tile in registers and feeds the tensor cores. Both read the packed
weights once (0.5 byte per weight plus 4 bytes per group of 128).

``int4_linear`` is registered as a torch custom op (``vla_ros::int4_linear``) so that
``torch.compile`` treats it as one opaque call and CUDA graphs capture it. On the CPU it
dequantizes with torch and calls ``F.linear`` (slow, for tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None

#: How the prefill (more than one row) runs on CUDA: 'fused' (dequantize inside the GEMM),
#: 'dequant' (dequantize the whole weight into a bf16 scratch tensor, then cuBLAS), or 'auto'
#: (time both at the first call of each weight shape, outside graph capture, keep the faster).
PREFILL_MODE = 'auto'
_AUTO_CHOICE: dict[tuple[int, int], str] = {}


def pack_int4(q: Tensor) -> Tensor:
    """Codes (N, K) in [0, 15] -> uint8 (N, K/2), low nibble = even column."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(qweight: Tensor) -> Tensor:
    """uint8 (N, K/2) -> codes (N, K) as uint8."""
    lo, hi = qweight & 0xF, qweight >> 4
    return torch.stack([lo, hi], dim=-1).reshape(qweight.shape[0], -1)


def dequantize_torch(qweight: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
                     dtype: torch.dtype) -> Tensor:
    """Reference dequantization (N, K) in ``dtype``, computed in fp32."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    m = offsets.float().t().repeat_interleave(group_size, dim=1)
    return (q * s + m).to(dtype)


if triton is not None:

    @triton.jit
    def _unpack_tile(b):
        """uint8 [R, C] -> int codes [R, 2C] (column 2j from the low nibble of byte j)."""
        lo = b & 0xF
        hi = b >> 4
        q = tl.join(lo, hi)  # [R, C, 2]
        return tl.reshape(q, (b.shape[0], 2 * b.shape[1]))

    def _prune_gemv(configs, named_args, **kwargs):
        chunk = named_args['K_CHUNK']
        return [c for c in configs if chunk % c.kwargs['BLOCK_K'] == 0] or configs[-1:]

    @triton.autotune(
        configs=[
            triton.Config({'BLOCK_N': bn, 'BLOCK_K': bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in [(8, 512, 4, 3), (16, 512, 4, 3), (16, 256, 4, 4),
                                  (32, 256, 4, 3), (8, 1024, 4, 3), (32, 512, 8, 3),
                                  (64, 256, 8, 3), (4, 1024, 4, 4), (16, 128, 2, 4)]
        ],
        key=['N', 'K', 'K_CHUNK'],
        prune_configs_by={'early_config_prune': _prune_gemv},
    )
    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, N, K, K_CHUNK,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: BLOCK_N rows over the whole K, BLOCK_K columns per step. The codes are
        # read as int32 words (word j = columns 8j..8j+7, column 8j+t in bits 4t..4t+3) and
        # turned into floats without conversion instructions: OR-ing a code into the mantissa
        # of 2^23 and subtracting 2^23 gives it exactly (int-to-float conversions run at a
        # fraction of the FMA rate and would bound the kernel). The accumulator stays
        # element-wise ([rows, groups, words per group]); the loop has no reduction, and the
        # scale and offset of each group are applied as sum(q x) * s + sum(x) * m. With a split
        # K (program_id(1) > 0 exists), each program covers K_CHUNK columns and writes one row
        # of partial sums y[split, N] (fp32), summed by the caller.
        WPB: tl.constexpr = BLOCK_K // 8
        NG: tl.constexpr = BLOCK_K // GROUP
        WPG: tl.constexpr = GROUP // 8
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rj = tl.arange(0, WPB)
        rg = tl.arange(0, NG)
        words_per_row = K // 8
        k_begin = pid_k * K_CHUNK
        k_end = tl.minimum(k_begin + K_CHUNK, K)
        acc = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            w = tl.load(qw_ptr + rn[:, None] * words_per_row + (k0 // 8 + rj)[None, :],
                        mask=nmask[:, None], other=0)
            p = tl.zeros([BLOCK_N, WPB], dtype=tl.float32)
            xs = tl.zeros([WPB], dtype=tl.float32)
            for t in tl.static_range(8):
                xt = tl.load(x_ptr + k0 + 8 * rj + t).to(tl.float32)
                c = (((w >> (4 * t)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                p += (c - 8388608.0) * xt[None, :]
                xs += xt
            gofs = (k0 // GROUP + rg)[None, :] * N + rn[:, None]
            sc = tl.load(s_ptr + gofs, mask=nmask[:, None], other=0).to(tl.float32)
            mc = tl.load(m_ptr + gofs, mask=nmask[:, None], other=0).to(tl.float32)
            acc += (tl.reshape(p, (BLOCK_N, NG, WPG)) * sc[:, :, None]
                    + tl.reshape(xs, (1, NG, WPG)) * mc[:, :, None])
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + pid_k * N + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.autotune(
        configs=[
            triton.Config({'BLOCK_M': bm, 'BLOCK_N': bn, 'BLOCK_K': bk, 'W_LHS': lhs},
                          num_warps=w, num_stages=st)
            for bm, bn, bk, lhs, w, st in [
                (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (64, 128, 128, 1, 4, 3),
                (128, 64, 64, 1, 4, 4), (128, 128, 128, 1, 8, 3), (64, 256, 64, 1, 8, 3),
                (32, 128, 128, 1, 4, 4), (128, 128, 64, 0, 8, 3), (64, 128, 64, 0, 4, 4)]
        ],
        key=['N', 'K'],
    )
    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, W_LHS: tl.constexpr):
        # Tile: BLOCK_M activation rows x BLOCK_N weight rows, K in BLOCK_K steps (within one
        # quantization group). The weight tile is dequantized in registers; with W_LHS it is
        # the left operand (y^T = W x^T), which the Hopper tensor cores can take from
        # registers, while x goes through shared memory.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        rk = tl.arange(0, BLOCK_K)
        rh = tl.arange(0, BLOCK_K // 2)
        if W_LHS:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                         mask=mmask[:, None], other=0.0)
            b = tl.load(qw_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rh)[None, :],
                        mask=nmask[:, None], other=0)
            q = _unpack_tile(b).to(tl.float32)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)
            m = tl.load(m_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)
            w = (q * s[:, None] + m[:, None]).to(xt.dtype)
            if W_LHS:
                acc = tl.dot(w, tl.trans(xt), acc)
            else:
                acc = tl.dot(xt, tl.trans(w), acc)
        if W_LHS:
            tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None],
                     acc.to(y_ptr.dtype.element_ty), mask=mmask[None, :] & nmask[:, None])
        else:
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, m_ptr, w_ptr, N, K, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        g = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rh = tl.arange(0, GROUP // 2)
        b = tl.load(qw_ptr + rn[:, None] * (K // 2) + (g * GROUP // 2 + rh)[None, :],
                    mask=nmask[:, None], other=0)
        q = _unpack_tile(b).to(tl.float32)
        s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)
        m = tl.load(m_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)
        w = q * s[:, None] + m[:, None]
        rk = g * GROUP + tl.arange(0, GROUP)
        tl.store(w_ptr + rn[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=nmask[:, None])


def dequantize_cuda(qweight: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
                    dtype: torch.dtype) -> Tensor:
    """Dequantize on the GPU into a new (N, K) tensor of ``dtype`` (the prefill's scratch)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(n, k, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n, 32), k // group_size)
    _dequant_kernel[grid](qweight, scales, offsets, w, n, k, GROUP=group_size, BLOCK_N=32,
                          num_warps=4)
    return w


def _int4_linear_cuda(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor,
                      group_size: int) -> Tensor:
    m, k = x2.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if m == 1:
        _gemv(x2, qweight, scales, offsets, y, group_size)
    else:
        mode = PREFILL_MODE
        if mode == 'auto':
            mode = _AUTO_CHOICE.get((n, k))
            if mode is None:
                if torch.cuda.is_current_stream_capturing():
                    mode = 'dequant'
                else:
                    mode = _AUTO_CHOICE[(n, k)] = _pick(
                        {'fused': lambda: _mm(x2, qweight, scales, offsets, y, group_size),
                         'dequant': lambda: F.linear(x2, dequantize_cuda(
                             qweight, scales, offsets, group_size, x2.dtype))})
        if mode == 'dequant':
            return F.linear(x2, dequantize_cuda(qweight, scales, offsets, group_size, x2.dtype))
        _mm(x2, qweight, scales, offsets, y, group_size)
    return y


def _gemv(x2, qweight, scales, offsets, y, group_size, split: int = 1) -> None:
    """Y (split, N): split == 1 -> the product (bf16), else fp32 partial sums over K chunks."""
    n, k = qweight.shape[0], x2.shape[1]
    groups = k // group_size
    chunk = -(-groups // split) * group_size
    grid = lambda meta: (triton.cdiv(n, meta['BLOCK_N']), split)  # noqa: E731
    _gemv_kernel[grid](x2, qweight.view(torch.int32), scales, offsets, y, n, k, chunk,
                       GROUP=group_size)


def gemv_split(n: int, k: int, group_size: int) -> int:
    """How many K chunks the one-row product of an (n, k) weight runs in.

    Few rows and a long K (Llama's down projection: 4096 x 11008) leave too few programs for
    132 SMs; splitting K multiplies them, at the price of a (split, N) fp32 sum (fused into the
    next element-wise kernel under torch.compile).
    """
    if n > 8192:
        return 1
    return max(1, min(8, k // 2048, k // group_size))


def _mm(x2, qweight, scales, offsets, y, group_size) -> None:
    m, k = x2.shape
    n = qweight.shape[0]
    grid = lambda meta: (triton.cdiv(n, meta['BLOCK_N']),  # noqa: E731
                         triton.cdiv(m, meta['BLOCK_M']))
    _gemm_kernel[grid](x2, qweight, scales, offsets, y, m, n, k, x2.stride(0), y.stride(0),
                 GROUP=group_size)


def _pick(runs: dict) -> str:
    """Return the name of the fastest of ``runs`` (ways to compute the same product).

    Each is warmed up (which also autotunes) and timed; called once per weight shape,
    outside graph capture.
    """
    times = {}
    for name, fn in runs.items():
        fn()  # autotunes / warms up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end)
    return min(times, key=times.get)


def prefill_mode_choices() -> dict[str, str]:
    """What was chosen per weight shape (N x K), for benchmark records."""
    return {f'{n}x{k}': mode for (n, k), mode in _AUTO_CHOICE.items()}


@torch.library.custom_op('vla_ros::int4_linear', mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor,
                group_size: int) -> Tensor:
    """Y = x @ W.T for int4 W (layout in the module docstring); x (..., K) bf16 on CUDA."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.is_cuda and triton is not None:
        y = _int4_linear_cuda(x2.contiguous(), qweight, scales, offsets, group_size)
    else:
        y = F.linear(x2, dequantize_torch(qweight, scales, offsets, group_size, x2.dtype))
    return y.reshape(*shape[:-1], qweight.shape[0])


@int4_linear.register_fake
def _int4_linear_fake(x, qweight, scales, offsets, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op('vla_ros::int4_gemv_partials', mutates_args=())
def int4_gemv_partials(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor,
                       group_size: int, split: int) -> Tensor:
    """Partial sums (split, N) fp32 of one row x (1, K) times int4 W.T over ``split`` K chunks."""
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(1, k)
    if x.is_cuda and triton is not None:
        y = torch.empty(split, n, device=x.device, dtype=torch.float32)
        _gemv(x2.contiguous(), qweight, scales, offsets, y, group_size, split)
        return y
    w = dequantize_torch(qweight, scales, offsets, group_size, torch.float32)
    chunk = -(-(k // group_size) // split) * group_size
    return torch.stack([F.linear(x2.float()[:, i:i + chunk], w[:, i:i + chunk])[0]
                        for i in range(0, chunk * split, chunk)])


@int4_gemv_partials.register_fake
def _int4_gemv_partials_fake(x, qweight, scales, offsets, group_size, split):
    return x.new_empty(split, qweight.shape[0], dtype=torch.float32)
