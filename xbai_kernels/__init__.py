"""xbai-kernels: the SPRM step-reward head of XBai o4 / MetaStone-S1, computed during decoding and training."""

from .decode import DecodeScorer, SlotResult
from .head import SPRMHead
from .loss import sprm_head_loss, sprm_loss
from .rule import StepRule
from .scoring import TrajectoryScore, TrajectoryScores, score_trajectories, step_mask

__version__ = "0.1.0"

__all__ = [
    "DecodeScorer",
    "SPRMHead",
    "SlotResult",
    "StepRule",
    "TrajectoryScore",
    "TrajectoryScores",
    "score_trajectories",
    "sprm_head_loss",
    "sprm_loss",
    "step_mask",
]
