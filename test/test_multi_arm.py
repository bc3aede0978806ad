"""One VLA node serving several arms, in-process: batches driven by the test, no time windows.

A real ``VlaNode`` with a real tiny OpenVLA checkpoint is created in this process with
``autostart`` off and configured (the model loads, no worker thread starts); the test then plays
the worker: it publishes observations over DDS on each arm's topic, spins until the node's
callbacks have them, and calls ``serve_once`` -- one batch -- itself, so which observations a
batch sees is chosen by the test, not by timing. Actions come back over DDS on each arm's action
topic (waited for as conditions with generous timeouts). Frame ages are set through header
stamps relative to the node's clock. Then the evaluation's multi-arm set-up (pure), and the
whole multi-arm bringup as separate processes over DDS: two simulated arms served by one VLA
node do their tasks in closed loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.duration import Duration
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy

from vla_ros.bringup import node_specs
from vla_ros.core.image import encode_image
from vla_ros.eval import EvalConfig, _graph_specs, run_graph
from vla_ros.msg import Observation, VlaAction
from vla_ros.nodes import qos
from vla_ros.nodes.vla_node import VlaNode
from vla_ros.testing import rclpy_context, spin_until

ARMS = ('/arm1/vla', '/arm2/vla', '/arm3/vla', '/arm4/vla')


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vla_ros.policy.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny')


class Fleet:
    """The VLA node under test plus a test node holding every arm's two ends."""

    def __init__(self, ctx: object, checkpoint: Path, arms: str, **params: object) -> None:
        overrides = {'model_path': str(checkpoint), 'unnorm_key': 'bridge_orig',
                     'device': 'cpu', 'autostart': False, 'nice': 0,
                     'arms': arms, **params}
        self.vla = VlaNode(context=ctx, namespace='fleet', parameter_overrides=[
            Parameter(k, value=v) for k, v in overrides.items()])
        self.node = rclpy.create_node('multi_arm_test', context=ctx)
        self.names = [arm.name for arm in self.vla.arms]
        self.obs_pubs = {n: self.node.create_publisher(Observation, f'{n}/observation',
                                                       qos.LATEST) for n in self.names}
        self.actions: dict[str, list[VlaAction]] = {n: [] for n in self.names}
        # No liveliness lease on the test's side: within one participant (this process), Fast
        # DDS declares a writer of a 0.5 s lease not alive whenever the loaded CPU delays its
        # assertion, drops its samples and does not recover; the safety node, a process of its
        # own, is the one that watches liveliness.
        listen = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for n in self.names:
            self.node.create_subscription(VlaAction, f'{n}/action', self.actions[n].append,
                                          listen)
        self.diags: list[DiagnosticArray] = []
        self.node.create_subscription(DiagnosticArray, '/fleet/diagnostics', self.diags.append,
                                      listen)
        self.ex = rclpy.executors.SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.vla)
        self.ex.add_node(self.node)
        self.rng = np.random.default_rng(7)

    def spin_until(self, pred: Callable[[], bool], timeout: float = 60.0) -> bool:
        return spin_until(self.ex, pred, timeout)

    def connect(self) -> None:
        assert self.spin_until(lambda: all(
            p.get_subscription_count() > 0 for p in self.obs_pubs.values()) and all(
            self.node.count_publishers(f'{n}/action') > 0 for n in self.names))

    def observation(self, episode: int, text: str, *, age: float = 0.0,
                    rgb: np.ndarray | None = None) -> Observation:
        if rgb is None:
            rgb = self.rng.integers(0, 256, (224, 224, 3), np.uint8)
        msg = Observation()
        msg.header.stamp = (self.vla.get_clock().now() - Duration(seconds=age)).to_msg()
        msg.header.frame_id = 'camera'
        data, h, w, enc, step = encode_image(rgb)
        msg.image.height, msg.image.width, msg.image.encoding, msg.image.step = h, w, enc, step
        msg.image.data = data
        msg.instruction, msg.episode_id = text, episode
        return msg

    def send(self, sent: dict[str, Observation]) -> None:
        """Publish each arm's observation and spin until the node's callback has it."""
        counts = {arm.name: arm.received for arm in self.vla.arms}
        for name, msg in sent.items():
            self.obs_pubs[name].publish(msg)
        arms = {arm.name: arm for arm in self.vla.arms}
        assert self.spin_until(lambda: all(
            arms[n].received > counts[n] for n in sent)), 'observations did not arrive'

    def wait_actions(self, expected: dict[str, int]) -> None:
        assert self.spin_until(lambda: all(
            len(self.actions[n]) >= k for n, k in expected.items())), {
            n: len(a) for n, a in self.actions.items()}

    def close(self) -> None:
        self.ex.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.vla.destroy_node()


@pytest.fixture
def fleet(domain_id: int, tiny_checkpoint: Path) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []
    with rclpy_context(domain_id) as ctx:
        def make(arms: str = ','.join(ARMS), **params: object) -> Fleet:
            f = Fleet(ctx, tiny_checkpoint, arms, **params)
            made.append(f)
            if f.names:
                assert f.vla.trigger_configure() == TransitionCallbackReturn.SUCCESS
                f.connect()
            return f
        yield make
        for f in made:
            f.close()


def _stamp(msg: VlaAction | Observation) -> tuple[int, int]:
    return msg.header.stamp.sec, msg.header.stamp.nanosec


def _image(obs: Observation) -> np.ndarray:
    return np.frombuffer(bytes(obs.image.data), np.uint8).reshape(224, 224, 3)


def test_one_batch_publishes_each_arms_action_in_its_namespace(fleet) -> None:  # noqa: ANN001
    f = fleet()
    assert f.names == list(ARMS)
    # One action writer per arm, each with the action stream's liveliness.
    assert [arm.publisher.topic_name for arm in f.vla.arms] == [f'{n}/action' for n in ARMS]
    assert all(arm.publisher.qos_profile == qos.ACTION for arm in f.vla.arms)
    texts = ['pick up the red block', 'move to the green block', 'wipe', 'push the blue block']
    sent = {n: f.observation(10 + i, texts[i]) for i, n in enumerate(f.names)}
    f.send(sent)
    assert f.vla.serve_once() == 4
    assert f.vla.batches == 1  # one predict_batch for all four
    f.wait_actions(dict.fromkeys(f.names, 1))
    policy = f.vla.policy
    for name, obs in sent.items():
        (action,) = f.actions[name]  # exactly one, on this arm's own topic
        assert _stamp(action) == _stamp(obs)
        assert action.header.frame_id == 'panda_link0'
        assert (action.episode_id, action.instruction) == (obs.episode_id, obs.instruction)
        expected = policy.predict(_image(obs), obs.instruction)
        np.testing.assert_array_equal(action.token_ids, expected.token_ids)
        np.testing.assert_allclose(action.delta, expected.action, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(action.token_probs, expected.token_probs, rtol=1e-5,
                                   atol=1e-7)
        assert action.inference_ms > 0
    # The four arms saw different frames and instructions: not one answer copied four times.
    assert len({tuple(f.actions[n][0].token_ids) for n in f.names}) > 1


def test_only_the_newest_frame_of_each_arm_is_served(fleet) -> None:  # noqa: ANN001
    f = fleet(','.join(ARMS[:2]))
    first, second = f.names
    burst = [f.observation(1, 'wipe') for _ in range(3)]
    for obs in burst:
        f.send({first: obs})
    f.send({second: f.observation(2, 'push')})
    assert f.vla.serve_once() == 2
    f.wait_actions({first: 1, second: 1})
    assert _stamp(f.actions[first][0]) == _stamp(burst[-1])
    assert f.vla.arms[0].buffer.dropped == 2 and f.vla.arms[1].buffer.dropped == 0
    # A served frame is gone: nothing fresh, nothing served, nothing queued.
    assert f.vla.serve_once() == 0
    assert f.vla.batches == 1


def test_a_stalled_arm_does_not_delay_the_others(fleet) -> None:  # noqa: ANN001
    f = fleet()
    live = [f.names[0], f.names[2]]
    stalled, stale = f.names[1], f.names[3]
    # Round 1: every arm but one has a frame; timeout 0 means the batch cannot wait for it.
    f.send({n: f.observation(1, 'reach the red block') for n in (*live, stale)})
    assert f.vla.serve_once(timeout=0.0) == 3
    # From now on the stalled arm and the stale arm send nothing fresh, the others go on.
    for k in range(2, 5):
        sent = {n: f.observation(k, 'reach the red block') for n in live}
        sent[stale] = f.observation(k, 'reach the red block', age=5.0)  # > 1 s: skipped
        f.send(sent)
        assert f.vla.serve_once(timeout=0.0) == len(live)
        f.wait_actions(dict.fromkeys(live, k))
        for n in live:
            assert _stamp(f.actions[n][-1]) == _stamp(sent[n])
    assert f.actions[stalled] == []
    assert len(f.actions[stale]) == 1  # its one fresh frame, never the old ones
    assert f.vla.arms[3].stale == 3
    assert f.vla.batches == 4 and list(f.vla._batch_sizes) == [3, 2, 2, 2]


def _bad_image(obs: Observation) -> Observation:
    obs.image.data = bytes(obs.image.data)[:1000]  # truncated buffer
    return obs


def test_a_bad_arm_does_not_fail_the_batch(fleet) -> None:  # noqa: ANN001
    f = fleet()
    bad_image, empty, huge, good = f.names
    sent = {bad_image: _bad_image(f.observation(1, 'wipe')),
            empty: f.observation(2, '   '),
            huge: f.observation(3, 'pick up the block ' * 200),
            good: f.observation(4, 'pick up the red block')}
    f.send(sent)
    assert f.vla.serve_once() == 1
    f.wait_actions({good: 1})
    assert _stamp(f.actions[good][0]) == _stamp(sent[good])
    assert [arm.rejected for arm in f.vla.arms] == [1, 1, 1, 0]
    errors = [arm.last_error for arm in f.vla.arms]
    assert errors[0].startswith('ImageError') and 'InstructionError' in errors[1]
    assert 'InstructionError' in errors[2] and errors[3] == ''

    # A bad sample is not sticky: the same arms with good input are all served next time.
    f.send({n: f.observation(5, 'reach the blue block') for n in f.names})
    assert f.vla.serve_once() == 4
    f.wait_actions(dict.fromkeys(f.names, 1))


def test_the_worker_serves_the_live_arms_and_diagnostics_name_the_others(
        fleet) -> None:  # noqa: ANN001
    f = fleet()
    good, bad, stalled, late = f.names
    f.vla.trigger_activate()  # the real worker thread from here on
    assert f.vla._worker is not None
    rounds = [0]

    def publish_round() -> None:
        rounds[0] += 1
        k = rounds[0]
        f.obs_pubs[good].publish(f.observation(k, 'reach the red block'))
        f.obs_pubs[bad].publish(_bad_image(f.observation(k, 'reach the red block')))
        f.obs_pubs[late].publish(f.observation(k, 'reach the red block', age=5.0))

    def statuses() -> dict[str, DiagnosticStatus]:
        for array in reversed(f.diags):
            found = {s.hardware_id: s for s in array.status if ': arm ' in s.name}
            if len(found) == 4:
                return found
        return {}

    def settled() -> bool:
        # Keep the live arms streaming: a new round whenever the last one was answered.
        if len(f.actions[good]) >= rounds[0]:
            publish_round()
        found = statuses()
        return bool(found) and found[good].message == 'serving' and all(
            found[n].level == DiagnosticStatus.WARN for n in (bad, stalled, late)) and \
            'ImageError' in found[bad].message

    assert f.spin_until(settled, 120.0), [(s.hardware_id, s.message)
                                          for s in statuses().values()]
    found = statuses()
    assert found[stalled].message == 'no observations'
    assert found[late].message == 'no actions: observations too old'
    values = {n: {kv.key: kv.value for kv in s.values} for n, s in found.items()}
    assert int(values[good]['actions_published']) >= 1
    assert float(values[good]['median_latency_ms']) > 0
    assert int(values[bad]['rejected_observations']) >= 1
    assert int(values[late]['stale_observations']) >= 1
    assert values[bad]['actions_published'] == values[late]['actions_published'] == '0'
    assert f.actions[bad] == f.actions[stalled] == f.actions[late] == []
    f.vla.trigger_deactivate()
    assert f.vla._worker is None


def test_bad_arms_parameter_fails_configure_and_says_why(fleet) -> None:  # noqa: ANN001
    # Entries resolve like topic names: relative ones under the node's namespace (/fleet).
    assert fleet('/arm1/vla, arm1/vla').names == ['/arm1/vla', '/fleet/arm1/vla']
    for bad, why in (('/fleet/arm1, arm1', 'appears twice'), ('arm1,2arm', 'not a namespace')):
        f = fleet(bad)
        assert f.names == [] and why in f.vla.load_error
        assert f.vla.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert f.vla.policy is None


def test_one_arm_is_the_nodes_own_topics(fleet) -> None:  # noqa: ANN001
    f = fleet('')
    assert f.names == ['/fleet']
    obs = f.observation(3, 'reach the green block')
    f.send({'/fleet': obs})
    assert f.vla.serve_once() == 1
    f.wait_actions({'/fleet': 1})
    assert _stamp(f.actions['/fleet'][0]) == _stamp(obs)


# ------------------------------------------------------------------------ closed loop, N arms
def test_time_scale_slows_every_time_constant_of_the_loop_together() -> None:
    base = EvalConfig()
    scaled = EvalConfig(time_scale=4.0)
    assert base.loop_safety == base.safety and base.scaled_safety() == {}
    loop, safety = scaled.loop_safety, scaled.safety
    for name in ('action_period', 'action_timeout', 'camera_timeout', 'vla_heartbeat_timeout',
                 'joint_state_timeout', 'gripper_min_dwell'):
        assert getattr(loop, name) == pytest.approx(4.0 * getattr(safety, name)), name
    # One action is the same motion, four times slower: speed x period and accel x period^2
    # are unchanged, so the limits bind the same way.
    for name in ('max_linear_speed', 'max_angular_speed'):
        assert getattr(loop, name) * loop.action_period == pytest.approx(
            getattr(safety, name) * safety.action_period), name
    for name in ('max_linear_accel', 'max_angular_accel'):
        assert getattr(loop, name) * loop.action_period ** 2 == pytest.approx(
            getattr(safety, name) * safety.action_period ** 2), name
    assert loop.max_delta_xyz == safety.max_delta_xyz and loop.still_count == safety.still_count
    for bad in (0.0, -1.0, float('nan'), 1000.0):
        with pytest.raises(ValueError, match='time_scale'):
            EvalConfig(time_scale=bad)
    with pytest.raises(ValueError, match='arms'):
        EvalConfig(arms=0)


def test_the_multi_arm_graph_is_the_robots_bringup_with_per_arm_layouts() -> None:
    config = EvalConfig(arms=3, time_scale=4.0, seed=100, episodes=2)
    assert config.arm_names() == ['arm1', 'arm2', 'arm3']
    # The arms share the schedule: consecutive parts, together exactly the single-arm episodes.
    parts = [config.arm_schedule('vla', arm) for arm in config.arm_names()]
    assert [len(p) for p in parts] == [2, 3, 3]
    assert [(t.name, seed) for part in parts for _, t, seed in part] == [
        (t.name, seed) for _, t, seed in config.schedule('vla')]
    assert all([j for j, _, _ in part] == list(range(1, len(part) + 1)) for part in parts)
    # Each simulator lays out its episode j with seed + j: the schedule's seed.
    for arm, part in zip(config.arm_names(), parts, strict=True):
        assert all(config.arm_seed_base('vla', arm) + j == seed for j, _, seed in part)
    with pytest.raises(ValueError, match='cannot be shared'):
        EvalConfig(arms=5, episodes=1).arm_schedule('vla', 'arm1')
    specs = _graph_specs(config, 'vla', 'vla')
    bringup = node_specs({'use_sim': 'true', 'robots': 'arm1,arm2,arm3'})
    assert [s.label for s in specs] == [s.label for s in bringup]
    for spec, plain in zip(specs, bringup, strict=True):
        assert spec.remappings == plain.remappings  # the bringup's wiring, untouched
        extra = {k: v for k, v in spec.parameters.items() if plain.parameters.get(k) != v}
        if spec.name == 'sim_arm_node':
            assert extra == {'seed': config.arm_seed_base('vla', spec.arm)}
        elif spec.name == 'camera_node':
            assert extra == {'policy_rate_hz': pytest.approx(5.0 / 4.0)}
        elif spec.name == 'safety_node':
            assert extra == config.scaled_safety()
        else:
            assert extra == {'model_path': extra['model_path'], 'device': 'cpu',
                             'max_observation_age': pytest.approx(4.0)}
    # The baselines stand in for the VLA node; one arm keeps the single-arm graph exactly.
    assert 'vla_node' not in [s.name for s in _graph_specs(config, 'expert', 'vla')]
    single = _graph_specs(EvalConfig(seed=5), 'vla', 'vla')
    assert single[-1].parameters['seed'] == 5  # episode k: seed + k, as without arms
    assert [(s.label, s.namespace_in('vla')) for s in single] == [
        ('camera_node', 'vla'), ('vla_node', 'vla'), ('safety_node', 'vla'), ('sim_arm_node', '')]


@pytest.mark.graph
def test_two_arms_served_by_one_vla_node_do_their_tasks_in_closed_loop(
        domain_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # vla-ros bringup --sim --arg robots:=arm1,arm2 (the shipped checkpoint on the CPU): two
    # cameras, one VLA node batching both arms, two safety nodes, two simulated arms, each arm
    # on its own layouts, both at once. Time x6: a 2-core machine cannot run the batch within
    # the 0.2 s period; bench/results/eval_graph_4arms.json has the 4-arm figures.
    # Latches an earlier run persisted for these safety nodes do not reach the evaluation's.
    from vla_ros.core.safety.latch import LatchFile, default_latch_path

    monkeypatch.setenv('XDG_STATE_HOME', str(tmp_path))
    for arm in ('arm1', 'arm2'):
        LatchFile(default_latch_path(f'/{arm}/vla/safety_node')).write(
            'protective stop: left by an earlier run', f'/{arm}/vla/safety_node')
    config = EvalConfig(episodes=2, tasks=('reach_red', 'reach_blue'), policies=('vla',),
                        seed=7100, arms=2, time_scale=6.0)
    diagnostics: dict = {}
    results = run_graph(config, domain_id=domain_id, diagnostics=diagnostics)
    assert sorted((r.arm, r.task, r.seed) for r in results) == [
        ('arm1', 'reach_blue', 7102), ('arm1', 'reach_red', 7101),
        ('arm2', 'reach_blue', 7104), ('arm2', 'reach_red', 7103)]
    for arm in ('arm1', 'arm2'):
        mine = [r for r in results if r.arm == arm]
        assert all(r.actions > 0 and r.inference_ms for r in mine), mine
        assert sum(r.success for r in mine) >= 1, mine
    # One VLA node served both arms, each on its own action topic.
    vla = diagnostics['vla']
    (policy,) = [v for name, v in vla.items() if name.endswith('vla_node: policy')]
    assert policy['arms'] == '2' and int(policy['batches']) > 0
    arms = {name.rsplit(' ', 1)[-1]: v for name, v in vla.items() if ': arm ' in name}
    assert sorted(arms) == ['/arm1/vla', '/arm2/vla']
    assert all(int(v['actions_published']) > 0 for v in arms.values())


# ------------------------------------------------------------------------ docs/fleet.md
ROOT = Path(__file__).resolve().parent.parent
DOC_COMMAND = 'vla-ros bringup --sim --arg robots:=arm1,arm2'


def capacity_table(result: dict) -> list[str]:
    """docs/fleet.md's table of one GPU's batch times, from bench_policy.py's batching rows."""
    rows = {(r['n_arms'], r['mode']): r for r in result['batching']}
    lines = ['| arms | bf16 batch [ms] | bf16 actions/s | int4 batch [ms] | int4 actions/s '
             '| every arm at 5 Hz (bf16) |', '| --- | --- | --- | --- | --- | --- |']
    for n in sorted({n for n, _ in rows}):
        bf16, int4 = rows[(n, 'bf16')], rows[(n, 'int4')]
        lines.append(f'| {n} | {bf16["batch_ms"]:.0f} | {bf16["throughput_hz"]:.0f} '
                     f'| {int4["batch_ms"]:.0f} | {int4["throughput_hz"]:.0f} '
                     f'| {"yes" if bf16["batch_ms"] <= 200 else "no"} |')
    return lines


def closed_loop_table(result: dict) -> list[str]:
    """docs/fleet.md's table of one bench_multi_arm.py result."""
    c = result['comparison']
    n = len(c['arms'])
    lines = [f'| episodes of | count | {n} arms, one VLA node: success | 1 arm, same layouts '
             '| shortfall [points] |', '| --- | --- | --- | --- | --- |']
    for label, r in [*c['arms'].items(), *c['tasks'].items(), ('all', c['all'])]:
        lines.append(f'| {label} | {r["episodes"]} | {r["success_rate"]:.0%} '
                     f'| {r["single_arm_same_layouts"]:.0%} | {r["shortfall_points"]:g} |')
    return lines


def closed_loop_figures(result: dict) -> str:
    """The sentence under the table: the VLA node's batches and the load of both runs."""
    multi, single = result['multi'], result['single']
    rates = [t['action_rate_hz'] for tasks in multi['per_arm'].values() for t in tasks.values()]
    return (f'The VLA node ran {multi["vla_node"]["batches"]} batches of '
            f'{float(multi["vla_node"]["mean_batch_size"]):.2f} arms on average, '
            f'{float(multi["vla_node"]["median_batch_ms"]):.0f} ms each (median; one arm alone: '
            f'{float(single["vla_node"]["median_batch_ms"]):.0f} ms), each arm getting '
            f'{min(rates):.2f}-{max(rates):.2f} actions/s against the '
            f'{1 / result["action_period_s"]:.3g} of the slowed loop; 1-minute load average '
            f'{multi["load_average_1min"]["start"]:.1f}-{multi["load_average_1min"]["end"]:.1f} '
            f'(four arms) and {single["load_average_1min"]["start"]:.1f}-'
            f'{single["load_average_1min"]["end"]:.1f} (one arm).')


def test_fleet_doc_shows_the_robots_layout_the_code_starts() -> None:
    text = (ROOT / 'docs' / 'fleet.md').read_text(encoding='utf-8')
    section = text[text.index('## Many arms, one GPU'):]
    assert DOC_COMMAND in section
    from vla_ros import cli
    opts = cli.build_parser().parse_args(DOC_COMMAND.split()[1:])
    values = {**cli._parse_assignments(opts.arg), 'use_sim': 'true'}
    specs = node_specs(values)
    # The command starts the graph the closed-loop test above runs (less the VLA node's
    # evaluation parameters).
    tested = _graph_specs(EvalConfig(arms=2), 'vla', 'vla')
    assert [(s.label, s.remappings) for s in specs] == [(s.label, s.remappings) for s in tested]
    by_label = {s.label: s for s in specs}
    rows = {line.split(' | ')[0].strip('| '): line for line in section.splitlines()
            if line.startswith('| ')}
    ns = by_label['arm1/camera_node'].namespace_in('vla')
    assert f'`/{ns}/camera_node`, `/{ns}/safety_node`' in rows['camera and safety nodes']
    for topic in (dict(by_label['arm1/camera_node'].remappings)['image'],
                  *(dict(by_label['arm1/safety_node'].remappings)[k]
                    for k in ('twist', 'joint_states', 'wrench'))):
        assert f'`{topic}`' in rows['camera, Servo, joint states, wrench'], topic
    sim = dict(by_label['arm1/sim_arm_node'].remappings)
    assert f'`/{by_label["arm1/sim_arm_node"].namespace_in("vla")}/sim_arm_node`' in \
        rows['simulated arm (`use_sim`)'] and f'`{sim["task_success"]}`' in \
        rows['simulated arm (`use_sim`)']
    assert f'`arms: {by_label["vla_node"].parameters["arms"]}`' in rows['VLA node']
    # The operator commands' --namespace reaches that arm's camera node (the instruction's one
    # reader) and safety node.
    from vla_ros.bringup import ns_topic
    assert ns_topic('arm1/vla', 'instruction') == f'/{ns}/instruction'
    h200 = json.loads((ROOT / 'bench' / 'results' / 'h200_2026-12-01_user.json').read_text())
    assert '\n'.join(capacity_table(h200)) in section
    result = json.loads((ROOT / 'bench' / 'results' / 'eval_graph_4arms.json').read_text())
    assert result['command'] in section
    assert '\n'.join(closed_loop_table(result)) in section
    assert closed_loop_figures(result) in ' '.join(section.split())
