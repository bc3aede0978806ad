"""DecodeEngine and the int4 layers against transformers' own greedy loop, on tiny models.

CPU always; the same tests also run on CUDA (graphs, Triton kernels) where a GPU is present.
"""

import inspect

import pytest
import torch
import transformers

from vla_ros.core.errors import ConfigError  # noqa: E402
from vla_ros.policy.engine import DecodeEngine, GraphedModule  # noqa: E402

# transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this one takes.
CACHE_KWARG = ('cache' if 'cache' in inspect.signature(transformers.LlamaForCausalLM.forward)
               .parameters else 'past_key_values')


DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def tiny_llama(seed=0, n_kv_heads=4, vocab=300, hidden=64, layers=3, device='cpu'):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=n_kv_heads,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device)
    # A wider logit spread than the default init, so the argmax is never a near-tie.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model


def hf_greedy(model, embeds, n_tokens, allowed=None):
    """A plain greedy loop over the HF model with its dynamic cache (the reference)."""
    bias = None
    if allowed is not None:
        bias = torch.full((model.config.vocab_size,), float('-inf'), device=embeds.device)
        bias[allowed.to(embeds.device)] = 0.0
    out, cache = [], {CACHE_KWARG: transformers.DynamicCache()}
    with torch.no_grad():
        res = model(inputs_embeds=embeds, use_cache=True, **cache)
        for i in range(n_tokens):
            logits = res.logits[:, -1].float()
            if bias is not None:
                logits = logits + bias
            tok = logits.argmax(-1)
            out.append(int(tok))
            if i + 1 < n_tokens:
                res = model(input_ids=tok.view(1, 1), use_cache=True, **cache)
    return out


def prefix(model, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    dev = model.lm_head.weight.device
    with torch.no_grad():
        emb = model.model.embed_tokens(ids.to(dev))
    # add a little noise so the prefix is not just token embeddings (like image patches)
    return emb + 0.02 * torch.randn(emb.shape, generator=g).to(dev)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('n_kv_heads', [4, 2])
def test_matches_hf_greedy_unconstrained_and_constrained(n_kv_heads, device):
    model = tiny_llama(n_kv_heads=n_kv_heads, device=device)
    # same seed: untouched by the engine's fusion
    ref_model = tiny_llama(n_kv_heads=n_kv_heads, device=device)
    allowed = torch.arange(200, 300)
    free = DecodeEngine(model, max_seq_len=64, allowed_token_ids=None)
    constrained = DecodeEngine(model, max_seq_len=64, allowed_token_ids=allowed)
    for seed, (length, n) in enumerate([(5, 7), (17, 3), (30, 12), (1, 1), (50, 7)]):
        emb = prefix(ref_model, length, seed)
        assert free.generate(emb, n).tokens.tolist() == hf_greedy(ref_model, emb, n)
        got = constrained.generate(emb, n).tokens.tolist()
        assert got == hf_greedy(ref_model, emb, n, allowed)
        assert all(200 <= t < 300 for t in got)
    if device == 'cuda':
        assert free.graph_captured and constrained.graph_captured, free.graph_error


@pytest.mark.parametrize('device', DEVICES)
def test_cache_reuse_does_not_leak_between_calls(device):
    model = tiny_llama(seed=1, device=device)
    engine = DecodeEngine(model, max_seq_len=64, allowed_token_ids=None)
    long_emb, short_emb = prefix(model, 40, 1), prefix(model, 6, 2)
    fresh_short = DecodeEngine(tiny_llama(seed=1, device=device),
                               max_seq_len=64).generate(short_emb, 9).tokens
    first_long = engine.generate(long_emb, 9).tokens
    assert engine.generate(short_emb, 9).tokens.tolist() == fresh_short.tolist()
    assert engine.generate(long_emb, 9).tokens.tolist() == first_long.tolist()


def test_output_is_not_a_view_of_engine_buffers():
    model = tiny_llama(seed=2)
    engine = DecodeEngine(model, max_seq_len=32)
    a = engine.generate(prefix(model, 4, 0), 5).tokens
    snapshot = a.clone()
    engine.generate(prefix(model, 9, 1), 5)
    assert torch.equal(a, snapshot)


def test_fusion_keeps_the_model_unchanged():
    model = tiny_llama(seed=3)
    ref = tiny_llama(seed=3)
    DecodeEngine(model, max_seq_len=16)
    emb = prefix(ref, 8, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=emb).logits, ref(inputs_embeds=emb).logits)


def test_too_many_tokens_raise_a_clear_error():
    model = tiny_llama()
    engine = DecodeEngine(model, max_seq_len=20)
    engine.generate(prefix(model, 14, 0), 7)  # 14 + 7 - 1 = 20 positions: fits exactly
    with pytest.raises(ConfigError, match='max_seq_len=20'):
        engine.generate(prefix(model, 15, 0), 7)
    with pytest.raises(ConfigError, match=r'\(1, L, hidden=64\)'):
        engine.generate(torch.zeros(2, 4, 64), 7)
    with pytest.raises(ConfigError, match='allowed_token_ids'):
        DecodeEngine(model, max_seq_len=20, allowed_token_ids=torch.tensor([5, 10_000]))


def test_graphed_module_falls_back_to_a_plain_call_on_cpu():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(1, 8)
    g = GraphedModule(lin, x)
    with torch.no_grad():
        torch.testing.assert_close(g(x), lin(x))


# --- quantization (CPU-runnable parts) -----------------------------------------------------------

from vla_ros.policy import quant  # noqa: E402


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('rows, k', [(1, 256), (5, 256), (37, 256), (1, 4096)])
def test_int4_layers_match_their_dequantized_weights(device, rows, k):
    # (1, 4096): on CUDA the one-row product runs with K split in two (partial sums)
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 80, bias=True).to(device)
    x = torch.randn(rows, k, device=device)
    # int4_fast (Triton kernels on CUDA: GEMV for one row, fused GEMM for several)
    q4 = quant.Int4Linear.from_linear(lin, device)
    deq = q4.dequantize()
    ref = x @ deq.T + lin.bias.detach()
    assert (q4(x) - ref).norm() / ref.norm() < 1e-2
    # the quantization itself is close to the float weights (4 bits, groups of 128)
    assert (deq - lin.weight).norm() / lin.weight.norm() < 0.12
    # int4_tinygemm (PyTorch's int4 GEMM)
    tg = quant.TinyGemmLinear.from_linear(lin, device)
    q, scale, zero = quant.quantize_int4_groupwise(lin.weight.detach(), 128)
    ref = x @ quant.dequantize_int4_groupwise(q, scale, zero, 128).T + lin.bias.detach()
    assert (tg(x) - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('method, cls', [('int4_fast', quant.Int4Linear),
                                         ('int4_tinygemm', quant.TinyGemmLinear)])
def test_engine_with_int4_layers_matches_hf_greedy_on_the_same_quantized_model(
        device, method, cls):
    model = tiny_llama(seed=4, hidden=128, device=device)
    quant.quantize_model(model, method, device=device)
    assert isinstance(model.model.layers[0].mlp.down_proj, cls)
    assert type(model.lm_head) is torch.nn.Linear  # lm_head stays in float
    engine = DecodeEngine(model, max_seq_len=48)
    assert isinstance(engine.layers[0].qkv, cls)  # fused from packed weights
    for seed, (length, n) in enumerate([(9, 7), (20, 5), (3, 7)]):
        emb = prefix(model, length, seed)
        # int4 layers compute in bf16, where near-ties can flip between the engine's and HF's
        # kernel orders: check each token is HF's argmax given the engine's own prefix, up to
        # bf16 noise (teacher forcing, so one flip does not cascade).
        assert_greedy_under_hf(model, emb, engine.generate(emb, n).tokens.tolist(), tol=0.05)


def assert_greedy_under_hf(model, emb, tokens, tol):
    with torch.no_grad():
        ids = torch.tensor([tokens[:-1]], device=emb.device)
        full = torch.cat([emb, model.model.embed_tokens(ids)], dim=1)
        logits = model(inputs_embeds=full).logits[0, emb.shape[1] - 1:].float()
    for i, tok in enumerate(tokens):
        top = logits[i].max()
        assert logits[i, tok] >= top - tol, (i, tok, int(logits[i].argmax()), float(top))


def test_quantization_errors_are_config_errors():
    model = tiny_llama()
    with pytest.raises(ConfigError, match='choose one of'):
        quant.quantize_model(model, 'int3')
    with pytest.raises(ConfigError, match='CUDA GPU only'):
        quant.quantize_model(model, 'nf4', device='cpu')


# --- on a tiny OpenVLA checkpoint, through the policy --------------------------------------------

@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    from vla_ros.policy import tiny
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp('tiny_openvla'), seed=3)


@pytest.mark.parametrize('constrain', [True, False])
def test_policy_fast_engine_tokens_equal_plain_on_tiny_checkpoint(tiny_checkpoint, constrain):
    import numpy as np

    from vla_ros.policy.policy import OpenVLAPolicy
    kw = dict(unnorm_key='bridge_orig', constrain_actions=constrain)
    plain = OpenVLAPolicy.from_pretrained(tiny_checkpoint, engine='plain', **kw)
    fast = OpenVLAPolicy.from_pretrained(tiny_checkpoint, engine='fast', **kw)
    rng = np.random.default_rng(0)
    for instruction in ('pick up the black bowl', 'open the drawer and put the spoon inside it',
                        'wipe'):
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        a, b = fast.predict(image, instruction), plain.predict(image, instruction)
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.action, b.action)


def test_vision_fn_computes_project_patches(tiny_checkpoint):
    from vla_ros.policy.engine import vision_fn
    from vla_ros.policy.policy import OpenVLAPolicy
    model = OpenVLAPolicy.from_pretrained(tiny_checkpoint, unnorm_key='bridge_orig').model
    px = torch.randn(1, model.vision_backbone.in_channels, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(vision_fn(model)(px), model.project_patches(px))
