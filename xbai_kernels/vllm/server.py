"""OpenAI server: the SPRM fields of each ``CompletionOutput`` copied onto the response choices, and
the SPRM request options checked before a request starts.

``/v1/completions`` and ``/v1/chat/completions`` choices carry ``sprm_score``,
``sprm_step_scores`` and ``sprm_step_positions`` (plus ``sprm_error`` when a score could not be
computed and the ``sprm_prompt_*`` fields when the request set ``vllm_xargs:
{"sprm_score_prompt": true}``). With ``"stream": true`` they are on the chunk that carries the
choice's ``finish_reason`` (the scores need the final tokens), and on no earlier chunk.

vLLM's choice models allow extra fields, so the fields serialize like the stock ones.

Options: vLLM's request models type ``vllm_xargs`` values as ``str | int | float | list``, so a JSON
``true`` reaches the request object as the integer 1. A JSON boolean is told from a number by the
request body as the client sent it (kept by Starlette after FastAPI parsed it); the checked value
is written back into ``vllm_xargs``, so the engine sees a Python bool. A bad option is answered
like vLLM's own request errors: an HTTP 400 ``ErrorResponse`` from the handler, before anything
is scheduled or streamed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import inspect
import json
import re
import sys

from . import options as sprm_options
from . import patches
from .results import SPRM_FIELDS, sprm_fields

__all__ = ["SPRM_FIELDS", "install_server_patch", "sprm_fields"]

# Only an SSE chunk in which some choice finishes is parsed: vLLM writes ``"finish_reason":null``
# on every other chunk, and parsing each chunk of every stream would cost the event loop.
_FINISHED = re.compile(r'"finish_reason"\s*:\s*"')


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

    async def stream(self):
        try:
            async for item in self.source:
                prompt_idx, result = item if self.indexed else (0, item)
                for output in result.outputs:
                    fields = sprm_fields(output)
                    if fields:
                        self.by_choice[output.index + prompt_idx * self.choices_per_prompt] = fields
                yield item
        finally:
            # Closing the engine's generator now (not when it is garbage-collected) aborts the
            # request of a client that went away.
            aclose = getattr(self.source, "aclose", None)
            if aclose is not None:
                await aclose()


def _annotate_chunk(chunk: str, tap: _ScoreTap, sent: set[int]) -> str:
    """Add the SPRM fields to the choices of an SSE chunk that finish in it."""
    if len(sent) == len(tap.by_choice) or not chunk.startswith("data: ") or not _FINISHED.search(chunk):
        return chunk
    body = chunk[len("data: ") :].strip()
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
    if not changed:
        return chunk
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _choices_per_prompt(request) -> int:
    return 1 if getattr(request, "n", None) is None else request.n


# ----- request options ----------------------------------------------------------------------------


async def _sent_xargs(raw_request) -> dict | None:
    """``vllm_xargs`` of the request body as the client sent it, or None when it cannot be read."""
    if raw_request is None:
        return None
    try:
        body = await raw_request.json()
    except Exception:  # noqa: BLE001 - no readable body: fall back to the parsed request
        return None
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    return xargs if isinstance(xargs, dict) else None


async def _check_options(request, raw_request) -> sprm_options.SPRMOptionError | None:
    """Check the request's SPRM options, writing each checked value back; the error, if any."""
    xargs = getattr(request, "vllm_xargs", None)
    keys = sprm_options.sprm_keys(xargs)
    if not keys:
        return None
    sent = await _sent_xargs(raw_request)
    try:
        for key in keys:
            if sent is not None and key in sent:
                value = sent[key]
            elif type(xargs[key]) is int and xargs[key] in (0, 1):
                # No body to read (vLLM's batch runner): vLLM's protocol turned true/false into 1/0.
                value = bool(xargs[key])
            else:
                value = xargs[key]
            xargs[key] = sprm_options.parse_option(key, value, "vllm_xargs")
    except sprm_options.SPRMOptionError as exc:
        return exc
    return None


def _checking_options(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        error = await _check_options(bound.arguments["request"], bound.arguments.get("raw_request"))
        if error is not None:
            return self.create_error_response(str(error), param=f"vllm_xargs.{error.option}")
        return await original(*bound.args, **bound.kwargs)

    return wrapper


# ----- the patches: each takes vLLM's original and returns the replacement -------------------------


def create_completion(original):
    """``OpenAIServingCompletion.create_completion``: a bad SPRM option is a 400 before anything runs."""
    return _checking_options(original)


def create_chat_completion(original):
    """``OpenAIServingChat.create_chat_completion``: a bad SPRM option is a 400 before anything runs."""
    return _checking_options(original)


def _stream(original, indexed: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        tap = _ScoreTap(bound.arguments["result_generator"], _choices_per_prompt(bound.arguments["request"]), indexed)
        bound.arguments["result_generator"] = tap.stream()
        sent: set[int] = set()
        chunks = original(*bound.args, **bound.kwargs)
        try:
            async for chunk in chunks:
                yield _annotate_chunk(chunk, tap, sent) if isinstance(chunk, str) else chunk
        finally:
            await chunks.aclose()

    return wrapper


def completion_stream_generator(original):
    """``OpenAIServingCompletion.completion_stream_generator``: fields on each choice's finishing chunk."""
    return _stream(original, indexed=True)


def chat_completion_stream_generator(original):
    """``OpenAIServingChat.chat_completion_stream_generator``: fields on each choice's finishing chunk."""
    return _stream(original, indexed=False)


def chat_completion_full_generator(original):
    """``OpenAIServingChat.chat_completion_full_generator``: fields on each choice of the response."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        tap = _ScoreTap(bound.arguments["result_generator"], _choices_per_prompt(bound.arguments["request"]), False)
        bound.arguments["result_generator"] = tap.stream()
        response = await original(*bound.args, **bound.kwargs)
        for choice in getattr(response, "choices", None) or ():
            _set_fields(choice, tap.by_choice.get(choice.index, {}))
        return response

    return wrapper


def request_output_to_completion_response(original):
    """``OpenAIServingCompletion.request_output_to_completion_response``: fields on each choice."""

    @functools.wraps(original)
    def wrapper(self, final_res_batch, *args, **kwargs):
        response = original(self, final_res_batch, *args, **kwargs)
        outputs = [output for result in final_res_batch for output in result.outputs]
        for choice, output in zip(response.choices, outputs):
            _set_fields(choice, sprm_fields(output))
        return response

    return wrapper


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Applies the ``server`` patch group right after vLLM's serving modules are first imported.

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
            patches.apply("server")


_SERVING_MODULES = (
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.chat_completion.serving",
)


def install_server_patch() -> None:
    """Patch the server now if its modules are loaded, else as soon as they are (idempotent)."""
    if all(name in sys.modules for name in _SERVING_MODULES):
        patches.apply("server")
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
