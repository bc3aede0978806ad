"""Does serving many arms from one VLA node cost task success? N arms vs one, closed loop, graph.

Runs ``vla_ros.eval.run_graph`` twice with the same settings and the same episodes: N arms
served by one VLA node (``vla-ros bringup --sim --arg robots:=arm1,...``), the arms sharing the
schedule (arm a runs its a-th consecutive part, all arms at once, each in a scene of its own),
then one arm (``vla-ros bringup --sim``) running all of it; the shipped checkpoint on the CPU.
``--time-scale`` slows the loop (see ``vla_ros.eval``) for a CPU that cannot run the batch within
the 0.2 s period. Writes, for each arm, each task and all episodes, the N-arm success rate, the
single-arm rate on the same layouts and the shortfall in points, with the VLA node's batch
figures (batches, mean batch size, median batch time), the stops by kind and the load average.

  .venv/bin/python bench/bench_multi_arm.py --arms 4 --episodes 10 --time-scale 8 \\
      --out bench/results/eval_graph_4arms.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(config, label: str, domain_id: int) -> dict:  # noqa: ANN001
    from vla_ros.eval import _print_progress, run_graph, summarize

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    diagnostics: dict = {}
    results = run_graph(config, domain_id=domain_id, progress=_print_progress,
                        diagnostics=diagnostics)
    vla = diagnostics.get('vla', {})
    (policy,) = [v for name, v in vla.items() if name.endswith('vla_node: policy')] or [{}]
    arms = sorted({r.arm for r in results})
    return {
        'label': label, 'arms': arms, 'seconds': round(time.perf_counter() - t0, 1),
        'load_average_1min': {'start': round(load, 2), 'end': round(os.getloadavg()[0], 2)},
        'vla_node': {k: policy.get(k) for k in ('batches', 'mean_batch_size',
                                                'median_batch_ms', 'median_inference_ms')},
        'vla_node_arms': {name.rsplit(' ', 1)[-1]: v for name, v in vla.items()
                          if ': arm ' in name},
        'stop_reasons': {arm: dict(sum((Counter(r.stop_reasons) for r in results
                                         if r.arm == arm), Counter()))
                         for arm in arms},
        'per_arm': {arm: {s.task: {'successes': s.successes, 'episodes': s.episodes,
                                   'success_rate': s.success_rate,
                                   'steps_to_success_mean': s.steps_to_success_mean,
                                   'action_rate_hz': s.action_rate_hz,
                                   'stops_per_episode': s.stops_per_episode}
                          for s in summarize([r for r in results if r.arm == arm])}
                    for arm in arms},
        'episodes': [r.to_dict() for r in results],
    }


def compare(single: dict, multi: dict) -> dict:
    """Each arm, each task and all episodes: N-arm success vs single-arm on the same layouts."""
    reference = {e['seed']: e['success'] for e in single['episodes']}

    def row(episodes: list[dict]) -> dict:
        rate = sum(e['success'] for e in episodes) / len(episodes)
        same = sum(reference[e['seed']] for e in episodes) / len(episodes)
        return {'episodes': len(episodes), 'success_rate': rate,
                'single_arm_same_layouts': same, 'shortfall_points': round(100 * (same - rate), 1)}

    episodes = multi['episodes']
    out = {'arms': {arm: row([e for e in episodes if e['arm'] == arm])
                    for arm in multi['per_arm']},
           'tasks': {task: row([e for e in episodes if e['task'] == task])
                     for task in dict.fromkeys(e['task'] for e in episodes)},
           'all': row(episodes)}
    out['worst_arm_shortfall_points'] = max(r['shortfall_points'] for r in out['arms'].values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--arms', type=int, default=4)
    ap.add_argument('--episodes', type=int, default=10,
                    help='episodes per task (the arms share them)')
    ap.add_argument('--time-scale', dest='time_scale', type=float, default=8.0)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--tasks', default='', help='comma list (default: every task)')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()

    import logging

    from vla_ros.bringup import default_checkpoint
    from vla_ros.eval import EvalConfig
    from vla_ros.testing import reserved_domain

    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    common = {'episodes': args.episodes, 'policies': ('vla',), 'seed': args.seed,
              'time_scale': args.time_scale}
    if args.tasks:
        common['tasks'] = tuple(args.tasks.split(','))
    single_config = EvalConfig(**common)
    result = {'command': '.venv/bin/python ' + ' '.join(
                  [str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]),
              'machine': {'nproc': os.cpu_count()}, 'checkpoint': default_checkpoint().name,
              'device': 'cpu', 'episodes_per_task': args.episodes, 'seed': args.seed,
              'time_scale': args.time_scale,
              'loop_safety_changes': single_config.scaled_safety(),
              'action_period_s': single_config.loop_safety.action_period}

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + '\n', encoding='utf-8')

    # A DDS domain of its own: another graph on the machine (a test run, a demo) would mix its
    # VLA node's /diagnostics into the figures.
    with reserved_domain() as domain:
        result['multi'] = _run(EvalConfig(**common, arms=args.arms), f'{args.arms} arms', domain)
        write()
        result['single'] = _run(single_config, '1 arm', domain)
    result['comparison'] = compare(result['single'], result['multi'])
    write()
    print(json.dumps(result['comparison'], indent=1), flush=True)


if __name__ == '__main__':
    main()
