"""Every config file the README names exists, loads and validates as shipped; the backfill example runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from raycompat.cli import main
from raycompat.pipeline.config import load_pipeline_config
from raycompat.pipeline.tune_space import load_search_config

REPO = Path(__file__).resolve().parents[1]
NAMED = sorted(set(re.findall(r"(?<![\w/.])((?:raycompat/)?configs/[\w.-]+\.yaml)", (REPO / "README.md").read_text())))


def test_the_readme_names_the_demo_cluster_and_backfill_configs():
    assert {"raycompat/configs/demo.yaml", "raycompat/configs/cluster_test.yaml",
            "raycompat/configs/backfill_example_1e9.yaml"} <= set(NAMED), NAMED


@pytest.mark.parametrize("name", NAMED)
def test_readme_config_loads_and_validates(name, monkeypatch):
    path = REPO / name
    assert path.is_file(), f"README names {name}, which is not in the repository"
    monkeypatch.chdir(REPO)  # relative paths inside resolve against the checkout, as the README runs them
    data = yaml.safe_load(path.read_text())
    if "strategies" in data:
        from raycompat.backfill.config import load_backfill_config
        from raycompat.backfill.quality import load_quality
        from raycompat.backfill.strategies import plan_strategies

        cfg = load_backfill_config(path)
        plans = plan_strategies(cfg, load_quality(cfg.quality, name), name)
        assert [p.name for p in plans] == [s.name for s in cfg.strategies]
    elif "generations" in data:
        from raycompat.chain.config import load_chain_config

        assert len(load_chain_config(path).generations) >= 2
    elif "chains" in data:
        from raycompat.chain.bench_config import load_chain_bench_config

        cfg = load_chain_bench_config(path)
        assert cfg.run_config(next(iter(cfg.chains)), next(iter(cfg.methods)))
    elif "protocols" in data:
        from raycompat.configio import load_config
        from raycompat.suite.config import SuiteConfig

        cfg = load_config(path, SuiteConfig)
        assert cfg.protocols and cfg.recipe in {*cfg.methods, cfg.fit.label}
    elif "search" in data or "space" in data:
        assert load_search_config(path).space
    else:
        cfg = load_pipeline_config(path)
        assert cfg.output_dir and cfg.data.name


def test_readme_backfill_example_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    examples = [n for n in NAMED if "strategies" in yaml.safe_load((REPO / n).read_text())]
    assert examples
    for name in examples:
        out = tmp_path / Path(name).stem
        assert main(["backfill-report", "--config", name, "--out-dir", str(out)]) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert report["inputs"]["config_path"] == name and report["recommendation"]["strategy"]
        assert (out / "report.md").read_text().split("\n\n")[1].startswith("Recommendation: ")
