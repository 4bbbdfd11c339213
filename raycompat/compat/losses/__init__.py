"""Losses for compatible training, one per module.

- :mod:`classification`: the new model's own cosine-softmax loss;
- :mod:`influence`: the compatibility loss against a frozen old-space classifier
  (NIFCL's pseudo classifier, or BCT's real old classifier);
- :mod:`l2`: the L2 feature-regression baseline;
- :mod:`prototype_alignment`: NIFCL's optional pull of new features onto their old-space prototype;
- :mod:`old_neighbors`: NIFCL's optional soft nearest-neighbour loss against the stored old features;
- :mod:`compatible_slice`: the first d_old dims of a new feature.
"""

from raycompat.compat.losses.classification import cosine_logits, cosine_softmax_loss
from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.compat.losses.influence import InfluenceLoss
from raycompat.compat.losses.l2 import L2CompatLoss
from raycompat.compat.losses.old_neighbors import OldNeighborLoss
from raycompat.compat.losses.prototype_alignment import PrototypeAlignmentLoss

__all__ = [
    "InfluenceLoss", "L2CompatLoss", "OldNeighborLoss", "PrototypeAlignmentLoss",
    "compatible_slice", "cosine_logits", "cosine_softmax_loss",
]
