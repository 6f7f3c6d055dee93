"""Cost of finishing a scored vLLM request of 1k, 8k or 32k tokens: on the API server's event loop
(the front end, which serves every other client) and in the engine core (the scheduler).

No engine runs: vLLM's own ``OutputProcessor`` (the object the API server's output handler calls) is
fed scripted engine outputs, one token per step, the finishing one carrying the stopped request's
logits as the scheduler patch sends them, and the ``process_outputs`` call that carries the
finishing token is timed, with the plugin's front-end patches applied ("scored") and without them
("stock", vLLM's own cost). Their difference is the plugin's share of finishing on the loop. Also
timed: the plugin's per-step cost while the request decodes (all ``process_outputs`` calls before
the last, scored minus stock, per step: nothing is sent then), and the engine core's work when the
request stops (``CacheSlotLogits.finished_logits`` over the token ids as a Python list, as vLLM
keeps them, and the block table).

Trajectories: ``<think>`` in the prompt, ``</think>`` at 90 % of the completion, a step token after
every ``step_every`` tokens (the tiny test model steps about every 20 tokens, XBai o4's English
reasoning about every 60).

    python -m benchmarks.bench_vllm_loop [--repeats 15] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402

STEP, THINK, END_THINK = 3, 1, 2
FILLER = (4, 5, 6, 8, 9, 10, 11, 12)


def _trajectory(length: int, step_every: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    tokens = rng.choice(FILLER, size=length)
    tokens[step_every - 1 :: step_every] = STEP
    tokens[int(0.9 * length)] = END_THINK
    return tokens.tolist()


def _stopped(prompt: list[int], completion: list[int], rule, block_size: int = 16):
    """The scheduler's side: a store holding a logit at every position, the request's block table,
    and its token ids as vLLM keeps them (a list)."""
    from xbai_kernels.vllm.logit_store import CacheSlotLogits

    ids = prompt + completion
    num_blocks = (len(ids) + block_size - 1) // block_size
    store = CacheSlotLogits(num_blocks, block_size, rule)
    store.values[:] = np.random.default_rng(0).normal(size=store.values.size).astype(np.float32)
    block_ids = np.random.default_rng(1).permutation(num_blocks).tolist()
    return store, block_ids, ids


def _run_once(completion, prompt, finished_payload, request_id: str) -> tuple[float, float, object]:
    """(ns of the finishing process_outputs call, ns of all earlier calls, the finished output)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
    from vllm.v1.engine.output_processor import OutputProcessor

    from xbai_kernels.vllm.engine import PAYLOAD_KEY

    processor = OutputProcessor(None, log_stats=False)
    params = SamplingParams(max_tokens=len(completion), detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
    request = EngineCoreRequest(
        request_id=request_id, prompt_token_ids=list(prompt), mm_features=None, sampling_params=params,
        pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None,
        external_req_id=request_id,
    )
    processor.add_request(request, None, None, 0, None)
    decoding = 0
    last = len(completion) - 1
    for step, token in enumerate(completion):
        output = EngineCoreOutput(
            request_id=request_id, new_token_ids=[token], finish_reason=FinishReason.LENGTH if step == last else None
        )
        if step == last:
            output.kv_transfer_params = {PAYLOAD_KEY: {"stopped": {request_id: finished_payload}, "chunks": {}}}
        start = time.perf_counter_ns()
        result = processor.process_outputs([output])
        elapsed = time.perf_counter_ns() - start
        if step == last:
            finished = result.request_outputs[0].outputs[0]
            return elapsed, decoding, finished
        decoding += elapsed
    raise AssertionError("unreachable")


def _stats(values_ns: list[float]) -> dict:
    us = sorted(v / 1e3 for v in values_ns)
    q = statistics.quantiles(us, n=10) if len(us) >= 2 else [us[0]] * 9
    return {"median_us": statistics.median(us), "p10_us": q[0], "p90_us": q[-1], "min_us": us[0], "max_us": us[-1]}


def measure(lengths, step_every_list, repeats: int) -> list[dict]:
    from xbai_kernels import StepRule
    from xbai_kernels.vllm import patches

    rule = StepRule((STEP,), THINK, END_THINK)
    prompt = [7, THINK, 5, 6, 4, 9, 8, 5, 6]
    rows = []
    for step_every in step_every_list:
        for length in lengths:
            completion = _trajectory(length, step_every, seed=length)
            store, block_ids, ids = _stopped(prompt, completion, rule)
            engine_ns = []
            for _ in range(repeats + 1):
                start = time.perf_counter_ns()
                finished = store.finished_logits(ids, block_ids)
                engine_ns.append(time.perf_counter_ns() - start)
            payload = finished.to_payload()
            timings = {}
            for mode in ("stock", "scored"):
                if mode == "scored":
                    patches.apply("frontend")
                else:
                    patches.revert("frontend")
                finish, per_step = [], []
                for repeat in range(repeats + 1):
                    finish_ns, decoding_ns, output = _run_once(completion, prompt, payload, f"{mode}-{length}-{repeat}")
                    if repeat == 0:
                        continue  # warm-up: first-call caches (rule tables, imports)
                    finish.append(finish_ns)
                    per_step.append(decoding_ns / max(length - 1, 1))
                if mode == "scored":
                    assert getattr(output, "sprm_error", None) is None, output.sprm_error
                    num_steps = len(output.sprm_step_positions)
                timings[mode] = (finish, per_step)
            patches.revert("frontend")
            finish_diff = [s - b for s, b in zip(sorted(timings["scored"][0]), sorted(timings["stock"][0]))]
            row = {
                "completion_tokens": length,
                "step_every": step_every,
                "scored_steps": num_steps,
                "finish_scored": _stats(timings["scored"][0]),
                "finish_stock": _stats(timings["stock"][0]),
                "finish_plugin_median_us": statistics.median(timings["scored"][0]) / 1e3
                - statistics.median(timings["stock"][0]) / 1e3,
                "finish_plugin_spread_us": [min(finish_diff) / 1e3, max(finish_diff) / 1e3],
                "per_step_scored": _stats(timings["scored"][1]),
                "per_step_stock": _stats(timings["stock"][1]),
                "engine_core_stop": _stats(engine_ns[1:]),
            }
            rows.append(row)
            print(
                f"{length:>6} tokens, step every {step_every:>3}: {num_steps:>5} steps; finishing "
                f"{row['finish_scored']['median_us']:8.1f} us scored vs {row['finish_stock']['median_us']:7.1f} us stock "
                f"(plugin {row['finish_plugin_median_us']:7.1f} us); per step "
                f"{row['per_step_scored']['median_us']:.2f} vs {row['per_step_stock']['median_us']:.2f} us; "
                f"engine core at stop {row['engine_core_stop']['median_us']:.1f} us"
            )
    return rows


def _environment() -> dict:
    import torch
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "vllm": vllm.__version__,
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown_table(result: dict) -> str:
    """docs/benchmarks.md: what finishing a scored request costs the server's event loop."""
    env = result["environment"]
    lines = [f"vLLM {env['vllm']} front end on {env['machine']} ({env['date'][:10]}): the `process_outputs` call that "
             f"finishes a request, scored against stock, and the engine core's work when the request stops; "
             f"medians of {result['repeats']} (p10/p90 in the JSON).", "",
             "| completion tokens | a step every | steps | finish, scored us | finish, stock us | plugin's share us "
             "| per earlier step, scored / stock us | engine core at stop us |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['completion_tokens']} | {row['step_every']} | {row['scored_steps']} | "
                     f"{row['finish_scored']['median_us']:.0f} | {row['finish_stock']['median_us']:.0f} | "
                     f"{row['finish_plugin_median_us']:.0f} | {row['per_step_scored']['median_us']:.1f} / "
                     f"{row['per_step_stock']['median_us']:.1f} | {row['engine_core_stop']['median_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--step-every", type=int, nargs="+", default=[20, 60])
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/cpu-vllm-loop.json)")
    args = parser.parse_args(argv)
    result = {
        "benchmark": "vllm_loop",
        "what": "event-loop cost of OutputProcessor.process_outputs for the step that finishes a scored "
        "request (one request, FINAL_ONLY, detokenize off), scored (plugin front end) vs stock vLLM; "
        "per_step_* is the mean cost of each earlier step; engine_core_stop is the scheduler's work "
        "when the request stops (candidates over its token ids, logits through its block table)",
        "environment": _environment(),
        "repeats": args.repeats,
        "rows": measure(args.lengths, args.step_every, args.repeats),
    }
    write_result(result, args.out, "cpu-vllm-loop.json")


if __name__ == "__main__":
    main()
