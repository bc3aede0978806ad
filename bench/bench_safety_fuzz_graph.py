"""Adversarial fuzz of the safety node through the node graph: >= 10^4 actions, zero tolerance.

The safety node and the simulated arm (with contact) run as processes over Fast DDS; the bench
takes the VLA node's place with ``vla_ros.testing.safety_fuzz.run_fuzz`` (adversarial actions at
50 Hz, episodes, e-stops, resets) and counts every violation of a hard limit in the commanded
twists and on the simulated arm with ``check``. ``test/test_safety_fuzz_graph.py`` runs the same
code for 1,500 actions in CI.

    .venv/bin/python bench/bench_safety_fuzz_graph.py --actions 12000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from vla_ros.testing import NodeProcess, node_processes, rclpy_context, reserved_domain, ros_env
from vla_ros.testing.graph import SafetyHarness
from vla_ros.testing.safety_fuzz import SAFETY_ARGS, SIM_ARGS, check, run_fuzz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--actions', type=int, default=12000)
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results'
                                         / 'safety_fuzz_graph.json'))
    opts = ap.parse_args()
    result: dict = {'command': ' '.join([Path(sys.executable).name, *sys.argv]),
                    'machine': {'nproc': os.cpu_count(), 'python': platform.python_version(),
                                'load_average_at_start': os.getloadavg()},
                    'safety_config': 'config/safety_node.yaml defaults'}
    with tempfile.TemporaryDirectory() as tmp, reserved_domain() as domain:
        env = ros_env(domain)
        safety = NodeProcess('vla_ros.nodes.safety_node', SAFETY_ARGS + [
            '-p', f'latch_file:={Path(tmp) / "latch"}'], env=env)
        sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=env)
        with node_processes(safety, sim), rclpy_context(domain) as ctx:
            h = SafetyHarness(ctx)
            if not (safety.wait_for_output('safety node ready', 60) and h.connected()
                    and h.wait_joint_states()):
                raise RuntimeError('graph did not come up:\n' + safety.output + sim.output)
            t0 = time.monotonic()
            rec = run_fuzz(h, opts.actions, seed=opts.seed, progress=True)
            result.update(check(h, rec))
            result['alive_after'] = {'safety_node': safety.alive(), 'sim_arm_node': sim.alive()}
            h.close()
    result['sent'] = {'actions': rec.actions, 'families': rec.kinds, 'episodes': rec.episodes,
                      'estops': rec.estops, 'resets': rec.resets,
                      'seconds': round(time.monotonic() - t0, 1)}
    result['machine']['load_average_at_end'] = os.getloadavg()
    Path(opts.out).write_text(json.dumps(result, indent=2) + '\n')
    v = result['violations']
    print(f"{rec.actions} actions, {result['twists']} twists, {result['joint_states']} joint "
          f"states: {sum(v.values())} violations {v}")
    return 0 if sum(v.values()) == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
