"""FCT configs load from mappings and reject bad values naming the dotted key."""

import pytest

from raycompat.configio import from_dict, to_dict
from raycompat.errors import ConfigError
from raycompat.models.config import SideInfoConfig, TransformationConfig


def test_round_trip():
    cfg = from_dict(TransformationConfig, {"hidden": [32], "uncertainty": True, "mu_disc": 0.5}, "fct")
    assert cfg.hidden == [32] and cfg.uncertainty and cfg.mu_disc == 0.5
    assert from_dict(TransformationConfig, to_dict(cfg)) == cfg
    assert from_dict(SideInfoConfig, {"dim": 64}).dim == 64


@pytest.mark.parametrize("cls,data,key", [
    (TransformationConfig, {"mu_unc": 0}, "fct.mu_unc"),
    (TransformationConfig, {"mu_disc": -1}, "fct.mu_disc"),
    (TransformationConfig, {"hidden": [8, 0]}, "fct.hidden"),
    (TransformationConfig, {"epochs": 0}, "fct.epochs"),
    (SideInfoConfig, {"dim": 0}, "fct.dim"),
    (SideInfoConfig, {"lr": -1e-3}, "fct.lr"),
])
def test_rejects_bad_values(cls, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(cls, data, "fct")
