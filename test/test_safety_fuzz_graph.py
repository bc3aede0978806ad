"""A short adversarial fuzz of the safety node through the graph (the bench runs >= 10^4 actions).

The safety node and the simulated arm (with contact) run as processes; 1,500 adversarial actions
at 50 Hz (``vla_ros.testing.safety_fuzz``) must leave every hard limit intact at zero tolerance,
on the commands and on the arm, while the run reaches motion, limits and stops.
"""

from __future__ import annotations

import pytest

from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env
from vla_ros.testing.graph import SafetyHarness
from vla_ros.testing.safety_fuzz import SAFETY_ARGS, SIM_ARGS, check, run_fuzz

pytestmark = pytest.mark.graph


def test_adversarial_actions_through_the_graph_keep_every_hard_limit(domain_id: int,  # noqa: ANN001
                                                                       tmp_path) -> None:
    safety = NodeProcess('vla_ros.nodes.safety_node', SAFETY_ARGS + [
        '-p', f'latch_file:={tmp_path / "latch"}'], env=ros_env(domain_id))
    sim = NodeProcess('vla_ros.nodes.sim_arm_node', SIM_ARGS, env=ros_env(domain_id))
    with node_processes(safety, sim), rclpy_context(domain_id) as ctx:
        h = SafetyHarness(ctx)
        try:
            assert safety.wait_for_output('safety node ready', 30), safety.output
            assert h.connected() and h.wait_joint_states(), safety.output + sim.output
            rec = run_fuzz(h, 1500, seed=7)
            result = check(h, rec)
            assert safety.alive() and sim.alive(), safety.output + sim.output
        finally:
            h.close()
    figures = f'{result} sent={rec.kinds} episodes={rec.episodes} estops={rec.estops}'
    assert sum(result['violations'].values()) == 0, figures
    print(figures)  # noqa: T201 - shown with -s
    assert result['moving_twists'] > 200 and result['joint_states'] > 1000, figures
    assert {'ACTIVE', 'STOPPED'} <= set(result['states']), figures
