"""The protocol suite on a real local Ray runtime: units as tasks, written as they finish, resumed."""

from __future__ import annotations

import json

import pytest

from raycompat.configio import from_dict
from raycompat.suite.config import SuiteConfig

from test_suite import TINY

pytestmark = pytest.mark.ray


def test_suite_runs_units_as_tasks_and_resumes_only_what_is_missing(ray_session, tmp_path):
    from raycompat.pipeline.bench_suite import run_suite, units_dir

    cfg = from_dict(SuiteConfig, {**TINY, "output_dir": str(tmp_path / "run")})
    path = run_suite(cfg, tmp_path / "out", name="s")
    doc = json.loads(path.read_text())
    assert doc["units_run"] == 2 and doc["selection_split"] == "validation"
    files = sorted(p.name for p in units_dir(cfg).iterdir())
    assert files == ["digits_a__seed0.json", "digits_a__seed1.json"]
    units = [json.loads((units_dir(cfg) / f).read_text()) for f in files]
    mean = (units[0]["methods"]["nifcl"]["new/old"]["test"]["top1"] + units[1]["methods"]["nifcl"]["new/old"]["test"]["top1"]) / 2
    assert doc["protocols"]["digits_a"]["methods"]["nifcl"]["new/old"]["top1"] == pytest.approx(mean)

    # Nothing missing: nothing runs, the same numbers.
    again = json.loads(run_suite(cfg, tmp_path / "out", name="s").read_text())
    assert again["units_run"] == 0 and again["protocols"] == doc["protocols"]

    # A unit lost (a crash mid-write leaves no file) and one from another config: only those run again.
    (units_dir(cfg) / "digits_a__seed1.json").unlink()
    stale = json.loads((units_dir(cfg) / "digits_a__seed0.json").read_text())
    stale["fingerprint"] = "0" * 64
    (units_dir(cfg) / "digits_a__seed0.json").write_text(json.dumps(stale))
    third = json.loads(run_suite(cfg, tmp_path / "out", name="s").read_text())
    assert third["units_run"] == 2 and third["protocols"] == doc["protocols"]

    # A new protocol: only its units run; the measured ones are kept.
    grown = from_dict(SuiteConfig, {**TINY, "output_dir": str(tmp_path / "run"),
                                    "protocols": {**TINY["protocols"],
                                                  "digits_box": {"dataset": "digits", "kind": "random_box",
                                                                 "box_dim": 8}}})
    fourth = json.loads(run_suite(grown, tmp_path / "out", name="s").read_text())
    assert fourth["units_run"] == 2 and fourth["protocols"]["digits_a"] == doc["protocols"]["digits_a"]
    # An untrained box has no old classifier and no old training images: no bct, no fct+side.
    assert set(fourth["protocols"]["digits_box"]["methods"]) == {"independent", "nifcl"}
    assert (tmp_path / "out" / "s.md").read_text().startswith("# Protocol suite")
