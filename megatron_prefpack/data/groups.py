"""Tokenized groups: the unit the preprocessor writes and the packer reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenizedGroup:
    """One prompt with K >= 1 tokenized responses.

    ``prompt`` and each response are 1-D int32 arrays; responses end with EOS.
    ``scores`` (optional, one per response) rank responses for reward models; for
    chosen/rejected pairs the preprocessor writes ``responses = [chosen, rejected]``
    and ``scores = [1.0, 0.0]``. ``kind`` says what the source record was: ``"pair"``,
    ``"ranked"`` (K responses with scores) or ``"multi"`` (K SFT targets, no scores).
    ``group_id`` is the record's index in the preprocessed dataset and keys everything
    stored beside it (reference log-probs, eval splits).
    """

    group_id: int
    prompt: np.ndarray
    responses: list[np.ndarray]
    kind: str = "pair"
    scores: list[float] | None = None
    margin: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens the group occupies in the preference-packed layout."""
        return len(self.prompt) - 1 + sum(1 + len(r) for r in self.responses)


@dataclass(frozen=True)
class Truncation:
    """What :func:`truncate` cut from one group."""

    prompt_tokens: int = 0
    responses: int = 0
    response_tokens: int = 0


def truncate(
    group: TokenizedGroup, max_prompt_len: int | None, max_response_len: int | None
) -> tuple[TokenizedGroup, Truncation]:
    """Cut the prompt to its last ``max_prompt_len`` tokens and every response to its first
    ``max_response_len`` tokens (a cut response loses its EOS). ``None`` keeps everything.
    Returns the (possibly new) group and what was cut, for the preprocessing summary."""
    prompt = group.prompt
    cut_prompt = 0
    if max_prompt_len is not None and len(prompt) > max_prompt_len:
        cut_prompt = len(prompt) - max_prompt_len
        prompt = prompt[cut_prompt:]
    responses = group.responses
    cut_responses = cut_tokens = 0
    if max_response_len is not None:
        responses = []
        for response in group.responses:
            if len(response) > max_response_len:
                cut_responses += 1
                cut_tokens += len(response) - max_response_len
                response = response[:max_response_len]
            responses.append(response)
    if not (cut_prompt or cut_responses):
        return group, Truncation()
    new = TokenizedGroup(
        group.group_id, prompt, responses, group.kind, group.scores, group.margin, dict(group.meta)
    )
    return new, Truncation(cut_prompt, cut_responses, cut_tokens)
