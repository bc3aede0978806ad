"""OpenVLA-7B on the user's path: from_pretrained(checkpoint on disk) -> predict(uint8 image).

What the VLA node does, timed: ``OpenVLAPolicy.from_pretrained(dir, device='cuda',
quantization=...)``, ``warmup()``, then ``predict(np.uint8 HxWx3 image, instruction)`` with
constrained decoding, on 224x224 frames (what the camera node sends) and 640x480 frames (resized
on the host inside predict), host preprocessing included; and ``predict_batch`` for N arms. Each
variant runs in its own process (clean CUDA context, its own peak memory, a crash cannot spoil
the others); results go to one JSON file, rewritten after every variant, so a run cut short
still leaves data.

  write          the checkpoint: openvla-7b's config fields and shapes, random bf16 weights in
                 3 safetensors shards + index, a 32000-id Llama-style tokenizer (made here)
  micro          ceilings (copy bandwidth, bf16 matmul rate) and the int4 kernel candidates per
                 Llama shape at M = 1 and 288 against a float64 reference, timed
  reference_bf16 OpenVLA's reference: the same preprocessing, eager vision and HF ``generate``
                 (eager attention, dynamic cache, greedy, unconstrained), same checkpoint
  bf16, int4     the user path: load_s, ready_s (process start of the load to the first action),
                 peak GPU memory over load and run, median/p90 per frame size, stage profile,
                 kernel profile, and batching rows for N = 1..32 arms
  bf16_warm, int4_warm  a second start on the same machine (compile/tuning cache warm): ready_s

Floors (from the measured ceilings): vision and prefill at the bf16 matmul rate (their weights
read once at the copy rate if that is longer), each decode step reading the Llama's weights
once at the copy rate; for N arms N times the arithmetic and the same weight reads.

Usage (see bench/README.md): on the GPU machine
  python3 bench/bench_policy.py --out $OUT/h200.json --log $OUT/bench_log.txt
CPU smoke test of the same code (toy sizes; timings mean nothing):
  .venv/bin/python bench/bench_policy.py --tiny --out /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ['write', 'micro', 'reference_bf16', 'bf16', 'int4', 'bf16_warm', 'int4_warm']
N_TOKENS = 7
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
FRAMES = {'224x224': (224, 224), '640x480': (480, 640)}
INSTRUCTIONS = ['pick up the red block', 'put the green block in the bowl',
                'push the blue block to the left of the yellow block', 'stack the blocks',
                'open the drawer', 'move the yellow block onto the plate near the cup',
                'wipe the table', 'place the red block on top of the green block and let go']
UNNORM_KEY = 'bridge_orig'


# ---------------------------------------------------------------------------------------------
# Helpers (worker side)
# ---------------------------------------------------------------------------------------------

def _stats(times: list[float]) -> dict:
    s = sorted(times)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {'median_ms': statistics.median(s), 'p90_ms': p90, 'min_ms': s[0], 'max_ms': s[-1],
            'n': len(s)}


def _images(shape: tuple[int, int], n: int = 8, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _device(args):
    import torch
    return torch.device('cuda' if torch.cuda.is_available() and not args.tiny else 'cpu')


def _gpu_peak() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {}
    return {'peak_vram_gb': torch.cuda.max_memory_allocated() / 1e9,
            'peak_reserved_gb': torch.cuda.max_memory_reserved() / 1e9}


def write_checkpoint(args) -> dict:
    """The 7B-shaped random checkpoint (or a toy one with --tiny), on this machine's disk."""
    import torch

    from vla_ros.policy import tiny
    config = tiny.openvla_7b_config([UNNORM_KEY])
    if args.tiny:
        config['timm_model_kwargs'] = [dict(k) for k in tiny.TINY_TIMM_MODEL_KWARGS]
        config['text_config'] = dict(config['text_config'], hidden_size=128,
                                     intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4)
    t0 = time.perf_counter()
    dev = _device(args)
    directory = tiny.write_random_checkpoint(args.ckpt, config, device=dev)
    shards = sorted(directory.glob('model-*.safetensors'))
    if dev.type == 'cuda':
        torch.cuda.synchronize()
    return {'write_s': time.perf_counter() - t0,
            'shard_gb': [p.stat().st_size / 1e9 for p in shards],
            'total_gb': sum(p.stat().st_size for p in shards) / 1e9}


def run_micro(args) -> dict:
    """Ceilings, and every int4 kernel candidate per Llama shape against float64, timed."""
    import math

    import torch

    from vla_ros.policy import int4_kernels as k4
    dev = _device(args)
    rec: dict = {}
    if dev.type != 'cuda':
        return rec

    def graph_ms(calls, iters=10):
        for c in calls:
            c()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times) / len(calls)

    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    ms = graph_ms([lambda a=a, b=b: b.copy_(a)])
    rec['copy_bw_tbs'] = 2 * a.numel() * 2 / (ms * 1e-3) / 1e12
    ms = graph_ms([lambda a=a: a.sum(dtype=torch.float32)])
    rec['read_bw_tbs'] = a.numel() * 2 / (ms * 1e-3) / 1e12
    del a, b
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = graph_ms([lambda x=x, y=y: torch.matmul(x, y)])
    rec['bf16_matmul_tflops'] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    rec['int4_inline_asm'] = k4._use_asm(dev)
    shapes = {'qkv': (12288, 4096), 'o': (4096, 4096), 'gate_up': (22016, 4096),
              'down': (4096, 11008)}
    out = {}
    gen = torch.Generator(device=dev).manual_seed(0)
    for sname, (n, k) in shapes.items():
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        group = k4.group_size_for(k)
        wbytes_int4 = n * k // 2 + 4 * n * k // group
        copies = max(2, math.ceil(256e6 / wbytes_int4))
        packed = [k4.quantize_weight(w, group) for _ in range(copies)]
        deq64 = k4.dequantize_torch(*packed[0], torch.float64)
        dense = [w.clone() for _ in range(max(2, math.ceil(256e6 / (2 * n * k))))]
        for m in (1, 288):
            xin = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            ref = xin.double() @ deq64.T
            split = k4.split_for(n, k, dev) if m <= k4.SKINNY_ROWS else 1
            row = {'split': split}
            names = list(k4.candidates(xin, *packed[0], split))
            for cand in names:
                try:
                    fn0 = k4.candidates(xin, *packed[0], split)[cand]
                    got = fn0().double()
                    got = got.sum(0) if got.dim() == 3 else got
                    err = float((got - ref).norm() / ref.norm())
                    calls = [k4.candidates(xin, *p, split)[cand] for p in packed]
                    ms = graph_ms(calls)
                    row[cand] = {'ms': ms, 'rel_err_vs_fp64': err,
                                 'weight_tbs': wbytes_int4 / (ms * 1e-3) / 1e12,
                                 'tflops': 2 * m * n * k / (ms * 1e-3) / 1e12}
                except Exception as exc:  # noqa: BLE001
                    row[cand] = {'error': f'{type(exc).__name__}: {exc}'[:300]}
            ms = graph_ms([lambda d=d, xin=xin: torch.nn.functional.linear(xin, d)
                           for d in dense])
            row['bf16_cublas'] = {'ms': ms, 'weight_tbs': 2 * n * k / (ms * 1e-3) / 1e12,
                                  'tflops': 2 * m * n * k / (ms * 1e-3) / 1e12}
            ok = {c: v['ms'] for c, v in row.items()
                  if isinstance(v, dict) and 'ms' in v and c != 'bf16_cublas'
                  and v.get('rel_err_vs_fp64', 1) < 2e-2}
            row['best'] = min(ok, key=ok.get) if ok else None
            out[f'{sname}_M{m}'] = row
        del packed, dense, w
        torch.cuda.empty_cache()
    rec['int4'] = out
    return rec


def run_reference(args) -> dict:
    """OpenVLA's reference path on the same checkpoint and preprocessing: HF generate, eager."""
    import numpy as np
    import torch
    from transformers import GenerationConfig

    from vla_ros.policy.checkpoint import load_checkpoint
    from vla_ros.policy.policy import OpenVLAPolicy
    dev = _device(args)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.ckpt, device=dev, attn_implementation='eager')
    load_s = time.perf_counter() - t0
    policy = OpenVLAPolicy(ckpt, unnorm_key=UNNORM_KEY)  # preprocessing only (no engine)
    model, lm = ckpt.model, ckpt.model.language_model
    gen_cfg = GenerationConfig(max_new_tokens=N_TOKENS, do_sample=False, num_beams=1,
                               eos_token_id=None, pad_token_id=32000, bos_token_id=1)

    def predict(image, instruction):
        with torch.inference_mode():
            px = policy.pixel_values(image).to(model.dtype)
            ids = torch.tensor([policy.prompt_ids(instruction)], device=dev)
            emb = model.embed_prefix(px, ids)
            mask = torch.ones(emb.shape[:2], dtype=torch.long, device=dev)
            out = lm.generate(inputs_embeds=emb, attention_mask=mask, generation_config=gen_cfg)
        tokens = out[0, -N_TOKENS:].cpu().numpy()
        return policy.action_tokenizer.decode(tokens.astype(np.int64))

    rec: dict = {'load_s': load_s, 'frames': {}}
    for frame, shape in FRAMES.items():
        images = _images(shape)
        for i in range(3):
            predict(images[i], INSTRUCTIONS[i])
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            predict(images[r % 8], INSTRUCTIONS[r % 8])
            times.append((time.perf_counter() - t) * 1e3)
        rec['frames'][frame] = dict(_stats(times), times_ms=times)
    rec.update(_gpu_peak())
    return rec


def _stage_profile(policy, images, dev) -> dict:
    """Medians of predict's own timings, and the prefill vs decode split of the engine."""
    import torch
    out = {}
    laps: dict[str, list[float]] = {}
    for r in range(10):
        o = policy.predict(images[r % 8], INSTRUCTIONS[r % 8])
        for k, v in o.timings.items():
            laps.setdefault(k, []).append(v)
    out.update({f'{k}_ms': statistics.median(v) for k, v in laps.items() if k != 'batch_size'})
    engine, model = policy.decode_engine, policy.model
    ids = policy.prompt_ids(INSTRUCTIONS[0])
    with torch.inference_mode():
        px = policy.pixel_values(images[0]).to(model.dtype)
        emb = model.embed_prefix(None, torch.tensor([ids], device=dev),
                                 patch_embeddings=model.project_patches(px))
        split = {}
        for n in (1, N_TOKENS):
            ts = []
            for _ in range(10):
                if dev.type == 'cuda':
                    torch.cuda.synchronize()
                t = time.perf_counter()
                engine.generate(emb, n_tokens=n).tokens.cpu()
                ts.append((time.perf_counter() - t) * 1e3)
            split[n] = statistics.median(ts)
    out['prefill_ms'] = split[1]
    out['decode_step_ms'] = (split[N_TOKENS] - split[1]) / (N_TOKENS - 1)
    out['prefix_len'] = emb.shape[1]
    return out


def _teacher_forced(policy, images, dev) -> dict:
    """Is each generated token the argmax of transformers' forward given our own prefix?

    With random weights the logits are nearly flat, so disagreements of a bf16 ulp or so are
    numerics (kernel order), not bugs; the largest gap says which.
    """
    import torch
    first, last = policy.action_tokenizer.action_token_range
    agree, gaps, spreads = 0, [], []
    for r in range(4):
        out = policy.predict(images[r], INSTRUCTIONS[r])
        ids = policy.prompt_ids(INSTRUCTIONS[r]) + list(out.token_ids[:-1])
        with torch.inference_mode():
            px = policy.pixel_values(images[r]).to(policy.model.dtype)
            logits = policy.model.forward_logits(px, torch.tensor([ids], device=dev))
        logits = logits[0, -N_TOKENS:].float()[:, first:last + 1]
        for i, t in enumerate(out.token_ids):
            gap = float(logits[i].max() - logits[i, t - first])
            agree += gap == 0.0
            gaps.append(gap)
            spreads.append(float(logits[i].std()))
    return {'agreement': agree / len(gaps), 'max_gap': max(gaps),
            'logit_std_median': statistics.median(spreads), 'n_tokens': len(gaps)}


def _kernel_profile(policy, images, top: int = 25) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for r in range(3):
                policy.predict(images[r], INSTRUCTIONS[0])
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            t = getattr(ev, 'device_time_total', None) or getattr(ev, 'cuda_time_total', 0)
            if t > 0:
                rows.append((ev.key[:100], t / 3 / 1e3, ev.count / 3))
        rows.sort(key=lambda r: -r[1])
        return {'kernel_ms_per_action': sum(r[1] for r in rows),
                'kernels_per_action': sum(r[2] for r in rows),
                'top': [{'kernel': k, 'ms': t, 'calls': c} for k, t, c in rows[:top]]}
    except Exception as exc:  # noqa: BLE001 - the profile explains, it must not fail the run
        return {'error': f'{type(exc).__name__}: {exc}'[:300]}


def run_user(args, quant: str | None, warm: bool) -> dict:
    """The node's path: from_pretrained, warmup, predict; then batches of N arms."""
    import torch

    from vla_ros.policy import cache
    from vla_ros.policy.policy import OpenVLAPolicy
    dev = _device(args)
    lines: list[str] = []
    t0 = time.perf_counter()
    policy = OpenVLAPolicy.from_pretrained(args.ckpt, unnorm_key=UNNORM_KEY, device=dev,
                                           quantization=quant, progress=lines.append)
    load_s = time.perf_counter() - t0
    rec: dict = {'quantization': quant, 'load_s': load_s, 'load_log': lines[-3:],
                 'host_rss_after_load_gb': _rss_gb(), **_gpu_peak()}
    rec['load_peak_vram_gb'] = rec.pop('peak_vram_gb', None)
    rec.pop('peak_reserved_gb', None)
    images = {frame: _images(shape) for frame, shape in FRAMES.items()}
    policy.warmup()
    policy.predict(images['224x224'][0], INSTRUCTIONS[0])
    rec['ready_s'] = time.perf_counter() - t0
    eng = policy.decode_engine
    rec['engine'] = {'compiled': eng.compiled, 'graph_captured': eng.graph_captured,
                     'compile_error': eng.compile_error, 'graph_error': eng.graph_error}
    if warm:
        rec.update(_gpu_peak())
        return rec
    rec['frames'] = {}
    for frame, imgs in images.items():
        for r in range(5):
            policy.predict(imgs[r], INSTRUCTIONS[r])
        times, probs = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            out = policy.predict(imgs[r % 8], INSTRUCTIONS[r % 8])
            times.append((time.perf_counter() - t) * 1e3)
            probs.append(float(out.token_probs.min()))
        rec['frames'][frame] = dict(_stats(times), times_ms=times, tokens=list(out.token_ids),
                                    min_token_prob=min(probs))
    rec.update(_gpu_peak())
    rec['host_rss_peak_gb'] = _rss_gb()
    rec['profile'] = _stage_profile(policy, images['224x224'], dev)
    rec['teacher_forced'] = _teacher_forced(policy, images['224x224'], dev)
    if dev.type == 'cuda':
        rec['kernels'] = _kernel_profile(policy, images['224x224'])
    rec['kernel_choices'] = cache.choices()
    _write_partial(args, rec)
    rec['batching'] = []
    imgs = images['224x224']
    for n in BATCH_SIZES:
        if time.perf_counter() - t0 > args.worker_budget_s:
            rec['batching_cut'] = f'worker budget reached before N={n}'
            break
        if dev.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        batch_imgs = [imgs[i % 8] for i in range(n)]
        batch_ins = [INSTRUCTIONS[i % 8] for i in range(n)]
        for _ in range(2):
            policy.predict_batch(batch_imgs, batch_ins)
        times = []
        for _ in range(max(5, args.repeats // 2)):
            t = time.perf_counter()
            outs = policy.predict_batch(batch_imgs, batch_ins)
            times.append((time.perf_counter() - t) * 1e3)
        assert all(len(o.token_ids) == N_TOKENS for o in outs)
        batch_ms = statistics.median(times)
        rec['batching'].append({'n_arms': n, 'mode': quant or 'bf16', 'batch_ms': batch_ms,
                                'p90_ms': _stats(times)['p90_ms'],
                                'throughput_hz': n * 1e3 / batch_ms,
                                'per_arm_latency_ms': batch_ms, **_gpu_peak()})
        _write_partial(args, rec)
    return rec


def _write_partial(args, rec: dict) -> None:
    Path(args.json).write_text(json.dumps(rec))


def worker_main(args) -> None:
    import logging
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
    import torch
    name = args.worker
    if name == 'write':
        rec = write_checkpoint(args)
    elif name == 'micro':
        rec = run_micro(args)
    elif name == 'reference_bf16':
        rec = run_reference(args)
    else:
        quant = 'int4' if name.startswith('int4') else None
        rec = run_user(args, quant, warm=name.endswith('_warm'))
    rec['name'] = name
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
    for mod in ('torch', 'transformers', 'timm', 'triton', 'safetensors'):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def model_sizes(ckpt: str) -> dict:
    """Parameter counts from the checkpoint's headers (for the floors)."""
    from vla_ros.policy.checkpoint import _shard_headers, weight_map
    from vla_ros.policy.int4_kernels import group_size_for
    from vla_ros.policy.quant import quantizes
    headers = _shard_headers(weight_map(ckpt)[0])
    vision = llm_linear = llm_other = int4_bytes = 0
    for key, (_, shape, _) in headers.items():
        n = 1
        for d in shape:
            n *= d
        module = key.rpartition('.')[0]
        if key.startswith(('vision_backbone.', 'projector.')):
            vision += n
        elif quantizes(module) and key.endswith('weight'):
            llm_linear += n
            int4_bytes += n // 2 + 4 * n // (group_size_for(shape[-1]) or 1)
        elif 'embed_tokens' not in key:
            llm_other += n
    return {'vision_params': vision, 'llm_linear_params': llm_linear,
            'llm_other_params': llm_other,
            'decode_bytes': {'bf16': 2 * (llm_linear + llm_other),
                             'int4': int4_bytes + 2 * llm_other}}


def floor_ms(sizes: dict, micro: dict, mode: str, n_arms: int, prefix_len: int) -> dict:
    """The physical floor of one batch of ``n_arms`` actions on this GPU."""
    # weights are read, not copied: the better of the copy and the read-only rate
    bw = max(micro['copy_bw_tbs'], micro.get('read_bw_tbs', 0)) * 1e12
    rate = micro['bf16_matmul_tflops'] * 1e12
    dbytes = sizes['decode_bytes'][mode]
    vision = max(2 * sizes['vision_params'] * 256 * n_arms / rate,
                 2 * sizes['vision_params'] / bw) * 1e3
    prefill = max(2 * sizes['llm_linear_params'] * prefix_len * n_arms / rate,
                  dbytes / bw) * 1e3
    step = max(dbytes / bw, 2 * sizes['llm_linear_params'] * n_arms / rate) * 1e3
    return {'vision_ms': vision, 'prefill_ms': prefill, 'decode_step_ms': step,
            'action_ms': vision + prefill + (N_TOKENS - 1) * step}


def finalize(result: dict) -> None:
    """Flatten the workers' records into the issue's schema (variants[], batching[])."""
    raw = result['raw']
    micro, ref = raw.get('micro', {}), raw.get('reference_bf16', {})
    sizes = result.get('model_sizes')
    variants, batching = [], []
    for name in ('reference_bf16', 'bf16', 'int4'):
        rec = raw.get(name)
        if not rec or 'frames' not in rec:
            continue
        mode = 'int4' if name == 'int4' else 'bf16'
        prefix = rec.get('profile', {}).get('prefix_len', 280)
        floor = floor_ms(sizes, micro, mode, 1, prefix) if sizes and 'copy_bw_tbs' in micro \
            else None
        for frame, st in rec['frames'].items():
            v = {'name': f'{name} {frame}', 'path': 'reference' if name.startswith('ref')
                 else 'user', 'frame': frame, 'median_ms': st['median_ms'], 'p90_ms': st['p90_ms'],
                 'peak_vram_gb': rec.get('peak_vram_gb'), 'load_s': rec.get('load_s'),
                 'ready_s': rec.get('ready_s')}
            if floor:
                v['floor_ms'] = floor['action_ms']
                v['ratio_to_floor'] = st['median_ms'] / floor['action_ms']
            ref_st = ref.get('frames', {}).get(frame)
            if ref_st:
                v['ratio_to_reference'] = ref_st['median_ms'] / st['median_ms']
            warm = raw.get(f'{name}_warm')
            if warm and 'ready_s' in warm:
                v['ready_s_warm'] = warm['ready_s']
            variants.append(v)
        for row in rec.get('batching', []):
            row = dict(row)
            if sizes and 'copy_bw_tbs' in micro:
                row['floor_ms'] = floor_ms(sizes, micro, mode, row['n_arms'], prefix)['action_ms']
                row['ratio_to_floor'] = row['batch_ms'] / row['floor_ms']
            batching.append(row)
    result['variants'] = variants
    result['batching'] = batching


def print_table(result: dict) -> None:
    print(f"device: {result['device']}")
    micro = result['raw'].get('micro', {})
    if 'copy_bw_tbs' in micro:
        print(f"copy {micro['copy_bw_tbs']:.2f} TB/s, read {micro.get('read_bw_tbs', 0):.2f} "
              f"TB/s, bf16 matmul "
              f"{micro['bf16_matmul_tflops']:.0f} TFLOP/s, int4 asm {micro['int4_inline_asm']}")
        for shape, row in micro.get('int4', {}).items():
            best = row.get('best')
            if best:
                b = row[best]
                print(f"  int4 {shape:12s} {best:28s} {b['ms'] * 1e3:7.1f} us "
                      f"{b['weight_tbs']:5.2f} TB/s {b['tflops']:6.0f} TFLOP/s | cuBLAS bf16 "
                      f"{row['bf16_cublas']['ms'] * 1e3:7.1f} us")
    print(f"{'variant':24s} {'median':>8s} {'p90':>7s} {'peakGB':>7s} {'load_s':>7s} "
          f"{'ready_s':>7s} {'warm_s':>7s} {'xref':>6s} {'xfloor':>6s}")
    for v in result['variants']:
        print(f"{v['name']:24s} {v['median_ms']:8.1f} {v['p90_ms']:7.1f} "
              f"{v.get('peak_vram_gb') or 0:7.2f} {v.get('load_s') or 0:7.1f} "
              f"{v.get('ready_s') or 0:7.1f} {v.get('ready_s_warm') or 0:7.1f} "
              f"{v.get('ratio_to_reference', 0):6.2f} {v.get('ratio_to_floor', 0):6.2f}")
    for row in result['batching']:
        print(f"  batch {row['mode']:5s} N={row['n_arms']:2d} {row['batch_ms']:7.1f} ms "
              f"{row['throughput_hz']:6.1f} Hz floor {row.get('floor_ms', 0):6.1f} "
              f"x{row.get('ratio_to_floor', 0):.2f} peak {row.get('peak_vram_gb', 0):.1f} GB")
    for name in ('bf16', 'int4'):
        prof = result['raw'].get(name, {}).get('profile')
        if prof:
            print(f"  {name} stages: " + ', '.join(f'{k} {v:.2f}' for k, v in prof.items()))
    for s in result['skipped']:
        print(f"skipped {s['name']}: {s['reason'][:300]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tiny', action='store_true', help='toy sizes on the CPU (smoke test)')
    ap.add_argument('--variants', default=','.join(VARIANTS))
    ap.add_argument('--ckpt', default='/tmp/openvla7b_random', help='checkpoint directory '
                    '(written by the write variant if missing)')
    ap.add_argument('--repeats', type=int, default=20)
    ap.add_argument('--out', default=None, help='JSON result path')
    ap.add_argument('--log', default=None, help='append worker output here')
    ap.add_argument('--deadline-s', type=float, default=540.0,
                    help='variants that would start after this many seconds are skipped')
    ap.add_argument('--worker-budget-s', type=float, default=200.0,
                    help='a user-path worker stops adding batch sizes after this long')
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
              'n_tokens': N_TOKENS, 'repeats': args.repeats, 'unnorm_key': UNNORM_KEY,
              'variants': [], 'batching': [], 'skipped': [], 'raw': {}}
    out_path = Path(args.out) if args.out else None
    log = open(args.log, 'a') if args.log else None  # noqa: SIM115

    def save():
        finalize(result)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1))

    for name in args.variants.split(','):
        elapsed = time.perf_counter() - t_start
        if name == 'write' and Path(args.ckpt, 'model.safetensors.index.json').is_file():
            continue
        if elapsed > args.deadline_s:
            result['skipped'].append({'name': name, 'reason': f'deadline ({elapsed:.0f} s)'})
            continue
        tmp = Path(f'/tmp/bench_{name}_{os.getpid()}.json')
        tmp.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, '--worker', name, '--json', str(tmp), '--ckpt',
               args.ckpt, '--repeats', str(args.repeats), '--worker-budget-s',
               str(min(args.worker_budget_s, max(30.0, args.deadline_s - elapsed - 30)))]
        if args.tiny:
            cmd.append('--tiny')
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=max(30.0, args.deadline_s + 45 - elapsed))
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 'timeout'
            text = (exc.stdout or b'').decode() if isinstance(exc.stdout, bytes) else \
                str(exc.stdout or '')
            text += (exc.stderr or b'').decode() if isinstance(exc.stderr, bytes) else \
                str(exc.stderr or '')
        wall = time.perf_counter() - t0
        if log:
            log.write(f'===== {name} rc={rc} {wall:.1f}s\n{text[-30000:]}\n')
            log.flush()
        if tmp.exists():
            rec = json.loads(tmp.read_text())
            rec['wall_s'] = wall
            if rc != 0:
                rec['incomplete'] = f'rc={rc}: {text.strip().splitlines()[-1] if text else ""}'
            result['raw'][name] = rec
        if rc != 0:
            err = text.strip().splitlines()[-1] if text.strip() else str(rc)
            result['skipped'].append({'name': name, 'reason': f'rc={rc}: {err[-500:]}'})
        if name == 'write' or 'model_sizes' not in result:
            try:
                result['model_sizes'] = model_sizes(args.ckpt)
            except Exception as exc:  # noqa: BLE001 - no checkpoint yet
                result['model_sizes_error'] = str(exc)[:200]
        save()
        print(f'[{time.perf_counter() - t_start:6.1f}s] {name}: rc={rc} ({wall:.1f} s)',
              flush=True)
    save()
    print_table(result)


if __name__ == '__main__':
    main()
