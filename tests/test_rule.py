"""StepRule: construction checks and the released English and Chinese step-token sets."""

from __future__ import annotations

import pytest
import torch

from xbai_kernels import StepRule
from xbai_kernels.ops import reference


class VocabTokenizer:
    """The slice of the HuggingFace tokenizer interface StepRule.from_tokenizer uses, over a fixed vocabulary."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.index = {text: i for i, text in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Greedy longest match: enough to make markers single tokens or not.
        ids, pos = [], 0
        while pos < len(text):
            for end in range(len(text), pos, -1):
                if text[pos:end] in self.index:
                    ids.append(self.index[text[pos:end]])
                    pos = end
                    break
            else:
                raise KeyError(text[pos])
        return ids


def test_ids_are_deduplicated_and_sorted():
    rule = StepRule((9, 7, 9, 8), 3, 4)
    assert rule.step_token_ids == (7, 8, 9)
    assert rule.step_token_id == 7  # training rule: the first id of the step encoding
    assert torch.equal(rule.step_ids_tensor(), torch.tensor([7, 8, 9]))
    assert rule.step_ids_tensor().dtype == torch.int64


def test_step_table_marks_exactly_the_step_ids():
    rule = StepRule((9, 7, 8), think_start_id=1, think_end_id=2)
    assert rule.step_table().tolist() == [False] * 7 + [True] * 3
    assert rule.step_table(size=12).tolist() == [False] * 7 + [True] * 3 + [False] * 2
    tokens = torch.tensor([-1, 0, 7, 9, 10, 10**9])
    assert reference.is_step_token(tokens, rule.step_table()).tolist() == [False, False, True, True, False, False]


def test_rule_is_hashable_and_equal_by_value():
    assert StepRule((7, 8), 3, 4) == StepRule([8, 7], 3, 4)
    assert len({StepRule((7, 8), 3, 4), StepRule((8, 7), 3, 4)}) == 1


@pytest.mark.parametrize(
    "args, error, words",
    [
        (((), 3, 4), ValueError, "empty"),
        (((7, -1), 3, 4), ValueError, "non-negative"),
        (((7,), 3, 3), ValueError, "must differ"),
        (((7, 3), 3, 4), ValueError, "think_start_id=3 is also a step token"),
        (((7, 4), 3, 4), ValueError, "think_end_id=4 is also a step token"),
        (((7,), "3", 4), TypeError, "think_start_id"),
        (((7,), 3, -4), TypeError, "think_end_id"),
        (((7,), True, 4), TypeError, "think_start_id"),
    ],
)
def test_bad_rules(args, error, words):
    with pytest.raises(error, match=words):
        StepRule(*args)


def test_from_tokenizer_english_uses_the_encoding_of_period_newlines():
    tok = VocabTokenizer(["a", "b", ".", "\n", ".\n\n", "<think>", "</think>", "\n\n"])
    rule = StepRule.from_tokenizer(tok, lang="en")
    assert rule == StepRule((4,), 5, 6)


def test_from_tokenizer_english_multi_token_encoding():
    # A tokenizer without a '.\n\n' token: S is every id of its encoding.
    tok = VocabTokenizer(["a", ".", "\n\n", "<think>", "</think>"])
    assert StepRule.from_tokenizer(tok).step_token_ids == (1, 2)


def test_from_tokenizer_chinese_token_set():
    vocab = [
        "\n",  # 0: the mark alone
        "\u3002",  # 1: 。 alone
        "a\n",  # 2: one other character
        "\u3002\u201d",  # 3: 。” one other character
        "ab\n",  # 4: two other characters -> no
        "\n\n\n",  # 5: three marks, no other character
        "\n\n\n\n",  # 6: four characters -> no
        "x",  # 7: no mark -> no
        "\u3002\n",  # 8: two marks
        "ab",  # 9
        "<think>",  # 10
        "</think>",  # 11
        "a\u3002b",  # 12: two other characters -> no
    ]
    rule = StepRule.from_tokenizer(VocabTokenizer(vocab), lang="zh")
    assert rule.step_token_ids == (0, 1, 2, 3, 5, 8)
    assert (rule.think_start_id, rule.think_end_id) == (10, 11)


def test_from_tokenizer_rejects_split_markers_and_unknown_lang():
    tok = VocabTokenizer(["<", "think", ">", "</", ".\n\n"])
    with pytest.raises(ValueError, match="'<think>' must be a single token"):
        StepRule.from_tokenizer(tok)
    good = VocabTokenizer([".\n\n", "<think>", "</think>"])
    with pytest.raises(ValueError, match="lang must be 'en' or 'zh'"):
        StepRule.from_tokenizer(good, lang="fr")


def test_from_tokenizer_on_the_tiny_model_tokenizer():
    from xbai_kernels.tiny import build_tokenizer

    tok = build_tokenizer()
    rule = StepRule.from_tokenizer(tok)
    (step_id,) = tok.encode(".\n\n", add_special_tokens=False)
    assert rule.step_token_ids == (step_id,)
    assert tok.decode([rule.think_start_id]) == "<think>"
    assert tok.decode([rule.think_end_id]) == "</think>"
    zh = StepRule.from_tokenizer(tok, lang="zh")
    # Every token the zh rule picks decodes to a newline (no 。 in this English vocabulary) ...
    assert all("\n" in tok.decode([i]) for i in zh.step_token_ids)
    # ... and '.\n\n' is one of them (3 characters, one besides the marks).
    assert step_id in zh.step_token_ids
