"""Robot host and inference host over DDS: end-to-end latency across the link, and link faults.

The graph of ``test/test_two_hosts.py`` (``vla_ros.testing.fleet.TwoHostGraph``: discovery
server, ``vla-ros bringup --sim --arg role:=robot`` on the robot host, ``--arg role:=inference``
with the shipped checkpoint on the CPU of the inference host, network namespaces joined by a
switch, as root), driven through phases: baseline, 100 ms and 200 ms delay each way, 10 % loss,
both, and the link down for 3 s. For each phase, from what reached the robot host: the actions
that arrived and the age of their camera frame on arrival, the actions the safety node passed
and their camera frame -> limited twist latency (the status it publishes with the twist), the
share of twists that moved the arm, moving twists without a fresh and recent action (must be
0), and how long the arm took to move again once the fault was cleared. The same graph with
both sides on one host gives the reference for what the link adds, and two ping-pong processes
on that host what the profile's fragment size costs within a host (``shm_round_trips``).

    .venv/bin/python bench/bench_two_hosts.py --out bench/results/two_hosts.json   # as root

Safety limits: config/safety_node.yaml, except what would end or pause the episode near its goal
while faults are measured (stop detection ``still_count``, ``min_token_prob``,
``max_contact_force``: all off); ``--safety name=value`` overrides more. The
figures depend on the CPU load: the JSON records the load average before and after.
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

import yaml

from vla_ros.bringup import config_dir
from vla_ros.testing import node_processes, reserved_domain
from vla_ros.testing.fleet import (
    Limits,
    TwoHostGraph,
    action_ages,
    figures_table,
    fleet_env,
    frame_to_twist_ms,
    round_trip_table,
    safety_config,
    stale_motion,
    vla_ros,
)
from vla_ros.testing.netns import Lan, netem_supported

#: (phase, delay each way [s], loss per frame, seconds held); the link-down phase is separate.
PHASES = (('baseline', 0.0, 0.0, 20.0), ('delay_100ms', 0.1, 0.0, 15.0),
          ('delay_200ms', 0.2, 0.0, 15.0), ('loss_10pct', 0.0, 0.1, 15.0),
          ('delay_200ms_loss_10pct', 0.2, 0.1, 15.0))
LINK_DOWN_S = 3.0
RECOVERY_TIMEOUT = 30.0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _window(g: TwoHostGraph, start: int, end: int) -> dict:
    """The metrics of one phase window [start, end] (ns), from the recording."""
    rec = g.rec.update()
    ages = [a * 1e3 for a in action_ages(rec, start, end)]
    latency = list(frame_to_twist_ms(rec, start, end))
    twists = [tw for tw in rec.twists if start <= tw['s'] <= end]
    moving = [tw for tw in twists if any(tw['v'])]
    return {
        'seconds': (end - start) / 1e9,
        'actions_received': len(ages),
        'action_rate_hz': len(ages) / ((end - start) / 1e9),
        'frame_age_on_arrival_ms': {'p50': _pct(ages, 0.5), 'p90': _pct(ages, 0.9),
                                    'max': max(ages, default=None)},
        'actions_passed': len(latency),
        'frame_to_twist_ms': {'p50': _pct(latency, 0.5), 'p90': _pct(latency, 0.9),
                              'min': min(latency, default=None)},
        'moving_twist_share': len(moving) / len(twists) if twists else None,
        'stale_motion': len(stale_motion(rec, g.limits, start, end)),
        'load_1min': os.getloadavg()[0],  # the machine's, other work included
    }


def _recovery(g: TwoHostGraph, since: int) -> float | None:
    first = g.moving_after(since, RECOVERY_TIMEOUT)
    return None if first is None else (first['s'] - since) / 1e9


def run(net: Lan, domain_id: int, tmp: Path, safety_yaml: Path, profile: Path | None,
        inference: str, phases: tuple) -> dict:
    """Bring the graph up, instruct, go through ``phases``, then the link-down phase."""
    out: dict[str, object] = {}
    record = tmp / f'record_{inference}.jsonl'
    with TwoHostGraph(net, domain_id, record, safety_yaml=safety_yaml, profile=profile,
                      inference=inference) as g:
        done = vla_ros(g.robot, g.env, 'instruct', 'move to the red block')
        if done.returncode:
            raise RuntimeError(done.stdout + done.stderr)
        g.moving_after(0, 60)
        for name, delay, loss, hold in phases:
            start = time.time_ns()
            if delay or loss:
                out['impairment'] = net.impair(delay, loss)
            time.sleep(hold)
            end = time.time_ns()
            net.clear()
            # Leave out the first 2 delays + 1 s: what was on its way when the fault began.
            settled = start + int((2 * delay + 1.0) * 1e9) if (delay or loss) else start
            out[name] = {'delay_each_way_s': delay, 'loss': loss, **_window(g, settled, end),
                         'moving_again_after_s': _recovery(g, end) if (delay or loss) else None}
            print(f'[bench] {name}: {json.dumps(out[name])}', flush=True)
        if inference != g.robot.name:
            g.wait_moving(RECOVERY_TIMEOUT)
            cut = time.time_ns()
            g.inference.link_down()
            time.sleep(LINK_DOWN_S)
            up = time.time_ns()
            g.inference.link_up()
            rec = g.rec.update()
            last = max((tw['s'] for tw in rec.moving() if tw['s'] < up), default=None)
            out['link_down'] = {
                'held_s': (up - cut) / 1e9,
                'last_motion_after_cut_s': None if last is None else (last - cut) / 1e9,
                'bound_s': g.limits.stop_bound_ns / 1e9,
                'actions_while_down': len([a for a in rec.actions
                                           if cut + 20_000_000 < a['t'] < up]),
                'moving_again_after_s': _recovery(g, up),
            }
            print(f'[bench] link_down: {json.dumps(out["link_down"])}', flush=True)
        out['stale_motion_whole_run'] = len(stale_motion(g.rec.update(), g.limits))
    return out


def shm_cost(net: Lan, domain_id: int, tmp: Path, profiles: list[Path]) -> dict:
    """Round trips of 224x224 observations and 640x480 images within one host, per profile.

    What a profile's fragment size costs the robot host: two ping-pong processes
    (``vla_ros.testing.pingpong_node``, reliable, 10 Hz) exchange frames in shared memory.
    """
    host = next(iter(net.hosts.values()))
    out = {}
    for profile in profiles:
        env = fleet_env(domain_id, '', profile)
        env.pop('ROS_DISCOVERY_SERVER')
        result = tmp / f'rtt_{profile.stem}.json'
        pong = host.node_process('vla_ros.testing.pingpong_node',
                                 ['pong', '--image-qos', 'reliable'], env=env)
        ping = host.node_process('vla_ros.testing.pingpong_node', [
            'ping', '--kind', 'both', '--image-qos', 'reliable', '--rate', '10', '--warmup', '10',
            '--count', '100', '--out', str(result)], env=env)
        with node_processes(pong, ping):
            ping.proc.wait(120)
        rtt = json.loads(result.read_text())
        out[_shown(profile)] = {kind: {
            'rtt_p50_ms': _pct([x / 1e6 for x in v['rtt_ns']], 0.5),
            'rtt_p90_ms': _pct([x / 1e6 for x in v['rtt_ns']], 0.9), 'lost': v['lost']}
            for kind, v in rtt.items()}
        print(f'[bench] shm cost {profile.name}: {json.dumps(out[_shown(profile)])}', flush=True)
    return out


def _shown(path: Path) -> str:
    """``config/<file>`` for the package's own profiles, else the path as given."""
    return f'config/{path.name}' if path.resolve().parent == config_dir() else str(path)


def main() -> int:
    """Run the benchmark and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, default=Path('bench/results/two_hosts.json'))
    parser.add_argument('--safety', action='append', default=[], metavar='NAME=VALUE',
                        help='override a safety_node parameter (YAML value)')
    parser.add_argument('--profile', type=Path, default=config_dir() / 'fastdds_fleet.xml',
                        help='Fast DDS profile of every process (config/fastdds_fleet.xml)')
    parser.add_argument('--no-one-host', action='store_true',
                        help='skip the one-host reference run')
    parser.add_argument('--keep', type=Path, default=None, metavar='DIR',
                        help='keep the recordings (JSON lines) in DIR')
    parser.add_argument('--phases', default=','.join(p[0] for p in PHASES),
                        help='comma list of phases to run (the link-down phase always runs)')
    opts = parser.parse_args()
    # The arm keeps moving while faults are measured: no stop detection, no low-confidence or
    # contact stops (they end or pause an episode near its goal).
    overrides = {'still_count': 0, 'min_token_prob': 0.0, 'max_contact_force': 0.0}
    for item in opts.safety:
        name, _, value = item.partition('=')
        overrides[name] = yaml.safe_load(value)
    load_before = os.getloadavg()
    result: dict[str, object] = {
        'command': '.venv/bin/python ' + ' '.join(  # as root
            [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        'machine': {'nproc': os.cpu_count(), 'python': platform.python_version(),
                    'kernel': platform.release(), 'netem': netem_supported(),
                    'loadavg_before': load_before},
        'safety_overrides': overrides,
        'profile': _shown(opts.profile),
        'discovery': 'fastdds discovery server on the robot host (ROS_DISCOVERY_SERVER)',
    }
    with tempfile.TemporaryDirectory(prefix='bench_two_hosts_') as tmp_name, \
            reserved_domain() as domain_id:
        tmp = opts.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        safety_yaml = safety_config(tmp / 'safety.yaml', **overrides)
        profile = opts.profile.resolve()
        result['safety_limits'] = vars(Limits.of(safety_yaml))
        phases = tuple(p for p in PHASES if p[0] in opts.phases.split(','))
        with Lan(['robot', 'inference']) as net:
            result['two_hosts'] = run(net, domain_id, tmp, safety_yaml, profile, 'inference',
                                      phases)
        if not opts.no_one_host:
            with Lan(['robot']) as net:
                result['one_host'] = run(net, domain_id, tmp, safety_yaml, profile, 'robot',
                                         PHASES[:1])
                result['shm_round_trips'] = shm_cost(net, domain_id, tmp, [
                    config_dir() / 'fastdds_shm.xml', config_dir() / 'fastdds_fleet.xml'])
    result['machine']['loadavg_after'] = os.getloadavg()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + '\n', encoding='utf-8')
    print(f'[bench] wrote {opts.out}; its table for docs/fleet.md:', flush=True)
    print('\n'.join(figures_table(result) + [''] + round_trip_table(result)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
