"""Closed-loop evaluation: the shipped checkpoint does the simulated tasks, far above random.

The whole chain is under test: the camera node's preprocessing, the OpenVLA model, the
de-tokenizer, un-normalization with the checkpoint's statistics, the default safety limits and
the simulated arm; a wrong flip, sign or bin anywhere shows up as failed episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_ros.bringup import default_checkpoint
from vla_ros.eval import (
    EpisodeResult,
    EvalConfig,
    format_report,
    load_safety_config,
    run_graph,
    run_in_process,
    summarize,
)
from vla_ros.sim.tasks import TASKS

CHECKPOINT = default_checkpoint()


@pytest.fixture(scope='module')
def vla():  # noqa: ANN201
    from vla_ros.policy.policy import OpenVLAPolicy

    torch.set_num_threads(1)
    return OpenVLAPolicy.from_pretrained(CHECKPOINT)


def test_the_limits_are_the_safety_nodes_defaults() -> None:
    config = load_safety_config()
    assert config.max_delta_xyz == (0.03, 0.03, 0.03)
    assert config.max_linear_speed == 0.15 and config.max_linear_accel == 0.5
    assert config.workspace_min[2] == 0.02 and config.still_count == 10


def test_episodes_use_the_sim_nodes_seed_numbering() -> None:
    config = EvalConfig(episodes=2, seed=100, tasks=('reach_red', 'reach_blue'))
    schedule = config.schedule('vla')
    assert [(k, t.name, s) for k, t, s in schedule] == [
        (1, 'reach_red', 101), (2, 'reach_blue', 102), (3, 'reach_red', 103),
        (4, 'reach_blue', 104)]
    assert len(EvalConfig(episodes=5, baseline_episodes=1).schedule('random')) == len(TASKS)
    with pytest.raises(ValueError):
        EvalConfig(policies=('oracle',))


def test_summary_counts_successes_steps_and_interventions() -> None:
    results = [EpisodeResult('vla', 'reach_red', 1, True, 10, limited_actions=2, stops=0,
                             limits={'accel:linear': 2}, inference_ms=[10.0, 12.0], wall_s=2.0,
                             actions=10),
               EpisodeResult('vla', 'reach_red', 2, False, 60, limited_actions=0, stops=1,
                             inference_ms=[11.0], wall_s=12.0, actions=60)]
    (s,) = summarize(results)
    assert (s.successes, s.episodes, s.success_rate) == (1, 2, 0.5)
    assert s.steps_to_success_mean == 10 and s.stops_per_episode == 0.5
    assert s.limited_action_fraction == pytest.approx(2 / 70)
    assert s.inference_ms_median == 11.0 and s.action_rate_hz == pytest.approx(5.0)
    assert 'reach_red' in format_report([s])


def test_the_expert_baseline_succeeds_through_the_limiter() -> None:
    results = run_in_process(EvalConfig(episodes=2, policies=('expert',), seed=300))
    assert all(r.success for r in results)
    assert all(r.stops == 0 for r in results)


def test_the_checkpoint_beats_random_in_closed_loop(vla) -> None:  # noqa: ANN001
    # The whole chain: camera-node preprocessing, the OpenVLA model, de-tokenizer,
    # un-normalization, the default safety limits, the simulated arm.
    config = EvalConfig(episodes=4, policies=('vla', 'random'), baseline_episodes=2,
                        seed=5000)
    assert set(config.tasks) == set(TASKS)  # the three reaches and the pick
    results = run_in_process(config, vla=vla)
    rate = {p: np.mean([r.success for r in results if r.policy == p])
            for p in ('vla', 'random')}
    report = format_report(summarize(results))
    assert rate['vla'] >= 0.8, report
    assert rate['vla'] >= rate['random'] + 0.6, report
    for name in config.tasks:  # every task, the grasp included, succeeds at least twice
        assert sum(r.success for r in results if r.policy == 'vla' and r.task == name) >= 2, \
            report


def test_the_checkpoint_is_the_openvla_format() -> None:
    config = json.loads((CHECKPOINT / 'config.json').read_text())
    assert config['vision_backbone_id'] == 'dinosiglip-vit-so-224px'
    assert config['image_sizes'] == [224, 224] and config['n_action_bins'] == 256
    stats = json.loads((CHECKPOINT / 'dataset_statistics.json').read_text())
    (entry,) = stats.values()
    assert entry['action']['mask'] == [True] * 6 + [False]
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) <= 30 * 2**20
    assert (CHECKPOINT / 'README.md').is_file()


def test_the_eval_command_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vla_ros.cli import main

    out = tmp_path / 'report.json'
    code = main(['eval', '--sim', '--in-process', '--episodes', '1', '--policies', 'expert',
                 '--tasks', 'reach_green', '--json', str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report['summary'][0]['success_rate'] == 1.0
    assert 'reach_green' in capsys.readouterr().out


@pytest.mark.graph
def test_the_checkpoint_and_the_expert_do_the_tasks_through_the_node_graph(
        domain_id: int) -> None:
    # camera_node -> vla_node (this checkpoint) -> safety_node -> sim_arm_node, over DDS; then
    # the same graph with the expert baseline in vla_node's place (it reads the simulator's
    # ground truth for the blocks, the held block and the gripper).
    config = EvalConfig(episodes=1, policies=('vla', 'expert'), seed=7000)
    results = run_graph(config, domain_id=domain_id)
    report = format_report(summarize(results))
    vla = [r for r in results if r.policy == 'vla']
    expert = [r for r in results if r.policy == 'expert']
    assert [r.task for r in vla] == [r.task for r in expert] == list(config.tasks)
    assert sum(r.success for r in vla) >= 3, report
    assert all(r.success for r in expert), report
    for r in vla:
        assert r.inference_ms and r.steps > 0
    assert all(r.steps <= TASKS[r.task].max_steps for r in results)
