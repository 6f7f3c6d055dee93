"""Step records as they leave the worker: ``{request id: (positions, logits)}`` on the runner's output.

Both runner patches produce the same payload: for every row of the step that scores a position,
its request, the absolute position and the head's logit. The scheduler (``engine``) forwards it
to the front end (``frontend``), which keys it by position, so preemption and recomputation fold in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The attribute of ``ModelRunnerOutput`` that carries a step's records (an extra attribute survives
# the executor's pickle hop; the scheduler patch reads it).
RECORDS_ATTRIBUTE = "xbai_sprm"

Records = dict[str, tuple[list[int], list[float]]]


def request_rows(rows: np.ndarray, query_start_loc: np.ndarray, num_requests: int) -> np.ndarray:
    """The request of each packed row: rows int [m] -> int [m]; request r owns rows
    ``query_start_loc[r]:query_start_loc[r + 1]`` (entries past ``num_requests`` are ignored)."""
    return np.searchsorted(query_start_loc[: num_requests + 1], rows, side="right") - 1


def by_request(requests: np.ndarray, positions: np.ndarray, logits: np.ndarray, req_ids: Sequence[str]) -> Records:
    """Group scored rows by request: requests int [m] (``request_rows`` of the rows), positions int
    [m], logits float [m]."""
    records: Records = {}
    for request, position, logit in zip(requests.tolist(), positions.tolist(), logits.tolist()):
        entry = records.setdefault(req_ids[request], ([], []))
        entry[0].append(position)
        entry[1].append(logit)
    return records


def attach(output, build: Callable[[], Records]) -> None:
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
