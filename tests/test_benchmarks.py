"""The benchmark suites' own logic: shape plans, the progress log, the end-to-end quick path on a
CPU (tiny model: StaticCache loop without graphs and the eager loop, scores checked against the
re-forward), and the report that renders docs/benchmarks.md and the README's numbers. Timings are never asserted."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from benchmarks import _common, bench_e2e, bench_kernels, decode_loops, report


def test_progress_without_a_terminal_logs_one_line_per_item(capsys):
    items = list(_common.progress([3, 5, 7], "demo", lambda x: f"x={x}"))
    assert items == [3, 5, 7]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[demo 1/3") and lines[2].endswith("x=7")


def test_kernel_decode_plan_covers_every_d_batch_and_step_fraction():
    args = argparse.Namespace(decode_d=(1536, 3584, 5120), decode_b=(1, 16, 64, 256, 1024))
    shapes = bench_kernels.decode_shapes(args)
    for d in args.decode_d:
        for b in args.decode_b:
            steps = sorted(s for dd, bb, s in shapes if (dd, bb) == (d, b))
            # none, a quarter (at least one row), all; at B = 1 a quarter and all are the same row
            assert steps == ([0, 1] if b == 1 else [0, b // 4, b]), (d, b, steps)
    assert len(shapes) == len(set(shapes))


def test_kernel_rows_plan_covers_none_one_a_quarter_all_and_the_sparse_cases():
    shapes = bench_kernels.rows_shapes((1536, 5120), bench_kernels.ROWS_B)
    for d in (1536, 5120):
        for b in bench_kernels.ROWS_B:
            counts = sorted(n for dd, bb, n in shapes if (dd, bb) == (d, b))
            expected = [0, 1] if b == 1 else [0, 1, b // 4, b]
            assert counts == sorted(expected + [100] * (b == 8192)), (d, b, counts)
        assert [n for dd, b, n in shapes if (dd, b) == (d, 4096)] == [100]
    assert len(shapes) == len(set(shapes))


def test_kv_buckets_end_at_the_cache_length_and_cover_every_position():
    ends = decode_loops.kv_bucket_ends(prompt_len=128, new_tokens=2048, buckets=4)
    assert ends == sorted(ends) and len(ends) == 4
    assert all(e % decode_loops.KV_ALIGN == 0 for e in ends)
    assert ends[-1] >= 128 + 2048 and ends[0] > 127  # the first decode step reads position P-1
    assert decode_loops.kv_bucket_ends(128, 64, 1) == [192]


@pytest.fixture(scope="module")
def e2e_quick_cpu(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "nvidia-h200-e2e.json"  # a README name, for the report test
    result = bench_e2e.main(["--quick", "--device", "cpu", "--out", str(out)])
    return result, out


def test_e2e_quick_on_cpu_scores_match_the_reforward(e2e_quick_cpu):
    result, out = e2e_quick_cpu
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert out.with_suffix(".png").exists()
    decodes = [c["decode"] for c in result["cases"]]
    assert decodes == ["static_cache_no_graph", "eager"]
    for case in result["cases"]:
        assert case["match"] is True and case["positions_equal"] is True, case
        assert case["steps_scored"] > 0
        assert case["max_abs_step_score_diff"] <= case["tolerance"]
        assert case["off_spread_pct"] >= 0
        for mode in bench_e2e.MODES:
            assert len(case["times_s"][mode]) == result["config"]["reps"] == 3
        for key in ("off_tokens_per_s", "ours_overhead_pct", "ours_us_per_step", "eager_hook_overhead_pct",
                    "released_s", "released_overhead_pct", "released_over_ours"):
            assert key in case, key
        assert case["released_overhead_pct"] > 0
    eager = result["cases"][1]
    assert eager["ours_host_us_per_step"] > 0 and eager["eager_hook_host_us_per_step"] > 0


def test_report_renders_graph_and_eager_rows_of_the_new_layout(e2e_quick_cpu):
    result, out = e2e_quick_cpu
    text = report.render_all(out.parent, plots=False)
    assert f"`{out.name}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[1] for row in rows] == ["static_cache_no_graph", "eager"]
    assert all(" | yes | " in row for row in rows)


def test_docs_benchmarks_page_and_readme_headline_match_the_results():
    """The generated page and the README's numbers are what the report makes of the current results."""
    page = report.BENCHMARKS_DOC.read_text()
    assert page == f"{report.INTRO}\n{report.render_all(plots=False)}\n", "rerun `python -m benchmarks report`"
    readme = report.README.read_text()
    assert report.replace_between(readme, report.BEGIN, report.END, report.headline(), "README") == readme
    assert "% of decode time" in report.headline()


def test_results_hold_one_current_file_per_suite_and_device():
    files = sorted(_common.RESULTS_DIR.glob("*.json"))
    # Every file is shown in docs/benchmarks.md: none is kept only as history.
    unshown = {f.name for f in files} - {path.name for path, _ in report.load_results()}
    assert not unshown, (
        f"{sorted(unshown)}: no suite renders these (give benchmarks/bench_<name>.py a markdown_table, "
        "then run `python -m benchmarks report`), or they are history that git keeps"
    )
    assert len(list(_common.RESULTS_DIR.iterdir())) <= 30
    experiment_names = [f.name for f in files if re.search(r"-v\d|call\d|session|sweep|run\d", f.name)]
    assert not experiment_names


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_e2e_cuda_graph_loop_captures_the_scorer_and_matches_the_reforward(tmp_path):
    result = bench_e2e.main(["--models", "tiny", "--batch", "4", "--new-tokens", "48", "--decode", "graph",
                             "--kv-buckets", "2", "--out", str(tmp_path / "e2e.json")])
    (case,) = result["cases"]
    assert case["decode"] == "cuda_graph" and "graph_error" not in case
    assert case["match"] is True and case["steps_scored"] > 0
    assert case["ours_step_graph_us"] > 0


def test_kernel_timings_carry_min_and_max_into_the_json_not_the_table():
    timing = bench_kernels.Timing([3.0, 1.0, 2.0])
    assert timing == 2.0 and (timing.min_us, timing.max_us) == (1.0, 3.0)
    per_call = timing.per_call(2)
    assert per_call == 1.0 and (per_call.min_us, per_call.max_us) == (0.5, 1.5)
    row = {"d": 8, "B": 1, "step_rows": 1}
    bench_kernels.guarded(row, "triton_graph", lambda: timing)
    bench_kernels.guarded(row, "cuda_graph", lambda: 1 / 0)
    assert row["triton_graph"] == 2.0 and row["min_max"] == {"triton_graph": [1.0, 3.0]}
    assert row["cuda_graph"] is None and "ZeroDivisionError" in row["errors"]["cuda_graph"]
    result = {"environment": {"device": "X", "torch": "t", "triton": "3", "date": "2026"},
              "ceilings": {"copy_Bps": 1e12, "matmul_flops": 1e15}, "decode": [row]}
    table = bench_kernels.markdown_table(result)
    assert "| d | B | step_rows | triton_graph | cuda_graph |" in table and "| min_max" not in table
