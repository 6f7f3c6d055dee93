"""The second route: the SPRM head as a pooling model, through LLM.encode (token_classify)."""

from __future__ import annotations

import pytest

from vllm_helpers import ENGINE_DEFAULTS, requires_vllm, shutdown
from vllm_reference import check_scores

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    from vllm import LLM

    llm = LLM(
        str(tiny_qwen3),
        runner="pooling",
        hf_overrides={"architectures": ["Qwen3SPRMRewardModel"]},
        enforce_eager=True,
        **{**ENGINE_DEFAULTS, "dtype": "float32"},
    )
    yield llm
    shutdown(llm)


def test_encode_scores_match_reference(engine, tiny_qwen3):
    from transformers import AutoTokenizer

    from xbai_kernels import StepRule
    from xbai_kernels.vllm.pooling import score_token_probabilities

    rule = StepRule.from_tokenizer(AutoTokenizer.from_pretrained(tiny_qwen3))
    texts = [
        "question<think>\nwe compute the sum.\n\nthen check.\n\nso the answer is four.\n\n</think>four",
        "<think>\nfirst.\n\n.\n\nsecond step value.\n\n",
        "no thinking here.\n\nbut steps.\n\n",
    ]
    outputs = engine.encode(texts, pooling_task="token_classify", use_tqdm=False)
    for output in outputs:
        ids = list(output.prompt_token_ids)
        probabilities = output.outputs.data[:, 0]
        assert probabilities.shape[0] == len(ids)
        got = score_token_probabilities(ids, probabilities, rule)
        assert check_scores(tiny_qwen3, ids, got.step_positions, got.step_scores, got.score) >= 2
