"""N:M mask learners: which weights of each Linear/Conv2d to keep, learned instead of taken by magnitude.
MaskLLMLearner (Gumbel softmax over candidate patterns) and MaskProLearner (per-weight logits, REINFORCE)."""

from prunedm.masks.learner import MaskedWeight, MaskLearner
from prunedm.masks.maskllm import PRESETS as MASKLLM_PRESETS
from prunedm.masks.maskllm import MaskLLMLearner, prior_graded
from prunedm.masks.maskpro import PRESETS as MASKPRO_PRESETS
from prunedm.masks.maskpro import (
    MaskProLearner,
    leave_probability,
    logit_init_for_budget,
    set_log_prob,
    top_n_mask,
)
from prunedm.masks.schedules import anneal
from prunedm.masks.targets import (
    apply_masks,
    find_targets,
    magnitude_masks,
    matrix_to_weight,
    nm_violations,
    raw_weight,
    weight_matrix,
)

__all__ = [
    "MASKLLM_PRESETS",
    "MASKPRO_PRESETS",
    "MaskLLMLearner",
    "MaskLearner",
    "MaskProLearner",
    "MaskedWeight",
    "anneal",
    "apply_masks",
    "find_targets",
    "leave_probability",
    "logit_init_for_budget",
    "magnitude_masks",
    "matrix_to_weight",
    "nm_violations",
    "prior_graded",
    "raw_weight",
    "set_log_prob",
    "top_n_mask",
    "weight_matrix",
]
