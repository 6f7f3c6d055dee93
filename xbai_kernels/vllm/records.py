"""Step records as they leave the worker: each computed row's KV-cache slot and head logit.

Both runner patches hand the scheduler one int32 array per step, ``rows`` [2, n] for the step's n
scheduled rows: ``rows[0]`` is the row's KV-cache slot (``block id * block_size + offset``, the
same flat index whatever block size the attention kernel splits blocks into); ``rows[1]`` holds
the float32 bits of its logit, NaN when the row keeps none (the store then forgets any logit an
earlier tenant of the slot left there).
A row keeps its logit when its position opens a step (SPEC's candidate rule, which needs the
next token, known on the device) or is the last of its KV block (see ``logit_store``).

One array, not a dict by request: the scheduler files it by slot in one vectorised write, so no
step costs Python work per request or per row anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# The attribute of ``ModelRunnerOutput`` that carries a step's rows (an extra attribute survives
# the executor's pickle hop; the scheduler patch reads it).
RECORDS_ATTRIBUTE = "xbai_sprm"


def encode(cache_slots: np.ndarray, kept: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Host-side encoding (the device writes the same layout): cache_slots int [n], kept int [m]
    (the rows that keep a logit), logits float32 [m] (theirs) -> int32 [2, n]."""
    rows = np.empty((2, cache_slots.shape[0]), dtype=np.int32)
    rows[0] = cache_slots
    values = rows[1].view(np.float32)
    values.fill(np.nan)
    values[kept] = logits
    return rows


def decode(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 [2, n] -> (cache slots int32 [n], logits float32 [n], NaN where the row keeps none): views."""
    return rows[0], rows[1].view(np.float32)


def attach(output, build: Callable[[], np.ndarray]) -> None:
    """Attach ``build()`` to a runner output: to an async output when vLLM resolves it (after its own
    copy, so no host wait joins the step), or to a plain ``ModelRunnerOutput`` now."""
    resolve = getattr(output, "get_output", None)
    if resolve is not None:

        def get_output():
            resolved = resolve()
            setattr(resolved, RECORDS_ATTRIBUTE, build())
            return resolved

        output.get_output = get_output
    elif getattr(output, "req_ids", None):
        setattr(output, RECORDS_ATTRIBUTE, build())
