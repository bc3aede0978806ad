"""The one enforced code style: ruff (99 columns, pep257 docstrings, import order) everywhere."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format', 'concise',
         'vla_ros', 'test', 'bench', 'launch', 'scripts/camera_node', 'scripts/vla_node',
         'scripts/safety_node', 'scripts/sim_arm_node'],
        cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
