"""The two decode loops the end-to-end benchmark times, the same model and sampler in both.

* ``StaticDecoder``: what serving engines do. A transformers ``StaticCache``, static input buffers,
  and the one-token step (forward, Gumbel-max sampling, and whatever scoring the caller adds)
  captured in CUDA graphs, one per KV-length bucket, replayed once per token; on a CPU the same step
  runs eagerly.
* ``generate``: HuggingFace's forward called from Python with a dynamic cache (host-bound: every
  kernel launch is paid on the host).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

TEMPERATURE = 0.7
KV_ALIGN = 64  # static cache and bucket lengths are multiples of this (SDPA's mask alignment wants 16)


class LastLayerInput:
    """Forward pre-hook keeping ``h`` (SPEC: the input of the last decoder layer) of the latest call, [B, L, d]."""

    def __init__(self, model) -> None:
        self.value: torch.Tensor | None = None
        self._handle = model.model.layers[-1].register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.value = args[0] if args else kwargs["hidden_states"]

    def remove(self) -> None:
        self._handle.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the CUDA-graph decode loop ------------------------------------------------------------------


class StaticCacheAttention:
    """Attention over a transformers StaticCache for graph capture, registered with transformers.

    Keys and values are cut to ``kv_limit`` (set while a graph is captured, so each graph reads only
    its bucket of the cache). A one-token decode step folds the query heads that share a KV head into
    the query length (exact for one query position), so grouped-query attention reads the cache once
    instead of materializing the repeated heads, as a serving engine's decode kernel does; longer
    inputs (the prefill) go to transformers' SDPA path.
    """

    name = "xbai_bench_static"

    def __init__(self) -> None:
        self.kv_limit: int | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if self.kv_limit is not None:
            key, value = key[:, :, : self.kv_limit], value[:, :, : self.kv_limit]
            attention_mask = None if attention_mask is None else attention_mask[..., : self.kv_limit]
        batch, heads, q_len, head_dim = query.shape
        if q_len != 1:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], head_dim)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2), None


def kv_bucket_ends(prompt_len: int, new_tokens: int, buckets: int) -> list[int]:
    """Cache lengths of the graphs: ``buckets`` steps up to the static cache length, each a multiple of
    KV_ALIGN; the decode at position p replays the first graph whose length exceeds p."""
    total = _round_up(prompt_len + new_tokens, KV_ALIGN)
    ends = {min(total, _round_up(prompt_len + -(-new_tokens * k // buckets), KV_ALIGN)) for k in range(1, buckets + 1)}
    return sorted(ends)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class StaticDecoder:
    """B sequences decoded one token per step with a StaticCache and static buffers.

    ``capture(mode, score)`` records one CUDA graph per KV bucket of a whole decode step; ``run``
    replays them N times (on a CPU, where there are no graphs, it runs the same step eagerly: the
    test path). ``score(h [B, d], sampled int64 [B], positions int64 [B])`` is the scoring work of a
    mode, or None. The buffers hold the state between steps: ``ids`` [B, P + N] (prompt, then every
    sampled token), ``input_ids`` / ``position_ids`` [B, 1] (the next step's input), ``mask``
    [B, 1, 1, L] (additive, 0 on the positions written so far).
    """

    def __init__(self, model, batch: int, prompt_len: int, new_tokens: int, buckets: int, logit_bias: torch.Tensor) -> None:
        from transformers import AttentionInterface, StaticCache

        if prompt_len < 2:
            raise ValueError("StaticDecoder: the prompt needs at least 2 tokens (1 prefilled, 1 decoded)")
        self.model, self.batch, self.prompt_len, self.new_tokens = model, batch, prompt_len, new_tokens
        self.logit_bias = logit_bias
        device, dtype = model.device, model.dtype
        self.device = device
        self.bucket_ends = kv_bucket_ends(prompt_len, new_tokens, buckets)
        self.max_len = self.bucket_ends[-1]
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.ids = torch.zeros(batch, prompt_len + new_tokens, dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.mask = torch.zeros(batch, 1, 1, self.max_len, dtype=dtype, device=device)
        self.hidden = LastLayerInput(model)
        self.attention = StaticCacheAttention()
        AttentionInterface.register(StaticCacheAttention.name, self.attention)
        self.use_graphs = device.type == "cuda"
        self.graphs: dict[str, list[tuple[int, torch.cuda.CUDAGraph]]] = {}
        self.scorers: dict[str, object] = {}

    def close(self) -> None:
        self.hidden.remove()
        self.graphs.clear()

    @contextlib.contextmanager
    def _static_attention(self):
        # The config attribute the attention layers read at every call (set_attn_implementation also
        # re-validates the model, which costs more than a decode step).
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = StaticCacheAttention.name
        try:
            with torch.no_grad():
                yield
        finally:
            config._attn_implementation = previous

    def start(self, prompts: torch.Tensor) -> torch.Tensor:
        """Reset the state and prefill prompt tokens 0 .. P-2 (the last one is the first decode step's
        input). Returns h of the prefilled positions, [B, P-1, d]."""
        p = self.prompt_len
        neg = torch.finfo(self.mask.dtype).min
        self.cache.reset()
        self.ids[:, :p] = prompts
        self.mask.fill_(neg)
        self.mask[..., : p - 1] = 0
        columns = torch.arange(self.max_len, device=self.device)
        rows = torch.arange(p - 1, device=self.device)
        causal = torch.zeros(p - 1, self.max_len, dtype=self.mask.dtype, device=self.device)
        causal.masked_fill_(columns[None, :] > rows[:, None], neg)
        with self._static_attention():
            self.model(
                input_ids=prompts[:, : p - 1], position_ids=rows[None].expand(self.batch, -1),
                attention_mask=causal[None, None].expand(self.batch, 1, -1, -1),
                past_key_values=self.cache, use_cache=True, logits_to_keep=1,
            )
        self.input_ids.copy_(prompts[:, -1:])
        self.position_ids.fill_(p - 1)
        return self.hidden.value

    def _step(self, score) -> None:
        position = self.position_ids[:1, 0]
        self.mask.index_fill_(-1, position, 0.0)
        logits = self.model(
            input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.mask,
            past_key_values=self.cache, use_cache=True,
        ).logits[:, -1].float()
        # Gumbel-max sampling at TEMPERATURE: no host sync, graph-safe (the default generator).
        noise = torch.empty_like(logits).exponential_()
        sampled = (logits / TEMPERATURE + self.logit_bias - noise.log()).argmax(-1)
        if score is not None:
            score(self.hidden.value[:, -1], sampled, self.position_ids[:, 0])
        self.ids.index_copy_(1, position + 1, sampled[:, None])
        self.input_ids.copy_(sampled[:, None])
        self.position_ids.add_(1)

    def capture(self, mode: str, score, prompts: torch.Tensor) -> None:
        if not self.use_graphs:
            return
        graphs = []
        try:
            for end in self.bucket_ends:
                self.attention.kv_limit = end
                self.start(prompts)
                with self._static_attention():
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        for _ in range(2):  # Triton JIT, cuBLAS handles, allocator: not in the graph
                            self._step(score)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self._step(score)
                graph.replay()  # the first replay uploads the graph
                graphs.append((end, graph))
        finally:
            self.attention.kv_limit = None
        sync(self.device)
        self.graphs[mode] = graphs

    def run(self, mode: str, score, prompts: torch.Tensor, seed: int, on_prefill=None) -> float:
        """One whole decode of N tokens; returns its seconds (CUDA events around the N replays)."""
        prefill_hidden = self.start(prompts)
        if on_prefill is not None:
            on_prefill(prefill_hidden)
        torch.manual_seed(seed)
        if not self.use_graphs:
            begin = time.perf_counter()
            with self._static_attention():
                for _ in range(self.new_tokens):
                    self._step(score)
            return time.perf_counter() - begin
        graphs, k = self.graphs[mode], 0
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(self.device)
        begin.record()
        for t in range(self.new_tokens):
            while graphs[k][0] <= self.prompt_len - 1 + t:
                k += 1
            graphs[k][1].replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


# ----- the eager (host-bound) decode loop ------------------------------------------------------------


@torch.inference_mode()
def generate(model, prompts, new_tokens, logit_bias, on_token=None, seed=0):
    """Sample ``new_tokens`` tokens for every row of ``prompts`` [B, P] with HuggingFace's forward and
    a dynamic cache; ``on_token(sampled, position)`` runs after each sample. Returns ids [B, P + N] and
    the wall seconds of the whole loop (one sync at each end, none per step)."""
    from transformers import DynamicCache

    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    batch, prompt_len = prompts.shape
    cache = DynamicCache()
    tokens = torch.empty(batch, new_tokens, dtype=torch.int64, device=prompts.device)
    sync(prompts.device)
    start = time.perf_counter()
    step_input = prompts
    for t in range(new_tokens):
        out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        probs = torch.softmax(out.logits[:, -1].float() / TEMPERATURE + logit_bias, dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if on_token is not None:
            on_token(sampled, prompt_len + t - 1)
        tokens[:, t] = sampled
        step_input = sampled[:, None]
    sync(prompts.device)
    return torch.cat([prompts, tokens], dim=1), time.perf_counter() - start
