"""GPU-only checks, run on the device machine (`python3 -m pytest bench/gpu_tests -q`), not in CI.

CI has no GPU, and the suite in test/ skips nothing for that reason: what needs CUDA lives here.
"""

import torch

from vla_ros.policy.engine import GraphedModule


def test_graphed_module_replays_and_recaptures_on_cuda():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lin = lin.cuda()
    g = GraphedModule(lin, torch.randn(2, 8, device='cuda'))
    for rows in (2, 2, 5):  # the third call has a new shape: re-captured
        x = torch.randn(rows, 8, device='cuda')
        with torch.no_grad():
            torch.testing.assert_close(g(x), lin(x))


