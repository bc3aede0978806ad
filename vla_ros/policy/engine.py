"""The hot path: a static-shape greedy decoder for OpenVLA's Llama, and a graphed vision path.

OpenVLA decodes exactly 7 tokens after a ~280-token prefix (BOS + 256 image patches + prompt),
one sample at a time. At that size a decode step is bound by reading the weights once, and the
rest of the time goes into launching ~1000 small kernels per step, not into arithmetic. So:

* a readable Llama forward (RMSNorm, RoPE, attention, SwiGLU MLP) that reads the weights of the
  transformers ``LlamaForCausalLM`` it is given (no copy, and no dependency on transformers'
  cache or attention classes, which change between releases), with a preallocated KV cache;
* the prefill (prefix padded to a length bucket) and the single-token decode step each captured
  once as a CUDA graph over static buffers; the greedy ``argmax`` (with the allowed-token mask
  applied inside the graph) feeds the next step's token buffer on the device, so the 6 decode
  steps run without a host sync; optionally both are ``torch.compile``d first;
* ``vision_fn`` (the two ViTs of the fused featurizer on two streams) and ``GraphedModule``,
  which replays a fixed-shape callable (vision + projector) as a CUDA graph.

On the CPU the same code runs eagerly. The linear layers are called as modules, so layers
swapped for quantized ones (``quant.py``) run through the same forward; plain bias-free q/k/v
and gate/up projections are fused (the modules' weights become views into the fused tensor, so
memory does not grow), int4 ones by concatenating their packed codes.

Why a forward of our own rather than transformers' ``StaticCache``: one short file holds the
whole hot path (what runs in the graph is visible), the decode step's inputs (token, position,
step) live in device buffers that the graph advances itself, and the code does not move with
transformers' cache API (5.17 on the GPU machine, 5.24 here). The price: the forward must match
Llama's numerics, which the tests check token for token against transformers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from vla_ros.core.errors import ConfigError
from vla_ros.policy.quant import fuse_int4_linears

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Model pieces (mirror transformers' Llama numerics: norm in fp32, rotate-half RoPE in the
# activation dtype).
# ---------------------------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm: normalize in fp32, cast back, then scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE; x is (B, heads, T, head_dim), cos/sin are (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(config, positions: int, device, dtype) -> tuple[Tensor, Tensor]:
    """Cos/sin tables (positions, head_dim) for the checkpoint's RoPE, as transformers has them."""
    head_dim = (getattr(config, 'head_dim', None)
                or config.hidden_size // config.num_attention_heads)
    params = getattr(config, 'rope_parameters', None) or {}
    rope_type = params.get('rope_type', params.get('type', 'default'))
    scaling = 1.0
    if rope_type == 'default':
        theta = params.get('rope_theta', getattr(config, 'rope_theta', 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    else:
        try:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, 'cpu')
        except (ImportError, KeyError) as exc:
            raise ConfigError(f'text_config rope_type {rope_type!r} is not supported by the '
                              'decode engine') from exc
        if rope_type == 'dynamic':
            raise ConfigError("text_config rope_type 'dynamic' is not supported by the decode "
                              'engine (its frequencies depend on the sequence length)')
    inv_freq = inv_freq.to(device=device, dtype=torch.float)
    freqs = torch.arange(positions, device=device, dtype=torch.float)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class Decoded(NamedTuple):
    """What a greedy decode returns, each (n_tokens,) on the engine's device.

    ``tokens``: the chosen ids (long). ``probs``: the probability of each chosen token (float32;
    softmax over the allowed ids when decoding is constrained, over the whole vocabulary
    otherwise). ``margins``: ``probs`` minus the runner-up token's probability (>= 0).
    """

    tokens: Tensor
    probs: Tensor
    margins: Tensor


def pick_tokens(logits: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy choice with its confidence: ``(ids, p_chosen, p_chosen - p_runner_up)``.

    ``logits`` (..., vocab) in any float dtype; ``bias`` (vocab,) holds 0 for allowed ids and
    -inf for the others (None: every id allowed), so the softmax runs over the allowed ids
    only. All on the device, no host sync: it runs inside the captured graphs.
    """
    logits = logits.float()
    if bias is not None:
        logits = logits + bias
    ids = logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    top2 = probs.topk(2, dim=-1).values
    chosen = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return ids, chosen, chosen - top2[..., 1]


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _fuse_linears(mods: list[nn.Linear]) -> nn.Linear:
    """One linear over the concatenated (output-axis) weights of plain bias-free linears.

    The original modules' weights become views of the fused tensor, so the model still computes
    the same function and no memory is added.
    """
    fused = torch.cat([m.weight.detach() for m in mods], dim=0)
    start = 0
    for m in mods:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    out = nn.Linear(fused.shape[1], fused.shape[0], bias=False, device='meta')
    out.weight = nn.Parameter(fused, requires_grad=False)
    return out


def fuse_projections(mods: list[nn.Module]) -> nn.Module | None:
    """A single module computing ``cat([m(x) for m in mods], -1)``, or None if they can't fuse."""
    if all(_plain_linear(m) for m in mods) and len({m.weight.dtype for m in mods}) == 1:
        return _fuse_linears(mods)
    return fuse_int4_linears(mods)


@dataclass
class _Layer:
    """One decoder layer, as references into the transformers module (plus fused projections)."""

    ln1: Tensor
    ln2: Tensor
    qkv: nn.Module | None       # fused q/k/v projection, or None to call q, k, v
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate_up: nn.Module | None   # fused gate/up projection, or None
    gate: nn.Module
    up: nn.Module
    down: nn.Module


# ---------------------------------------------------------------------------------------------
# Decode engine
# ---------------------------------------------------------------------------------------------

class DecodeEngine:
    """Greedy decoding with a preallocated KV cache, graphed prefill and graphed decode step.

    Args:
        language_model: a transformers ``LlamaForCausalLM`` (weights final: merge LoRA and
            quantize before building the engine; the engine reads the weights, it does not copy
            them, except that q/k/v and gate/up projections are fused: plain weights in place,
            int4 weights by concatenating their packed tiles).
        max_seq_len: KV-cache length; a call needs prefix length + n_tokens - 1 positions.
        allowed_token_ids: if given, decoding is constrained to these ids (logits of all other
            ids are set to -inf before the argmax, inside the graph). ``None``: unconstrained.
        use_cuda_graph: replay prefill and decode step as CUDA graphs (CUDA only; ignored on
            the CPU). If a capture fails (a quantized layer that cannot be captured) the engine
            logs why (``graph_error``) and runs eagerly.
        compile_step: wrap the engine's two steps, prefill and decode step, in
            ``torch.compile`` (fuses the small element-wise kernels: norms, RoPE, SiLU,
            residuals) before the graph capture. Compilation takes about 40 s for the decode
            step and for each prefill length bucket.
        fuse_projections: fuse q/k/v and gate/up (see above).
        prefill_bucket: prefixes are zero-padded on the right to a multiple of this, so that
            one prefill graph serves every prompt length in a bucket. Padding sits after the
            real tokens, so causal attention never sees it, and the decode step overwrites its
            cache rows before they are unmasked.
    """

    def __init__(self, language_model: nn.Module, max_seq_len: int,
                 allowed_token_ids: Tensor | None = None, use_cuda_graph: bool = True,
                 compile_step: bool = False, fuse_projections: bool = True,
                 prefill_bucket: int = 16) -> None:
        cfg = language_model.config
        if max_seq_len < 2:
            raise ConfigError(f'max_seq_len must be >= 2, got {max_seq_len}')
        if prefill_bucket < 1:
            raise ConfigError(f'prefill_bucket must be >= 1, got {prefill_bucket}')
        self.config = cfg
        self.max_seq_len = int(max_seq_len)
        self.prefill_bucket = int(prefill_bucket)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, 'num_key_value_heads', None) or self.n_heads
        self.head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = 1.0 / math.sqrt(self.head_dim)

        body = language_model.model
        self.embed = body.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        if self.device.type == 'meta':
            raise ConfigError('the language model is still on the meta device; load weights first')
        self.hidden = self.embed.shape[1]
        self.norm = body.norm.weight
        self.lm_head = language_model.lm_head
        self.vocab_size = self.embed.shape[0]
        self.layers = [self._wrap_layer(layer, fuse_projections) for layer in body.layers]

        with torch.inference_mode():
            self._build_buffers(allowed_token_ids)

        self.use_cuda_graph = bool(use_cuda_graph) and self.device.type == 'cuda'
        self.graph_error: str | None = None
        self._decode_graph: torch.cuda.CUDAGraph | None = None
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_inputs: dict[int, Tensor] = {}
        self._step_fn: Callable[[], None] = self._decode_step
        self._prefill_fn: Callable[[Tensor], None] = self._prefill
        if compile_step:
            self._step_fn = torch.compile(self._decode_step, fullgraph=True, dynamic=False)
            self._prefill_fn = torch.compile(self._prefill, fullgraph=True, dynamic=False)

    # -- construction ------------------------------------------------------------------------

    def _wrap_layer(self, layer: nn.Module, fuse: bool) -> _Layer:
        att, mlp = layer.self_attn, layer.mlp
        qkv = fuse_projections([att.q_proj, att.k_proj, att.v_proj]) if fuse else None
        gate_up = fuse_projections([mlp.gate_proj, mlp.up_proj]) if fuse else None
        return _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                      qkv, att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                      gate_up, mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def _build_buffers(self, allowed: Tensor | None) -> None:
        dev, s = self.device, self.max_seq_len
        # One (1, kv_heads, max_seq_len, head_dim) tensor per layer: separate buffers keep the
        # in-place cache writes simple for torch.compile.
        shape = (1, self.n_kv, s, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.layers]
        self.cos, self.sin = rope_tables(self.config, s, dev, self.dtype)
        self.positions = torch.arange(s, device=dev)
        self.logit_bias: Tensor | None = None
        if allowed is not None:
            ids = torch.as_tensor(allowed, dtype=torch.long).flatten()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ConfigError(f'allowed_token_ids must be non-empty ids in [0, '
                                  f'{self.vocab_size}), got {ids.numel()} ids')
            bias = torch.full((self.vocab_size,), float('-inf'), device=dev)
            bias[ids.to(dev)] = 0.0
            self.logit_bias = bias
        # Static inputs/outputs of the graphs: the real prefix length, the token to embed, its
        # position, the step counter (index into out_tokens). The graphs advance them on the
        # device, so no host sync is needed between steps.
        self.prefix_len = torch.zeros(1, dtype=torch.long, device=dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_tokens = torch.zeros(s, dtype=torch.long, device=dev)
        self.out_probs = torch.zeros(s, dtype=torch.float32, device=dev)
        self.out_margins = torch.zeros(s, dtype=torch.float32, device=dev)

    # -- the forward -------------------------------------------------------------------------

    def _attention_block(self, i: int, lay: _Layer, x: Tensor, cos: Tensor, sin: Tensor,
                         decode_pos: Tensor | None, decode_mask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        h = rms_norm(x, lay.ln1, self.eps)
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if lay.qkv is not None:
            q, k, v = lay.qkv(h).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = lay.q(h), lay.k(h), lay.v(h)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if decode_pos is None:      # prefill: positions 0..t-1, causal attention over the prefix
            self.k_cache[i][:, :, :t].copy_(k)
            self.v_cache[i][:, :, :t].copy_(v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=gqa)
        else:                       # one token at decode_pos, attending to cache[:pos + 1]
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.index_copy_(2, decode_pos, k)
            vc.index_copy_(2, decode_pos, v)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=decode_mask, scale=self.scale,
                                               enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, t, nq)
        return x + lay.o(y)

    def _mlp_block(self, lay: _Layer, x: Tensor) -> Tensor:
        h = rms_norm(x, lay.ln2, self.eps)
        if lay.gate_up is not None:
            gate, up = lay.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = lay.gate(h), lay.up(h)
        return x + lay.down(F.silu(gate) * up)

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor, last: Tensor | None,
                 decode_pos: Tensor | None = None,
                 decode_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Run all layers on x (1, T, hidden); return the next token (``pick_tokens``), (1,) each.

        The token is read off row ``last`` (a (1,) index tensor; None: the last row).
        """
        for i, lay in enumerate(self.layers):
            x = self._attention_block(i, lay, x, cos, sin, decode_pos, decode_mask)
            x = self._mlp_block(lay, x)
        x = x[:, -1] if last is None else x.index_select(1, last)[:, 0]
        return pick_tokens(self.lm_head(rms_norm(x, self.norm, self.eps)), self.logit_bias)

    def _record(self, index: Tensor, picked: tuple[Tensor, Tensor, Tensor]) -> None:
        nxt, prob, margin = picked
        self.token.copy_(nxt)
        self.out_tokens.index_copy_(0, index, nxt)
        self.out_probs.index_copy_(0, index, prob)
        self.out_margins.index_copy_(0, index, margin)

    def _prefill(self, x: Tensor) -> None:
        """Prefill the cache from the padded prefix x (1, T, hidden).

        The real length is ``self.prefix_len``. Writes out_tokens[0] and sets token, pos and
        step for the decode steps.
        """
        t = x.shape[1]
        self.step.zero_()
        self._record(self.step, self._forward(x, self.cos[:t], self.sin[:t], self.prefix_len - 1))
        self.pos.copy_(self.prefix_len)
        self.step.fill_(1)

    def _decode_step(self) -> None:
        """One token: embed self.token at self.pos, write out_tokens[step], advance all three."""
        x = F.embedding(self.token, self.embed).view(1, 1, -1)
        cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)
        self._record(self.step, self._forward(x, cos, sin, None, self.pos, mask))
        self.pos.add_(1)
        self.step.add_(1)

    # -- graphs ------------------------------------------------------------------------------

    def _capture(self, fn: Callable[[], None], before: Callable[[], None]) -> \
            torch.cuda.CUDAGraph | None:
        """Warm ``fn`` up on a side stream (compiling it if asked), then capture it.

        ``before`` resets the static state before each run. Returns None (and switches the
        engine to eager mode, saying why) if the capture fails.
        """
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    before()
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            before()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return graph
        except Exception as exc:  # a layer that cannot be captured: run eagerly, say why
            self.graph_error = f'{type(exc).__name__}: {exc}'
            self.use_cuda_graph = False
            logger.warning('CUDA graph capture failed, running eagerly: %s', self.graph_error)
            torch.cuda.synchronize(self.device)
            return None

    def _reset_decode_state(self) -> None:
        self.pos.zero_()
        self.step.zero_()

    def _padded_length(self, length: int) -> int:
        b = self.prefill_bucket
        return min(self.max_seq_len, -(-length // b) * b)

    def warmup(self, prefix_lengths: tuple[int, ...] = ()) -> None:
        """Capture the decode graph and the prefill graphs for these prefix lengths now.

        Otherwise the first ``generate`` of each length bucket does (and, with
        ``compile_step``, compiles), which makes that call slow.
        """
        for length in prefix_lengths or (1,):
            self.generate(torch.zeros(1, length, self.hidden, device=self.device,
                                      dtype=self.dtype), 2)

    @property
    def graph_captured(self) -> bool:
        """Whether the decode step replays as a CUDA graph."""
        return self._decode_graph is not None

    # -- public ------------------------------------------------------------------------------

    def generate(self, inputs_embeds: Tensor, n_tokens: int = 7) -> Decoded:
        """Greedy-decode ``n_tokens`` after the prefix.

        Returns ``Decoded`` (tokens, probs, margins), each (n_tokens,) on the engine's device
        (fresh tensors, not views of the engine's buffers).

        ``inputs_embeds`` is (1, L, hidden) in the model's dtype (what ``embed_prefix`` returns).
        The call's state lives in the cache positions it writes; positions left over from
        earlier calls are masked out or overwritten, so calls do not leak into each other.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1 \
                or inputs_embeds.shape[2] != self.hidden:
            raise ConfigError(f'inputs_embeds must be (1, L, hidden={self.hidden}): the engine '
                              f'decodes one sample at a time, got {tuple(inputs_embeds.shape)}')
        length = inputs_embeds.shape[1]
        if n_tokens < 1:
            raise ConfigError(f'n_tokens must be >= 1, got {n_tokens}')
        if length < 1 or length + n_tokens - 1 > self.max_seq_len:
            raise ConfigError(f'a prefix of {length} tokens plus {n_tokens} new tokens needs '
                              f'{length + n_tokens - 1} cache positions, more than max_seq_len='
                              f'{self.max_seq_len}; build the engine with a larger max_seq_len')
        with torch.inference_mode():
            padded = self._padded_length(length)
            buf = self._prefill_inputs.get(padded)
            if buf is None:
                buf = torch.zeros(1, padded, self.hidden, device=self.device, dtype=self.dtype)
                self._prefill_inputs[padded] = buf
            buf[:, :length].copy_(inputs_embeds)
            if padded > length:
                buf[:, length:].zero_()
            self.prefix_len.fill_(length)

            if self.use_cuda_graph and padded not in self._prefill_graphs:
                graph = self._capture(lambda: self._prefill_fn(buf), lambda: None)
                if graph is not None:
                    self._prefill_graphs[padded] = graph
            if self.use_cuda_graph and self._decode_graph is None and n_tokens > 1:
                self._decode_graph = self._capture(self._step_fn, self._reset_decode_state)
            # (captures ran warm-up steps on scratch state; the prefill below resets all of it)
            if self.use_cuda_graph:
                self._prefill_graphs[padded].replay()
            else:
                self._prefill_fn(buf)
            for _ in range(n_tokens - 1):
                if self.use_cuda_graph:
                    self._decode_graph.replay()
                else:
                    self._step_fn()
            return Decoded(self.out_tokens[:n_tokens].clone(), self.out_probs[:n_tokens].clone(),
                           self.out_margins[:n_tokens].clone())


# ---------------------------------------------------------------------------------------------
# The vision path
# ---------------------------------------------------------------------------------------------

def vision_fn(model: nn.Module, parallel: bool = True,
              torch_compile: bool = False) -> Callable[[Tensor], Tensor]:
    """``pixel_values -> projected patches`` for an ``OpenVLA`` model, for ``GraphedModule``.

    The two ViTs of a fused backbone (DINOv2 on channels 0:3, SigLIP on 3:6) are independent
    and, at 256 tokens, too small to fill an H100 on their own, so with ``parallel`` (CUDA
    only) the second runs on a side stream concurrently with the first; a CUDA graph captures
    the fork and join. ``torch_compile`` compiles each ViT and the projector (fuses the
    element-wise work between the GEMMs). On the CPU it runs the ViTs one after the other,
    computing what ``model.project_patches`` computes.
    """
    backbone, projector = model.vision_backbone, model.projector
    vits = list(backbone.featurizers)
    feats = [lambda x, v=v: backbone.vit_features(v, x) for v in vits]
    if torch_compile:
        feats = [torch.compile(f, dynamic=False) for f in feats]
        projector = torch.compile(projector, dynamic=False)
    device, dtype = model.device, model.dtype
    if not parallel or len(vits) < 2 or device.type != 'cuda':
        def run_serial(px: Tensor) -> Tensor:
            px = px.to(device=device, dtype=dtype)
            out = [f(px[:, 3 * i:3 * i + 3]) for i, f in enumerate(feats)]
            return projector(out[0] if len(out) == 1 else torch.cat(out, dim=2))
        return run_serial
    side = torch.cuda.Stream(device)

    def run_parallel(px: Tensor) -> Tensor:
        px = px.to(device=device, dtype=dtype)
        main = torch.cuda.current_stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            second = feats[1](px[:, 3:6])
        first = feats[0](px[:, 0:3])
        main.wait_stream(side)
        second.record_stream(main)
        return projector(torch.cat([first, second], dim=2))
    return run_parallel


# ---------------------------------------------------------------------------------------------
# Fixed-shape module replay (the vision path)
# ---------------------------------------------------------------------------------------------

class GraphedModule:
    """Replays ``fn(x)`` for a fixed input shape as a CUDA graph.

    Meant for the vision featurizer + projector, whose input is always (1, 6, 224, 224): one
    replay instead of ~700 kernel launches. The input is copied into a static buffer; a new
    shape or dtype triggers a re-capture. On the CPU (or with ``enabled=False``) it just calls
    ``fn``. The returned tensor is a clone unless ``clone_output=False``, in which case it is
    the static output buffer and is overwritten by the next call.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], example_input: Tensor,
                 enabled: bool = True, clone_output: bool = True, warmup_iters: int = 2) -> None:
        self.fn = fn
        self.clone_output = clone_output
        self.warmup_iters = warmup_iters
        self.enabled = enabled and example_input.is_cuda
        self._graph: torch.cuda.CUDAGraph | None = None
        self._in: Tensor | None = None
        self._out: Tensor | None = None
        if self.enabled:
            self._capture(example_input)

    def _capture(self, example: Tensor) -> None:
        with torch.inference_mode():
            self._in = example.detach().clone()
            side = torch.cuda.Stream(example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self.fn(self._in)
            torch.cuda.current_stream(example.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self.fn(self._in)
            self._graph = graph

    def __call__(self, x: Tensor) -> Tensor:
        """Run ``fn(x)`` (by graph replay on CUDA)."""
        if not self.enabled:
            with torch.inference_mode():
                return self.fn(x)
        if x.shape != self._in.shape or x.dtype != self._in.dtype or x.device != self._in.device:
            self._capture(x)
        with torch.inference_mode():
            self._in.copy_(x)
            self._graph.replay()
            return self._out.clone() if self.clone_output else self._out
