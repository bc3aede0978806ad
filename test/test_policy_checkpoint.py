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


def test_out_of_memory_names_the_modes_that_fit(tiny_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory')

    monkeypatch.setattr(ckpt_module, 'load_weights', boom)
    with pytest.raises(ConfigError, match=r'none about .* GB, int4 about .* GB; modes that fit: '
                                          r'quantization int4'):
        load_checkpoint(tiny_dir)
    headers = ckpt_module._shard_headers(ckpt_module.weight_map(tiny_dir)[0])
    needs = ckpt_module.memory_estimates(headers)
    assert needs['int4'] < needs['none']
    message = ckpt_module._memory_message(tiny_dir, torch.device('cuda', 0), needs, 'none',
                                          free=(needs['int4'] + needs['none']) // 2,
                                          total=needs['none'])
    assert message.endswith('modes that fit: quantization int4')
    message = ckpt_module._memory_message(tiny_dir, torch.device('cuda', 0), needs, 'int4',
                                          free=needs['int4'] // 2, total=needs['none'])
    assert 'no mode fits' in message


def test_shards_that_disagree_with_the_index(copy_dir):
    index = json.loads((copy_dir / INDEX).read_text())
    index['metadata']['total_size'] += 2
    (copy_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf'{INDEX} says .* the shards and the index '
                                              'disagree'):
        load_checkpoint(copy_dir)
    index['metadata']['total_size'] -= 2
    (copy_dir / INDEX).write_text(json.dumps(index))
    state = safetensors_torch.load_file(str(copy_dir / SHARD2))
    state['projector.fc9.weight'] = torch.zeros(2)
    safetensors_torch.save_file(state, str(copy_dir / SHARD2), metadata={'format': 'pt'})
    with pytest.raises(CheckpointError, match=rf'{SHARD2} holds 1 keys that {INDEX} does not '
                                              r'assign to it: projector\.fc9\.weight'):
        load_checkpoint(copy_dir)


def test_an_interrupted_load_leaves_nothing_behind(tiny_dir, monkeypatch):
    import gc

    from vla_ros.policy.model import OpenVLA

    def alive() -> int:
        gc.collect()
        return sum(type(o) is OpenVLA for o in gc.get_objects())

    before = alive()
    calls = []

    def interrupt(self, nbytes, final=False):
        calls.append(nbytes)
        if len(calls) == 40:  # mid-way through the weights, as a SIGINT would land
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.LoadProgress, 'add', interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(tiny_dir)
    assert len(calls) == 40 and alive() == before
    monkeypatch.undo()
    lines = []
    loaded = load_checkpoint(tiny_dir, progress=lines.append)  # and the next load works
    assert not loaded.model.meta_tensor_names()
    assert 'MB/s' in lines[-1] and 'done in' in lines[-1] and '(100%)' in lines[-1]


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


def _make_adapter(tiny_dir, out, whole_model=True, targets=None, rank=4):
    import peft
    model = load_checkpoint(tiny_dir).model
    config = peft.LoraConfig(r=rank, lora_alpha=8, init_lora_weights=False,
                             target_modules=targets or LLAMA_TARGETS + ['fc1', 'fc2', 'fc3'])
    torch.manual_seed(0)
    target = model if whole_model else model.language_model
    peft_model = peft.get_peft_model(target, config)
    peft_model.save_pretrained(str(out))
    return out


def _peft_logits(tiny_dir, adapter, whole_model=True):
    """The reference: peft's own (unmerged) application of the adapter."""
    import peft
    model = load_checkpoint(tiny_dir).model
    target = model if whole_model else model.language_model
    peft.PeftModel.from_pretrained(target, str(adapter)).eval()
    with torch.no_grad():
        return model.forward_logits(pixel_values(), prompt_ids())


@pytest.fixture(scope='module')
def adapter_dir(tiny_dir, tmp_path_factory):
    return _make_adapter(tiny_dir, tmp_path_factory.mktemp('lora') / 'adapter')


def _logits(policy):
    with torch.no_grad():
        return policy.model.forward_logits(pixel_values(), prompt_ids())


def test_lora_merged_on_load_computes_what_peft_computes(tiny_dir, adapter_dir):
    keys = safetensors_torch.load_file(str(adapter_dir / 'adapter_model.safetensors'))
    assert any(k.startswith('base_model.model.language_model.') for k in keys)
    assert any(k.startswith('base_model.model.projector.') for k in keys)
    base = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig')
    lora = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                         lora_path=adapter_dir)
    assert not torch.allclose(_logits(lora), _logits(base), atol=1e-3)
    torch.testing.assert_close(_logits(lora), _peft_logits(tiny_dir, adapter_dir), rtol=1e-4,
                               atol=1e-4)
    assert not any('lora' in k for k in lora.model.state_dict())
    assert type(lora.model.language_model).__name__ == 'LlamaForCausalLM'


def test_lora_on_bare_llama_and_all_linear(tiny_dir, adapter_dir, tmp_path):
    bare = _make_adapter(tiny_dir, tmp_path / 'bare', whole_model=False, targets=LLAMA_TARGETS)
    keys = safetensors_torch.load_file(str(bare / 'adapter_model.safetensors'))
    assert all(k.startswith('base_model.model.model.layers.') for k in keys)
    base = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig')
    lora = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=bare)
    assert not torch.allclose(_logits(lora), _logits(base), atol=1e-3)
    torch.testing.assert_close(_logits(lora), _peft_logits(tiny_dir, bare, whole_model=False),
                               rtol=1e-4, atol=1e-4)
    # openvla's finetune.py saves target_modules="all-linear": the tensors say what is adapted
    shutil.copytree(adapter_dir, tmp_path / 'all')
    config = json.loads((tmp_path / 'all' / 'adapter_config.json').read_text())
    config['target_modules'] = 'all-linear'
    (tmp_path / 'all' / 'adapter_config.json').write_text(json.dumps(config))
    explicit = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                             lora_path=adapter_dir)
    resolved = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                             lora_path=tmp_path / 'all')
    assert torch.equal(_logits(explicit), _logits(resolved))


def test_lora_with_int4_quantizes_the_merged_weights(tiny_dir, adapter_dir):
    from vla_ros.policy.quant import Int4Linear, quantize_linears
    q = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=adapter_dir,
                                      quantization='int4')
    assert isinstance(q.model.language_model.model.layers[0].self_attn.q_proj, Int4Linear)
    merged = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                           lora_path=adapter_dir)
    quantize_linears(merged.model)  # quantizing after the load: the same weights
    torch.testing.assert_close(_logits(q), _logits(merged), rtol=0, atol=0)
    out = q.predict(image(1), 'open the drawer')
    assert len(out.token_ids) == 7


def test_lora_errors(tiny_dir, adapter_dir, tmp_path):
    with pytest.raises(CheckpointError, match='LoRA adapter directory not found: .*nowhere'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                      lora_path=tmp_path / 'nowhere')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(CheckpointError, match='adapter_config.json'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=empty)
    shutil.copy(adapter_dir / 'adapter_config.json', empty)
    with pytest.raises(CheckpointError, match='adapter_model.safetensors'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=empty)


def test_lora_that_does_not_fit_names_the_file_and_tensor(tiny_dir, adapter_dir, tmp_path):
    # made on another base: one projection's input width differs
    other = tmp_path / 'other'
    shutil.copytree(adapter_dir, other)
    file = other / 'adapter_model.safetensors'
    state = safetensors_torch.load_file(str(file))
    key = 'base_model.model.language_model.model.layers.1.mlp.down_proj.lora_A.weight'
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    safetensors_torch.save_file(state, str(file))
    with pytest.raises(CheckpointError) as info:
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=other)
    message = str(info.value)
    assert str(file) in message and 'layers.1.mlp.down_proj.lora_A' in message
    assert len(message) < 400
    # r in the config disagreeing with the tensors
    wrong_r = tmp_path / 'wrong_r'
    shutil.copytree(adapter_dir, wrong_r)
    config = json.loads((wrong_r / 'adapter_config.json').read_text())
    config['r'] = 8
    (wrong_r / 'adapter_config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'adapter_model\.safetensors: .*lora_A has shape '
                                              r'\[4, \d+\], but r = 8'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', lora_path=wrong_r)
