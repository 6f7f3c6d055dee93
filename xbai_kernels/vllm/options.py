"""The per-request SPRM options: their names, what values they take, and the one place that checks them.

A request sets options in ``SamplingParams.extra_args`` (``LLM.generate``) or ``vllm_xargs`` (the
OpenAI server). Every key that starts with ``sprm_`` belongs to this plugin: a known one must hold a
valid value and an unknown one is refused, so that a typo is an error instead of an option that
silently does nothing. Keys without the prefix belong to vLLM or to other plugins and are left alone.

Adding an option: one ``Option`` entry in ``OPTIONS`` (name, a parser that returns the value or
raises ``ValueError`` with the reason, the default, and a line of help); ``parse_options`` then
checks it everywhere (the server, ``LLM.generate``, the front end that reads it).

Imports nothing from vLLM: the checks run in the front end, before a request reaches the engine.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import pruning

PREFIX = "sprm_"


class SPRMOptionError(ValueError):
    """A request's SPRM option is unknown or holds an invalid value. ``option`` names it, ``value`` is
    what the request held (None for an unknown option)."""

    def __init__(self, message: str, option: str, value=None) -> None:
        super().__init__(message)
        self.option = option
        self.value = value


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[object], object]  # the value as the request held it -> the value used; ValueError if invalid
    default: object
    help: str


def _boolean(value) -> bool:
    # A JSON boolean only: bool("false") is True and 2.5 is no answer to a yes/no question.
    if isinstance(value, bool):
        return value
    raise ValueError("takes a JSON boolean (true or false)")


OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option(
            "sprm_score_prompt",
            _boolean,
            False,
            "also score the prompt alone as a trajectory (sprm_prompt_score, sprm_prompt_step_scores, "
            "sprm_prompt_step_positions), from the hidden states of its prefill",
        ),
        Option(
            "sprm_prune",
            pruning.normalize_policy,
            None,
            "stop Best-of-N candidates whose running step scores fall behind while they decode: "
            '{"policy": "relative", "steps": [4, 8], "keep": [0.5, 0.25], "min_keep": 1} or '
            '{"policy": "absolute", "threshold": 0.3, "min_steps": 4, "window": null, "min_keep": 1} '
            "(a JSON string in the OpenAI server's vllm_xargs); see xbai_kernels.vllm.pruning",
        ),
    )
}


def describe(value) -> str:
    """How an option's value reads in an error message: as JSON (what a server client sent), with its type."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    kind = {bool: "boolean", str: "string", int: "integer", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
    return f"{text} ({kind})"


def sprm_keys(extra_args: Mapping | None) -> list[str]:
    """The keys of ``extra_args`` that belong to this plugin."""
    if not extra_args:
        return []
    return [key for key in extra_args if isinstance(key, str) and key.startswith(PREFIX)]


def parse_option(name: str, value, where: str = "extra_args"):
    """The value of option ``name`` as it will be used; ``SPRMOptionError`` if unknown or invalid."""
    option = OPTIONS.get(name)
    if option is None:
        known = ", ".join(sorted(OPTIONS))
        close = difflib.get_close_matches(name, OPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SPRMOptionError(
            f"unknown SPRM option {name!r} in {where}{hint}; the options of xbai_kernels are: {known}",
            name,
        )
    try:
        return option.parse(value)
    except ValueError as exc:
        raise SPRMOptionError(f"SPRM option {name!r} in {where} {exc}; got {describe(value)}", name, value) from None


def parse_options(extra_args: Mapping | None, where: str = "extra_args") -> dict[str, object]:
    """Every option's value for one request (the default where it sets none); ``SPRMOptionError``
    (a ``ValueError``) for an unknown ``sprm_*`` key or an invalid value."""
    values = {name: option.default for name, option in OPTIONS.items()}
    for key in sprm_keys(extra_args):
        values[key] = parse_option(key, extra_args[key], where)
    return values
