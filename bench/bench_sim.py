"""Step time of the simulator: the physics tick that ``sim_arm_node`` runs at 100 Hz, and more.

Times, per call, the public API with the arguments the node passes: ``World.apply_twist`` for
one 10 ms tick, in free motion and pressing on the table (the contact solve), with contact on
(the default) and off (the kinematic arm, as the simulator was before it had contact); the
node's whole tick ``SimArmNode.step`` (integration plus the joint_states, ee_pose and wrench
messages, published in-process); and ``World.step_delta`` (one 0.2 s action, as the in-process
evaluation and the training rollouts step it) under the scripted expert on every task. It
writes mean, p50 and p99 and the share of one core at 100 Hz, with the command, as JSON.

    python bench/bench_sim.py --json bench/results/sim_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_ros.sim.scene import GRIPPER_DOWN
from vla_ros.sim.tasks import TASKS, World, expert_action, success

TICK = 0.01
PRESS = np.array([0.0, 0.0, -0.05, 0.0, 0.0, 0.0])


def _stats(samples: list[float]) -> dict[str, float]:
    us = np.asarray(samples) * 1e6
    return {'mean_us': round(float(us.mean()), 1), 'p50_us': round(float(np.median(us)), 1),
            'p99_us': round(float(np.percentile(us, 99)), 1), 'n': int(us.size),
            'core_share_at_100hz': round(float(us.mean()) * 1e-6 / TICK, 4)}


def _time(call: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - start)
    return out


def _free_twist(i: int) -> np.ndarray:
    """A slow back-and-forth over the block area, 0.25 s each way (never touches)."""
    sign = 1.0 if (i // 25) % 2 else -1.0
    return np.array([0.05 * sign, 0.03 * sign, 0.0, 0.0, 0.0, 0.1 * sign])


def _world(contact: bool) -> World:
    world = World(contact=contact)
    world.reset(3, 'reach_red')
    world.place_tool([0.45, -0.25, 0.2], GRIPPER_DOWN)
    return world


def bench_world(n: int) -> dict[str, dict[str, float]]:
    """``World.apply_twist`` for one tick: free motion (contact on / off) and pressing."""
    out = {}
    for contact in (True, False):
        world = _world(contact)
        out[f'tick_free_contact_{"on" if contact else "off"}'] = _stats(
            _time(lambda i, w=world: w.apply_twist(_free_twist(i), TICK), n))
    world = _world(True)
    world.place_tool([0.45, -0.25, 0.01], GRIPPER_DOWN)
    for _ in range(20):
        world.apply_twist(PRESS, TICK)
    assert world.arm.contacts, 'the press must touch the table'
    out['tick_pressing_table'] = _stats(_time(lambda _i: world.apply_twist(PRESS, TICK), n))
    return out


def bench_node(n: int) -> dict[str, dict[str, float]]:
    """``SimArmNode.step``: the node's whole physics tick, messages published in-process."""
    import rclpy
    from rclpy.context import Context

    from vla_ros.nodes.sim_arm_node import SimArmNode
    from vla_ros.testing import reserved_domain

    context = Context()
    with reserved_domain() as domain:
        rclpy.init(context=context, domain_id=domain)
        try:
            return _node_ticks(SimArmNode(context=context), n)
        finally:
            rclpy.try_shutdown(context=context)


def _node_ticks(node: Any, n: int) -> dict[str, dict[str, float]]:
    """Time the node's tick free and pressing, then destroy the node."""
    out = {}
    node.world.place_tool([0.45, -0.25, 0.2], GRIPPER_DOWN)
    out['node_tick_free'] = _stats(_time(lambda i: node.step(TICK, _free_twist(i)), n))
    node.world.place_tool([0.45, -0.25, 0.01], GRIPPER_DOWN)
    for _ in range(20):
        node.step(TICK, PRESS)
    out['node_tick_pressing_table'] = _stats(_time(lambda _i: node.step(TICK, PRESS), n))
    node.destroy_node()
    return out


def bench_step_delta(episodes: int) -> dict[str, dict[str, float]]:
    """``World.step_delta`` (one 0.2 s action) under the expert, contact on and off."""
    out = {}
    for contact in (True, False):
        world = World(contact=contact)
        samples = []
        for seed in range(episodes):
            for task in sorted(TASKS):
                state = world.reset(1000 + seed, task)
                for _ in range(TASKS[task].max_steps):
                    action = expert_action(world.task, state)
                    start = time.perf_counter()
                    state = world.step_delta(action)
                    samples.append(time.perf_counter() - start)
                    if success(world.task, state):
                        break
        stats = _stats(samples)
        del stats['core_share_at_100hz']
        out[f'step_delta_contact_{"on" if contact else "off"}'] = stats
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and optionally write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ticks', type=int, default=3000, help='ticks per tick case')
    parser.add_argument('--episodes', type=int, default=5, help='expert episodes per task')
    parser.add_argument('--json', help='write the report here')
    args = parser.parse_args(argv)
    report = {
        'command': 'python bench/bench_sim.py ' + ' '.join(sys.argv[1:] if argv is None
                                                           else argv),
        'machine': f'{platform.machine()}, {platform.python_version()}',
        'load_average_before': [round(v, 2) for v in os.getloadavg()],
        'results': {**bench_world(args.ticks), **bench_node(args.ticks),
                    **bench_step_delta(args.episodes)},
    }
    report['load_average_after'] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + '\n')
    if args.json:
        Path(args.json).write_text(text + '\n', encoding='utf-8')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
