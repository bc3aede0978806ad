"""Confidence of the shipped policy on in-distribution vs perturbed frames, and a gate threshold.

The shipped checkpoint (``checkpoints/sim_tabletop``, through ``OpenVLAPolicy.from_pretrained``
and ``predict_batch``, CPU) drives the simulated arm in process on the four tasks (the frames the
camera node would forward: ``vla_ros.core.image.preprocess`` with its defaults). At every step
the same state is also shown perturbed: the camera occluded (a grey or dark patch over 30-60 %
of the frame, like a hand or a cap), unseen colours (the colour channels rotated: red blocks
look blue, the table green) and a wrong instruction (tasks it was never trained on). The score
of an action is the geometric mean of its 7 token probabilities (``min_mean_token_prob``), its
least token probability (``min_token_prob``) or its least margin (``min_token_margin``); the
report gives their distributions, the ROC AUC of "in distribution" against each perturbation,
the share of every kind refused over a sweep of thresholds, and for each score the highest
threshold (a multiple of 0.05 for the geometric mean, of 0.01 otherwise) that refused no
in-distribution action of the study, with the share of each perturbation it refuses. The
geometric mean's is the default ``min_mean_token_prob``; the
closed-loop success with it through the node graph is measured by
``python -m vla_ros.eval`` (see ``docs/safety.md``).

    .venv/bin/python bench/bench_confidence.py --episodes 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from vla_ros.bringup import default_checkpoint
from vla_ros.core.image import ImageConfig, preprocess
from vla_ros.sim.tasks import TASKS, World

WRONG = ('stack the blocks on the left', 'open the top drawer', 'wipe the table clean',
         'pick up the green block', 'put the red block in the bowl', 'move to the yellow block')
KINDS = ('in_distribution', 'occluded', 'unseen_colours', 'wrong_instruction')


def occlude(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey or dark patch over 30-60 % of the frame."""
    out = rgb.copy()
    h, w = rgb.shape[:2]
    area = rng.uniform(0.3, 0.6)
    ph = int(h * math.sqrt(area) * rng.uniform(0.8, 1.2))
    pw = min(w, int(area * h * w / max(ph, 1)))
    ph = min(h, ph)
    y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out[y:y + ph, x:x + pw] = rng.integers(10, 120)
    return out


def recolour(rgb: np.ndarray) -> np.ndarray:
    """Rotate the colour channels (R->G->B->R): colours never seen in training."""
    return rgb[..., [2, 0, 1]].copy()


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of ``positive`` scoring above ``negative`` (ties count half; Mann-Whitney)."""
    both = np.concatenate([positive, negative])
    order = np.argsort(both, kind='mergesort')
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    for v in np.unique(both):  # average ranks of ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    r_pos = ranks[:positive.size].sum()
    return float((r_pos - positive.size * (positive.size + 1) / 2)
                 / (positive.size * negative.size))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--episodes', type=int, default=10, help='episodes per task')
    ap.add_argument('--seed', type=int, default=20000)
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'confidence.json'))
    opts = ap.parse_args()
    from vla_ros.policy.policy import OpenVLAPolicy

    policy = OpenVLAPolicy.from_pretrained(default_checkpoint(), device='cpu', progress=None)
    image_config = ImageConfig()
    rng = np.random.default_rng(opts.seed)
    world = World()
    scores: dict[str, dict[str, list[float]]] = {k: {'prob': [], 'margin': [], 'mean_log': []}
                                                 for k in KINDS}
    successes: dict[str, int] = {}
    start = time.perf_counter()
    for name, task in TASKS.items():
        successes[name] = 0
        for e in range(opts.episodes):
            world.reset(opts.seed + 1000 * len(successes) + e, task)
            for _ in range(task.max_steps):
                raw = world.observe()
                frames = [raw, occlude(raw, rng), recolour(raw), raw]
                images = [preprocess(f, image_config) for f in frames]
                texts = [task.instruction] * 3 + [str(rng.choice(WRONG))]
                outs = policy.predict_batch(images, texts)
                for kind, out in zip(KINDS, outs, strict=True):
                    scores[kind]['prob'].append(float(np.min(out.token_probs)))
                    scores[kind]['margin'].append(float(np.min(out.token_margins)))
                    scores[kind]['mean_log'].append(float(np.mean(np.log(np.maximum(
                        out.token_probs, 1e-12)))))
                world.step_delta(outs[0].action)
                if world.success():
                    successes[name] += 1
                    break
    result: dict = {'command': ' '.join([Path(sys.executable).name, *sys.argv]),
                    'checkpoint': 'checkpoints/sim_tabletop', 'device': 'cpu',
                    'machine': {'nproc': os.cpu_count(), 'python': platform.python_version()},
                    'seconds': round(time.perf_counter() - start, 1),
                    'in_process_successes': {k: f'{v}/{opts.episodes}'
                                             for k, v in successes.items()},
                    'score': 'least token probability of the 7 action tokens (and margin)'}
    sweep = [round(0.01 * k, 2) for k in range(1, 13)]
    result['refused_share_by_threshold'] = {
        kind: {f'{t:.2f}': float((np.asarray(scores[kind]['prob']) < t).mean()) for t in sweep}
        for kind in KINDS}
    result['geometric_mean_prob'] = {
        kind: {'p1': float(np.quantile(np.exp(scores[kind]['mean_log']), 0.01)),
               'p50': float(np.median(np.exp(scores[kind]['mean_log'])))} for kind in KINDS}
    for kind in KINDS:
        scores[kind]['geomean'] = np.exp(scores[kind]['mean_log']).tolist()
    result['refused_share_by_geomean_threshold'] = {
        kind: {f'{t:.2f}': float((np.asarray(scores[kind]['geomean']) < t).mean())
               for t in np.arange(0.05, 0.55, 0.05)} for kind in KINDS}
    for metric in ('geomean', 'prob', 'margin'):
        ind = np.asarray(scores['in_distribution'][metric])
        step = 0.05 if metric == 'geomean' else 0.01
        thr = float(np.floor(ind.min() / step) * step)  # refuses none of the study's own
        thr = round(thr, 2)
        block: dict = {'threshold': thr,
                       'in_distribution': {'n': int(ind.size), 'p1': float(np.quantile(ind, 0.01)),
                                           'p50': float(np.median(ind)),
                                           'refused_at_threshold': float((ind < thr).mean())}}
        for kind in KINDS[1:]:
            x = np.asarray(scores[kind][metric])
            block[kind] = {'n': int(x.size), 'p50': float(np.median(x)),
                           'p99': float(np.quantile(x, 0.99)), 'roc_auc': auc(ind, x),
                           'refused_at_threshold': float((x < thr).mean())}
        block['histogram'] = {k: np.histogram(scores[k][metric], bins=10, range=(0, 1))[0]
                              .tolist() for k in KINDS}
        result['mean_token_prob' if metric == 'geomean' else f'min_token_{metric}'] = block
    ind = np.asarray(scores['in_distribution']['mean_log'])
    result['mean_token_log_prob_auc'] = {k: auc(ind, np.asarray(scores[k]['mean_log']))
                                         for k in KINDS[1:]}
    Path(opts.out).write_text(json.dumps(result, indent=2) + '\n')
    for key in ('mean_token_prob', 'min_token_prob', 'min_token_margin'):
        metric = key
        b = result[key]
        aucs = ', '.join(f'{k} {b[k]["roc_auc"]:.3f}' for k in KINDS[1:])
        print(f'{metric}: threshold {b["threshold"]} (refuses '
              f'{b["in_distribution"]["refused_at_threshold"]:.3f} of in-distribution); '
              f'AUC {aucs}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
