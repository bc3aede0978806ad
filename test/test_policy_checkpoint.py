"""Tiny OpenVLA checkpoints through the real loading path: format, strictness, errors, LoRA."""

import json
import shutil
import time

import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import timm  # noqa: F401 - the model code needs it; fail loudly if it is missing
import torch
import transformers  # noqa: F401

from vla_ros.core.errors import CheckpointError, ConfigError, UnnormKeyError
from vla_ros.policy import checkpoint as ckpt_module
from vla_ros.policy.checkpoint import load_checkpoint, load_tokenizer, save_weights
from vla_ros.policy.policy import OpenVLAPolicy
from vla_ros.policy.tiny import build_tiny_model, write_tiny_checkpoint

SHARD1 = 'model-00001-of-00002.safetensors'
SHARD2 = 'model-00002-of-00002.safetensors'
INDEX = 'model.safetensors.index.json'
PROMPTS = [
    'In: What action should the robot take to pick up the black bowl?\nOut:',
    'In: What action should the robot take to put the ünïcode 42 spoon away?\nOut:',
    'Hello  world',
]


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('tiny') / 'ckpt', seed=0)


@pytest.fixture(scope='module')
def loaded(tiny_dir):
    return load_checkpoint(tiny_dir)


@pytest.fixture
def copy_dir(tiny_dir, tmp_path):
    target = tmp_path / 'ckpt'
    shutil.copytree(tiny_dir, target)
    return target


def image(seed=0):
    return np.random.RandomState(seed).randint(0, 256, (224, 224, 3), dtype=np.uint8)


def pixel_values(seed=0):
    return torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(seed))


def prompt_ids():
    return torch.tensor([[1, 284, 484, 289, 292, 466]])


# --------------------------------------------------------------------------------------------
# The tiny format
# --------------------------------------------------------------------------------------------


def test_tiny_checkpoint_is_complete_small_fast_and_deterministic(tiny_dir, tmp_path):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {'config.json', 'preprocessor_config.json', 'tokenizer.model', 'tokenizer.json',
            'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json', INDEX,
            SHARD1, SHARD2} <= names
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 20e6
    config = json.loads((tiny_dir / 'config.json').read_text())
    for field in ('vision_backbone_id', 'use_fused_vision_backbone', 'image_sizes',
                  'timm_model_ids', 'timm_override_act_layers', 'image_resize_strategy',
                  'llm_backbone_id', 'hf_llm_id', 'arch_specifier', 'text_config',
                  'n_action_bins', 'norm_stats', 'pad_token_id', 'pad_to_multiple_of',
                  'llm_max_length', 'model_type', 'auto_map'):
        assert field in config, field
    assert config['model_type'] == 'openvla' and config['n_action_bins'] == 256
    assert config['text_config']['vocab_size'] == 576 and config['pad_token_id'] == 512
    assert config['norm_stats']['bridge_orig']['action']['mask'] == [True] * 6 + [False]
    pre = json.loads((tiny_dir / 'preprocessor_config.json').read_text())
    assert pre['tvf_normalize_params'][0]['mean'] == [0.484375, 0.455078125, 0.40625]
    assert pre['tvf_normalize_params'][1]['std'] == [0.5, 0.5, 0.5]
    assert json.loads((tiny_dir / 'added_tokens.json').read_text()) == {'<PAD>': 512}
    start = time.perf_counter()
    again = write_tiny_checkpoint(tmp_path / 'again', seed=0)
    assert time.perf_counter() - start < 5.0
    for path in tiny_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = write_tiny_checkpoint(tmp_path / 'other', seed=1)
    assert (other / SHARD2).read_bytes() != (tiny_dir / SHARD2).read_bytes()


def test_loads_strictly_through_the_real_path(loaded, tiny_dir):
    model = loaded.model
    assert loaded.weight_files == (tiny_dir / SHARD1, tiny_dir / SHARD2)
    assert model.meta_tensor_names() == [] and not model.training
    assert model.padded_vocab_size == 576 and model.dtype == torch.float32
    assert loaded.norm_stats.keys == ['bridge_orig', 'libero_spatial']
    tok = loaded.tokenizer
    assert tok.vocab_size == 512 and len(tok) == 513
    assert tok.pad_token_id == 512 and tok.bos_token_id == 1
    # the in-memory model of the same seed has exactly the stored (bf16-rounded) weights
    reference = build_tiny_model(seed=0)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    bf16 = load_checkpoint(tiny_dir, dtype=torch.bfloat16).model
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(bf16.forward_logits(pixel_values(), prompt_ids()).float()).all()


def test_tokenizer_matches_sentencepiece_with_and_without_tokenizer_json(loaded, copy_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(copy_dir / 'tokenizer.model'))
    assert sp.get_piece_size() == 512 and sp.piece_to_id('▁') != sp.unk_id()
    assert loaded.tokenizer.convert_tokens_to_ids('▁') == sp.piece_to_id('▁')
    (copy_dir / 'tokenizer.json').unlink()
    converted = load_tokenizer(copy_dir)
    for text in PROMPTS:
        want = [1] + sp.encode(text)
        assert loaded.tokenizer(text).input_ids == want
        assert converted(text).input_ids == want
    assert converted.vocab_size == 512 and converted.pad_token_id == 512


def test_saved_then_loaded_gives_identical_logits(loaded, tiny_dir, tmp_path):
    target = tmp_path / 'resaved'
    shutil.copytree(tiny_dir, target, ignore=shutil.ignore_patterns('model*'))
    with torch.no_grad():  # perturb so the file written is not the tiny one
        loaded_model = load_checkpoint(tiny_dir).model
        loaded_model.projector.fc1.bias.add_(0.123)
    files = save_weights(loaded_model, target, n_shards=1, dtype=torch.float32)
    assert [f.name for f in files] == ['model.safetensors']
    again = load_checkpoint(target).model
    px, ids = pixel_values(1), prompt_ids()
    with torch.no_grad():
        want = loaded_model.forward_logits(px, ids)
        got = again.forward_logits(px, ids)
        base = loaded.model.forward_logits(px, ids)
    assert got.shape == (1, 256 + 6, 576)
    assert torch.equal(got, want) and not torch.equal(got, base)


def test_timm_gamma_names_are_accepted_on_load(loaded, copy_dir):
    state = safetensors_torch.load_file(str(copy_dir / SHARD1))
    renamed = {k.replace('.scale_factor', '.gamma'): v for k, v in state.items()}
    assert renamed != state
    safetensors_torch.save_file(renamed, str(copy_dir / SHARD1), metadata={'format': 'pt'})
    index = json.loads((copy_dir / INDEX).read_text())
    index['weight_map'] = {k.replace('.scale_factor', '.gamma'): v
                           for k, v in index['weight_map'].items()}
    (copy_dir / INDEX).write_text(json.dumps(index))
    model = load_checkpoint(copy_dir).model
    with torch.no_grad():
        assert torch.equal(model.forward_logits(pixel_values(), prompt_ids()),
                           loaded.model.forward_logits(pixel_values(), prompt_ids()))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['config.json', SHARD1, SHARD2, INDEX, 'tokenizer.model',
                                  'preprocessor_config.json'])
def test_missing_file_is_named(copy_dir, name):
    (copy_dir / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace('.', r'\.')):
        load_checkpoint(copy_dir)


@pytest.mark.parametrize('name', ['config.json', INDEX, 'preprocessor_config.json',
                                  'tokenizer_config.json', 'dataset_statistics.json'])
def test_corrupt_json_is_named(copy_dir, name):
    (copy_dir / name).write_text('{"truncated": ')
    with pytest.raises(CheckpointError, match=name.replace('.', r'\.')):
        load_checkpoint(copy_dir)


@pytest.mark.parametrize('name', [SHARD1, SHARD2])
def test_corrupt_safetensors_is_named(copy_dir, name):
    data = (copy_dir / name).read_bytes()
    (copy_dir / name).write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=name.replace('.', r'\.')):
        load_checkpoint(copy_dir)


def test_missing_required_config_field(copy_dir):
    config = json.loads((copy_dir / 'config.json').read_text())
    del config['timm_model_ids']
    (copy_dir / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'config\.json.*timm_model_ids'):
        load_checkpoint(copy_dir)


def test_missing_and_unexpected_keys(copy_dir):
    state = safetensors_torch.load_file(str(copy_dir / SHARD2))
    dropped = sorted(state)[-1]
    del state[dropped]
    state['language_model.model.extra_head.weight'] = torch.zeros(2)
    safetensors_torch.save_file(state, str(copy_dir / SHARD2), metadata={'format': 'pt'})
    index = json.loads((copy_dir / INDEX).read_text())
    del index['weight_map'][dropped]
    index['weight_map']['language_model.model.extra_head.weight'] = SHARD2
    (copy_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(copy_dir)
    message = str(info.value)
    assert dropped in message and INDEX in message
    assert 'language_model.model.extra_head.weight' in message and SHARD2 in message


def test_index_key_absent_from_shard(copy_dir):
    index = json.loads((copy_dir / INDEX).read_text())
    index['weight_map']['projector.fc9.weight'] = SHARD1
    (copy_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf'{SHARD1}.*projector\.fc9\.weight'):
        load_checkpoint(copy_dir)


def test_shape_mismatch_names_keys(copy_dir):
    config = json.loads((copy_dir / 'config.json').read_text())
    config['text_config']['intermediate_size'] = 200
    (copy_dir / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'shape.*mlp\.(down|gate|up)_proj'):
        load_checkpoint(copy_dir)


def test_out_of_memory_suggests_quantization(tiny_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory')

    monkeypatch.setattr(ckpt_module, 'load_weights', boom)
    with pytest.raises(ConfigError, match='nf4'):
        load_checkpoint(tiny_dir)


def test_unnorm_key_errors_list_keys_before_loading(copy_dir):
    (copy_dir / SHARD1).unlink()  # proves the key is checked before any weight is read
    with pytest.raises(UnnormKeyError, match='bridge_orig.*libero_spatial'):
        OpenVLAPolicy.from_pretrained(copy_dir, unnorm_key='bridge')
    with pytest.raises(UnnormKeyError, match='bridge_orig.*libero_spatial'):
        OpenVLAPolicy.from_pretrained(copy_dir)


def test_dataset_statistics_override(tmp_path):
    path = write_tiny_checkpoint(tmp_path / 'ft', with_dataset_statistics=True)
    loaded = load_checkpoint(path)
    assert loaded.norm_stats.keys == ['tiny_finetune']
    policy = OpenVLAPolicy.from_pretrained(path)  # a single dataset: no unnorm_key needed
    assert policy.unnorm_key == 'tiny_finetune'
    stats = json.loads((path / 'dataset_statistics.json').read_text())['tiny_finetune']['action']
    np.testing.assert_array_equal(policy.norm_stats.q99, stats['q99'])
    with pytest.raises(UnnormKeyError, match='tiny_finetune'):
        OpenVLAPolicy.from_pretrained(path, unnorm_key='bridge_orig')


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

LLAMA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def _make_adapter(tiny_dir, out, whole_model=True, targets=None):
    import peft
    model = load_checkpoint(tiny_dir).model
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=targets or LLAMA_TARGETS + ['fc1', 'fc2', 'fc3'])
    torch.manual_seed(0)
    target = model if whole_model else model.language_model
    peft_model = peft.get_peft_model(target, config)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope='module')
def adapter_dir(tiny_dir, tmp_path_factory):
    return _make_adapter(tiny_dir, tmp_path_factory.mktemp('lora') / 'adapter')


def _logits(policy):
    with torch.no_grad():
        return policy.model.forward_logits(pixel_values(), prompt_ids())


def test_lora_changes_outputs_and_merge_matches(tiny_dir, adapter_dir):
    keys = safetensors_torch.load_file(str(adapter_dir / 'adapter_model.safetensors'))
    assert any(k.startswith('base_model.model.language_model.') for k in keys)
    assert any(k.startswith('base_model.model.projector.') for k in keys)
    base = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig')
    lora = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                         lora_path=adapter_dir)
    merged = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                           lora_path=adapter_dir, merge_lora=True)
    assert not torch.allclose(_logits(lora), _logits(base), atol=1e-3)
    torch.testing.assert_close(_logits(merged), _logits(lora), rtol=1e-4, atol=1e-4)
    assert not any('lora' in k for k in merged.model.state_dict())
    assert type(merged.model.language_model).__name__ == 'LlamaForCausalLM'
    changed = False
    for seed in range(3):
        want = lora.predict(image(seed), 'open the drawer')
        assert merged.predict(image(seed), 'open the drawer').token_ids == want.token_ids
        changed |= base.predict(image(seed), 'open the drawer').token_ids != want.token_ids
    assert changed


def test_lora_on_bare_llama_and_all_linear(tiny_dir, adapter_dir, tmp_path):
    bare = _make_adapter(tiny_dir, tmp_path / 'bare', whole_model=False, targets=LLAMA_TARGETS)
    keys = safetensors_torch.load_file(str(bare / 'adapter_model.safetensors'))
    assert all(k.startswith('base_model.model.model.layers.') for k in keys)
    base = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig')
    lora = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=bare)
    assert not torch.allclose(_logits(lora), _logits(base), atol=1e-3)
    # openvla's finetune.py saves target_modules="all-linear"; it resolves to the saved modules
    shutil.copytree(adapter_dir, tmp_path / 'all')
    config = json.loads((tmp_path / 'all' / 'adapter_config.json').read_text())
    config['target_modules'] = 'all-linear'
    (tmp_path / 'all' / 'adapter_config.json').write_text(json.dumps(config))
    explicit = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                             lora_path=adapter_dir)
    resolved = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                             lora_path=tmp_path / 'all')
    assert torch.equal(_logits(explicit), _logits(resolved))


def test_lora_errors(tiny_dir, adapter_dir, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(CheckpointError, match='adapter_config.json'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=empty)
    shutil.copy(adapter_dir / 'adapter_config.json', empty)
    with pytest.raises(CheckpointError, match='adapter_model.safetensors'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=empty)
    with pytest.raises(ConfigError, match='merge_lora'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=adapter_dir,
                                      quantization='int4_fast')
