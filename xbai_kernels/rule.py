"""StepRule: the step-token set and the thinking markers of a tokenizer (docs/semantics.md).

The rules that use them (which positions are scored) live in ``xbai_kernels.semantics``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Chinese step tokens: the decoded text holds one of these marks...
_ZH_MARKS = ("\n", "\u3002")
# ...is at most this long, and has at most this many characters besides the marks.
_ZH_MAX_CHARS = 3
_ZH_MAX_OTHER_CHARS = 1


@dataclass(frozen=True)
class StepRule:
    """The inference rule's vocabulary: the step-token set S and the two thinking markers.

    ``step_token_ids`` is the set S (a token id in it ends a step); ``think_start_id`` and
    ``think_end_id`` are the ids of ``<think>`` and ``</think>``. The markers may not be step
    tokens: the rules give them distinct roles, and the decode scorer relies on it.
    """

    step_token_ids: tuple[int, ...]
    think_start_id: int
    think_end_id: int

    def __post_init__(self) -> None:
        ids = tuple(sorted({int(i) for i in self.step_token_ids}))
        if not ids:
            raise ValueError("StepRule: step_token_ids is empty; at least one step token is needed")
        if any(i < 0 for i in ids):
            raise ValueError(f"StepRule: step_token_ids must be non-negative, got {ids}")
        for name in ("think_start_id", "think_end_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"StepRule: {name} must be a non-negative int, got {value!r}")
            if value in ids:
                raise ValueError(f"StepRule: {name}={value} is also a step token; the roles must differ")
        if self.think_start_id == self.think_end_id:
            raise ValueError("StepRule: think_start_id and think_end_id must differ")
        object.__setattr__(self, "step_token_ids", ids)

    @property
    def step_token_id(self) -> int:
        """The training rule's step id: the first id of the step set (docs/semantics.md, the training loss)."""
        return self.step_token_ids[0]

    def step_ids_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """S as an int64 tensor on ``device``, for ``torch.isin``-style membership tests."""
        return torch.tensor(self.step_token_ids, dtype=torch.int64, device=device)

    def step_table(self, device: torch.device | str | None = None, size: int = 0) -> torch.Tensor:
        """bool [max(size, max(S) + 1)]: entry t is whether token t is in S (ids past the end are not).

        Membership in one load whatever |S| is: the Chinese rule's S holds thousands of Qwen ids, which
        a scan over S would compare against every row at every decode step.
        """
        table = torch.zeros(max(int(size), self.step_token_ids[-1] + 1), dtype=torch.bool, device=device)
        table[self.step_ids_tensor(device)] = True
        return table

    @classmethod
    def from_tokenizer(cls, tokenizer, lang: str = "en") -> "StepRule":
        """Build the released rule's vocabulary from a HuggingFace tokenizer.

        ``lang="en"``: S = the ids of ``".\\n\\n"``. ``lang="zh"``: S = every vocabulary token whose
        decoded text contains ``\\n`` or ``。``, is at most 3 characters long and has at most one
        character besides those marks.
        """
        think_start = _single_token_id(tokenizer, "<think>")
        think_end = _single_token_id(tokenizer, "</think>")
        if lang == "en":
            ids = tokenizer.encode(".\n\n", add_special_tokens=False)
        elif lang == "zh":
            ids = [
                token_id
                for token_id in range(len(tokenizer))
                if token_id not in (think_start, think_end)
                and _is_zh_step_text(tokenizer.decode([token_id]))
            ]
        else:
            raise ValueError(f"StepRule.from_tokenizer: lang must be 'en' or 'zh', got {lang!r}")
        return cls(tuple(ids), think_start, think_end)


def _is_zh_step_text(text: str) -> bool:
    if not any(mark in text for mark in _ZH_MARKS) or len(text) > _ZH_MAX_CHARS:
        return False
    others = sum(1 for ch in text if ch not in _ZH_MARKS)
    return others <= _ZH_MAX_OTHER_CHARS


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"StepRule.from_tokenizer: {text!r} must be a single token of this tokenizer, "
            f"it encodes to {ids}"
        )
    return int(ids[0])
