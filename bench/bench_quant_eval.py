"""Does quantization cost task success? The shipped sim checkpoint, bf16 vs int4, closed loop.

Runs ``vla_ros.eval.run_in_process`` (the simulated arm and the same safety limiter as the node
graph, on a simulated clock) for the VLA policy loaded in each precision, with the same episodes
(layout seeds) for every mode, and writes the success rate per task and mode with the
difference to bf16. The policy runs where ``--device`` says; the simulator needs the arm model
library (pinocchio), so this runs where that is installed.

  .venv/bin/python bench/bench_quant_eval.py --episodes 50 --out bench/results/quant_eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--episodes', type=int, default=50, help='episodes per task')
    ap.add_argument('--modes', default='bf16,int4')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--seed', type=int, default=10000)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()

    import torch

    from vla_ros.bringup import default_checkpoint
    from vla_ros.eval import EvalConfig, run_in_process, summarize
    from vla_ros.policy.policy import OpenVLAPolicy

    torch.set_num_threads(1)
    config = EvalConfig(episodes=args.episodes, policies=('vla',), seed=args.seed)
    result = {'command': 'python ' + ' '.join([str(Path(__file__).relative_to(ROOT))]
                                              + sys.argv[1:]),
              'machine': f'{platform.processor() or platform.machine()}, '
                         f'torch {torch.__version__}',
              'device': args.device, 'checkpoint': default_checkpoint().name,
              'episodes_per_task': args.episodes, 'seed': args.seed, 'modes': {}}
    for mode in args.modes.split(','):
        t0 = time.perf_counter()
        policy = OpenVLAPolicy.from_pretrained(
            default_checkpoint(), device=args.device, dtype=torch.bfloat16,
            quantization=None if mode == 'bf16' else mode, progress=None)
        episodes = run_in_process(config, vla=policy)
        summaries = summarize(episodes)
        result['modes'][mode] = {
            'seconds': time.perf_counter() - t0,
            'tasks': {s.task: {'success_rate': s.success_rate, 'episodes': s.episodes,
                               'steps_to_success_mean': s.steps_to_success_mean}
                      for s in summaries},
            'success_rate': sum(e.success for e in episodes) / len(episodes)}
        print(mode, {t: v['success_rate'] for t, v in result['modes'][mode]['tasks'].items()},
              flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    base = result['modes'].get('bf16')
    if base:
        for rec in result['modes'].values():
            rec['points_vs_bf16'] = {
                t: 100 * (v['success_rate'] - base['tasks'][t]['success_rate'])
                for t, v in rec['tasks'].items()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({m: r.get('points_vs_bf16') for m, r in result['modes'].items()}))


if __name__ == '__main__':
    main()
