"""OpenAI server: the SPRM fields of each ``CompletionOutput`` copied onto the response choices.

``/v1/completions`` and ``/v1/chat/completions`` choices carry ``sprm_score``,
``sprm_step_scores`` and ``sprm_step_positions`` (plus ``sprm_error`` when a score could not be
computed and the ``sprm_prompt_*`` fields when the request set ``vllm_xargs:
{"sprm_score_prompt": true}``). With ``"stream": true`` they are on the chunk that carries the
choice's ``finish_reason`` (the scores need the final tokens), and on no earlier chunk.

vLLM's choice models allow extra fields, so the fields serialize like the stock ones.
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import json
import sys

SPRM_FIELDS = (
    "sprm_score",
    "sprm_step_scores",
    "sprm_step_positions",
    "sprm_error",
    "sprm_prompt_score",
    "sprm_prompt_step_scores",
    "sprm_prompt_step_positions",
    "sprm_prompt_error",
)
_PATCHED: dict[str, tuple[type, object]] = {}


def sprm_fields(completion_output) -> dict:
    """The SPRM attributes a finished ``CompletionOutput`` carries (empty for an unscored one)."""
    return {name: getattr(completion_output, name) for name in SPRM_FIELDS if hasattr(completion_output, name)}


def _set_fields(choice, fields: dict) -> None:
    for name, value in fields.items():
        setattr(choice, name, value)


class _ScoreTap:
    """Wraps a generator of ``RequestOutput`` (or ``(prompt_idx, RequestOutput)``), noting the
    scores of finished outputs by choice index."""

    def __init__(self, source, choices_per_prompt: int, indexed: bool) -> None:
        self.source = source
        self.choices_per_prompt = choices_per_prompt
        self.indexed = indexed
        self.by_choice: dict[int, dict] = {}
        self.final = None

    async def __aiter__(self):
        async for item in self.source:
            prompt_idx, result = item if self.indexed else (0, item)
            self.final = result
            for output in result.outputs:
                fields = sprm_fields(output)
                if fields:
                    self.by_choice[output.index + prompt_idx * self.choices_per_prompt] = fields
            yield item


def _annotate_chunk(chunk: str, tap: _ScoreTap, sent: set[int]) -> str:
    """Add the SPRM fields to the choices of an SSE chunk that finish in it."""
    if not chunk.startswith("data: ") or len(sent) == len(tap.by_choice):
        return chunk
    body = chunk[len("data: ") :].strip()
    if body == "[DONE]":
        return chunk
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return chunk
    changed = False
    for choice in data.get("choices") or ():
        index = choice.get("index")
        if choice.get("finish_reason") is not None and index in tap.by_choice and index not in sent:
            choice.update(tap.by_choice[index])
            sent.add(index)
            changed = True
    return f"data: {json.dumps(data)}\n\n" if changed else chunk


def _choices_per_prompt(request) -> int:
    return 1 if getattr(request, "n", None) is None else request.n


def _patched_stream(original, indexed: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def stream_generator(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        tap = _ScoreTap(bound.arguments["result_generator"], _choices_per_prompt(bound.arguments["request"]), indexed)
        bound.arguments["result_generator"] = tap.__aiter__()
        sent: set[int] = set()
        async for chunk in original(*bound.args, **bound.kwargs):
            yield _annotate_chunk(chunk, tap, sent) if isinstance(chunk, str) else chunk

    return stream_generator


def _patched_chat_full(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def chat_completion_full_generator(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        tap = _ScoreTap(bound.arguments["result_generator"], _choices_per_prompt(bound.arguments["request"]), False)
        bound.arguments["result_generator"] = tap.__aiter__()
        response = await original(*bound.args, **bound.kwargs)
        for choice in getattr(response, "choices", None) or ():
            _set_fields(choice, tap.by_choice.get(choice.index, {}))
        return response

    return chat_completion_full_generator


def _patched_completion_response(original):
    @functools.wraps(original)
    def request_output_to_completion_response(self, final_res_batch, *args, **kwargs):
        response = original(self, final_res_batch, *args, **kwargs)
        outputs = [output for result in final_res_batch for output in result.outputs]
        for choice, output in zip(response.choices, outputs):
            _set_fields(choice, sprm_fields(output))
        return response

    return request_output_to_completion_response


def patch_openai_server() -> bool:
    """Patch the completion and chat serving classes once per process (front end only uses them)."""
    if _PATCHED:
        return False
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    targets = (
        (OpenAIServingCompletion, "request_output_to_completion_response", _patched_completion_response),
        (OpenAIServingCompletion, "completion_stream_generator", lambda f: _patched_stream(f, indexed=True)),
        (OpenAIServingChat, "chat_completion_full_generator", _patched_chat_full),
        (OpenAIServingChat, "chat_completion_stream_generator", lambda f: _patched_stream(f, indexed=False)),
    )
    for owner, name, factory in targets:
        original = owner.__dict__[name]
        _PATCHED[name] = (owner, original)
        setattr(owner, name, factory(original))
    return True


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Applies ``patch_openai_server`` right after vLLM's serving modules are first imported.

    Only the API server process imports them, and it may do so after loading plugins; engine-core
    and worker processes never pay for importing the server.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname not in _SERVING_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if all(name in sys.modules for name in _SERVING_MODULES):
            patch_openai_server()


_SERVING_MODULES = (
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.chat_completion.serving",
)


def install_server_patch() -> None:
    """Patch the server now if its modules are loaded, else as soon as they are (idempotent)."""
    if all(name in sys.modules for name in _SERVING_MODULES):
        patch_openai_server()
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


def revert_openai_server() -> None:
    for name, (owner, original) in _PATCHED.items():
        setattr(owner, name, original)
    _PATCHED.clear()
