"""The safety parameters have one home: SafetyConfig's table feeds the node and the YAML.

``config/safety_node.yaml`` must be exactly what the node declares (names, defaults, and the
descriptions as comments), every limiter parameter must carry its unit and range in the node's
descriptor, and the descriptor ranges must be the ones SafetyConfig validates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vla_ros.core.errors import ConfigError
from vla_ros.core.safety import SafetyConfig, specs
from vla_ros.nodes.params import descriptor
from vla_ros.nodes.safety_node import PARAMS

YAML = Path(__file__).resolve().parents[1] / 'config' / 'safety_node.yaml'


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return '[' + ', '.join(_literal(v) for v in value) + ']'
    return repr(value)


def render_yaml() -> str:
    """The parameter file as it must read: one line per declared parameter, doc as comment."""
    lines = ['# safety_node: the one parameter table (vla_ros/core/safety/config.py and the',
             '# node rows of vla_ros/nodes/safety_node.py); test/test_safety_params.py keeps',
             '# this file equal to it.',
             '/**/safety_node:', '  ros__parameters:']
    for p in PARAMS:
        entry = f'    {p.name}: {_literal(p.default)}'
        lines.append(f'{entry:<44}# {p.description}')
    return '\n'.join(lines) + '\n'


def test_yaml_is_the_declared_parameter_table() -> None:
    assert YAML.read_text(encoding='utf-8') == render_yaml()


def test_every_limiter_parameter_has_unit_range_and_descriptor() -> None:
    rows = {p.name: p for p in PARAMS}
    for spec in specs():
        p = rows[spec.name]
        assert p.read_only and spec.doc in p.description
        if spec.unit:
            assert f'[{spec.unit}]' in p.description
        d = descriptor(p)
        if spec.kind == 'float':
            (r,) = d.floating_point_range
            assert (r.from_value, r.to_value) == (spec.low, spec.high), spec.name
        elif spec.kind == 'int':
            (r,) = d.integer_range
            assert (r.from_value, r.to_value) == (spec.low, spec.high), spec.name


@pytest.mark.parametrize('spec', [s for s in specs() if s.kind in ('float', 'int')],
                         ids=lambda s: s.name)
def test_descriptor_range_is_what_the_config_validates(spec) -> None:  # noqa: ANN001
    below = spec.low - (1 if spec.kind == 'int' else max(1e-6, abs(spec.low) * 1e-6))
    above = spec.high + (1 if spec.kind == 'int' else max(1e-6, abs(spec.high) * 1e-6))
    for bad in (below, above):
        with pytest.raises(ConfigError, match=spec.name):
            SafetyConfig(**{spec.name: int(bad) if spec.kind == 'int' else bad})
    if spec.low_open:
        with pytest.raises(ConfigError, match=spec.name):
            SafetyConfig(**{spec.name: spec.low})
    assert math.isfinite(spec.high)
