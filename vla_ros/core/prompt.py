r"""The OpenVLA prompt: one template, the instruction checks, and the trailing-space token rule.

OpenVLA was trained on ``In: What action should the robot take to {instruction}?\nOut:`` with the
instruction lower-cased, and its ``predict_action`` appends the Llama token 29871 (the bare
SentencePiece space ``▁``) to the tokenized prompt when the tokenizer did not end with it, because
the action tokens followed that space in training. Both rules live here so the policy and its tests
share them; instructions that cannot be used (not text, empty, absurdly long) raise
InstructionError instead of reaching the model. Only the standard library is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

from vla_ros.core.errors import ConfigError, InstructionError

#: The prompt OpenVLA was trained with; ``{instruction}`` is filled with the lower-cased text.
PROMPT_TEMPLATE = 'In: What action should the robot take to {instruction}?\nOut:'
#: Llama-2 SentencePiece id of the bare space piece that must end the prompt's token ids.
TRAILING_SPACE_TOKEN_ID = 29871
#: Default bound on the instruction length, in characters (after stripping).
DEFAULT_MAX_CHARS = 1000


def build_prompt(instruction: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Return the OpenVLA prompt for ``instruction``.

    Surrounding whitespace is stripped, then the text is lower-cased and put into
    PROMPT_TEMPLATE unchanged otherwise (punctuation is kept, as in the reference). Raises
    InstructionError when ``instruction`` is not a str, is empty or whitespace only, or is longer
    than ``max_chars`` characters after stripping; ConfigError when ``max_chars`` is not a
    positive int.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ConfigError(f'max_chars must be a positive int, got {max_chars!r}')
    if not isinstance(instruction, str):
        raise InstructionError(
            f'instruction must be a str, got {type(instruction).__name__}: {instruction!r:.80}'
        )
    text = instruction.strip()
    if not text:
        raise InstructionError('instruction is empty (or whitespace only)')
    if len(text) > max_chars:
        raise InstructionError(
            f'instruction is {len(text)} characters long; the limit is {max_chars}'
        )
    return PROMPT_TEMPLATE.format(instruction=text.lower())


def ensure_trailing_space_token(ids: Sequence[int]) -> list[int]:
    """Return a copy of ``ids`` ending in TRAILING_SPACE_TOKEN_ID (29871), appended if missing.

    Mirrors OpenVLA's ``predict_action``; idempotent. An empty input gives ``[29871]``.
    """
    out = [int(i) for i in ids]
    if not out or out[-1] != TRAILING_SPACE_TOKEN_ID:
        out.append(TRAILING_SPACE_TOKEN_ID)
    return out
