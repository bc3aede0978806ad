"""The hot path: a static-shape, batched greedy decoder for OpenVLA's Llama, and the vision path.

OpenVLA decodes exactly 7 tokens after a ~280-token prefix (BOS + 256 image patches + prompt).
At that size a decode step is bound by reading the weights once, and the rest of the time goes
into launching small kernels, not into arithmetic. So:

* a readable Llama forward (RMSNorm, RoPE, attention, SwiGLU MLP) over the tensors of the
  transformers ``LlamaForCausalLM`` it is given (no copy: q/k/v and gate/up are fused and the
  modules' weights become views of the fused tensors), with a preallocated KV cache and no
  dependency on transformers' cache or attention classes, which change between releases;
* batches: B prefixes of different lengths, right-padded to one length bucket, run as one
  prefill (causal attention never lets a sample see its own padding) and then B tokens per
  decode step, each at its own position (a per-sample mask hides the padding rows until the
  step overwrites them); the greedy choice (``pick_tokens``: allowed-token mask, argmax,
  probability and margin) runs on the device and feeds the next step's token buffer, so the
  decode steps need no host sync;
* on CUDA, one decoder layer, the head and the small per-step glue are ``torch.compile``d once
  (the same compiled layer serves all 32 layers: compile time does not grow with depth, and a
  restart loads it from the cache of ``vla_ros.policy.cache``), and the prefill and the decode
  step of each (batch, length) shape are captured as CUDA graphs. A compile or capture failure
  logs one warning and runs the same forward eagerly; the CPU always runs it eagerly.
* ``vision_fn`` (the two ViTs of the fused featurizer on two streams, compiled on CUDA) and
  ``GraphedModule``, which replays a fixed-shape callable (vision + projector) as a CUDA graph
  per input shape.

Linear layers are read as ``quant.Dense`` or ``quant.Int4Weight`` tensors and computed with
``quant.linear``, so float and int4 models run through the same forward.

Why a forward of our own rather than transformers' ``StaticCache``: one short file holds the
whole hot path (what runs in the graph is visible), the decode step's inputs (tokens, positions,
step) live in device buffers that the graph advances itself, and batches of different prompt
lengths need per-sample positions. The price: the forward must match Llama's numerics, which
the tests check token for token against transformers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from vla_ros.core.errors import ConfigError
from vla_ros.policy.quant import LinearWeights, fuse_weights, layer_weights, linear

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
    """Rotate-half RoPE; x is (B, heads, T, head_dim), cos/sin broadcast to it."""
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
    """What a greedy decode returns, each (B, n_tokens) on the engine's device.

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


class LayerWeights(NamedTuple):
    """The tensors of one decoder layer, as the compiled layer function takes them."""

    ln1: Tensor
    qkv: LinearWeights
    o: LinearWeights
    ln2: Tensor
    gate_up: LinearWeights
    down: LinearWeights


def _bucket(value: int, step: int) -> int:
    return -(-value // step) * step


# ---------------------------------------------------------------------------------------------
# Decode engine
# ---------------------------------------------------------------------------------------------

class DecodeEngine:
    """Batched greedy decoding with a preallocated KV cache and graphed prefill/decode steps.

    Args:
        language_model: a transformers ``LlamaForCausalLM`` whose linear layers are plain or
            ``quant.Int4Linear`` (merge LoRA and quantize before building the engine). The
            engine reads its tensors; q/k/v and gate/up are fused (the modules keep working,
            on views of the fused tensors).
        max_seq_len: the longest prefix + new tokens a call may need (cache positions). The
            cache itself grows on demand up to this, in steps of ``prefill_bucket``.
        allowed_token_ids: if given, decoding is constrained to these ids (logits of all other
            ids are -inf before the argmax and the softmax). ``None``: unconstrained.
        use_cuda_graph: replay prefill and decode step as CUDA graphs (CUDA only).
        compile: ``torch.compile`` the layer, the head and the step glue (CUDA only).
        prefill_bucket: prefixes are zero-padded on the right to a multiple of this, so that
            one prefill graph serves every prompt length in a bucket.
    """

    def __init__(self, language_model: nn.Module, max_seq_len: int,
                 allowed_token_ids: Tensor | None = None, use_cuda_graph: bool = True,
                 compile: bool = True, prefill_bucket: int = 16) -> None:
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
        self.eps = float(cfg.rms_norm_eps)
        self.scale = 1.0 / math.sqrt(self.head_dim)

        body = language_model.model
        self.embed = body.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        if self.device.type == 'meta':
            raise ConfigError('the language model is still on the meta device; load weights first')
        self.hidden = self.embed.shape[1]
        self.vocab_size = self.embed.shape[0]
        self.norm = body.norm.weight
        self.lm_head = layer_weights(language_model.lm_head, 'lm_head')
        self.layers = [self._read_layer(i, layer) for i, layer in enumerate(body.layers)]
        cuda = self.device.type == 'cuda'
        self.use_cuda_graph = bool(use_cuda_graph) and cuda
        self.graph_error: str | None = None
        self.compile_error: str | None = None

        self.logit_bias: Tensor | None = None
        if allowed_token_ids is not None:
            ids = torch.as_tensor(allowed_token_ids, dtype=torch.long).flatten()
            if ids.numel() < 2 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ConfigError(f'allowed_token_ids must be at least 2 ids in [0, '
                                  f'{self.vocab_size}), got {ids.numel()} ids')
            with torch.inference_mode():
                self.logit_bias = torch.full((self.vocab_size,), float('-inf'),
                                             device=self.device)
                self.logit_bias[ids.to(self.device)] = 0.0
        with torch.inference_mode():  # all engine buffers are inference tensors (one guard set)
            self.cos, self.sin = rope_tables(cfg, self.max_seq_len, self.device, self.dtype)
        self._layer_fn: Callable = self._layer
        self._head_fn: Callable = self._head
        self._compiled = bool(compile) and cuda
        if self._compiled:
            # one compiled layer per shape class: prefill/decode, batch of one or several,
            # cache growth; leave room for them all (the default limit is 8)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._layer_fn = torch.compile(self._layer, dynamic=None)
            self._head_fn = torch.compile(self._head, dynamic=None)
        self._batch_cap = 0
        self._seq_cap = 0
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._prefill_in: dict[tuple[int, int], Tensor] = {}

    # -- construction ------------------------------------------------------------------------

    def _read_layer(self, i: int, layer: nn.Module) -> LayerWeights:
        att, mlp = layer.self_attn, layer.mlp
        name = f'model.layers.{i}'
        qkv = fuse_weights([att.q_proj, att.k_proj, att.v_proj],
                           [f'{name}.self_attn.{p}_proj' for p in 'qkv'])
        gate_up = fuse_weights([mlp.gate_proj, mlp.up_proj],
                               [f'{name}.mlp.gate_proj', f'{name}.mlp.up_proj'])
        return LayerWeights(layer.input_layernorm.weight,
                            qkv, layer_weights(att.o_proj, f'{name}.self_attn.o_proj'),
                            layer.post_attention_layernorm.weight, gate_up,
                            layer_weights(mlp.down_proj, f'{name}.mlp.down_proj'))

    def _ensure_capacity(self, batch: int, seq: int) -> None:
        """Grow the cache and the step buffers to hold ``batch`` samples of ``seq`` positions.

        Growing drops the captured graphs (they point at the old buffers).
        """
        if batch <= self._batch_cap and seq <= self._seq_cap:
            return
        b = max(batch, self._batch_cap)
        s = min(self.max_seq_len, max(seq, self._seq_cap))
        dev, dt = self.device, self.dtype
        self._graphs.clear()
        self._prefill_in.clear()
        self.k_cache = self.v_cache = []  # free the old cache before allocating the new one
        shape = (b, self.n_kv, s, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        self.positions = torch.arange(s, device=dev)
        self.lengths = torch.ones(b, dtype=torch.long, device=dev)
        self.token = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_tokens = torch.zeros(b, s, dtype=torch.long, device=dev)
        self.out_probs = torch.zeros(b, s, dtype=torch.float32, device=dev)
        self.out_margins = torch.zeros(b, s, dtype=torch.float32, device=dev)
        self._batch_cap, self._seq_cap = b, s

    # -- the forward -------------------------------------------------------------------------

    def _layer(self, x: Tensor, w: LayerWeights, kc: Tensor, vc: Tensor, cos: Tensor,
               sin: Tensor, pos: Tensor | None, mask: Tensor | None) -> Tensor:
        """One decoder layer on x (B, T, hidden); prefill (``pos`` None) or one decode step.

        Prefill: positions 0..T-1, K/V written to cache rows 0..T-1, causal attention. Decode
        (T = 1): sample b's K/V written at row ``pos[b]``, attention over the cache under
        ``mask`` (B, 1, 1, S).
        """
        b, t, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = linear(rms_norm(x, w.ln1, self.eps), w.qkv).split([nq, nkv, nkv], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if pos is None:
            kc[:, :, :t].copy_(k)
            vc[:, :, :t].copy_(v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=gqa)
        else:
            rows = torch.arange(b, device=x.device)[:, None]
            heads = torch.arange(self.n_kv, device=x.device)[None, :]
            kc.index_put_((rows, heads, pos[:, None]), k[:, :, 0])
            vc.index_put_((rows, heads, pos[:, None]), v[:, :, 0])
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scale,
                                               enable_gqa=gqa)
        x = x + linear(y.transpose(1, 2).reshape(b, t, nq), w.o)
        gate, up = linear(rms_norm(x, w.ln2, self.eps), w.gate_up).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, w.down)

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Final norm, lm_head and the greedy choice for x (B, hidden)."""
        return pick_tokens(linear(rms_norm(x, self.norm, self.eps), self.lm_head),
                           self.logit_bias)

    def _layers(self, x: Tensor, b: int, cos: Tensor, sin: Tensor, pos: Tensor | None,
                mask: Tensor | None) -> Tensor:
        for i, w in enumerate(self.layers):
            x = self._layer_fn(x, w, self.k_cache[i][:b], self.v_cache[i][:b], cos, sin, pos,
                               mask)
        return x

    def _record(self, b: int, picked: tuple[Tensor, Tensor, Tensor]) -> None:
        ids, prob, margin = picked
        self.token[:b].copy_(ids)
        self.out_tokens[:b].index_copy_(1, self.step, ids[:, None])
        self.out_probs[:b].index_copy_(1, self.step, prob[:, None])
        self.out_margins[:b].index_copy_(1, self.step, margin[:, None])

    def _prefill(self, b: int, t: int) -> None:
        """Prefill from the padded input buffer (b, t); the real lengths are ``self.lengths``.

        Writes token 0 of each sample and sets token, pos and step for the decode steps.
        """
        x = self._layers(self._prefill_in[(b, t)], b, self.cos[:t], self.sin[:t], None, None)
        lengths = self.lengths[:b]
        last = x[torch.arange(b, device=x.device), lengths - 1]
        self.step.zero_()
        self._record(b, self._head_fn(last))
        self.pos[:b].copy_(lengths)
        self.step.fill_(1)

    def _decode_step(self, b: int) -> None:
        """One token per sample at its own position; advances token, pos and step."""
        pos = self.pos[:b]
        x = F.embedding(self.token[:b], self.embed).view(b, 1, -1)
        cos = self.cos.index_select(0, pos).view(b, 1, 1, -1)
        sin = self.sin.index_select(0, pos).view(b, 1, 1, -1)
        mask = (self.positions[None, :] <= pos[:, None]).view(b, 1, 1, -1)
        x = self._layers(x, b, cos, sin, pos, mask)
        self._record(b, self._head_fn(x[:, 0]))
        self.pos[:b].add_(1)
        self.step.add_(1)

    # -- running: eager, compiled, graphed ---------------------------------------------------

    def _disable_compile(self, exc: Exception) -> None:
        self.compile_error = f'{type(exc).__name__}: {exc}'
        self._compiled = False
        self._layer_fn, self._head_fn = self._layer, self._head
        logger.warning('torch.compile of the engine failed, running it uncompiled: %s',
                       self.compile_error[:2000])

    def _warm(self, fn: Callable[[], None], runs: int) -> None:
        """Run ``fn`` (compiling it on first use); a compile failure falls back to eager."""
        for _ in range(runs):
            try:
                fn()
            except (torch.OutOfMemoryError, ConfigError):
                raise
            except Exception as exc:  # noqa: BLE001 - dynamo/inductor raise many types
                if not self._compiled:
                    raise
                self._disable_compile(exc)
                fn()

    def _run(self, key: tuple, fn: Callable[[], None], reset: Callable[[], None]) -> None:
        """Run ``fn`` by graph replay (capturing it on first use), else directly."""
        if not self.use_cuda_graph:
            if self._compiled and key not in self._graphs:
                self._warm(fn, 1)
                self._graphs[key] = None  # seen: compiled for this shape
                return
            fn()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(fn, reset)
            if graph is None:  # capture failed: eager from now on
                fn()
                return
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, fn: Callable[[], None], reset: Callable[[], None]) -> \
            torch.cuda.CUDAGraph | None:
        """Warm ``fn`` up on a side stream (compiling it and tuning kernels), then capture it.

        ``reset`` restores the static state before the capture. Returns None (and switches the
        engine to eager replay, saying why once) if the capture fails.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            reset()
            self._warm(fn, 3)
        torch.cuda.current_stream(self.device).wait_stream(side)
        try:
            reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return graph
        except Exception as exc:  # noqa: BLE001 - a layer that cannot be captured
            self.graph_error = f'{type(exc).__name__}: {exc}'
            self.use_cuda_graph = False
            self._graphs.clear()
            logger.warning('CUDA graph capture failed, running without graphs: %s',
                           self.graph_error[:2000])
            torch.cuda.synchronize(self.device)
            return None

    def padded_length(self, length: int) -> int:
        """The prefill length a prefix of ``length`` tokens is padded to."""
        return min(self.max_seq_len, _bucket(length, self.prefill_bucket))

    def warmup(self, prefix_lengths: Sequence[int] = (1,), batch_sizes: Sequence[int] = (1,),
               n_tokens: int = 7) -> None:
        """Compile, tune and capture now for these shapes (else the first call of each does)."""
        for b in sorted(set(batch_sizes), reverse=True):
            for length in prefix_lengths:
                self.generate(torch.zeros(b, length, self.hidden, device=self.device,
                                          dtype=self.dtype), [length] * b, n_tokens)

    @property
    def graph_captured(self) -> bool:
        """Whether some step replays as a CUDA graph."""
        return self.use_cuda_graph and any(g is not None for g in self._graphs.values())

    @property
    def compiled(self) -> bool:
        """Whether the layer runs compiled (False after a compile failure, and on the CPU)."""
        return self._compiled

    # -- public ------------------------------------------------------------------------------

    def generate(self, inputs_embeds: Tensor, lengths: Sequence[int] | None = None,
                 n_tokens: int = 7) -> Decoded:
        """Greedy-decode ``n_tokens`` after each prefix of a batch.

        ``inputs_embeds`` is (B, L, hidden) in the model's dtype, sample b's prefix in rows
        ``0 .. lengths[b] - 1`` (the rest is padding and ignored); ``lengths`` defaults to
        L for every sample. Returns ``Decoded`` with (B, n_tokens) tensors on the engine's
        device (fresh tensors, not views of the engine's buffers). The call's state lives in
        the cache positions it writes; what earlier calls left there is masked out or
        overwritten, so calls do not leak into each other.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != self.hidden \
                or inputs_embeds.shape[0] < 1:
            raise ConfigError(f'inputs_embeds must be (B, L, hidden={self.hidden}), got '
                              f'{tuple(inputs_embeds.shape)}')
        b, width = inputs_embeds.shape[:2]
        lengths = [width] * b if lengths is None else [int(n) for n in lengths]
        if len(lengths) != b:
            raise ConfigError(f'{len(lengths)} lengths for a batch of {b}')
        if n_tokens < 1:
            raise ConfigError(f'n_tokens must be >= 1, got {n_tokens}')
        longest = max(lengths)
        if min(lengths) < 1 or longest > width:
            raise ConfigError(f'lengths must be in [1, {width}], got {lengths}')
        if longest + n_tokens - 1 > self.max_seq_len:
            raise ConfigError(f'a prefix of {longest} tokens plus {n_tokens} new tokens needs '
                              f'{longest + n_tokens - 1} cache positions, more than max_seq_len='
                              f'{self.max_seq_len}; build the engine with a larger max_seq_len')
        t = self.padded_length(longest)
        with torch.inference_mode():
            self._ensure_capacity(b, _bucket(max(t, longest + n_tokens - 1), self.prefill_bucket))
            buf = self._prefill_in.get((b, t))
            if buf is None:
                buf = torch.zeros(b, t, self.hidden, device=self.device, dtype=self.dtype)
                self._prefill_in[(b, t)] = buf
            n = min(width, t)
            buf[:, :n].copy_(inputs_embeds[:, :n])
            if t > n:
                buf[:, n:].zero_()
            self.lengths[:b].copy_(torch.as_tensor(lengths), non_blocking=True)
            # padding is zeroed, so whatever the caller left there (even NaN) stays unread
            padding = self.positions[:t][None, :] >= self.lengths[:b, None]
            buf.masked_fill_(padding[:, :, None], 0.0)

            def reset() -> None:  # the state right after the prefill (warm-ups advanced it)
                self.token[:b].copy_(self.out_tokens[:b, 0])
                self.pos[:b].copy_(self.lengths[:b])
                self.step.fill_(1)

            self._run(('prefill', b, t), lambda: self._prefill(b, t), lambda: None)
            for _ in range(n_tokens - 1):
                self._run(('decode', b), lambda: self._decode_step(b), reset)
            return Decoded(self.out_tokens[:b, :n_tokens].clone(),
                           self.out_probs[:b, :n_tokens].clone(),
                           self.out_margins[:b, :n_tokens].clone())


# ---------------------------------------------------------------------------------------------
# The vision path
# ---------------------------------------------------------------------------------------------

def vision_fn(model: nn.Module, parallel: bool = True,
              torch_compile: bool = False) -> Callable[[Tensor], Tensor]:
    """``pixel_values -> projected patches`` for an ``OpenVLA`` model, for ``GraphedModule``.

    The two ViTs of a fused backbone (DINOv2 on channels 0:3, SigLIP on 3:6) are independent
    and, at 256 tokens, too small to fill a GPU on their own, so with ``parallel`` (CUDA only)
    the second runs on a side stream concurrently with the first; a CUDA graph captures the
    fork and join. ``torch_compile`` compiles each ViT and the projector (fuses the element-wise
    work between the GEMMs). On the CPU it runs the ViTs one after the other, computing what
    ``model.project_patches`` computes.
    """
    backbone, projector = model.vision_backbone, model.projector
    vits = list(backbone.featurizers)
    feats = [lambda x, v=v: backbone.vit_features(v, x) for v in vits]
    if torch_compile:
        feats = [torch.compile(f, dynamic=None) for f in feats]
        projector = torch.compile(projector, dynamic=None)
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


class GraphedModule:
    """Replays ``fn(x)`` as a CUDA graph, one graph per input shape.

    Meant for the vision featurizer + projector, whose input is (B, 6, 224, 224): one replay
    instead of ~700 kernel launches. The input is copied into a static buffer of its shape. On
    the CPU (or with ``enabled=False``) it calls ``fn``. If warming up or capturing ``fn``
    fails, ``fallback`` (e.g. the uncompiled function) replaces it, with one warning; without
    one, or if that fails too, it runs eagerly. The result is a clone unless
    ``clone_output=False`` (then the static output buffer, overwritten by the next call of
    that shape).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], example_input: Tensor | None = None,
                 enabled: bool = True, clone_output: bool = True, warmup_iters: int = 2,
                 fallback: Callable[[Tensor], Tensor] | None = None) -> None:
        self.fn = fn
        self.fallback = fallback
        self.clone_output = clone_output
        self.warmup_iters = warmup_iters
        self.enabled = enabled
        self.error: str | None = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        if example_input is not None and self.enabled and example_input.is_cuda:
            self._capture(example_input)

    def _key(self, x: Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, str(x.device))

    def _capture(self, example: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor] | None:
        with torch.inference_mode():
            static_in = example.detach().clone()
            side = torch.cuda.Stream(example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            try:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup_iters):
                        self.fn(static_in)
                torch.cuda.current_stream(example.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self.fn(static_in)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - compile or capture failure
                torch.cuda.synchronize(example.device)
                if self.fallback is None or self.fn is self.fallback:
                    self.error = f'{type(exc).__name__}: {exc}'
                    self.enabled = False
                    logger.warning('vision graph capture failed, running eagerly: %s',
                                   self.error[:2000])
                    return None
                logger.warning('vision: compiled path failed, using the uncompiled one: %s',
                               f'{type(exc).__name__}: {exc}'[:2000])
                self.fn = self.fallback
                return self._capture(example)
        entry = (graph, static_in, static_out)
        self._graphs[self._key(example)] = entry
        return entry

    def __call__(self, x: Tensor) -> Tensor:
        """Run ``fn(x)`` (by graph replay on CUDA)."""
        if not self.enabled or not x.is_cuda:
            with torch.inference_mode():
                return self.fn(x)
        entry = self._graphs.get(self._key(x)) or self._capture(x)
        if entry is None:
            return self(x)
        graph, static_in, static_out = entry
        with torch.inference_mode():
            static_in.copy_(x)
            graph.replay()
            return static_out.clone() if self.clone_output else static_out
