"""OpenVLA-7B latency benchmark: the reference path (HF generate) against vla_ros's engine.

One run measures every variant, each in its own subprocess (a clean CUDA context and allocator,
so peak memory is per variant and a crash or a failed graph capture cannot spoil the others):

  reference_bf16     vision + projector eager, then ``generate(inputs_embeds=...)`` with eager
                     attention and a dynamic cache, greedy, 7 tokens (OpenVLA's predict_action)
  reference_bnb_*    the same with bitsandbytes layers
  bf16 / bnb_* / fast_int4 [+_compile]
                     graphed vision + projector, then DecodeEngine (static KV cache, CUDA-graphed
                     decode step; ``_compile`` adds torch.compile of the step)

Weights are random (normal(0, 0.02)), drawn per parameter from a generator seeded by its name,
so every subprocess builds the same model and tokens can be compared across variants. The model
is built on the meta device and materialized on the GPU layer by layer (quantized variants
quantize each decoder layer right after materializing it, so they never hold the bf16 model).

Usage (see bench/README.md):
  python bench/bench_policy.py --out bench/results/h100.json            # GPU, 7B shapes
  python bench/bench_policy.py --tiny --out /tmp/tiny.json              # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL_VARIANTS = ['micro', 'reference_bf16', 'bf16', 'bf16_compile', 'fast_int4',
                'fast_int4_compile', 'bnb_nf4', 'bnb_int8', 'bf16_nograph', 'reference_bnb_nf4',
                'reference_bnb_int8']
N_TOKENS = 7
N_INPUTS = 8


# ---------------------------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------------------------

def openvla_7b_config() -> dict:
    """The architecture fields of openvla/openvla-7b's config.json (DESIGN section 4)."""
    return {
        'model_type': 'openvla',
        'vision_backbone_id': 'dinosiglip-vit-so-224px',
        'llm_backbone_id': 'llama2-7b-pure',
        'arch_specifier': 'no-align+fused-gelu-mlp',
        'use_fused_vision_backbone': True,
        'image_resize_strategy': 'resize-naive',
        'timm_model_ids': ['vit_large_patch14_reg4_dinov2.lvd142m',
                           'vit_so400m_patch14_siglip_224'],
        'timm_override_act_layers': [None, None],
        'image_sizes': [224, 224],
        'pad_token_id': 32000,
        'pad_to_multiple_of': 64,
        'llm_max_length': 2048,
        'n_action_bins': 256,
        'text_config': {'model_type': 'llama', 'vocab_size': 32064, 'pad_token_id': 32000,
                        'hidden_size': 4096, 'intermediate_size': 11008,
                        'num_hidden_layers': 32, 'num_attention_heads': 32,
                        'num_key_value_heads': 32},
    }


def tiny_config() -> dict:
    """Same families, toy sizes: for a CPU run of this script (--tiny)."""
    cfg = openvla_7b_config()
    cfg['timm_model_kwargs'] = [{'embed_dim': 64, 'depth': 3, 'num_heads': 2},
                                {'embed_dim': 72, 'depth': 3, 'num_heads': 2}]
    cfg['text_config'] = {'model_type': 'llama', 'vocab_size': 32064, 'pad_token_id': 32000,
                          'hidden_size': 128, 'intermediate_size': 256,
                          'num_hidden_layers': 2, 'num_attention_heads': 4,
                          'num_key_value_heads': 4}
    return cfg


# ---------------------------------------------------------------------------------------------
# Worker: build one variant, time it, write a JSON record
# ---------------------------------------------------------------------------------------------

def _init_params(module, prefix: str, device, seed: int) -> None:
    """Materialize ``module`` (meta) on ``device`` with name-seeded random values."""
    import torch
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            full = f'{prefix}.{name}'
            if p.dim() == 1 and ('norm' in full and full.endswith('weight')):
                p.fill_(1.0)
            elif p.dim() == 1 and name.endswith('bias'):
                p.zero_()
            elif name.endswith('scale_factor'):
                p.fill_(0.1)
            else:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed + zlib.crc32(full.encode()))
                p.normal_(0.0, 0.02, generator=gen)


def build_model(cfg: dict, device, dtype, quant: str | None, attn: str, seed: int = 0):
    """OpenVLA with random weights, materialized (and quantized) piece by piece on ``device``."""
    import torch

    from vla_ros.policy.model import OpenVLA
    from vla_ros.policy.quant import quantize_linears

    model = OpenVLA.from_config(cfg, dtype=dtype, device='meta', attn_implementation=attn)
    lm = model.language_model
    _init_params(model.vision_backbone, 'vision_backbone', device, seed)
    _init_params(model.projector, 'projector', device, seed)
    for name in ('embed_tokens', 'norm'):
        _init_params(getattr(lm.model, name), f'language_model.model.{name}', device, seed)
    _init_params(lm.lm_head, 'language_model.lm_head', device, seed)
    for i, layer in enumerate(lm.model.layers):
        _init_params(layer, f'language_model.model.layers.{i}', device, seed)
        if quant is not None:
            quantize_linears(layer, quant, device)
    for name, buf in list(model.named_buffers()):
        if buf.device.type == 'meta' and not name.endswith('inv_freq'):
            raise RuntimeError(f'buffer {name} left on meta')
    model.materialize_buffers(device)
    left = model.meta_tensor_names()
    if left:
        raise RuntimeError(f'still on meta: {left[:5]}')
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return model.eval()


def make_inputs(cfg: dict, device, dtype, seed: int = 1234):
    """N_INPUTS (pixel_values, input_ids) pairs: random images, prompts of 17..32 tokens."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    size = cfg['image_sizes'][0]
    inputs = []
    for i in range(N_INPUTS):
        px = torch.randn(1, 6, size, size, generator=gen).to(device, dtype)
        length = 17 + (i * 5) % 16  # 17..32: every prefix (273..288) in one 16-bucket
        ids = torch.randint(3, 31744, (1, length), generator=gen)
        ids[0, 0] = 1          # BOS
        ids[0, -1] = 29871     # OpenVLA appends token 29871 to the prompt
        inputs.append((px, ids.to(device)))
    return inputs


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _time_ms(device, fn, *args) -> float:
    """Synchronized wall-clock time of fn(*args) in ms."""
    _sync(device)
    t0 = time.perf_counter()
    fn(*args)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _stats(times: list[float]) -> dict:
    s = sorted(times)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {'median_ms': statistics.median(s), 'p90_ms': p90, 'min_ms': s[0], 'max_ms': s[-1],
            'n': len(s)}


def _llm_weight_bytes(lm) -> int:
    """Bytes one decode step reads: every LM parameter/buffer except the input embedding."""
    import torch
    total = 0
    seen = set()
    for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
        if 'embed_tokens' in name or 'inv_freq' in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    # bitsandbytes keeps quantization statistics outside parameters
    for m in lm.modules():
        qs = getattr(getattr(m, 'weight', None), 'quant_state', None)
        if qs is not None:
            state2 = getattr(qs, 'state2', None)
            for v in (getattr(qs, 'absmax', None), getattr(state2, 'absmax', None)):
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        scb = getattr(getattr(m, 'weight', None), 'SCB', None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def run_variant(args) -> dict:
    import torch

    from vla_ros.policy.engine import DecodeEngine, GraphedModule, vision_fn

    name = args.worker
    cfg = tiny_config() if args.tiny else openvla_7b_config()
    device = torch.device('cuda' if torch.cuda.is_available() and not args.tiny else 'cpu')
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    reference = name.startswith('reference')
    base = name.replace('reference_', '').replace('_compile', '').replace('_nograph', '')
    quant = {'bf16': None, 'bnb_int8': 'int8', 'bnb_nf4': 'nf4', 'fast_int4': 'int4_fast',
             'tinygemm_int4': 'int4_tinygemm'}[base]
    compiled = name.endswith('_compile')
    rec: dict = {'name': name, 'quantization': quant, 'device_type': device.type}
    t_build = time.perf_counter()
    model = build_model(cfg, device, dtype, quant, attn='eager' if reference else 'sdpa')
    rec['build_s'] = time.perf_counter() - t_build
    lm = model.language_model
    rec['llm_decode_bytes'] = _llm_weight_bytes(lm)
    rec['llm_linear_params'] = sum(m.in_features * m.out_features
                                   for m in lm.model.layers.modules()
                                   if hasattr(m, 'in_features') and hasattr(m, 'out_features'))
    rec['vision_params'] = sum(p.numel() for p in model.vision_backbone.parameters()) + sum(
        p.numel() for p in model.projector.parameters())
    if device.type == 'cuda':
        rec['build_peak_vram_gb'] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    inputs = make_inputs(cfg, device, dtype)
    max_len = max(model.prefix_length(ids.shape[1]) for _, ids in inputs) + N_TOKENS

    if reference:
        from transformers import GenerationConfig
        gen_cfg = GenerationConfig(max_new_tokens=N_TOKENS, do_sample=False, num_beams=1,
                                   eos_token_id=None, pad_token_id=32000, bos_token_id=1)

        def predict(px, ids):
            with torch.inference_mode():
                emb = model.embed_prefix(px, ids)
                mask = torch.ones(emb.shape[:2], dtype=torch.long, device=device)
                out = lm.generate(inputs_embeds=emb, attention_mask=mask,
                                  generation_config=gen_cfg)
            return out[0, -N_TOKENS:].tolist()
        stages = {}
    else:
        t0 = time.perf_counter()
        use_graph = not name.endswith('_nograph') and not args.no_graph
        vision = GraphedModule(vision_fn(model, parallel=use_graph, torch_compile=compiled),
                               inputs[0][0], enabled=use_graph)
        engine = DecodeEngine(lm, max_seq_len=max_len, allowed_token_ids=None,
                              use_cuda_graph=use_graph, compile_step=compiled)
        engine.warmup(tuple(sorted({model.prefix_length(ids.shape[1]) for _, ids in inputs})))
        rec['setup_s'] = time.perf_counter() - t0
        rec['graph_captured'] = engine.graph_captured
        rec['graph_error'] = engine.graph_error

        def predict(px, ids):
            with torch.inference_mode():
                emb = model.embed_prefix(None, ids, patch_embeddings=vision(px))
                return engine.generate(emb, N_TOKENS).tolist()

        def embed(px, ids):
            with torch.inference_mode():
                return model.embed_prefix(None, ids, patch_embeddings=vision(px))
        stages = {'vision': vision, 'embed': embed, 'engine': engine}

    # warm-up (excluded), then timed repeats cycling through the inputs
    tokens = {}
    for i, (px, ids) in enumerate(inputs):
        tokens[i] = predict(px, ids)
    rec['tokens'] = [tokens[i] for i in range(len(inputs))]
    times = []
    for r in range(args.repeats):
        px, ids = inputs[r % len(inputs)]
        times.append(_time_ms(device, predict, px, ids))
    rec.update(_stats(times))
    rec['times_ms'] = times
    if device.type == 'cuda':
        rec['peak_vram_gb'] = torch.cuda.max_memory_allocated() / 1e9

    rec['profile'] = profile(model, stages, inputs, device, args.profile_repeats)
    if quant == 'int4_fast':
        from vla_ros.policy.int4_kernels import prefill_mode_choices
        rec['int4_prefill_modes'] = prefill_mode_choices()
    if stages:
        rec['teacher_forced'] = teacher_forced_check(model, stages, inputs, rec['tokens'])
        if device.type == 'cuda':
            rec['kernels'] = kernel_profile(stages, inputs)
    return rec


def teacher_forced_check(model, stages, inputs, tokens) -> dict:
    """Is each of our tokens the argmax of the HF model (eager attention, no cache) given our
    own prefix? Disagreements with a margin at bf16 noise level are numerics, not bugs."""
    import torch
    lm = model.language_model
    try:
        lm.set_attn_implementation('eager')
    except Exception:  # noqa: BLE001
        lm.config._attn_implementation = 'eager'
    agree, margins, spreads = 0, [], []
    with torch.inference_mode():
        for (px, ids), toks in zip(inputs, tokens, strict=True):
            emb = stages['embed'](px, ids)
            tail = lm.get_input_embeddings()(torch.tensor([toks[:-1]], device=emb.device))
            logits = lm(inputs_embeds=torch.cat([emb, tail], 1)).logits[0, emb.shape[1] - 1:]
            logits = logits.float()
            for i, t in enumerate(toks):
                top = float(logits[i].max())
                margin = top - float(logits[i, t])
                agree += margin == 0.0
                if margin > 0:
                    margins.append(margin)
                spreads.append(float(logits[i].std()))
    n = sum(len(t) for t in tokens)
    return {'agreement': agree / n, 'n_tokens': n,
            'max_margin_when_different': max(margins) if margins else 0.0,
            'logit_std': statistics.median(spreads)}


def kernel_profile(stages, inputs, top: int = 20) -> dict:
    """GPU kernel time by kernel (torch.profiler/CUPTI) for a prefill-only call and a full call."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    engine, embed = stages['engine'], stages['embed']
    px, ids = inputs[0]
    out = {}
    try:
        with torch.inference_mode():
            emb = embed(px, ids)
            for label, n in (('prefill', 1), ('generate7', N_TOKENS)):
                torch.cuda.synchronize()
                with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        engine.generate(emb, n)
                    torch.cuda.synchronize()
                rows = []
                for ev in prof.key_averages():
                    t = getattr(ev, 'device_time_total', None)
                    if t is None:
                        t = getattr(ev, 'cuda_time_total', 0)
                    if t > 0:
                        rows.append((ev.key[:90], t / 3 / 1e3, ev.count / 3))
                rows.sort(key=lambda r: -r[1])
                out[label] = {'kernel_ms_total': sum(r[1] for r in rows),
                              'top': [{'kernel': k, 'ms': t, 'calls': c}
                                      for k, t, c in rows[:top]]}
    except Exception as exc:  # noqa: BLE001
        out['error'] = f'{type(exc).__name__}: {exc}'
    return out


def profile(model, stages, inputs, device, repeats: int) -> dict:
    """Per-stage medians (ms): vision+projector, embedding, prefill, one decode step."""
    import torch
    out: dict = {}
    vis, stage_t = {}, {'vision_ms': [], 'embed_ms': [], 'prefill_ms': [], 'decode_6_ms': []}
    with torch.inference_mode():
        for r in range(repeats):
            px, ids = inputs[r % len(inputs)]
            if not stages:  # reference: vision eager only
                stage_t['vision_ms'].append(_time_ms(device, model.project_patches, px))
                continue
            vision, embed, engine = stages['vision'], stages['embed'], stages['engine']
            stage_t['vision_ms'].append(_time_ms(device, vision, px))
            stage_t['embed_ms'].append(_time_ms(device, embed, px, ids)
                                       - stage_t['vision_ms'][-1])
            emb = embed(px, ids)
            t1 = _time_ms(device, engine.generate, emb, 1)
            t7 = _time_ms(device, engine.generate, emb, N_TOKENS)
            stage_t['prefill_ms'].append(t1)
            stage_t['decode_6_ms'].append(t7 - t1)
            vis['prefix_len'] = emb.shape[1]
    for k, v in stage_t.items():
        if v:
            out[k] = statistics.median(v)
    if 'prefix_len' in vis:
        out['prefix_len'] = vis['prefix_len']
    if 'decode_6_ms' in out:
        out['decode_step_ms'] = out['decode_6_ms'] / (N_TOKENS - 1)
    return out


def run_micro(args) -> dict:
    """Ceilings and per-shape GEMM times: copy bandwidth, bf16 matmul rate, then each linear of
    a decoder layer at M=1 (decode) and M=288 (prefill) for bf16 (cuBLAS), int4_fast (Triton,
    fused and dequantize+cuBLAS prefill), int4_tinygemm and bnb NF4. Timed as CUDA-graph
    replays over enough weight copies to defeat the 50 MB L2 (as in a real decode step, where
    each weight is read once)."""
    import math

    import torch
    device = torch.device('cuda' if torch.cuda.is_available() and not args.tiny else 'cpu')
    rec: dict = {'name': 'micro', 'device_type': device.type}
    if device.type != 'cuda':
        return rec

    def event_ms(fn, *args, iters=20):
        fn(*args)
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end))
        return statistics.median(ts)

    def graph_ms(calls):
        """Median time of one call, from replays of a graph of all calls."""
        for c in calls:
            c()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        return event_ms(g.replay, iters=10) / len(calls)

    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = event_ms(b.copy_, a)
    rec['copy_bw_tbs'] = 2 * a.numel() * 2 / (ms * 1e-3) / 1e12
    del a, b
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = event_ms(torch.matmul, x, y)
    rec['bf16_matmul_tflops'] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()

    from vla_ros.policy import int4_kernels
    from vla_ros.policy.quant import Int4Linear, TinyGemmLinear, _bnb_linear
    shapes = {'qkv': (4096, 12288), 'o': (4096, 4096), 'gate_up': (4096, 22016),
              'down': (11008, 4096), 'lm_head': (4096, 32064)}
    kinds = args.micro_kinds.split(',')
    gemm = {}
    for sname, (k, n) in shapes.items():
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        torch.nn.init.normal_(base.weight, 0, 0.02)
        for kind in kinds:
            if kind == 'bnb_nf4' and sname == 'lm_head':
                continue
            wbytes = k * n * (2 if kind == 'bf16' else 0.5 + 4 / 128)
            copies = max(2, math.ceil(200e6 / wbytes))
            try:
                mods = []
                for _ in range(copies):
                    if kind == 'bf16':
                        mods.append(torch.nn.Linear(k, n, bias=False, device=device,
                                                    dtype=torch.bfloat16))
                        mods[-1].weight.data.copy_(base.weight)
                    elif kind.startswith('int4_fast'):
                        mods.append(Int4Linear.from_linear(base, device))
                    elif kind == 'int4_tinygemm':
                        mods.append(TinyGemmLinear.from_linear(base, device))
                    else:
                        mods.append(_bnb_linear(base, 'nf4', device))
                for m_rows in (1, 288):
                    xin = torch.randn(1, m_rows, k, device=device, dtype=torch.bfloat16)
                    int4_kernels.PREFILL_MODE = 'dequant' if kind.endswith('dequant') else 'fused'
                    with torch.inference_mode():
                        ref = base(xin).float()
                        err = float((mods[0](xin).float() - ref).norm() / ref.norm())
                        ms = graph_ms([functools.partial(m, xin) for m in mods])
                    gemm[f'{sname}_M{m_rows}_{kind}'] = {
                        'ms': ms, 'rel_err_vs_bf16': err,
                        'weight_tbs': wbytes / (ms * 1e-3) / 1e12,
                        'tflops': 2 * m_rows * k * n / (ms * 1e-3) / 1e12}
            except Exception as exc:  # noqa: BLE001
                gemm[f'{sname}_{kind}_error'] = f'{type(exc).__name__}: {exc}'[:300]
            mods = None
            torch.cuda.empty_cache()
        int4_kernels.PREFILL_MODE = 'auto'
    rec['gemm'] = gemm
    return rec


def worker_main(args) -> None:
    import torch
    rec = run_micro(args) if args.worker == 'micro' else run_variant(args)
    rec['torch'] = torch.__version__
    Path(args.json).write_text(json.dumps(rec))


# ---------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------

def device_info() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f'{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs'
    except Exception:  # noqa: BLE001
        pass
    return 'cpu'


def versions() -> dict:
    out = {}
    for mod in ('torch', 'transformers', 'timm', 'bitsandbytes', 'triton'):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='toy sizes on the CPU (smoke test)')
    ap.add_argument('--variants', default=','.join(ALL_VARIANTS))
    ap.add_argument('--repeats', type=int, default=30)
    ap.add_argument('--profile-repeats', type=int, default=10)
    ap.add_argument('--out', default=None, help='JSON result path')
    ap.add_argument('--log', default=None, help='append worker output here')
    ap.add_argument('--deadline-s', type=float, default=540.0,
                    help='skip variants that would start after this many seconds')
    ap.add_argument('--worker-timeout-s', type=float, default=300.0)
    ap.add_argument('--no-graph', action='store_true')
    ap.add_argument('--micro-kinds', default='bf16,int4_fast,int4_fast_dequant,int4_tinygemm,'
                    'bnb_nf4',
                    help='micro: int4_fast = Triton GEMV + fused GEMM, int4_fast_dequant = '
                    'Triton GEMV + dequantize/cuBLAS prefill')
    ap.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--json', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return

    t_start = time.perf_counter()
    command = 'python ' + ' '.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    result = {'device': device_info(), 'command': command, 'versions': versions(),
              'config': 'tiny' if args.tiny else 'openvla-7b shapes, random weights',
              'n_tokens': N_TOKENS, 'repeats': args.repeats, 'variants': [], 'skipped': []}
    out_path = Path(args.out) if args.out else None
    log = open(args.log, 'a') if args.log else None  # noqa: SIM115

    def save():
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1))

    for name in args.variants.split(','):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline_s:
            result['skipped'].append({'name': name, 'reason': f'deadline ({elapsed:.0f} s)'})
            continue
        no_retry = name.startswith('reference') or name == 'micro'
        attempts = [[]] if no_retry else [[], ['--no-graph']]
        for extra in attempts:
            tmp = Path(f'/tmp/bench_{name}_{os.getpid()}.json')
            cmd = [sys.executable, __file__, '--worker', name, '--json', str(tmp),
                   '--repeats', str(args.repeats), '--micro-kinds', args.micro_kinds,
                   '--profile-repeats', str(args.profile_repeats)] + extra
            if args.tiny:
                cmd.append('--tiny')
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=min(args.worker_timeout_s,
                                                  max(30.0, args.deadline_s + 60 - elapsed)))
                rc, text = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, text = 'timeout', str(exc.stdout or '') + str(exc.stderr or '')
            wall = time.perf_counter() - t0
            if log:
                log.write(f'===== {name} {extra} rc={rc} {wall:.1f}s\n{text[-20000:]}\n')
                log.flush()
            if rc == 0 and tmp.exists():
                rec = json.loads(tmp.read_text())
                rec['wall_s'] = wall
                if extra:
                    rec['note'] = 'graph capture crashed the first attempt; rerun without graphs'
                result['variants'].append(rec)
                break
            err = text.strip().splitlines()[-1] if text.strip() else str(rc)
            result['skipped'].append({'name': name, 'attempt': extra, 'reason': err[-500:]})
            if 'ConfigError' in err or 'ImportError' in err or rc == 'timeout':
                break  # not a graph problem: do not retry without graphs
        finalize(result)
        save()
        print(f'[{time.perf_counter() - t_start:6.1f}s] {name}: done', flush=True)
    finalize(result)
    save()
    print_table(result)


def finalize(result: dict) -> None:
    variants = {v['name']: v for v in result['variants']}
    ref = variants.get('reference_bf16')
    micro = variants.get('micro', {})
    if 'copy_bw_tbs' in micro:
        # floors from the measured ceilings: bytes / copy bandwidth, flops / bf16 matmul rate
        bw, rate = micro['copy_bw_tbs'] * 1e12, micro['bf16_matmul_tflops'] * 1e12
        for v in result['variants']:
            if 'llm_decode_bytes' not in v:
                continue
            length = v.get('profile', {}).get('prefix_len', 280)
            step = v['llm_decode_bytes'] / bw * 1e3
            prefill = max(2 * v['llm_linear_params'] * length / rate,
                          v['llm_decode_bytes'] / bw) * 1e3
            vision = 2 * v['vision_params'] * 256 / rate * 1e3
            v['floor'] = {'decode_step_ms': step, 'prefill_ms': prefill, 'vision_ms': vision,
                          'action_ms': vision + prefill + (N_TOKENS - 1) * step}
    for v in result['variants']:
        if 'median_ms' in v and ref:
            v['ratio_to_reference'] = ref['median_ms'] / v['median_ms']
        if ref and 'tokens' in v and v is not ref:
            pairs = [(a, b) for ta, tb in zip(v['tokens'], ref['tokens'], strict=True)
                     for a, b in zip(ta, tb, strict=True)]
            v['token_agreement_vs_reference_bf16'] = sum(a == b for a, b in pairs) / len(pairs)
            v['sequences_identical_vs_reference_bf16'] = sum(
                ta == tb for ta, tb in zip(v['tokens'], ref['tokens'], strict=True))


def print_table(result: dict) -> None:
    print(f"device: {result['device']}")
    print(f"{'variant':22s} {'median':>8s} {'p90':>8s} {'peakGB':>7s} {'xref':>6s} {'agree':>6s}"
          f" {'vision':>7s} {'prefill':>8s} {'step':>7s}")
    for v in result['variants']:
        if 'median_ms' not in v:
            continue
        p = v.get('profile', {})
        print(f"{v['name']:22s} {v['median_ms']:8.1f} {v['p90_ms']:8.1f} "
              f"{v.get('peak_vram_gb', 0):7.2f} {v.get('ratio_to_reference', 0):6.2f} "
              f"{v.get('token_agreement_vs_reference_bf16', float('nan')):6.2f} "
              f"{p.get('vision_ms', float('nan')):7.2f} {p.get('prefill_ms', float('nan')):8.2f} "
              f"{p.get('decode_step_ms', float('nan')):7.2f}")
    for s in result['skipped']:
        print(f"skipped {s['name']}: {s['reason'][:200]}")


if __name__ == '__main__':
    main()
