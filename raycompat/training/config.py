"""The training layer's configs: the optimiser, and the old and new models' recipes
(backbone + optimiser, and for the new model its compatibility term).

OldConfig and NewConfig live here, not in models/, because they compose the
training and compat layers' configs: training depends on models and compat, never
the other way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

from annotated_types import Ge, Gt

from raycompat.compat.config import CompatConfig
from raycompat.configio import check, join
from raycompat.models.config import ModelConfig


@dataclass
class OptimConfig:
    epochs: Annotated[int, Gt(0)] = 3
    batch_size: Annotated[int, Gt(0)] = 128
    lr: Annotated[float, Gt(0)] = 1e-3
    weight_decay: Annotated[float, Ge(0)] = 5e-4
    # Scale s of the cosine classifier s * <w_c, normalize(phi(x))>.
    scale: Annotated[float, Gt(0)] = 16.0
    # Learning rate over the epochs: cosine decay from lr towards 0 (stepped once per epoch), which settles the
    # last epoch's weights (the model the run exports), or constant. With a constant lr the compatibility terms
    # left validation new/old swinging by up to 20 points between the last epochs (chain benchmark); results
    # measured before this default changed name `schedule: constant` in their configs.
    schedule: Literal["constant", "cosine"] = "cosine"


@dataclass
class OldConfig:
    """The old model: a black box. Trained here only when ``extractor`` is null (to have one)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The black box used for extraction: null = train an old model (model, optim) and use the
    # TorchScript file train-old exports; else a path to a TorchScript file or exported model
    # directory, "module:callable", or an http:// endpoint, and no old model is trained.
    extractor: Optional[str] = None
    # The old classifier's weights, read by new.method bct only (a path or storage URI): a torch.save'd
    # float tensor (num_old_classes, d_old) whose row j is class j's weight, or an exported model's
    # classifier.pt ({"weight": tensor, "classes": [class id of each row]}). null = the classifier.pt
    # of the old model train-old exports; bct with old.extractor set needs it.
    classifier: Optional[str] = None
    name: str = "old"
    version: str = "1"
    # An http(s) extractor: seconds to wait for each answer, and retries (with backoff) after a
    # timeout, a refused connection or a 5xx.
    http_timeout_s: Annotated[float, Gt(0)] = 30.0
    http_retries: Annotated[int, Ge(0)] = 2


@dataclass
class NewConfig:
    """The new model and how it is made compatible."""

    method: Literal["independent", "l2", "bct", "nifcl"] = "independent"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    # Model name in models/ and features/; null = "new-<method>".
    name: Optional[str] = None
    version: str = "1"

    def validate(self, key: str) -> None:
        check(self.compat.align == 0 or self.method == "nifcl", join(join(key, "compat"), "align"),
              f"only method nifcl uses the prototype-alignment term (method is {self.method})")
        check(self.compat.neighbors.weight == 0 or self.method == "nifcl", join(key, "compat.neighbors.weight"),
              f"only method nifcl uses the old-neighbourhood term (method is {self.method})")


