"""Training objectives: weighted sums of loss terms built from the recipe's ``[objective]`` section.

Importing this package registers the shipped terms (``clip``, ``siglip``, ``filip``, ``affinity_distill``,
``lexical``, ``flops``, ``dreamlip_grouping``, ``sub_caption_clip``, ``alip``).
"""

from clipforge.objectives.alip import AlipLoss, alip_gates
from clipforge.objectives.base import (
    TERMS,
    Objective,
    Term,
    TermConfig,
    build_objective,
    build_term,
    register_term,
    term_config_class,
)
from clipforge.objectives.contrastive import (
    ClipLoss,
    clip_logits,
    clip_loss,
    multi_positive_clip_loss,
    symmetric_cross_entropy,
)
from clipforge.objectives.distill import AffinityDistill, affinity_distill_loss
from clipforge.objectives.dreamlip import DreamlipGrouping, SubCaptionClip, grouped_features, grouping_weights
from clipforge.objectives.filip import FilipLoss, late_interaction_scores
from clipforge.objectives.lexical import FlopsRegulariser, LexicalContrastive, flops, quadratic_warmup
from clipforge.objectives.sigmoid import (
    SigLipLoss,
    sigmoid_pair_loss_sum,
    siglip_logits,
    siglip_loss,
    siglip_loss_chunked,
)

__all__ = [
    "TERMS",
    "AffinityDistill",
    "AlipLoss",
    "alip_gates",
    "DreamlipGrouping",
    "SubCaptionClip",
    "grouped_features",
    "grouping_weights",
    "affinity_distill_loss",
    "FilipLoss",
    "FlopsRegulariser",
    "LexicalContrastive",
    "flops",
    "quadratic_warmup",
    "TermConfig",
    "late_interaction_scores",
    "multi_positive_clip_loss",
    "ClipLoss",
    "Objective",
    "SigLipLoss",
    "Term",
    "build_objective",
    "build_term",
    "clip_logits",
    "clip_loss",
    "register_term",
    "sigmoid_pair_loss_sum",
    "siglip_logits",
    "siglip_loss",
    "siglip_loss_chunked",
    "symmetric_cross_entropy",
    "term_config_class",
]
