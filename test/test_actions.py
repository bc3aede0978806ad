"""Tests of vla_ros.core.actions: tokens, statistics, un-normalization, grippers, Action7D."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vla_ros.core.actions import (
    Action7D,
    ActionError,
    ActionStats,
    ActionTokenizer,
    GripperConvention,
    NormStats,
    apply_gripper_convention,
    gripper_closedness,
    unnormalize,
)
from vla_ros.core.errors import CheckpointError, ConfigError, UnnormKeyError, VlaRosError

TOK = ActionTokenizer()
HALF_BIN = 1.0 / 255.0
EPS = 1e-12

unit = st.floats(-1.0, 1.0, allow_nan=False)
any_finite = st.floats(-1e6, 1e6, allow_nan=False)


# ---------------------------------------------------------------- tokenizer: examples


def test_defaults_and_range():
    assert TOK.vocab_size == 32000 and TOK.n_bins == 256
    assert TOK.bins.shape == (256,) and TOK.bin_centers.shape == (255,)
    assert TOK.action_token_range == (31744, 31999)
    ids = TOK.allowed_token_ids()
    assert ids.dtype == np.int64 and ids[0] == 31744 and ids[-1] == 31999 and ids.size == 256
    assert TOK.bin_width == pytest.approx(2.0 / 255.0)


def test_encode_known_values():
    # digitize(-1) = 1 -> 31999; digitize(1) = 256 -> 31744; 0 lies in bin 128 (edges +-1/255).
    assert TOK.encode([-1.0, 0.0, 1.0]).tolist() == [31999, 31872, 31744]
    assert TOK.encode(np.float64(0.5)).dtype == np.int64


def test_decode_known_values():
    assert TOK.decode(np.array([31999])) == pytest.approx(-1.0 + HALF_BIN)
    assert TOK.decode(np.array([31745])) == pytest.approx(1.0 - HALF_BIN)
    # 31744 (a == 1 exactly) shares the top bin with 31745, as in the reference.
    assert TOK.decode(np.array([31744])) == TOK.decode(np.array([31745]))


def test_reference_formula_matches_vectorized():
    ids = np.arange(31700, 32064)
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    expected = centers[np.clip(32000 - ids - 1, 0, 254)]
    np.testing.assert_array_equal(TOK.decode(ids), expected)


def test_out_of_range_actions_clip():
    assert TOK.encode([-5.0, 7.0, -np.inf, np.inf]).tolist() == [31999, 31744, 31999, 31744]


def test_encode_nan_raises():
    with pytest.raises(ActionError):
        TOK.encode([0.0, float('nan')])
    assert issubclass(ActionError, VlaRosError) and issubclass(ActionError, ValueError)


def test_encode_non_numeric_raises():
    with pytest.raises(ActionError):
        TOK.encode(['a'])


def test_non_action_ids_decode_to_extreme_bins():
    top, bottom = 1.0 - HALF_BIN, -1.0 + HALF_BIN
    # Ordinary text ids (below the range) -> the top center; <PAD> and padded ids -> the bottom.
    out = TOK.decode(np.array([0, 2, 29871, 31743, 32000, 32063]))
    np.testing.assert_allclose(out, [top, top, top, top, bottom, bottom], rtol=0, atol=1e-15)
    assert TOK.decode(np.array([0]))[0] == TOK.bin_centers[254]
    assert TOK.decode(np.array([32000]))[0] == TOK.bin_centers[0]


def test_decode_strict_rejects_non_action_ids():
    with pytest.raises(ActionError, match='31743'):
        TOK.decode([31743, 31800], strict=True)
    with pytest.raises(ActionError, match='32000'):
        TOK.decode([32000], strict=True)
    ids = [31744, 31999]
    np.testing.assert_array_equal(TOK.decode(ids, strict=True), TOK.decode(ids))


def test_decode_rejects_float_and_bool_ids():
    with pytest.raises(ActionError):
        TOK.decode(np.array([31800.0]))
    with pytest.raises(ActionError):
        TOK.decode(np.array([True]))


def test_is_action_token():
    assert TOK.is_action_token(31744) is True and TOK.is_action_token(31999) is True
    assert TOK.is_action_token(31743) is False and TOK.is_action_token(32000) is False
    assert TOK.is_action_token([0, 31800, 32063]).tolist() == [False, True, False]


@pytest.mark.parametrize(
    'kwargs',
    [
        {'n_bins': 1},
        {'n_bins': 0},
        {'n_bins': 2.5},
        {'n_bins': True},
        {'vocab_size': 256},
        {'vocab_size': 100},
        {'vocab_size': '32000'},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ConfigError):
        ActionTokenizer(**kwargs)


def test_other_sizes():
    tok = ActionTokenizer(vocab_size=1000, n_bins=11)
    assert tok.action_token_range == (989, 999)
    assert tok.encode([-1.0, 1.0]).tolist() == [999, 989]
    assert tok.decode([999])[0] == pytest.approx(-0.9)


# ---------------------------------------------------------------- tokenizer: properties


@given(hnp.arrays(np.float64, st.integers(1, 16), elements=unit))
def test_round_trip_within_half_bin(a):
    ids = TOK.encode(a)
    assert ids.shape == a.shape
    assert np.all(np.abs(TOK.decode(ids) - a) <= HALF_BIN + EPS)


@given(hnp.arrays(np.float64, st.integers(1, 16), elements=any_finite))
def test_ids_within_action_range(a):
    ids = TOK.encode(a)
    assert np.all((ids >= 31744) & (ids <= 31999))
    assert np.all(TOK.is_action_token(ids))
    np.testing.assert_array_equal(ids, TOK.encode(np.clip(a, -1, 1)))


@given(any_finite, any_finite)
def test_encode_non_increasing(a, b):
    lo, hi = min(a, b), max(a, b)
    assert TOK.encode(lo) >= TOK.encode(hi)


def test_encode_direction_is_strictly_decreasing_across_bins():
    ids = TOK.encode(TOK.bin_centers)
    assert np.all(np.diff(ids) == -1)


@given(st.integers(-100, 40000), st.integers(-100, 40000))
def test_decode_non_increasing_in_id(i, j):
    lo, hi = min(i, j), max(i, j)
    assert TOK.decode([lo])[0] >= TOK.decode([hi])[0]


@given(st.integers(31744, 31999))
def test_decode_then_encode_is_identity_on_action_ids(i):
    if i == 31744:  # only a == 1 gives 31744; its bin center re-encodes as 31745
        assert TOK.encode(TOK.decode([i]))[0] == 31745
    else:
        assert TOK.encode(TOK.decode([i]))[0] == i


# ---------------------------------------------------------------- statistics


def _stats_dict(dim=7, mask=None, seed=0, **extra):
    rng = np.random.default_rng(seed)
    q01 = rng.uniform(-1, 0, dim)
    q99 = q01 + rng.uniform(0, 2, dim)
    action = {'q01': q01.tolist(), 'q99': q99.tolist(), 'mean': [0.0] * dim, 'std': [1.0] * dim}
    if mask is not None:
        action['mask'] = mask
    action.update(extra)
    return {'action': action, 'proprio': {'q01': [0.0]}, 'num_transitions': 10,
            'num_trajectories': 2}


def test_mask_defaults_to_all_true():
    s = ActionStats.from_mapping(_stats_dict()['action'])
    assert s.mask.dtype == bool and s.mask.all() and s.action_dim == 7
    assert s.mean is not None and s.min is None


def test_stats_are_read_only():
    s = ActionStats(q01=[0.0, 0.0], q99=[1.0, 1.0])
    with pytest.raises(ValueError):
        s.q01[0] = 5.0
    with pytest.raises(AttributeError):
        s.q01 = np.zeros(2)


@pytest.mark.parametrize(
    'action, field',
    [
        ({'q99': [1.0]}, 'q01'),
        ({'q01': [0.0]}, 'q99'),
        ({'q01': [0.0, 0.0], 'q99': [1.0]}, 'q99'),
        ({'q01': [0.0, float('nan')], 'q99': [1.0, 1.0]}, 'q01'),
        ({'q01': [0.0], 'q99': [float('inf')]}, 'q99'),
        ({'q01': [2.0, 0.0], 'q99': [1.0, 1.0]}, 'q99 < q01'),
        ({'q01': [0.0, 0.0], 'q99': [1.0, 1.0], 'mask': [True]}, 'mask'),
        ({'q01': [0.0], 'q99': [1.0], 'mask': ['yes']}, 'mask'),
        ({'q01': [0.0], 'q99': [1.0], 'std': [1.0, 2.0]}, 'std'),
        ({'q01': [[0.0]], 'q99': [[1.0]]}, 'q01'),
        ({'q01': ['a'], 'q99': [1.0]}, 'q01'),
        ({'q01': [], 'q99': []}, 'q01'),
    ],
)
def test_invalid_stats_name_key_and_field(action, field):
    with pytest.raises(CheckpointError) as info:
        NormStats.from_norm_stats({'my_key': {'action': action}}, 'ckpt/config.json')
    msg = str(info.value)
    assert 'my_key' in msg and field in msg and 'ckpt/config.json' in msg


def test_entry_without_action_rejected():
    with pytest.raises(CheckpointError, match='bridge_orig'):
        NormStats.from_norm_stats({'bridge_orig': {'proprio': {}}})
    with pytest.raises(CheckpointError):
        NormStats.from_norm_stats({})
    with pytest.raises(CheckpointError):
        NormStats.from_norm_stats([1, 2])


def test_from_config():
    ns = NormStats.from_config({'n_action_bins': 256, 'norm_stats': {'a': _stats_dict()}})
    assert ns.keys == ['a'] and ns.select(None).action_dim == 7
    with pytest.raises(CheckpointError, match='norm_stats'):
        NormStats.from_config({'norm_stats': None})


def test_select_rules():
    ns = NormStats.from_norm_stats(
        {'zeta': _stats_dict(seed=1), 'bridge_orig': _stats_dict(seed=2), 'alpha': _stats_dict()}
    )
    assert ns.select('bridge_orig') is ns['bridge_orig']
    with pytest.raises(UnnormKeyError) as info:
        ns.select(None)
    assert 'alpha, bridge_orig, zeta' in str(info.value)
    with pytest.raises(UnnormKeyError) as info:
        ns.select('bridge')
    assert 'alpha, bridge_orig, zeta' in str(info.value) and "'bridge'" in str(info.value)
    with pytest.raises(UnnormKeyError):
        ns.select(3)
    assert isinstance(UnnormKeyError('x'), LookupError)
    assert list(ns) == ['alpha', 'bridge_orig', 'zeta'] and len(ns) == 3 and 'zeta' in ns


def test_single_dataset_selectable_by_none_and_name():
    ns = NormStats.from_norm_stats({'only': _stats_dict()})
    assert ns.select(None) is ns.select('only')
    with pytest.raises(UnnormKeyError, match='only'):
        ns.select('other')


def _write(path, obj):
    path.write_text(json.dumps(obj))


def test_checkpoint_dir_config_only(tmp_path):
    _write(tmp_path / 'config.json', {'norm_stats': {'from_config': _stats_dict()}})
    assert NormStats.from_checkpoint_dir(tmp_path).keys == ['from_config']


def test_dataset_statistics_overrides_config(tmp_path):
    _write(tmp_path / 'config.json', {'norm_stats': {'from_config': _stats_dict(seed=1)}})
    eef_mask = [True] * 6 + [False]
    _write(tmp_path / 'dataset_statistics.json', {'finetuned': _stats_dict(seed=2, mask=eef_mask)})
    ns = NormStats.from_checkpoint_dir(str(tmp_path))
    assert ns.keys == ['finetuned']
    assert ns.source.endswith('dataset_statistics.json')
    np.testing.assert_array_equal(ns.select(None).mask, [True] * 6 + [False])
    np.testing.assert_allclose(ns.select(None).q01, _stats_dict(seed=2)['action']['q01'])


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match='config.json'):
        NormStats.from_checkpoint_dir(tmp_path)
    with pytest.raises(CheckpointError, match='nope'):
        NormStats.from_checkpoint_dir(tmp_path / 'nope')
    with pytest.raises(CheckpointError, match='missing file'):
        NormStats.from_json_file(tmp_path / 'dataset_statistics.json')


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / 'dataset_statistics.json').write_text('{"a": ')
    with pytest.raises(CheckpointError, match='invalid JSON.*dataset_statistics.json'):
        NormStats.from_checkpoint_dir(tmp_path)
    (tmp_path / 'dataset_statistics.json').unlink()
    (tmp_path / 'config.json').write_text('not json')
    with pytest.raises(CheckpointError, match='invalid JSON.*config.json'):
        NormStats.from_checkpoint_dir(tmp_path)


# ---------------------------------------------------------------- un-normalization


@st.composite
def stats_and_actions(draw):
    dim = draw(st.integers(1, 10))
    q01 = draw(hnp.arrays(np.float64, dim, elements=st.floats(-10, 10)))
    width = draw(hnp.arrays(np.float64, dim, elements=st.floats(0, 10)))
    mask = draw(hnp.arrays(np.bool_, dim))
    a_n = draw(hnp.arrays(np.float64, (draw(st.integers(1, 4)), dim), elements=unit))
    return ActionStats(q01=q01, q99=q01 + width, mask=mask), a_n


@given(stats_and_actions())
def test_unnormalize_matches_formula(sa):
    stats, a_n = sa
    out = unnormalize(a_n, stats)
    assert out.shape == a_n.shape
    for row_in, row_out in zip(a_n, out, strict=True):
        for i in range(stats.action_dim):
            if stats.mask[i]:
                lo, hi = stats.q01[i], stats.q99[i]
                assert row_out[i] == pytest.approx(0.5 * (row_in[i] + 1) * (hi - lo) + lo)
                assert lo - 1e-9 <= row_out[i] <= hi + 1e-9
            else:
                assert row_out[i] == row_in[i]  # passes through unchanged


@given(stats_and_actions())
def test_unnormalize_endpoints(sa):
    stats, _ = sa
    dim = stats.action_dim
    lo = unnormalize(-np.ones(dim), stats)
    hi = unnormalize(np.ones(dim), stats)
    np.testing.assert_allclose(lo[stats.mask], stats.q01[stats.mask], atol=1e-12)
    np.testing.assert_allclose(hi[stats.mask], stats.q99[stats.mask], atol=1e-12)
    assert np.all(lo[~stats.mask] == -1.0) and np.all(hi[~stats.mask] == 1.0)


def test_unnormalize_eef_gripper_stays_raw():
    stats = ActionStats(q01=[-0.02] * 6 + [0.0], q99=[0.02] * 6 + [1.0], mask=[True] * 6 + [False])
    out = unnormalize([0.0] * 6 + [0.996], stats)
    np.testing.assert_allclose(out, [0.0] * 6 + [0.996], atol=1e-15)
    out = unnormalize([1.0] * 7, stats)
    np.testing.assert_allclose(out, [0.02] * 6 + [1.0])


def test_unnormalize_rejects_bad_input():
    stats = ActionStats(q01=[0.0, 0.0], q99=[1.0, 1.0])
    with pytest.raises(ActionError, match='last dimension 2'):
        unnormalize([0.0, 0.0, 0.0], stats)
    with pytest.raises(ActionError):
        unnormalize(0.5, stats)
    with pytest.raises(ActionError):
        unnormalize([0.0, float('nan')], stats)


def test_decode_then_unnormalize_end_to_end():
    stats = ActionStats(q01=[-1.0] * 6 + [0.0], q99=[3.0] * 6 + [1.0], mask=[True] * 6 + [False])
    ids = TOK.encode([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.0])
    out = unnormalize(TOK.decode(ids), stats)
    assert out[0] == pytest.approx(-1.0 + 2.0 * HALF_BIN)  # bottom center -> q01 + 0.5*w*(1/255)
    assert out[-1] == pytest.approx(1.0 - HALF_BIN)  # masked gripper stays the raw center


# ---------------------------------------------------------------- gripper

XS = [0.0, 0.3, 0.5, 0.7, 1.0]


@pytest.mark.parametrize(
    'conv, applied, closed',
    [
        (GripperConvention.RAW, [0.0, 0.3, 0.5, 0.7, 1.0], [1.0, 0.7, 0.5, 0.3, 0.0]),
        (GripperConvention.BINARIZE, [0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]),
        (GripperConvention.LIBERO, [1.0, 1.0, 0.0, -1.0, -1.0], [1.0, 1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_gripper_examples(conv, applied, closed):
    assert [apply_gripper_convention(x, conv) for x in XS] == pytest.approx(applied)
    assert [gripper_closedness(x, conv) for x in XS] == pytest.approx(closed)
    assert [gripper_closedness(x, conv.value) for x in XS] == pytest.approx(closed)


def _libero_reference(x):
    action = np.zeros(7)
    action[-1] = x
    action[..., -1] = 2 * (action[..., -1] - 0.0) / (1.0 - 0.0) - 1
    action[..., -1] = np.sign(action[..., -1])
    action[..., -1] = action[..., -1] * -1.0
    return action[-1]


@given(st.floats(-2, 3, allow_nan=False))
def test_libero_matches_reference_pipeline(x):
    assert apply_gripper_convention(x, 'libero') == _libero_reference(x)
    assert gripper_closedness(x, 'libero') == (1.0 if x < 0.5 else 0.0)


@given(st.floats(-5, 5, allow_nan=False), st.sampled_from(list(GripperConvention)))
def test_closedness_in_unit_interval(x, conv):
    c = gripper_closedness(x, conv)
    assert 0.0 <= c <= 1.0
    if conv is not GripperConvention.RAW:
        assert c in (0.0, 1.0)


def test_raw_is_identity_and_clips_for_closedness():
    assert apply_gripper_convention(-0.2, 'raw') == -0.2
    assert gripper_closedness(-0.2, 'raw') == 1.0 and gripper_closedness(1.3, 'raw') == 0.0


def test_libero_zero_command_is_positive_zero():
    assert math.copysign(1.0, apply_gripper_convention(0.5, 'libero')) == 1.0


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf'), 'x', None])
def test_gripper_non_finite_raises(bad):
    for conv in GripperConvention:
        with pytest.raises(ActionError):
            apply_gripper_convention(bad, conv)
        with pytest.raises(ActionError):
            gripper_closedness(bad, conv)


def test_convention_parse():
    assert GripperConvention.parse(' LIBERO ') is GripperConvention.LIBERO
    assert GripperConvention.parse(GripperConvention.RAW) is GripperConvention.RAW
    with pytest.raises(ConfigError, match='raw, binarize, libero'):
        GripperConvention.parse('bridge')
    with pytest.raises(ConfigError):
        gripper_closedness(0.1, 3)


# ---------------------------------------------------------------- Action7D


def test_action7d_round_trip():
    vals = [0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 1.0]
    a = Action7D.from_array(np.array(vals))
    assert a.dx == 0.01 and a.dyaw == 0.3 and a.gripper == 1.0
    np.testing.assert_array_equal(a.as_array(), vals)
    assert a.as_array().dtype == np.float64
    assert a.is_finite()
    assert a == Action7D(*vals)
    with pytest.raises(AttributeError):
        a.dx = 1.0


def test_action7d_validation_and_finiteness():
    with pytest.raises(ActionError):
        Action7D.from_array([0.0] * 6)
    with pytest.raises(ActionError):
        Action7D.from_array(np.zeros((1, 7)))
    with pytest.raises(ActionError):
        Action7D.from_array(['a'] * 7)
    assert not Action7D.from_array([0.0] * 6 + [float('nan')]).is_finite()
    assert not Action7D(0, 0, float('inf'), 0, 0, 0, 0).is_finite()


@settings(max_examples=50)
@given(hnp.arrays(np.float64, 7, elements=st.floats(allow_nan=True, allow_infinity=True)))
def test_action7d_array_property(arr):
    a = Action7D.from_array(arr)
    np.testing.assert_array_equal(a.as_array(), arr)
    assert a.is_finite() == bool(np.isfinite(arr).all())
