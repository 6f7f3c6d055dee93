"""Score the reasoning steps of a text with a model's SPRM head (copy this file and adapt it).

    python python/score_offline.py MODEL_DIR --text "<think>\\nFirst we add.\\n\\nThen we check.\\n\\n</think> 7"
    python python/score_offline.py MODEL_DIR --file trajectory.txt [--lang zh] [--dtype bfloat16]

``--text`` reads the escapes ``\\n``, ``\\t`` and ``\\\\`` as a newline, a tab and a backslash: a shell
passes them on literally, and a step ends at ``.`` followed by a blank line, which is hard to type.

MODEL_DIR is a HuggingFace model directory holding the SPRM head next to the weights
(``score_module.pt`` as released, or ``sprm_head.safetensors`` from ``xbai-kernels convert``).
Try it on the tiny model: ``xbai-kernels make-tiny-model /tmp/tiny && python python/score_offline.py /tmp/tiny``.

This is the released pipeline's scoring pass (one full forward over the finished text, reading
``h`` = ``hidden_states[-2]``); during generation the vLLM integration gets the same numbers
without that extra forward.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from xbai_kernels import SPRMHead, StepRule, score_trajectories

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``text`` with ``\\n``, ``\\t`` and ``\\\\`` replaced; any other character (Chinese included) untouched."""
    return re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], text)


EXAMPLE = "<think>\nwe add two and three.\n\nthen we check the sum.\n\nthe answer is five.\n\n</think> 5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--text", default=EXAMPLE, help="the whole trajectory (prompt + response); \\n and \\t are read as escapes"
    )
    source.add_argument("--file", help="read the trajectory from this file")
    parser.add_argument("--lang", choices=("en", "zh"), default="en", help="the English or Chinese step-token set")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    text = open(args.file, encoding="utf-8").read() if args.file else unescape(args.text)
    dtype = getattr(torch, args.dtype)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device).eval()
    # The head loads in the model's dtype, as the released scoring server does; it accumulates in fp32.
    head = SPRMHead.from_pretrained(args.model_dir, hidden_size=model.config.hidden_size, device=args.device, dtype=dtype)
    rule = StepRule.from_tokenizer(tokenizer, lang=args.lang)

    input_ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), device=args.device)
    with torch.no_grad():
        hidden = model(input_ids=input_ids[None], output_hidden_states=True).hidden_states[-2][0]
    scores = score_trajectories(hidden, input_ids, head.eval(), rule)[0]

    ids = input_ids.tolist()
    start = 0
    for position, score in zip(scores.positions.tolist(), scores.step_scores.tolist()):
        # The step ends with the step token at position + 1; print the text up to and including it.
        step_text = tokenizer.decode(ids[start : position + 2]).strip()
        print(f"{score:.4f}  {step_text!r}")
        start = position + 2
    print(f"trajectory score (geometric mean of {scores.positions.numel()} steps): {scores.score:.4f}")
    if scores.positions.numel() == 0:
        print(
            "note: no step was scored. A step ends where a step token (English: '.' then a blank line) follows,\n"
            "inside <think> ... </think> when the text has them; check that the text holds such a boundary.",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
