"""The chain cost plan over a 3-generation horizon against hand-computed costs, times and qualities."""

from __future__ import annotations

import json

import pytest

from raycompat.backfill.chain_document import chain_blocks, pays_off_sentence, write_chain_plan
from raycompat.backfill.chain_plan import (
    Action,
    ChainCosts,
    ChainPolicy,
    chain_plan,
    threshold_policy,
    uniform_policies,
)
from raycompat.backfill.config import CostInputsConfig, GalleryConfig, NodeCostConfig, NodeTypeConfig
from raycompat.configio import from_dict
from raycompat.errors import ConfigError

# 1000 items; 2 GPU nodes at $3.60/h each = $0.002/s in all. Per node: the backbone does 10 images/s
# (reading 1 kB at 1 MB/s would allow 1000/s: compute bound), h does 100 vectors/s (100 B each: io
# would allow 10000/s). Cluster: re-embeds 20 items/s, transforms 200 vectors/s.
#   full backfill: 1000 / 20 = 50 s, $0.10, 2 x 50 / 3600 GPU node-hours
#   partial 30%:    300 / 20 = 15 s, $0.03
#   fct:           1000 / 200 = 5 s, $0.01
COSTS = {
    "gallery": {"size": "1e3", "bytes_per_image": "1 kB", "bytes_per_vector": 100},
    "cluster": [{"name": "gpu", "accelerator": "gpu", "count": 2, "dollars_per_hour": 3.6}],
    "costs": {"source": "hand-made", "nodes": {"gpu": {"backbone_images_per_s": 10, "transform_vectors_per_s": 100,
                                                        "read_bandwidth": "1 MB/s"}}},
}
# top-1 of the chain: generation 1 stays above 65 on generation 0's gallery, generation 2 does not.
M = [[70.0], [66.0, 75.0], [58.0, 72.0, 80.0]]


def costs() -> ChainCosts:
    return from_dict(ChainCosts, COSTS)


def by_name(doc):
    return {p["name"]: p for p in doc["policies"]}


def test_uniform_policies_costs_and_quality():
    doc = chain_plan(costs(), M, uniform_policies(3, partial_fraction=0.3))
    p = by_name(doc)
    assert list(p) == ["always compatible", "always fct", "always partial 30%", "always full"]
    assert doc["cluster"]["reembed_items_per_s"] == pytest.approx(20.0)
    assert doc["cluster"]["transform_vectors_per_s"] == pytest.approx(200.0)

    full = p["always full"]
    assert [s["seconds"] for s in full["steps"]] == pytest.approx([50.0, 50.0])
    assert [s["dollars"] for s in full["steps"]] == pytest.approx([0.1, 0.1])
    assert [s["cumulative_dollars"] for s in full["steps"]] == pytest.approx([0.1, 0.2])
    assert [s["cumulative_seconds"] for s in full["steps"]] == pytest.approx([50.0, 100.0])
    assert full["total"]["items_reembedded"] == pytest.approx(2000.0)
    assert full["total"]["node_hours"]["gpu"] == pytest.approx(2 * 2 * 50 / 3600)
    assert full["total"]["full_backfills"] == [1, 2]
    # Each full backfill resets the gallery to its generation: the diagonal.
    assert [s["quality"] for s in full["steps"]] == [75.0, 80.0]
    assert [s["quality_source"] for s in full["steps"]] == ["M[1][1]", "M[2][2]"]

    partial = p["always partial 30%"]
    assert [s["cumulative_seconds"] for s in partial["steps"]] == pytest.approx([15.0, 30.0])
    assert partial["total"]["dollars"] == pytest.approx(0.06)
    assert partial["total"]["items_reembedded"] == pytest.approx(600.0)
    assert [s["quality"] for s in partial["steps"]] == [None, None]

    fct = p["always fct"]
    assert fct["total"]["seconds"] == pytest.approx(10.0)
    assert fct["total"]["dollars"] == pytest.approx(0.02)
    assert fct["total"]["vectors_transformed"] == pytest.approx(2000.0)
    assert fct["total"]["items_reembedded"] == 0
    assert [s["gallery_state"] for s in fct["steps"]] == ["transformed", "transformed"]
    assert [s["gallery_state"] for s in partial["steps"]] == ["mixed", "mixed"]

    compatible = p["always compatible"]
    assert compatible["total"]["seconds"] == 0 and compatible["total"]["dollars"] == 0
    # The gallery stays at generation 0: the first column.
    assert [s["quality"] for s in compatible["steps"]] == [66.0, 58.0]
    assert doc["full_backfill_pays_off"] is None


def test_full_backfill_resets_the_chain():
    policy = ChainPolicy("full then compatible", (Action("full_backfill"), Action("compatible")))
    (p,) = chain_plan(costs(), M, [policy])["policies"]
    # Generation 2 searches the gallery generation 1 re-embedded: M[2][1], not M[2][0].
    assert [s["quality"] for s in p["steps"]] == [75.0, 72.0]
    assert [s["gallery_generation"] for s in p["steps"]] == [1, 1]
    assert p["total"]["dollars"] == pytest.approx(0.1)


def test_measured_quality_where_the_gallery_mixes_generations():
    policy = ChainPolicy("partial then compatible", (Action("partial_backfill", 0.3), Action("compatible")),
                         quality=(69.0, 61.5))
    (p,) = chain_plan(costs(), M, [policy])["policies"]
    assert [(s["quality"], s["quality_source"]) for s in p["steps"]] == [(69.0, "measured"), (61.5, "measured")]
    assert [s["gallery_generation"] for s in p["steps"]] == [None, None]
    # Where the matrix gives the value a measured one would contradict it.
    clash = ChainPolicy("x", (Action("compatible"), Action("full_backfill")), quality=(None, 79.0))
    with pytest.raises(ConfigError, match=r"quality\[1\]: the gallery is all at generation 2 .* M\[2\]\[2\] gives it"):
        chain_plan(costs(), M, [clash])


@pytest.mark.parametrize(
    "required, actions, first, unmet, dollars",
    [
        # 66 >= 65 at generation 1; 58 < 65 at generation 2: back-fill there.
        (65.0, ["compatible", "full_backfill"], 2, [], 0.1),
        # 66 < 70: back-fill at 1; then M[2][1] = 72 >= 70: compatible.
        (70.0, ["full_backfill", "compatible"], 1, [], 0.1),
        # Exactly the requirement is enough.
        (66.0, ["compatible", "full_backfill"], 2, [], 0.1),
        (50.0, ["compatible", "compatible"], None, [], 0.0),
        # Even the diagonal (75, 80) misses 85: back-fill every time, both unmet.
        (85.0, ["full_backfill", "full_backfill"], 1, [1, 2], 0.2),
    ],
)
def test_when_a_full_backfill_pays_off(required, actions, first, unmet, dollars):
    assert [a.kind for a in threshold_policy(M, required).actions] == actions
    doc = chain_plan(costs(), M, [], required=required)
    r = doc["full_backfill_pays_off"]
    assert r["generation"] == first
    assert r["unmet"] == unmet
    assert r["full_backfills"] == [t for t, a in enumerate(actions, start=1) if a == "full_backfill"]
    assert by_name(doc)["threshold"]["total"]["dollars"] == pytest.approx(dollars)


def test_hand_built_sections_are_validated():
    c = ChainCosts(
        gallery=GalleryConfig(size="1e3", bytes_per_image="1 kB", bytes_per_vector=100),
        cluster=[NodeTypeConfig("gpu", "gpu", 2, 3.6)],
        costs=CostInputsConfig("hand-made", {"gpu": NodeCostConfig(10, 100, "1 MB/s")}),
    )
    doc = chain_plan(c, M, [ChainPolicy("full", (Action("full_backfill"),) * 2)])
    assert doc["policies"][0]["total"]["seconds"] == pytest.approx(100.0)
    assert doc["gallery_size"] == 1000


@pytest.mark.parametrize(
    "policies, kwargs, message",
    [
        ([ChainPolicy("a", (Action("compatible"),))], {}, r"policy 'a': expected 2 actions"),
        ([ChainPolicy("a", (Action("partial_backfill", 1.0), Action("compatible")))], {},
         r"upgrade 1: partial_backfill needs a fraction in \(0, 1\), got 1.0"),
        ([ChainPolicy("a", (Action("full_backfill", 0.5), Action("compatible")))], {}, r"full_backfill takes no fraction"),
        ([ChainPolicy("a", (Action("nothing"), Action("compatible")))], {}, r"kind 'nothing' is not one of"),
        ([ChainPolicy("a", (Action("compatible"),) * 2)] * 2, {}, r"names repeat"),
        ([ChainPolicy("a", (Action("compatible"),) * 2, quality=(1.0,))], {}, r"quality: expected 2 values"),
        ([], {}, r"at least one policy"),
        ([], {"required": float("nan")}, r"required: expected a finite quality"),
    ],
)
def test_refused(policies, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        chain_plan(costs(), M, policies, **kwargs)


def test_refuses_a_single_generation_and_unknown_node_costs():
    with pytest.raises(ConfigError, match="at least two generations"):
        chain_plan(costs(), [[70.0]], [])
    bad = json.loads(json.dumps(COSTS))
    bad["costs"]["nodes"]["cpu"] = bad["costs"]["nodes"]["gpu"]
    with pytest.raises(ConfigError, match=r"costs for unknown node type\(s\) \['cpu'\]"):
        from_dict(ChainCosts, bad)


def test_report_files_and_text(tmp_path):
    doc = chain_plan(costs(), M, uniform_policies(3, partial_fraction=0.3), required=65.0)
    html = write_chain_plan(doc, tmp_path)
    assert json.loads((tmp_path / "chain_plan.json").read_text()) == doc
    md = (tmp_path / "chain_plan.md").read_text()
    assert pays_off_sentence(doc) == ("To keep top1 >= 65.00, a full backfill first pays off at generation 2, where "
                                      "the compatible gallery falls below it (full backfills at generation(s) 2).")
    assert pays_off_sentence(doc) in md
    # The totals row of the threshold policy: one full backfill, 50 s, $0.10, final top-1 80.
    assert "| threshold | compatible, full backfill | 50 s | $0.10 | 1,000 | 0 | 80.00 |" in md
    assert "| 2 | full backfill | 50 s | $0.10 | 50 s | $0.10 | all at 2 | 80.00 (M[2][2]) |" in md
    assert "| 2 | fct | 5 s | $0.01 | 10 s | $0.02 | transformed by h | not measured |" in md
    assert html.read_text().startswith("<!DOCTYPE html>") and "threshold" in html.read_text()
    assert [b[0] for b in chain_blocks(doc)][:2] == ["h1", "p"]
