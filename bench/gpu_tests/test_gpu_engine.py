"""GPU-only checks, run on the GPU machine (`python3 -m pytest bench/gpu_tests -q`), not in CI.

CI has no GPU, and the suite in test/ skips nothing for that reason: what needs CUDA lives here
(test/test_engine.py also runs its engine tests on CUDA when one is present). These run the
user path of a tiny checkpoint on the GPU: compiled layers, CUDA graphs, the int4 Triton kernels
(with their inline-assembly conversion), batches.
"""

import numpy as np
import pytest
import torch

from vla_ros.policy.engine import GraphedModule
from vla_ros.policy.policy import OpenVLAPolicy
from vla_ros.policy.tiny import write_tiny_checkpoint


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('tiny') / 'ckpt', seed=1)


def test_graphed_module_replays_per_shape_on_cuda():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lin = lin.cuda()
    g = GraphedModule(lin, torch.randn(2, 8, device='cuda'))
    for rows in (2, 2, 5, 2):  # a new shape gets its own graph
        x = torch.randn(rows, 8, device='cuda')
        with torch.no_grad():
            torch.testing.assert_close(g(x), lin(x))


def _teacher_forced_ok(policy, image, instruction, tokens, tol):
    """Each token is the argmax of transformers' logits given the policy's own prefix."""
    ids = torch.tensor([policy.prompt_ids(instruction) + list(tokens[:-1])], device='cuda')
    with torch.no_grad():
        logits = policy.model.forward_logits(policy.pixel_values(image), ids)[0, -7:].float()
    if policy.constrain_actions:
        first, last = policy.action_tokenizer.action_token_range
        logits = logits[:, first:last + 1]
        tokens = [t - first for t in tokens]
    top = logits.max(-1).values
    return all(float(logits[i, t]) >= float(top[i]) - tol for i, t in enumerate(tokens))


@pytest.mark.parametrize('quantization, dtype, tol', [(None, torch.float32, 1e-3),
                                                      (None, torch.bfloat16, 0.05),
                                                      ('int4', torch.bfloat16, 0.05)])
def test_policy_on_cuda_follows_transformers_and_batches(tiny_dir, quantization, dtype, tol):
    policy = OpenVLAPolicy.from_pretrained(tiny_dir, unnorm_key='bridge_orig', device='cuda',
                                           dtype=dtype, quantization=quantization)
    policy.warmup(batch_sizes=(1,))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    instructions = ['pick up the black bowl', 'open the drawer and put the spoon inside it',
                    'wipe']
    singles = [policy.predict(i, t) for i, t in zip(images, instructions, strict=True)]
    engine = policy.decode_engine
    assert engine.compiled and engine.graph_captured, (engine.compile_error, engine.graph_error)
    for image, instruction, out in zip(images, instructions, singles, strict=True):
        assert _teacher_forced_ok(policy, image, instruction, out.token_ids, tol)
        assert np.all((out.token_margins >= 0) & (out.token_probs <= 1))
    batch = policy.predict_batch(images, instructions)
    agree = sum(a.token_ids == b.token_ids for a, b in zip(batch, singles, strict=True))
    if dtype == torch.float32:
        assert agree == 3
    for image, instruction, out in zip(images, instructions, batch, strict=True):
        assert _teacher_forced_ok(policy, image, instruction, out.token_ids, tol)
