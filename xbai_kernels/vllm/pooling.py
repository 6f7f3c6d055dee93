"""The SPRM head as a vLLM pooling model: ``LLM.encode`` (task ``token_classify``) returns per-token step probabilities.

The second route for text that already exists, for clients built around vLLM's pooling API:

    llm = LLM(model_dir, runner="pooling", hf_overrides={"architectures": ["Qwen3SPRMRewardModel"]})
    (output,) = llm.encode([text], pooling_task="token_classify")
    probabilities = output.outputs.data[:, 0]        # sigmoid(head(h_i)) at every position i
    result = score_token_probabilities(output.prompt_token_ids, probabilities, rule)

Every position gets sigmoid(logit), like a token-classification reward model; SPEC's rule (which
positions are steps, the thinking region) is applied by ``score_token_probabilities``, since it
needs the whole text and a pooler sees one prompt's hidden states at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.pooler.activations import PoolerMultiLabelClassify
from vllm.model_executor.layers.pooler.tokwise.poolers import pooler_for_token_classify
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from ..head import HEAD_KEYS, CheckpointError, SPRMHead
from .. import semantics
from ..ops import dispatch
from ..rule import StepRule
from ..scoring import step_mask
from . import config as sprm_config
from .results import SPRMResult


def score_token_probabilities(token_ids, probabilities: torch.Tensor, rule: StepRule) -> SPRMResult:
    """SPEC's scores from per-token step probabilities float [L] of the token ids int [L] they belong to."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
    probabilities = probabilities.reshape(-1).float().cpu()
    if probabilities.numel() != ids.numel():
        raise ValueError(f"score_token_probabilities: {probabilities.numel()} probabilities for {ids.numel()} tokens")
    positions = step_mask(ids, rule).nonzero().squeeze(-1)
    step_scores = probabilities[positions]
    score = semantics.trajectory_score(step_scores)
    return SPRMResult(float(score), step_scores.tolist(), positions.tolist())


class _SPRMRewardModel(nn.Module):
    """A Qwen backbone whose pooled output is ``h`` (input of the last decoder layer) scored by the SPRM head."""

    is_pooling_model = True
    backbone_class: type = Qwen2Model

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        self.config = model_config.hf_config
        self.model = self.backbone_class(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        # SPEC: h enters the LAST decoder layer, which the aux mechanism reports for index L-1.
        self.model._set_aux_hidden_state_layers((self.config.num_hidden_layers - 1,))
        location = sprm_config.head_location(model_config)
        if location is None:
            raise CheckpointError(
                f"{type(self).__name__}: no SPRM head for {model_config.model} (expected sprm_head.safetensors or "
                f"score_module.pt in the model directory, or XBAI_SPRM_HEAD; and XBAI_SPRM not 0)"
            )
        # Kept out of the module tree: vLLM's weight loader must not expect it in the checkpoint.
        self.__dict__["sprm_head"] = SPRMHead.from_pretrained(
            location, hidden_size=self.config.hidden_size, device=vllm_config.device_config.device,
            dtype=model_config.dtype,
        ).eval()
        self.pooler = pooler_for_token_classify(
            model_config.pooler_config, classifier=self._step_logits, act_fn=PoolerMultiLabelClassify()
        )

    def _step_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.sprm_head
        return dispatch.call("head_logits", hidden.device, hidden.to(head[0].weight.dtype), *head.weights)[:, None]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        _, (last_layer_input,) = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        return last_layer_input

    def load_weights(self, weights):
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."])
        return loader.load_weights((name, tensor) for name, tensor in weights if name not in HEAD_KEYS)


@default_pooling_type(tok_pooling_type="ALL")
class Qwen2SPRMRewardModel(_SPRMRewardModel):
    backbone_class = Qwen2Model


@default_pooling_type(tok_pooling_type="ALL")
class Qwen3SPRMRewardModel(_SPRMRewardModel):
    backbone_class = Qwen3Model
