"""Tests of vla_ros.core.prompt: the OpenVLA template, instruction checks and token 29871."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vla_ros.core.errors import ConfigError, InstructionError
from vla_ros.core.prompt import (
    PROMPT_TEMPLATE,
    TRAILING_SPACE_TOKEN_ID,
    build_prompt,
    ensure_trailing_space_token,
)


def test_exact_string():
    assert build_prompt('pick up the black bowl') == (
        'In: What action should the robot take to pick up the black bowl?\nOut:'
    )


def test_template_constant():
    assert PROMPT_TEMPLATE == 'In: What action should the robot take to {instruction}?\nOut:'
    assert TRAILING_SPACE_TOKEN_ID == 29871


def test_lower_cases_and_strips():
    assert build_prompt('  Put the RED Block\tin the Bin \n') == (
        'In: What action should the robot take to put the red block\tin the bin?\nOut:'
    )


def test_keeps_punctuation_like_reference():
    assert build_prompt('Open the drawer.').endswith('open the drawer.?\nOut:')


@pytest.mark.parametrize('bad', ['', '   ', '\n\t '])
def test_empty_rejected(bad):
    with pytest.raises(InstructionError, match='empty'):
        build_prompt(bad)


def test_too_long_rejected_with_length_and_limit():
    with pytest.raises(InstructionError) as info:
        build_prompt('a' * 100000)
    assert '100000' in str(info.value) and '1000' in str(info.value)
    assert build_prompt('a' * 1000) == PROMPT_TEMPLATE.format(instruction='a' * 1000)
    with pytest.raises(InstructionError, match='11 characters.*limit is 10'):
        build_prompt('abcdefghijk', max_chars=10)


def test_limit_counts_stripped_text():
    padded = '   ' + 'B' * 10 + '   '
    assert build_prompt(padded, max_chars=10) == PROMPT_TEMPLATE.format(instruction='b' * 10)


@pytest.mark.parametrize('bad', [None, 42, b'pick up', ['pick']])
def test_non_str_rejected(bad):
    with pytest.raises(InstructionError, match='must be a str'):
        build_prompt(bad)


@pytest.mark.parametrize('bad', [0, -1, 2.5, True, None])
def test_bad_max_chars(bad):
    with pytest.raises(ConfigError):
        build_prompt('go', max_chars=bad)


@given(st.text(min_size=1, max_size=200).filter(lambda s: s.strip()))
def test_prompt_property(text):
    prompt = build_prompt(text, max_chars=200)
    assert prompt == PROMPT_TEMPLATE.format(instruction=text.strip().lower())
    assert prompt.startswith('In: What action should the robot take to ')
    assert prompt.endswith('?\nOut:')


def test_trailing_space_token_examples():
    assert ensure_trailing_space_token([1, 512, 29901]) == [1, 512, 29901, 29871]
    assert ensure_trailing_space_token([1, 29871]) == [1, 29871]
    assert ensure_trailing_space_token([]) == [29871]
    assert ensure_trailing_space_token((1, 2)) == [1, 2, 29871]


def test_trailing_space_token_does_not_mutate():
    ids = [1, 2]
    out = ensure_trailing_space_token(ids)
    assert ids == [1, 2] and out is not ids


@given(st.lists(st.integers(0, 32063), max_size=40))
def test_trailing_space_token_idempotent(ids):
    once = ensure_trailing_space_token(ids)
    assert ensure_trailing_space_token(once) == once
    assert once[-1] == 29871
    assert once[: len(ids)] == ids
    assert len(once) - len(ids) == (0 if ids and ids[-1] == 29871 else 1)
