"""DAgger rollouts: a trained policy drives the simulated arm, the scripted expert labels.

Each episode renders the camera, preprocesses it as the camera node does, lets the policy
choose the executed action (the expert's instead with probability ``--beta``) and records the
expert's action for the visited state (``train.data.generate`` with a policy behaviour). The
result is a demonstrations file for the LoRA stage of ``vla_ros.train.train``::

    python -m vla_ros.train.dagger --checkpoint BASE --episodes-per-task 100 --out dagger.npz
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_ros.core.image import ImageConfig, preprocess
from vla_ros.train.data import ALL_TASKS, DataConfig, NoisyExpert, generate

__all__ = ['PolicyBehaviour', 'main']

logger = logging.getLogger(__name__)


class PolicyBehaviour:
    """Execute the policy's action for the rendered frame (the expert's with probability beta).

    ``perturb`` (a ``NoisyExpert``) adds its noise and excursions to whatever is executed, so
    that the rollouts also visit the states a policy reaches after a disturbance.
    """

    def __init__(self, policy: Any, beta: float, perturb: NoisyExpert | None = None) -> None:
        """Wrap an ``OpenVLAPolicy``."""
        self.policy = policy
        self.beta = float(beta)
        self.perturb = perturb

    def __call__(self, image: np.ndarray, instruction: str, state: Any, label: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Return the action to execute in ``state``."""
        if rng.random() < self.beta:
            action = np.array(label, dtype=float)
        else:
            action = np.array(self.policy.predict(image, instruction).action, dtype=float)
        if self.perturb is not None:
            action = self.perturb(image, instruction, state, action, rng)
        return action


def main(argv: Sequence[str] | None = None) -> int:
    """Record DAgger rollouts of a checkpoint and write them as demonstrations."""
    p = argparse.ArgumentParser(prog='python -m vla_ros.train.dagger',
                                description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--tasks', default=','.join(ALL_TASKS))
    p.add_argument('--episodes-per-task', type=int, default=100)
    p.add_argument('--seed', type=int, default=300_000, help='first layout seed')
    p.add_argument('--beta', type=float, default=0.2)
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', stream=sys.stdout)
    import torch

    from vla_ros.policy.policy import OpenVLAPolicy

    torch.set_num_threads(1)
    policy = OpenVLAPolicy.from_pretrained(opts.checkpoint, device='cpu')
    image_config = ImageConfig()
    config = DataConfig(tasks=tuple(t for t in opts.tasks.split(',') if t),
                        episodes_per_task=opts.episodes_per_task, seed=opts.seed)

    def behaviour() -> PolicyBehaviour:
        return PolicyBehaviour(policy, opts.beta, NoisyExpert(
            config.noise_std, config.excursion_prob, config.excursion_steps))

    demos = generate(config, behaviour_factory=behaviour,
                     observe=lambda world: preprocess(world.observe(), image_config))
    demos.save(opts.out)
    logger.info('%d samples, %d episodes, %.0f%% of the rollouts succeeded; wrote %s',
                len(demos), demos.num_episodes, 100 * demos.successes.mean(), opts.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
