"""Demonstrations, OpenVLA action statistics, the OpenVLA-style trainer and DAgger rollouts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_ros.core.actions import ActionStats, ActionTokenizer, NormStats, unnormalize
from vla_ros.core.errors import ConfigError
from vla_ros.core.image import ImageConfig, preprocess
from vla_ros.policy.policy import OpenVLAPolicy
from vla_ros.sim.tasks import TASKS, World
from vla_ros.train import dagger, data
from vla_ros.train import train as trainer
from vla_ros.train.data import (
    BLOCK_ORDER,
    EEF_MASK,
    DataConfig,
    Demonstrations,
    NoisyExpert,
    compute_norm_stats,
    expert_label,
    generate,
    normalize_actions,
    record_episode,
    render,
)

KEY = trainer.DEFAULT_UNNORM_KEY
CPU = torch.device('cpu')
TINY = trainer.ModelSpec(vision_dim=32, vision_depth=2, vision_heads=2, hidden_size=64,
                         num_layers=1, num_heads=2, intermediate_size=128)
#: Two instructions whose prompts differ in length, so that the batches are right-padded.
SHORT, LONG = 'move to the red block', 'pick up the red block and lift it'


@pytest.fixture(scope='module', autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def recorded() -> tuple[DataConfig, Demonstrations]:
    """Two tasks on one layout, clean expert, six steps each, rendered."""
    config = DataConfig(tasks=('reach_red', 'pick_red'), episodes_per_task=1, max_steps=6,
                        seed=7, perturb_fraction=0.0)
    demos = generate(config)
    assert demos.images is None  # recording draws no pixels
    render(demos, workers=1)
    return config, demos


@pytest.fixture(scope='module')
def first_frames() -> Demonstrations:
    """The first step of three layouts under two instructions: six distinct samples."""
    demos = generate(DataConfig(tasks=('reach_red', 'pick_red'), episodes_per_task=3,
                                max_steps=1, seed=21))
    render(demos, workers=1)
    return demos


def _stats(demos: Demonstrations) -> dict:
    return {KEY: compute_norm_stats(demos.actions, num_trajectories=demos.num_episodes)}


def _tiny(directory: Path, demos: Demonstrations, seed: int = 0
          ) -> tuple[trainer.OpenVLA, dict, dict, OpenVLAPolicy]:
    """A random tiny model written to ``directory`` and wrapped as its policy."""
    stats = _stats(demos)
    config = trainer.build_config(stats, TINY)
    model = trainer.init_model(config, seed=seed)
    trainer.write_checkpoint(directory, model, config, stats)
    return model, stats, config, trainer.policy_for(model, directory)


def _tokens(policy: OpenVLAPolicy, demos: Demonstrations) -> list[tuple[int, ...]]:
    return [policy.predict(demos.images[k], demos.instruction(k)).token_ids
            for k in range(len(demos))]


# -------------------------------------------------------------------------- statistics


def test_norm_stats_are_stored_the_openvla_way() -> None:
    actions = np.zeros((101, 7))
    actions[:, 0] = np.arange(101) * 0.001  # 0 .. 0.1
    actions[:, 1] = -np.arange(101) * 0.002  # 0 .. -0.2
    actions[:, 6] = (np.arange(101) >= 50).astype(float)
    stats = compute_norm_stats(actions, num_trajectories=4)
    a = stats['action']
    assert a['q01'][0] == pytest.approx(0.001) and a['q99'][0] == pytest.approx(0.099)
    assert a['q01'][1] == pytest.approx(-0.198) and a['q99'][1] == pytest.approx(-0.002)
    assert a['min'][0] == 0.0 and a['max'][0] == pytest.approx(0.1)
    assert a['q01'][6] == 0.0 and a['q99'][6] == 1.0
    assert a['mask'] == [True] * 6 + [False]
    assert stats['num_transitions'] == 101 and stats['num_trajectories'] == 4
    assert set(stats['proprio']) == {'mean', 'std', 'max', 'min', 'q01', 'q99'}
    json.dumps(stats)  # plain Python values only
    loaded = NormStats.from_norm_stats({'sim': stats}).select('sim')
    assert loaded.mask.tolist() == list(EEF_MASK)


def test_norm_stats_reject_a_mask_of_the_wrong_length() -> None:
    with pytest.raises(ConfigError):
        compute_norm_stats(np.zeros((3, 7)), mask=[True] * 7 + [False])


def test_normalization_is_bounds_q99_and_keeps_the_gripper_raw() -> None:
    stats = {'q01': [-0.02] * 6 + [0.0], 'q99': [0.02] * 6 + [1.0], 'mask': list(EEF_MASK),
             'min': [-0.03] * 6 + [0.0], 'max': [0.03] * 6 + [1.0]}
    raw = np.array([[-0.02, 0.02, 0.0, 0.05, -0.05, 0.01, 1.0],
                    [0.01, -0.01, 0.005, 0.0, 0.0, 0.0, 0.0]])
    out = normalize_actions(raw, stats)
    np.testing.assert_allclose(out[0], [-1, 1, 0, 1, -1, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.5, -0.5, 0.25, 0, 0, 0, 0.0], atol=1e-6)


def test_constant_dimensions_go_to_zero_but_a_constant_raw_gripper_stays_open() -> None:
    # The reach data: rotations never move, the gripper is always 1 (open). OpenVLA's rule
    # would zero the gripper too, i.e. teach "closed"; only normalized dimensions are zeroed.
    actions = np.zeros((50, 7))
    actions[:, 0] = np.linspace(-0.02, 0.02, 50)
    actions[:, 3] = 0.01  # constant but non-zero: still 0 once normalized
    actions[:, 6] = 1.0
    stats = compute_norm_stats(actions)
    normalized = normalize_actions(actions, stats['action'])
    assert np.all(normalized[:, 3:6] == 0.0)
    assert np.all(normalized[:, 6] == 1.0)
    tok = ActionTokenizer(vocab_size=512)
    back = unnormalize(tok.decode(tok.encode(normalized)), ActionStats.from_mapping(
        stats['action']))
    assert np.all(back[:, 6] > 0.99)  # raw gripper: open
    np.testing.assert_allclose(back[:, 4:6], 0.0, atol=1e-12)


def test_normalize_then_tokens_then_unnormalize_round_trips() -> None:
    rng = np.random.default_rng(0)
    actions = np.column_stack([rng.uniform(-0.02, 0.02, (500, 3)),
                               rng.uniform(-0.1, 0.1, (500, 3)), rng.integers(0, 2, 500)])
    stats = compute_norm_stats(actions)
    tok = ActionTokenizer(vocab_size=512)
    normalized = normalize_actions(actions, stats['action'])
    back = unnormalize(tok.decode(tok.encode(normalized)), ActionStats.from_mapping(
        stats['action']))
    span = np.asarray(stats['action']['q99']) - np.asarray(stats['action']['q01'])
    inside = np.all((actions[:, :6] >= stats['action']['q01'][:6])
                    & (actions[:, :6] <= stats['action']['q99'][:6]), axis=1)
    assert inside.sum() > 400
    err = np.abs(back - actions)[inside]
    assert np.all(err[:, :6] <= span[:6] / 255 + 1e-9)  # half a bin of 2/255 in [-1, 1] units
    assert np.all(err[:, 6] <= 1 / 255 + 1e-9)


# -------------------------------------------------------------------------- data


def test_data_config_is_validated() -> None:
    for bad in ({'tasks': ('reach_purple',)}, {'tasks': ('reach_red', 'reach_red')},
                {'tasks': ()}, {'episodes_per_task': 0}, {'perturb_fraction': 1.5},
                {'noise_std': 0.1}, {'excursion_prob': -0.1}, {'excursion_steps': (3, 1)},
                {'excursion_steps': (0, 2)}, {'max_steps': 0}, {'steps_after_success': -1}):
        with pytest.raises(ConfigError):
            DataConfig(**bad)
    assert DataConfig(tasks=['reach_red'], excursion_steps=[2, 2]).excursion_steps == (2, 2)


def test_rendered_frames_are_the_camera_nodes_frames_at_the_recorded_states(
        recorded: tuple[DataConfig, Demonstrations]) -> None:
    config, demos = recorded
    assert demos.images.shape == (len(demos), 224, 224, 3) and demos.images.dtype == np.uint8
    assert demos.num_episodes == 2 and demos.task_names == config.tasks
    world = World()
    firsts = []
    for t, name in enumerate(config.tasks):
        task = TASKS[name]
        rows = np.flatnonzero(demos.task_ids == t)
        assert demos.steps[rows].tolist() == list(range(len(rows))) and len(rows) > 3
        assert demos.instruction(int(rows[0])) == task.instruction
        world.reset(config.seed, task)
        # perturb_fraction=0: the clean expert executed its labels; replay them.
        for k in rows:
            state = world.state()
            np.testing.assert_array_equal(demos.images[k],
                                          preprocess(world.observe(), ImageConfig()))
            np.testing.assert_allclose(demos.actions[k], expert_label(task, state), atol=1e-6)
            np.testing.assert_allclose(demos.tcp[k], state.tcp_position, atol=1e-6)
            np.testing.assert_allclose(demos.blocks[k],
                                       [state.blocks[n] for n in BLOCK_ORDER], atol=1e-6)
            world.step_delta(expert_label(task, state))
        firsts.append(demos.images[rows[0]])
        # The arm moved: a later frame is not the first one.
        assert not np.array_equal(demos.images[rows[-1]], demos.images[rows[0]])
    # One layout per seed for every task: only the instruction tells the targets apart.
    assert np.array_equal(firsts[0], firsts[1])


def test_labels_are_the_expert_at_the_visited_state_whatever_is_executed() -> None:
    task = TASKS['reach_blue']
    seen: list[np.ndarray] = []

    def off_course(image: None, instruction: str, state: object, label: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
        assert image is None and instruction == task.instruction
        np.testing.assert_allclose(label, expert_label(task, state))
        seen.append(label)
        return label + np.array([0.015, -0.015, 0.01, 0, 0, 0, 0])

    cols, success = record_episode(World(), task, 3, off_course, np.random.default_rng(0), 5)
    labels = cols['actions']
    assert len(labels) == len(cols['tcp']) == 5 and not success
    for recorded_label, label in zip(labels, seen, strict=True):
        np.testing.assert_allclose(recorded_label, label, atol=1e-6)
    # Off course for real: the labels keep correcting the drift.
    assert not np.allclose(labels[0][:3], labels[-1][:3], atol=2e-3)


def test_demonstrations_save_load_concat_and_first_episodes(
        recorded: tuple[DataConfig, Demonstrations], tmp_path: Path) -> None:
    _, demos = recorded
    custom = dataclasses.replace(demos, instructions=(SHORT, LONG))
    loaded = Demonstrations.load(custom.save(tmp_path / 'demos.npz'))
    assert loaded.images is None  # frames are re-rendered, not stored
    assert loaded.task_names == demos.task_names and loaded.instructions == (SHORT, LONG)
    for name in ('actions', 'task_ids', 'episodes', 'steps', 'successes', 'tcp', 'rotation',
                 'width', 'blocks', 'yaws'):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(demos, name))
    np.testing.assert_array_equal(render(loaded, workers=1), demos.images)

    # concat: episode ids continue after ours, task ids follow the merged task names.
    other = generate(DataConfig(tasks=('reach_blue', 'reach_red'), episodes_per_task=2,
                                max_steps=2, seed=50))
    both = demos.concat(other)
    assert len(both) == len(demos) + len(other) and both.images is None
    assert both.task_names == ('reach_red', 'pick_red', 'reach_blue')
    assert both.num_episodes == 6 and both.episodes.max() == 5
    np.testing.assert_array_equal(both.episodes[len(demos):], other.episodes + 2)
    assert [both.instruction(k) for k in range(len(demos), len(both))] == [
        other.instruction(k) for k in range(len(other))]
    np.testing.assert_array_equal(both.successes, np.concatenate([demos.successes,
                                                                  other.successes]))
    np.testing.assert_array_equal(both.tcp[len(demos):], other.tcp)

    # first_episodes keeps whole episodes.
    head = both.first_episodes(3)
    assert head.num_episodes == 3 and len(head.successes) == 3
    kept = np.isin(both.episodes, [0, 1, 2])
    assert len(head) == int(kept.sum())
    np.testing.assert_array_equal(head.actions, both.actions[kept])
    np.testing.assert_array_equal(head.steps, both.steps[kept])
    assert head.instructions == both.instructions
    rendered = demos.first_episodes(1)
    np.testing.assert_array_equal(rendered.images, demos.images[demos.episodes == 0])


def test_demonstrations_reject_bad_shapes(recorded: tuple[DataConfig, Demonstrations]) -> None:
    _, demos = recorded
    with pytest.raises(ConfigError):
        dataclasses.replace(demos, actions=demos.actions[:, :6])
    with pytest.raises(ConfigError):
        dataclasses.replace(demos, tcp=demos.tcp[:-1])
    with pytest.raises(ConfigError):
        dataclasses.replace(demos, images=demos.images.astype(np.float32))
    with pytest.raises(ConfigError):
        dataclasses.replace(demos, instructions=(SHORT,))
    with pytest.raises(ConfigError):
        dataclasses.replace(demos, task_ids=demos.task_ids + 2)


def test_the_recording_command_writes_the_experts_demonstrations(tmp_path: Path) -> None:
    out = tmp_path / 'expert.npz'
    assert data.main(['--out', str(out), '--tasks', 'reach_green,pick_red',
                      '--episodes-per-task', '1', '--seed', '9']) == 0
    written = Demonstrations.load(out)
    expected = generate(DataConfig(tasks=('reach_green', 'pick_red'), episodes_per_task=1,
                                   seed=9))
    assert written.task_names == ('reach_green', 'pick_red') and written.num_episodes == 2
    np.testing.assert_array_equal(written.actions, expected.actions)
    np.testing.assert_array_equal(written.tcp, expected.tcp)
    np.testing.assert_array_equal(written.successes, expected.successes)


# -------------------------------------------------------------------------- training


def test_batches_are_the_inference_prompt_the_action_tokens_and_the_pixel_values(
        recorded: tuple[DataConfig, Demonstrations], tmp_path: Path) -> None:
    _, demos = recorded
    demos = dataclasses.replace(demos, instructions=(SHORT, LONG))
    _, stats, config, policy = _tiny(tmp_path / 'base', demos)
    assert config['timm_model_ids'] == ['vit_large_patch14_reg4_dinov2.lvd142m',
                                        'vit_so400m_patch14_siglip_224']
    assert json.loads((tmp_path / 'base' / 'dataset_statistics.json').read_text()) == stats
    batches = trainer.Batches(policy, demos, stats[KEY]['action'], CPU)
    first, last = policy.action_tokenizer.action_token_range
    assert (first, last) == (256, 511)
    targets = policy.action_tokenizer.encode(normalize_actions(demos.actions,
                                                               stats[KEY]['action']))
    np.testing.assert_array_equal(batches.targets.numpy(), targets)
    assert ((targets >= first) & (targets <= last)).all()
    short, long = policy.prompt_ids(SHORT), policy.prompt_ids(LONG)
    assert len(short) < len(long)
    assert batches.ids.shape == (len(demos), len(long) + 6)
    pad = policy.checkpoint.config['pad_token_id']
    for k in range(len(demos)):
        prompt = policy.prompt_ids(demos.instruction(k))
        row = prompt + targets[k, :6].tolist()
        assert batches.ids[k].tolist() == row + [pad] * (batches.ids.shape[1] - len(row))
        assert int(batches.lengths[k]) == len(prompt)
    for k in (0, len(demos) - 1):
        torch.testing.assert_close(batches.pixel_values(torch.tensor([k])),
                                   policy.pixel_values(demos.images[k]), rtol=0, atol=1e-5)


def test_action_logits_are_the_logits_of_greedy_decoding(
        recorded: tuple[DataConfig, Demonstrations], tmp_path: Path) -> None:
    _, demos = recorded
    demos = dataclasses.replace(demos, instructions=(SHORT, LONG))
    model, stats, _, policy = _tiny(tmp_path / 'base', demos, seed=3)
    model.eval()
    rows = [0, 3, len(demos) - 1]  # both prompt lengths: the short rows are right-padded
    predicted = [policy.predict(demos.images[k], demos.instruction(k)).token_ids for k in rows]
    batches = trainer.Batches(policy, demos, stats[KEY]['action'], CPU)
    ids = batches.ids[rows].clone()
    lengths = batches.lengths[rows]
    for r, tokens in enumerate(predicted):
        ids[r, lengths[r]:lengths[r] + 6] = torch.tensor(tokens[:6])
    with torch.no_grad():
        logits = trainer.action_logits(model, batches.pixel_values(torch.tensor(rows)), ids,
                                       lengths)
    assert logits.shape == (len(rows), 7, model.padded_vocab_size)
    first, last = policy.action_tokenizer.action_token_range
    argmax = logits[..., first:last + 1].argmax(-1) + first
    assert [tuple(r) for r in argmax.tolist()] == predicted
    # The very logits of the KV-cache decode path, not only their argmax.
    for r, k in enumerate(rows):
        prompt = torch.tensor([policy.prompt_ids(demos.instruction(k))])
        with torch.no_grad():
            step, cache = model.prefill(model.embed_prefix(policy.pixel_values(demos.images[k]),
                                                           prompt))
            decoded = [step[0]]
            for token in predicted[r][:6]:
                step, cache = model.decode_step(torch.tensor([token]), cache)
                decoded.append(step[0])
        torch.testing.assert_close(logits[r], torch.stack(decoded), rtol=1e-4, atol=1e-4)


def test_a_memorized_batch_decodes_back_through_from_pretrained(
        first_frames: Demonstrations, tmp_path: Path) -> None:
    # Teacher-forced training positions must be the free-running greedy decode positions: after
    # memorizing six samples (three layouts under two instructions), greedy decoding
    # reproduces the target tokens, in memory and from the written bf16 checkpoint.
    demos = first_frames
    model, stats, config, policy = _tiny(tmp_path / 'base', demos)
    batches = trainer.Batches(policy, demos, stats[KEY]['action'], CPU)
    targets = [tuple(t) for t in batches.targets.tolist()]
    assert len(set(targets)) == len(demos)
    everything = torch.arange(len(demos))
    before = trainer.validate(model, model, batches, everything, policy.action_tokenizer)
    train_config = trainer.TrainConfig(steps=150, batch_size=len(demos), lr=3e-3,
                                       warmup_steps=10, val_fraction=0.0, log_every=50)
    history = trainer.train(model, batches, train_config, model, policy.action_tokenizer,
                            'memorize')
    assert [p['step'] for p in history] == [50, 100, 150]
    assert history[-1]['train_loss'] < 0.3 < 2.0 < history[0]['train_loss']
    after = trainer.validate(model, model, batches, everything, policy.action_tokenizer)
    assert before['val_accuracy'] < 0.2 and after['val_accuracy'] >= 0.95
    assert after['val_loss'] < 0.3
    assert not model.training
    in_memory = _tokens(policy, demos)
    assert sum(a == b for a, b in zip(in_memory, targets, strict=True)) >= len(demos) - 1
    final = trainer.write_checkpoint(tmp_path / 'final', model, config, stats)
    loaded = OpenVLAPolicy.from_pretrained(final)
    assert next(loaded.model.parameters()).dtype == torch.float32  # bf16 file, f32 compute
    from_disk = _tokens(loaded, demos)
    assert sum(a == b for a, b in zip(from_disk, targets, strict=True)) >= len(demos) - 2


def test_a_lora_adapter_loads_through_from_pretrained_like_the_merged_model(
        first_frames: Demonstrations, tmp_path: Path) -> None:
    demos = first_frames
    model, stats, config, policy = _tiny(tmp_path / 'scratch', demos, seed=1)
    base_dir = trainer.write_checkpoint(tmp_path / 'base', model, config, stats,
                                        dtype=torch.float32)
    base_tokens = _tokens(OpenVLAPolicy.from_pretrained(base_dir), demos)
    batches = trainer.Batches(policy, demos, stats[KEY]['action'], CPU)
    peft_model = trainer.apply_lora(model, trainer.LoraSpec(rank=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in n for n in trainable)
    assert any('projector' in n for n in trainable)
    assert not any('vision_backbone' in n or 'lm_head' in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if 'vision_backbone' in n}
    trainer.train(model, batches, trainer.TrainConfig(
        steps=20, batch_size=len(demos), lr=1e-2, warmup_steps=1, val_fraction=0.0,
        log_every=20), peft_model, policy.action_tokenizer, 'lora')
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    adapter = tmp_path / 'adapter'
    peft_model.save_pretrained(str(adapter))
    merged = peft_model.merge_and_unload()
    merged_dir = trainer.write_checkpoint(tmp_path / 'merged', merged, config, stats,
                                          dtype=torch.float32)
    with_adapter = _tokens(OpenVLAPolicy.from_pretrained(base_dir, lora_path=adapter), demos)
    from_merged = _tokens(OpenVLAPolicy.from_pretrained(merged_dir), demos)
    assert with_adapter == from_merged
    assert with_adapter != base_tokens  # the adapter changed the policy


def test_the_training_command_writes_base_and_lora_checkpoints(
        recorded: tuple[DataConfig, Demonstrations], tmp_path: Path) -> None:
    _, demos = recorded
    data = demos.save(tmp_path / 'small.npz')
    common = ['--data', str(data), '--steps', '2', '--batch-size', '4', '--workers', '1',
              '--device', 'cpu']
    base = tmp_path / 'base'
    assert trainer.main(common + ['--out', str(base)]) == 0
    statistics = json.loads((base / 'dataset_statistics.json').read_text())
    assert list(statistics) == [KEY]
    assert statistics[KEY]['action']['mask'] == list(EEF_MASK)
    assert statistics[KEY]['action']['q01'] == compute_norm_stats(demos.actions)['action'][
        'q01']
    assert statistics[KEY]['num_trajectories'] == demos.num_episodes
    report = json.loads((tmp_path / 'base_train_report.json').read_text())
    assert report['data']['samples'] == len(demos)
    assert report['data']['tasks'] == list(demos.task_names)
    assert report['train']['steps'] == 2 and report['history'][-1]['step'] == 2
    assert report['model'] == dataclasses.asdict(trainer.ModelSpec())
    policy = OpenVLAPolicy.from_pretrained(base)
    assert policy.unnorm_key == KEY
    assert policy.predict(demos.images[0], demos.instruction(0)).action.shape == (7,)

    lora = tmp_path / 'lora'
    assert trainer.main(common + ['--out', str(lora), '--stage', 'lora', '--base', str(base),
                                  '--lora-rank', '4']) == 0
    adapter = tmp_path / 'lora_lora_adapter'
    assert (adapter / 'adapter_config.json').is_file()
    assert json.loads((lora / 'dataset_statistics.json').read_text()) == statistics
    assert json.loads((lora / 'config.json').read_text()) == json.loads(
        (base / 'config.json').read_text())
    assert (tmp_path / 'lora_train_report.json').is_file()
    merged = OpenVLAPolicy.from_pretrained(lora)
    assert merged.predict(demos.images[0], demos.instruction(0)).action.shape == (7,)
    with_adapter = OpenVLAPolicy.from_pretrained(base, lora_path=adapter)
    assert with_adapter.predict(demos.images[0], demos.instruction(0)).action.shape == (7,)

    with pytest.raises(ConfigError):
        trainer.main(common + ['--out', str(tmp_path / 'nobase'), '--stage', 'lora'])
    assert not (tmp_path / 'nobase').exists()


# -------------------------------------------------------------------------- DAgger


def test_the_dagger_behaviour_mixes_expert_and_policy(
        recorded: tuple[DataConfig, Demonstrations], tmp_path: Path) -> None:
    _, demos = recorded
    _, _, _, policy = _tiny(tmp_path / 'base', demos, seed=5)
    image, instruction = demos.images[2], demos.instruction(2)
    label = demos.actions[2].astype(float)
    own = policy.predict(image, instruction).action
    assert not np.allclose(own, label, atol=1e-3)
    rng = np.random.default_rng(0)
    expert = dagger.PolicyBehaviour(policy, beta=1.0)
    learner = dagger.PolicyBehaviour(policy, beta=0.0)
    for _ in range(3):
        np.testing.assert_array_equal(expert(image, instruction, None, label, rng), label)
        np.testing.assert_array_equal(learner(image, instruction, None, label, rng), own)
    perturbed = dagger.PolicyBehaviour(policy, beta=0.0, perturb=NoisyExpert(0.01, 0.0, (1, 1)))
    action = perturbed(image, instruction, None, label, np.random.default_rng(1))
    np.testing.assert_array_equal(action[3:], own[3:])  # noise on dx, dy, dz only
    assert 0 < np.abs(action[:3] - own[:3]).max() < 0.06


def test_dagger_writes_expert_labelled_rollouts_of_a_checkpoint(
        recorded: tuple[DataConfig, Demonstrations], tmp_path: Path) -> None:
    _, demos = recorded
    _tiny(tmp_path / 'base', demos, seed=5)
    out = tmp_path / 'dagger.npz'
    seed = 300
    assert dagger.main(['--checkpoint', str(tmp_path / 'base'), '--out', str(out),
                        '--tasks', 'reach_red,pick_red', '--episodes-per-task', '1',
                        '--seed', str(seed)]) == 0
    rollouts = Demonstrations.load(out)
    assert rollouts.task_names == ('reach_red', 'pick_red')
    assert rollouts.instructions == (TASKS['reach_red'].instruction,
                                     TASKS['pick_red'].instruction)
    assert rollouts.num_episodes == 2 and len(rollouts.successes) == 2
    assert np.isfinite(rollouts.actions).all()
    assert set(np.unique(rollouts.actions[:, 6])) <= {0.0, 1.0}
    world = World()
    for t, name in enumerate(rollouts.task_names):
        first = int(np.flatnonzero((rollouts.task_ids == t) & (rollouts.steps == 0))[0])
        state = world.reset(seed, name)
        np.testing.assert_allclose(rollouts.actions[first], expert_label(TASKS[name], state),
                                   atol=1e-6)
        np.testing.assert_allclose(rollouts.tcp[first], state.tcp_position, atol=1e-6)
    # The executed actions were the (random) policy's: the rollouts leave the expert's path.
    clean = generate(DataConfig(tasks=('reach_red',), episodes_per_task=1, seed=seed,
                                perturb_fraction=0.0, max_steps=8))
    steps = min(len(clean), int((rollouts.task_ids == 0).sum()))
    assert not np.allclose(rollouts.tcp[:steps], clean.tcp[:steps], atol=1e-3)
