"""The persisted stop latch (file semantics) and the shadow-mode comparison, without DDS."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from vla_ros.core.safety import SafetyConfig, SafetyLimiter
from vla_ros.core.safety.latch import LatchError, LatchFile, default_latch_path
from vla_ros.core.safety.shadow import (
    ShadowStats,
    format_report,
    intervened,
    read_audit,
    report_from_audit,
)


# ------------------------------------------------------------------------------ latch
def test_latch_round_trip_is_atomic_and_cleared(tmp_path) -> None:  # noqa: ANN001
    latch = LatchFile(tmp_path / 'deep' / 'safety.latch')
    assert latch.read() is None
    latch.write('estop service', '/vla/safety_node')
    assert latch.read() == 'estop service'
    record = json.loads(latch.path.read_text())
    assert record['by'] == '/vla/safety_node' and record['latched_at'] > 0
    assert sorted(p.name for p in latch.path.parent.iterdir()) == ['safety.latch']  # no temp
    latch.write('protective stop: contact force 31.0 N > max_contact_force 20.0 N')
    assert latch.read().startswith('protective stop')
    latch.clear()
    assert latch.read() is None and not latch.path.exists()
    latch.clear()  # no file: fine


@pytest.mark.parametrize('content', [b'', b'{', b'\xff\xfe', b'[]', b'{"reason": ""}',
                                     b'{"reason": 3}', b'x' * 70000])
def test_a_corrupt_latch_file_reads_as_latched(tmp_path, content: bytes) -> None:  # noqa: ANN001
    path = tmp_path / 'safety.latch'
    path.write_bytes(content)
    reason = LatchFile(path).read()
    assert reason is not None and 'fail closed' in reason and str(path) in reason


def test_an_unreadable_latch_reads_as_latched_and_unwritable_raises(tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / 'a_folder.latch'
    folder.mkdir()
    assert 'unreadable' in LatchFile(folder).read()
    with pytest.raises(LatchError, match='cannot remove'):
        LatchFile(folder).clear()
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(LatchError, match='cannot write'):
        LatchFile(blocker / 'sub' / 'x.latch').write('estop')


def test_default_latch_path_is_in_the_state_dir_keyed_by_node(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv('XDG_STATE_HOME', str(tmp_path))
    assert default_latch_path('/arm1/vla/safety_node') == (
        tmp_path / 'vla_ros' / 'arm1__vla__safety_node.latch')
    monkeypatch.delenv('XDG_STATE_HOME')
    path = default_latch_path('/vla/safety_node')
    assert path.parent == __import__('pathlib').Path.home() / '.local' / 'state' / 'vla_ros'
    assert os.path.basename(path) == 'vla__safety_node.latch'


# ------------------------------------------------------------------------------ shadow
def test_shadow_stats_error_direction_and_interventions() -> None:
    s = ShadowStats()
    ref = np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.2])
    s.add(np.array([0.08, 0.02, 0.0, 0.0, 0.0, 0.1]), ref, False)  # same half-space
    s.add(np.array([-0.05, 0.0, 0.0, 0.0, 0.0, 0.2]), ref, True)  # opposite
    s.add(np.array([0.05, 0.0, 0.0, 0.0, 0.0, 0.0]), None, True)  # no fresh reference
    s.add(np.zeros(6), ref, False)  # not moving: error counts, direction does not
    out = s.summary()
    assert out['actions'] == 4 and out['samples'] == 3 and out['moving_samples'] == 2
    assert out['intervention_rate'] == pytest.approx(0.5)
    assert out['direction_agreement'] == pytest.approx(0.5)
    np.testing.assert_allclose(out['mean_abs_error'][:2], [(0.02 + 0.15 + 0.1) / 3, 0.02 / 3])
    assert 'direction agreement: 0.500' in format_report(out)
    empty = ShadowStats().summary()
    assert math.isnan(empty['direction_agreement']) and empty['samples'] == 0


def test_acceleration_ramp_is_not_an_intervention() -> None:
    assert not intervened(['accel:linear', 'accel:angular'])
    assert intervened(['accel:linear:cannot_brake'])
    assert intervened(['per_axis_clamp:x']) and intervened(['workspace:z_min'])


def test_report_from_the_audit_log_matches_the_live_stats(tmp_path) -> None:  # noqa: ANN001
    lines = [
        {'event': 'action', 'accepted': True, 'limits_applied': ['accel:linear'],
         'shadow': {'would_be': [0.1, 0, 0, 0, 0, 0], 'reference': [0.1, 0, 0, 0, 0, 0]}},
        {'event': 'action', 'accepted': True, 'limits_applied': ['speed:linear'],
         'shadow': {'would_be': [0.0, 0.1, 0, 0, 0, 0], 'reference': [0.1, 0, 0, 0, 0, 0]}},
        {'event': 'action', 'accepted': False, 'limits_applied': []},
        {'event': 'tick', 'accepted': False},
    ]
    path = tmp_path / 'audit.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in lines) + '\nnot json\n')
    out = read_audit(path)
    assert out == report_from_audit(lines)
    assert out['actions'] == 2 and out['samples'] == 2 and out['intervention_rate'] == 0.5
    assert out['direction_agreement'] == 0.5  # orthogonal counts as not agreeing


def test_would_be_is_the_target_through_the_stages_without_the_ramp() -> None:
    lim = SafetyLimiter(SafetyConfig(max_linear_accel=0.5, max_linear_speed=0.1,
                                     min_mean_token_prob=0.0))
    lim.on_episode(1, 'go', 1.0)
    lim.on_camera_frame(1.02, 1.02)
    d = lim.on_action([0.03, 0, 0, 0, 0, 0, 0], 0.5, 1, 1.02, 1.02, instruction='go',
                      frame_id='panda_link0')
    assert d.accepted and d.twist[0] == pytest.approx(0.01)  # ramping (0.5 m/s^2 * 20 ms)
    assert lim.would_be(1.02)[0] == pytest.approx(0.1)  # what it ramps to (speed-limited)
