"""``xbai-kernels eval``'s answer checking and problem file, without an engine."""

from __future__ import annotations

import pytest

from xbai_kernels.cli import main
from xbai_kernels.vllm import evaluate


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so the answer is \\boxed{391}.", "391"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_boxed_takes_the_last_balanced_box(text, boxed):
    assert evaluate.extract_boxed(text) == boxed


def test_answers_compare_without_spaces_dollars_or_a_final_period():
    assert evaluate.is_correct("thus \\boxed{ $3 + x$ }", "3+x")
    assert evaluate.is_correct("\\boxed{42.}", 42)
    assert not evaluate.is_correct("\\boxed{41}", "42") and not evaluate.is_correct("42", "42")


def test_problem_files_name_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "1+1?", "answer": 2}\n\n{"question": "2+2?", "answer": "4"}\n')
    assert evaluate.load_problems(good) == [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]
    for content, words in (('{"problem": "x"}\n', ":1: needs a problem"), ('{"answer": 1}\n{oops\n', ":1: needs"),
                           ('{"problem": "x", "answer": 1}\n{oops\n', ":2: not a JSON object"), ("\n", "no problems")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(ValueError, match=words):
            evaluate.load_problems(bad)


def test_eval_command_refuses_bad_input_before_any_engine(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1?", "answer": 2}\n')
    assert main(["eval", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", str(data), "--model", str(tmp_path), "--prune", '{"policy": "sometimes"}']) == 2
    assert '"policy"' in capsys.readouterr().err
    assert main(["eval", str(data), "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
