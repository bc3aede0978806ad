"""The native OpenVLA model and the policy on tiny checkpoints (CPU): layout, numerics, API."""

from pathlib import Path

import numpy as np
import pytest
import timm  # noqa: F401 - the model code needs it; fail loudly if it is missing
import torch
import transformers  # noqa: F401

from vla_ros.core.actions import ActionTokenizer, unnormalize
from vla_ros.core.errors import ConfigError, ImageError, InstructionError
from vla_ros.core.image import resize_square
from vla_ros.policy.model import (
    OpenVLA,
    Projector,
    checkpoint_to_timm_key,
    create_timm_vit,
    timm_to_checkpoint_key,
)
from vla_ros.policy.policy import OpenVLAPolicy, PolicyOutput
from vla_ros.policy.tiny import (
    TINY_TIMM_MODEL_KWARGS,
    build_tiny_model,
    tiny_config,
    tiny_norm_stats,
    write_tiny_checkpoint,
)

OPENVLA_7B_CONFIG = {
    'vision_backbone_id': 'dinosiglip-vit-so-224px',
    'use_fused_vision_backbone': True,
    'image_sizes': [224, 224],
    'timm_model_ids': ['vit_large_patch14_reg4_dinov2.lvd142m', 'vit_so400m_patch14_siglip_224'],
    'timm_override_act_layers': [None, None],
    'arch_specifier': 'no-align+fused-gelu-mlp',
    'llm_backbone_id': 'llama2-7b-pure',
    'text_config': {'model_type': 'llama', 'pad_token_id': 32000, 'torch_dtype': 'bfloat16',
                    'vocab_size': 32064},
    'pad_token_id': 32000,
    'pad_to_multiple_of': 64,
    'auto_map': {'AutoConfig': 'configuration_prismatic.OpenVLAConfig'},
}


@pytest.fixture(scope='module')
def tiny_model():
    return build_tiny_model(seed=0)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('tiny') / 'ckpt', seed=0)


@pytest.fixture(scope='module')
def policy(tiny_dir):
    return OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig')


def random_image(seed=0, shape=(224, 224, 3)):
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def pixel_values(seed=0):
    return torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(seed))


def manual_features(vit, images):
    """The reference computation: blocks up to the second-to-last, prefix dropped, no norm."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.norm_pre(x)
    for block in list(vit.blocks)[:-1]:
        x = block(x)
    return x[:, vit.num_prefix_tokens:]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def test_vision_backbone_shape_and_manual_block_loop(tiny_model):
    backbone = tiny_model.vision_backbone
    dino, siglip = backbone.featurizer, backbone.fused_featurizer
    assert dino.num_prefix_tokens == 5 and siglip.num_prefix_tokens == 0  # cls + 4 registers
    px = pixel_values()
    with torch.no_grad():
        out = backbone(px)
        expected = torch.cat([manual_features(dino, px[:, :3]),
                              manual_features(siglip, px[:, 3:])], dim=2)
    assert out.shape == (1, 256, 32 + 48)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # channels 0:3 feed DINOv2 only: changing SigLIP's channels leaves the first 32 features
    px2 = px.clone()
    px2[:, 3:] += 1.0
    with torch.no_grad():
        out2 = backbone(px2)
    torch.testing.assert_close(out2[..., :32], out[..., :32], rtol=0, atol=0)
    assert not torch.allclose(out2[..., 32:], out[..., 32:])


def test_vision_backbone_rejects_bad_pixel_values(tiny_model):
    with pytest.raises(ImageError, match='6'):
        tiny_model.vision_backbone(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ImageError, match='224'):
        tiny_model.vision_backbone(torch.zeros(1, 6, 112, 112))


def test_openvla_7b_shapes_on_meta():
    model = OpenVLA.from_config(OPENVLA_7B_CONFIG, dtype=torch.bfloat16, device='meta')
    backbone = model.vision_backbone
    assert backbone.embed_dims == [1024, 1152] and backbone.num_patches == 256
    assert len(backbone.featurizer.blocks) == 24 and len(backbone.fused_featurizer.blocks) == 27
    state = model.state_dict()
    assert state['projector.fc1.weight'].shape == (8704, 2176)
    assert state['projector.fc2.weight'].shape == (4096, 8704)
    assert state['projector.fc3.weight'].shape == (4096, 4096)
    assert state['language_model.lm_head.weight'].shape == (32064, 4096)
    assert state['language_model.model.embed_tokens.weight'].shape == (32064, 4096)
    assert 'vision_backbone.featurizer.blocks.22.ls1.scale_factor' in state
    assert not any(k.endswith('.gamma') for k in state)
    assert 'vision_backbone.fused_featurizer.attn_pool.latent' in state
    n_params = sum(v.numel() for v in state.values())
    assert 7.5e9 < n_params < 7.6e9
    cfg = model.language_model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps) == (
        32, 4096, 11008, 1e-6)
    with torch.no_grad():
        feats = backbone(torch.empty(1, 6, 224, 224, device='meta', dtype=torch.bfloat16))
    assert feats.shape == (1, 256, 2176)


def test_scale_factor_rename_round_trip():

    kwargs = dict(TINY_TIMM_MODEL_KWARGS[0], pretrained=False, num_classes=0, img_size=224)
    plain = timm.create_model('vit_large_patch14_reg4_dinov2.lvd142m', **kwargs).eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith('gamma'):
                p.uniform_(0.5, 1.5)
    prefix = 'vision_backbone.featurizer.'
    timm_state = {prefix + k: v for k, v in plain.state_dict().items()}
    ckpt_state = {timm_to_checkpoint_key(k): v for k, v in timm_state.items()}
    renamed = [k for k in ckpt_state if k.endswith('scale_factor')]
    assert len(renamed) == 2 * 3 and not any(k.endswith('gamma') for k in ckpt_state)
    assert {checkpoint_to_timm_key(k) for k in ckpt_state} == set(timm_state)
    assert timm_to_checkpoint_key('language_model.model.norm.weight') == \
        'language_model.model.norm.weight'
    ours = create_timm_vit('vit_large_patch14_reg4_dinov2.lvd142m', 224, None,
                           TINY_TIMM_MODEL_KWARGS[0])
    ours.load_state_dict({k[len(prefix):]: v for k, v in ckpt_state.items()}, strict=True)
    ours.eval()
    px = pixel_values(1)[:, :3]
    with torch.no_grad():
        torch.testing.assert_close(ours(px), plain(px), rtol=0, atol=0)
        torch.testing.assert_close(
            ours.forward_intermediates(px, indices=[1], intermediates_only=True)[0],
            plain.forward_intermediates(px, indices=[1], intermediates_only=True)[0])
    back = {checkpoint_to_timm_key(prefix + k)[len(prefix):]: v
            for k, v in ours.state_dict().items()}
    fresh = timm.create_model('vit_large_patch14_reg4_dinov2.lvd142m', **kwargs).eval()
    fresh.load_state_dict(back, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(px), plain(px), rtol=0, atol=0)


def test_projector_variants():
    fused = Projector(80, 64, fused=True)
    widths = (fused.fc1.out_features, fused.fc2.out_features, fused.fc3.out_features)
    assert widths == (320, 64, 64)
    plain = Projector(80, 64, fused=False)
    assert plain.fc3 is None and plain.fc1.out_features == 64
    x = torch.randn(1, 5, 80)
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        want = fused.fc3(gelu(fused.fc2(gelu(fused.fc1(x)))))
        torch.testing.assert_close(fused(x), want)
        torch.testing.assert_close(plain(x), plain.fc2(gelu(plain.fc1(x))))
    config = tiny_config(tiny_norm_stats(['a']))
    config['arch_specifier'] = 'no-align+gelu-mlp'
    config['use_fused_vision_backbone'] = False
    single = OpenVLA.from_config(config)
    assert single.projector.fc3 is None and single.vision_backbone.fused_featurizer is None
    with torch.no_grad():
        assert single.project_patches(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 64)
    config['arch_specifier'] = 'no-align+linear'
    with pytest.raises(ConfigError, match='arch_specifier'):
        OpenVLA.from_config(config)


@pytest.mark.parametrize('field', ['timm_model_ids', 'image_sizes', 'text_config',
                                   'arch_specifier', 'use_fused_vision_backbone'])
def test_from_config_missing_field(field):
    config = tiny_config(tiny_norm_stats(['a']))
    del config[field]
    with pytest.raises(ConfigError, match=field):
        OpenVLA.from_config(config, device='meta')


def test_embed_prefix_layout(tiny_model):
    ids = torch.tensor([[1, 40, 41, 42, 466]])
    px = pixel_values(2)
    with torch.no_grad():
        seq = tiny_model.embed_prefix(px, ids)
        table = tiny_model.language_model.get_input_embeddings().weight
        patches = tiny_model.project_patches(px)
    assert seq.shape == (1, 1 + 256 + 4, 64) and tiny_model.prefix_length(5) == 261
    torch.testing.assert_close(seq[0, 0], table[1], rtol=0, atol=0)              # BOS
    torch.testing.assert_close(seq[0, 1:257], patches[0], rtol=0, atol=0)        # the image
    torch.testing.assert_close(seq[0, 257:], table[[40, 41, 42, 466]], rtol=0, atol=0)


def test_kv_cache_steps_match_full_forward(tiny_model):
    ids = torch.tensor([[1, 40, 41, 42, 466]])
    px = pixel_values(3)
    with torch.no_grad():
        embeds = tiny_model.embed_prefix(px, ids)
        logits, cache = tiny_model.prefill(embeds)
        full = tiny_model.language_model(inputs_embeds=embeds, use_cache=False).logits
        torch.testing.assert_close(logits, full[:, -1], rtol=1e-5, atol=1e-5)
        token = torch.tensor([300])
        step_logits, _ = tiny_model.decode_step(token, cache)
        longer = tiny_model.forward_logits(px, torch.cat([ids, token[None]], dim=1))
    torch.testing.assert_close(step_logits, longer[:, -1], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


def test_predict_contract(policy):
    out = policy.predict(random_image(), 'pick up the black bowl')
    assert isinstance(out, PolicyOutput)
    assert out.action.shape == (7,) and np.isfinite(out.action).all()
    assert out.normalized.shape == (7,) and len(out.token_ids) == 7 == policy.action_dim
    first, last = policy.action_tokenizer.action_token_range
    assert (first, last) == (256, 511)
    assert all(first <= t <= last for t in out.token_ids)
    assert {'preprocess', 'vision', 'llm', 'total'} <= set(out.timings)
    assert all(v >= 0 for v in out.timings.values())
    with pytest.raises(ValueError):
        out.action[0] = 1.0
    again = policy.predict(random_image(), 'pick up the black bowl')
    assert again.token_ids == out.token_ids
    np.testing.assert_array_equal(again.action, out.action)


def test_prompt_ids_bos_and_space_token(policy):
    space = policy.tokenizer.convert_tokens_to_ids('▁')
    ids = policy.prompt_ids('  Pick up the Cup ')
    assert ids[0] == policy.tokenizer.bos_token_id == 1 and ids[-1] == space
    text = policy.tokenizer.decode(ids[1:-1])
    assert text == 'In: What action should the robot take to pick up the cup?\nOut:'
    assert ids.count(space) == 1


def test_unnormalization_matches_core(tiny_dir, policy):
    img = random_image(4)
    out = policy.predict(img, 'put the spoon in the drawer')
    decoded = ActionTokenizer(vocab_size=512).decode(np.array(out.token_ids))
    np.testing.assert_array_equal(out.normalized, decoded)
    np.testing.assert_array_equal(out.action, unnormalize(decoded, policy.norm_stats))
    assert policy.unnorm_key == 'bridge_orig' and not policy.norm_stats.mask[6]
    assert out.action[6] == out.normalized[6]  # the gripper passes raw (mask false)
    other = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='libero_spatial')
    out2 = other.predict(img, 'put the spoon in the drawer')
    assert out2.token_ids == out.token_ids
    stats = other.norm_stats
    want = 0.5 * (out2.normalized + 1) * (stats.q99 - stats.q01) + stats.q01
    np.testing.assert_allclose(out2.action, want, rtol=0, atol=1e-12)


def test_resize_of_other_sizes(policy):
    big = random_image(5, (300, 400, 3))
    out = policy.predict(big, 'close the drawer')
    ref = policy.predict(resize_square(big, 224, 'bicubic'), 'close the drawer')
    assert out.token_ids == ref.token_ids


@pytest.mark.parametrize('image', [
    np.zeros((224, 224, 3), np.float32),
    np.zeros((224, 224), np.uint8),
    np.zeros((224, 224, 4), np.uint8),
    np.zeros((0, 224, 3), np.uint8),
    [[0, 0, 0]],
])
def test_bad_images(policy, image):
    with pytest.raises(ImageError):
        policy.predict(image, 'pick up the cup')


@pytest.mark.parametrize('instruction', ['', '   ', None, 42, 'x' * 5000])
def test_bad_instructions(policy, instruction):
    with pytest.raises(InstructionError):
        policy.predict(random_image(), instruction)


def _rig_lm_head(model, token_id):
    """Replace lm_head by a biased linear whose argmax is always ``token_id``."""
    old = model.language_model.lm_head
    rigged = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        rigged.weight.zero_()
        rigged.bias.zero_()
        rigged.bias[token_id] = 10.0
    model.language_model.lm_head = rigged


@pytest.mark.parametrize('token_id,bin_value', [(512, -1 + 1 / 255), (575, -1 + 1 / 255),
                                                (5, 1 - 1 / 255)])
def test_unconstrained_non_action_token(tiny_dir, token_id, bin_value):
    free = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='libero_spatial',
                                         constrain_actions=False)
    _rig_lm_head(free.model, token_id)  # before the first prediction builds the engine
    out = free.predict(random_image(), 'pick up the cup')
    assert out.token_ids == (token_id,) * 7
    np.testing.assert_allclose(out.normalized, bin_value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.action, unnormalize(out.normalized, free.norm_stats))
    strict = OpenVLAPolicy(free.checkpoint, unnorm_key='libero_spatial', constrain_actions=True)
    constrained = strict.predict(random_image(), 'pick up the cup')
    assert all(256 <= t <= 511 for t in constrained.token_ids)


@pytest.mark.parametrize('constrain', [True, False])
def test_token_confidence_is_the_softmax_of_the_reference_logits(tiny_dir, constrain):
    pol = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig',
                                        constrain_actions=constrain)
    first, last = pol.action_tokenizer.action_token_range
    for seed, instruction in enumerate(('pick up the black bowl', 'wipe the table')):
        img = random_image(20 + seed)
        out = pol.predict(img, instruction)
        assert out.token_probs.shape == out.token_margins.shape == (7,)
        # the reference: transformers' forward over the prefix and the chosen tokens
        ids = torch.tensor([pol.prompt_ids(instruction) + list(out.token_ids[:-1])])
        with torch.no_grad():
            logits = pol.model.forward_logits(pol.pixel_values(img), ids)[0, -7:].double()
        offset = 0
        if constrain:
            logits, offset = logits[:, first:last + 1], first
        probs = torch.softmax(logits, dim=-1)
        top2 = probs.topk(2, dim=-1).values
        chosen = torch.tensor(out.token_ids) - offset
        assert torch.equal(probs.argmax(-1), chosen)
        np.testing.assert_allclose(out.token_probs, probs[torch.arange(7), chosen].numpy(),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out.token_margins, (top2[:, 0] - top2[:, 1]).numpy(),
                                   rtol=1e-4, atol=1e-6)
        assert np.all((out.token_margins >= 0) & (out.token_margins <= out.token_probs))
        assert np.all((out.token_probs > 0) & (out.token_probs <= 1))
        assert out.token_probs.min() < 0.9  # not saturated: the comparison says something


SIM_CHECKPOINT = Path(__file__).resolve().parent.parent / 'checkpoints' / 'sim_tabletop'


def test_a_batch_equals_each_sample_alone_token_for_token():
    # the shipped (trained) checkpoint, fp32 on the CPU: its actions depend on the inputs
    pol = OpenVLAPolicy.from_pretrained(SIM_CHECKPOINT)
    rng = np.random.RandomState(3)
    images = [rng.randint(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.randint(0, 256, (480, 640, 3), dtype=np.uint8))  # resized, like predict
    instructions = ['pick up the red block', 'put the green block in the bowl',
                    'push the blue block to the left of the yellow block', 'stack']
    singles = [pol.predict(i, t) for i, t in zip(images, instructions, strict=True)]
    batch = pol.predict_batch(images, instructions)
    assert len({s.token_ids for s in singles}) > 1
    for single, out in zip(singles, batch, strict=True):
        assert out.token_ids == single.token_ids
        np.testing.assert_array_equal(out.action, single.action)
        np.testing.assert_allclose(out.token_probs, single.token_probs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out.token_margins, single.token_margins, atol=2e-5)
        assert out.timings['batch_size'] == 4


def test_a_bad_sample_fails_only_its_own_entry(policy):
    good = random_image(7)
    out = policy.predict_batch([good, np.zeros((224, 224), np.uint8), good, good],
                               ['open the drawer', 'open the drawer', '', 'wipe'])
    assert isinstance(out[1], ImageError) and isinstance(out[2], InstructionError)
    assert out[0].token_ids == policy.predict(good, 'open the drawer').token_ids
    assert out[3].token_ids == policy.predict(good, 'wipe').token_ids
    assert out[0].timings['batch_size'] == 2
    assert all(isinstance(o, InstructionError) for o in policy.predict_batch([good], [None]))
    with pytest.raises(ConfigError, match='2 images but 1 instructions'):
        policy.predict_batch([good, good], ['wipe'])


def test_option_errors(tiny_dir):
    with pytest.raises(TypeError, match='engine'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', engine='plain')
    with pytest.raises(ConfigError, match='one of int4'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', quantization='nf4')
    with pytest.raises(ConfigError, match='quantization'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', quantization='int3')
    with pytest.raises(ConfigError, match='dtype'):
        OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', dtype='float8')


def test_docs_precision_table_is_the_quantization_modes():
    from vla_ros.policy.quant import METHODS
    text = (Path(__file__).resolve().parent.parent / 'docs' / 'openvla.md').read_text()
    lines = text.splitlines()
    start = lines.index('| mode | what is quantized | GPU memory, openvla-7b |')
    modes = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        modes.append(line.split('|')[1].strip().strip('`'))
    assert modes == ['none', *METHODS]
    assert 'predict_batch(images, instructions) -> list[PolicyOutput | ImageError |' in text


def test_compile_cache_lives_in_the_user_cache_keyed_by_model(tmp_path, monkeypatch):
    from vla_ros.policy import cache
    monkeypatch.setattr(cache, '_folder', None)  # restored afterwards
    monkeypatch.setenv('VLA_ROS_CACHE_DIR', str(tmp_path / 'c'))
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    monkeypatch.delenv('TRITON_CACHE_DIR', raising=False)
    config = tiny_config(tiny_norm_stats(['a']))
    folder = cache.activate(config, torch.device('cpu'))
    assert folder.parent == tmp_path / 'c' and folder.is_dir()
    import os
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(folder / 'inductor')
    # statistics do not change the key, the architecture does
    same = dict(config, norm_stats={'b': config['norm_stats']['a']})
    other = dict(config, text_config=dict(config['text_config'], num_hidden_layers=3))
    cpu = torch.device('cpu')
    assert cache.cache_key(same, cpu) == cache.cache_key(config, cpu)
    assert cache.cache_key(other, cpu) != cache.cache_key(config, cpu)
    monkeypatch.delenv('VLA_ROS_CACHE_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert cache.cache_root() == tmp_path / 'xdg' / 'vla_ros'
