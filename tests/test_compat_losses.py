"""Losses vs hand-written formulas on small tensors."""

import math

import pytest
import torch

from raycompat.compat.losses import (InfluenceLoss, L2CompatLoss, OldNeighborLoss, PrototypeAlignmentLoss,
                                     compatible_slice, cosine_logits, cosine_softmax_loss)
from raycompat.compat.losses.old_neighbors import spread
from raycompat.errors import ConfigError, DataError


def _unit(v):
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def _hand_logits(feat, weight, scale):
    return [[scale * sum(a * b for a, b in zip(_unit(f), _unit(w))) for w in weight] for f in feat]


def _hand_ce(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels):
        total += -row[y] + math.log(sum(math.exp(v) for v in row))
    return total / len(labels)


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 6, generator=g, dtype=torch.float64),
            torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.tensor([0, 2, 1, 2, 0]))


def test_cosine_logits_and_loss_match_hand_formula(small):
    feat, _, labels = small
    weight = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hand = _hand_logits(feat.tolist(), weight.tolist(), 16.0)
    torch.testing.assert_close(cosine_logits(feat, weight, 16.0), torch.tensor(hand, dtype=torch.float64))
    weight.requires_grad_()
    loss = cosine_softmax_loss(feat, weight, labels, 16.0)
    assert loss.item() == pytest.approx(_hand_ce(hand, labels.tolist()), rel=1e-10)
    loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_compatible_slice_takes_first_dims_and_rejects_wider_old():
    x = torch.arange(12.0).reshape(2, 6)
    torch.testing.assert_close(compatible_slice(x, 4), x[:, :4])
    assert compatible_slice(x, 6).data_ptr() == x.data_ptr()  # a view, not a copy
    with pytest.raises(ConfigError, match="6 dims, fewer than the old features' 8"):
        compatible_slice(x, 8)
    with pytest.raises(ConfigError):
        compatible_slice(x, 0)


def test_influence_ce_slices_new_features(small):
    feat, weight, labels = small  # d_new = 6 > d_old = 4
    loss = InfluenceLoss(weight, scale=20.0)(feat, labels=labels)
    hand = _hand_ce(_hand_logits(feat[:, :4].tolist(), weight.tolist(), 20.0), labels.tolist())
    assert loss.item() == pytest.approx(hand, rel=1e-5)


def test_influence_kl_to_soft_targets(small):
    feat, weight, _ = small
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.9, 0.1]])
    loss = InfluenceLoss(weight, scale=10.0)(feat, soft_targets=soft)
    logits = _hand_logits(feat[:, :4].tolist(), weight.tolist(), 10.0)
    hand = 0.0
    for row, p in zip(logits, soft.tolist()):
        logz = math.log(sum(math.exp(v) for v in row))
        hand += sum(pi * (math.log(pi) - (v - logz)) for pi, v in zip(p, row) if pi > 0)
    assert loss.item() == pytest.approx(hand / len(logits), rel=1e-5)


def test_influence_weight_is_frozen_and_feature_gets_gradient(small):
    feat, weight, labels = small
    loss_fn = InfluenceLoss(weight, scale=16.0)
    assert list(loss_fn.parameters()) == [] and "weight" in loss_fn.state_dict()
    feat = feat.clone().requires_grad_()
    loss_fn(feat, labels=labels).backward()
    assert loss_fn.weight.grad is None
    assert feat.grad[:, :4].abs().sum() > 0 and feat.grad[:, 4:].abs().sum() == 0


def test_influence_errors(small):
    feat, weight, labels = small
    loss_fn = InfluenceLoss(weight, scale=16.0)
    with pytest.raises(ConfigError, match="exactly one"):
        loss_fn(feat)
    with pytest.raises(ConfigError, match="exactly one"):
        loss_fn(feat, labels=labels, soft_targets=torch.ones(5, 3) / 3)
    with pytest.raises(DataError, match="soft_targets must have shape"):
        loss_fn(feat, soft_targets=torch.ones(5, 4) / 4)
    with pytest.raises(ConfigError, match="fewer than the old"):
        loss_fn(feat[:, :3], labels=labels)
    with pytest.raises(ConfigError):
        InfluenceLoss(weight, scale=0.0)
    with pytest.raises(DataError):
        InfluenceLoss(torch.full((2, 4), float("nan")), scale=1.0)


def test_l2_loss_matches_hand_formula(small):
    feat, _, _ = small
    old = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hand = 0.0
    for f, o in zip(feat[:, :4].tolist(), old.tolist()):
        hand += sum((a - b) ** 2 for a, b in zip(_unit(f), _unit(o)))
    assert L2CompatLoss()(feat, old).item() == pytest.approx(hand / 5, rel=1e-10)
    # Zero when the first d_old dims point where the old feature points, whatever the rest.
    same = torch.cat([3.0 * old, torch.randn(5, 2, dtype=torch.float64)], dim=1)
    assert L2CompatLoss()(same, old).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError):
        L2CompatLoss()(feat[:, :3], old)
    with pytest.raises(DataError):
        L2CompatLoss()(feat, old[:4])


def test_prototype_alignment_matches_hand_formula(small):
    feat, weight, labels = small
    hand = sum(1 - sum(a * b for a, b in zip(_unit(f[:4]), _unit(weight[y].tolist())))
               for f, y in zip(feat.tolist(), labels.tolist())) / 5
    assert PrototypeAlignmentLoss(weight)(feat, labels=labels).item() == pytest.approx(hand, rel=1e-6)


def test_prototype_alignment_soft_targets_mix_unit_prototypes(small):
    feat, weight, labels = small
    soft = torch.softmax(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), dim=1)
    units = [_unit(w) for w in weight.tolist()]
    hand = 0.0
    for f, q in zip(feat.tolist(), soft.tolist()):
        target = [sum(q[c] * units[c][j] for c in range(3)) for j in range(4)]
        hand += 1 - sum(a * b for a, b in zip(_unit(f[:4]), _unit(target)))
    loss = PrototypeAlignmentLoss(weight)
    assert loss(feat, soft_targets=soft).item() == pytest.approx(hand / 5, rel=1e-6)
    # One-hot soft targets are the hard labels.
    assert loss(feat, soft_targets=torch.nn.functional.one_hot(labels, 3).double()).item() == pytest.approx(
        loss(feat, labels=labels).item(), rel=1e-6)


def test_prototype_alignment_is_zero_on_the_prototype_and_frozen(small):
    _, weight, labels = small
    on_target = torch.cat([3.0 * weight[labels], torch.randn(5, 2, dtype=torch.float64)], dim=1).requires_grad_()
    loss = PrototypeAlignmentLoss(weight)
    value = loss(on_target, labels=labels)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    value.backward()
    assert not loss.weight.requires_grad
    with pytest.raises(ConfigError, match="exactly one"):
        loss(on_target)
    with pytest.raises(DataError, match="soft_targets must have shape"):
        loss(on_target, soft_targets=torch.ones(5, 4) / 4)
    with pytest.raises(DataError, match="NaN"):
        PrototypeAlignmentLoss(torch.full((2, 4), float("nan")))


def _hand_old_neighbors(feat, idx, labels, old, old_labels, scale, candidates):
    """Item by item: -log(sum over same-class candidates / sum over all candidates), own item left out."""
    total, n = 0.0, 0
    for f, i, y in zip(feat, idx, labels):
        pos = every = 0.0
        for j in candidates:
            if j == i:
                continue
            e = math.exp(scale * sum(a * b for a, b in zip(_unit(f[:len(old[j])]), _unit(old[j]))))
            every += e
            pos += e if old_labels[j] == y else 0.0
        if pos > 0:
            total, n = total - math.log(pos / every), n + 1
    return total / n


@pytest.fixture
def neighborhood():
    g = torch.Generator().manual_seed(7)
    old = torch.randn(12, 4, generator=g, dtype=torch.float64)
    old_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 3])  # class 3: one member only
    new = torch.randn(5, 6, generator=g, dtype=torch.float64)
    return new, torch.tensor([0, 4, 11, 7, 2]), old, old_labels


def test_old_neighbors_matches_hand_formula_and_leaves_own_item_out(neighborhood):
    new, idx, old, old_labels = neighborhood
    y = old_labels[idx]
    loss = OldNeighborLoss(old, old_labels, scale=8.0)
    # Item 11 is the only member of class 3: no other candidate shares its class, so it is left out.
    hand = _hand_old_neighbors(new.tolist(), idx.tolist(), y.tolist(), old.tolist(), old_labels.tolist(), 8.0,
                               range(12))
    assert loss(new, idx, y).item() == pytest.approx(hand, rel=1e-5)
    # A bank draws a subset of candidates, the same for the same batch; the formula holds on it.
    banked = OldNeighborLoss(old, old_labels, scale=8.0, bank=7, seed=3)
    cand = banked.candidates(idx)
    assert len(cand) == 7 and torch.equal(cand, banked.candidates(idx)) and len(set(cand.tolist())) == 7
    hand = _hand_old_neighbors(new.tolist(), idx.tolist(), y.tolist(), old.tolist(), old_labels.tolist(), 8.0,
                               cand.tolist())
    assert banked(new, idx, y).item() == pytest.approx(hand, rel=1e-5)
    assert torch.equal(OldNeighborLoss(old, old_labels, 8.0, bank=50).candidates(idx), torch.arange(12))


def _hand_instance_neighbors(feat, idx, old, old_labels, scale, k, candidates, pool=None):
    """Item by item: targets = item i's k nearest same-class old features (by its own old feature) among
    ``pool`` (default all), softmax-weighted at ``scale``; loss = -sum_j p_ij log q_ij, q over the
    candidates without i."""
    total, n = 0.0, 0
    pool = range(len(old)) if pool is None else pool
    for f, i in zip(feat, idx):
        mates = [j for j in pool if j != i and old_labels[j] == old_labels[i]]
        if not mates:
            continue
        cos_old = {j: sum(a * b for a, b in zip(_unit(old[i]), _unit(old[j]))) for j in mates}
        mates = sorted(mates, key=lambda j: -cos_old[j])[:k]
        z = sum(math.exp(scale * cos_old[j]) for j in mates)
        q = {j: scale * sum(a * b for a, b in zip(_unit(f[:len(old[j])]), _unit(old[j]))) for j in range(len(old))}
        log_z = math.log(sum(math.exp(q[j]) for j in candidates if j != i))
        total -= sum(math.exp(scale * cos_old[j]) / z * (q[j] - log_z) for j in mates)
        n += 1
    return total / n


def test_old_neighbors_instance_targets_match_hand_formula(neighborhood):
    new, idx, old, old_labels = neighborhood
    y = old_labels[idx]
    for k in (1, 2, 10, 0):  # 10: more than any class has, the missing targets weigh 0; 0: every class-mate
        loss = OldNeighborLoss(old, old_labels, scale=8.0, targets="old_neighbors", k=k)
        hand = _hand_instance_neighbors(new.tolist(), idx.tolist(), old.tolist(), old_labels.tolist(), 8.0,
                                        k or 12, range(12))
        assert loss(new, idx, y).item() == pytest.approx(hand, rel=1e-6)
    banked = OldNeighborLoss(old, old_labels, scale=8.0, bank=7, seed=3, targets="old_neighbors", k=2)
    hand = _hand_instance_neighbors(new.tolist(), idx.tolist(), old.tolist(), old_labels.tolist(), 8.0, 2,
                                    banked.candidates(idx).tolist())
    assert banked(new, idx, y).item() == pytest.approx(hand, rel=1e-6)
    # k 0 with a bank: the targets are the item's class-mates among the candidates.
    banked = OldNeighborLoss(old, old_labels, scale=8.0, bank=7, seed=3, targets="old_neighbors")
    cand = banked.candidates(idx).tolist()
    hand = _hand_instance_neighbors(new.tolist(), idx.tolist(), old.tolist(), old_labels.tolist(), 8.0, 12, cand,
                                    pool=cand)
    assert banked(new, idx, y).item() == pytest.approx(hand, rel=1e-6)
    # The instance target is not the class target: on its old nearest class-mate a feature scores lower
    # than on its farthest one, where the class target cannot tell them apart by more than their logits.
    inst = OldNeighborLoss(old, old_labels, scale=8.0, targets="old_neighbors", k=1)
    i = 0
    mates = [j for j in range(12) if j != i and old_labels[j] == old_labels[i]]
    cos = torch.nn.functional.normalize(old, dim=1)
    near, far = max(mates, key=lambda j: cos[i] @ cos[j]), min(mates, key=lambda j: cos[i] @ cos[j])
    pad = torch.zeros(1, 2, dtype=torch.float64)
    on = lambda j: torch.cat([old[j:j + 1], pad], dim=1)  # noqa: E731
    assert inst(on(near), torch.tensor([i]), y[:1]) < inst(on(far), torch.tensor([i]), y[:1])
    with pytest.raises(ConfigError, match="targets must be"):
        OldNeighborLoss(old, old_labels, scale=1.0, targets="items")
    with pytest.raises(ConfigError, match="k must be >= 0"):
        OldNeighborLoss(old, old_labels, scale=1.0, targets="old_neighbors", k=-1)


def test_old_neighbors_is_lower_among_own_class_and_frozen(neighborhood):
    _, idx, old, old_labels = neighborhood
    idx, y = idx[[0, 1, 3, 4]], old_labels[idx[[0, 1, 3, 4]]]
    loss = OldNeighborLoss(old, old_labels, scale=16.0)
    # On another member of its class (not itself) vs on a member of another class.
    same = {0: 3, 4: 1, 7: 0, 2: 5}
    other = {0: 1, 4: 2, 7: 2, 2: 0}
    among_own = torch.cat([old[[same[i] for i in idx.tolist()]], torch.zeros(4, 2, dtype=torch.float64)], dim=1)
    among_other = torch.cat([old[[other[i] for i in idx.tolist()]], torch.zeros(4, 2, dtype=torch.float64)], dim=1)
    among_own.requires_grad_()
    value = loss(among_own, idx, y)
    assert value < loss(among_other, idx, y)
    value.backward()
    assert torch.isfinite(among_own.grad).all() and not loss.feats.requires_grad


def test_old_neighbors_without_any_valid_item_is_zero_with_finite_gradient(neighborhood):
    new, _, old, old_labels = neighborhood
    lone = new[:1].clone().requires_grad_()
    value = OldNeighborLoss(old, old_labels, scale=16.0)(lone, torch.tensor([11]), torch.tensor([3]))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(lone.grad).all()


def test_old_neighbors_bad_input(neighborhood):
    new, idx, old, old_labels = neighborhood
    with pytest.raises(ConfigError, match="scale must be positive"):
        OldNeighborLoss(old, old_labels, scale=0.0)
    with pytest.raises(ConfigError, match="bank must be >= 0"):
        OldNeighborLoss(old, old_labels, scale=1.0, bank=-1)
    with pytest.raises(DataError, match="labels must be class indices of shape"):
        OldNeighborLoss(old, old_labels[:5], scale=1.0)
    with pytest.raises(DataError, match="NaN or inf"):
        OldNeighborLoss(torch.full((3, 4), float("inf")), old_labels[:3], scale=1.0)
    with pytest.raises(DataError, match="idx and labels must have shape"):
        OldNeighborLoss(old, old_labels, scale=1.0)(new, idx[:3], old_labels[idx[:3]])
    with pytest.raises(ConfigError, match="fewer than the old features"):
        OldNeighborLoss(old, old_labels, scale=1.0)(new[:, :3], idx, old_labels[idx])


def test_old_neighbors_relative_scale_is_the_same_for_a_cone_of_old_features(neighborhood):
    new, idx, old, old_labels = neighborhood
    y = old_labels[idx]
    unit = old / old.norm(dim=1, keepdim=True)
    sigma = math.sqrt(sum(sum((a - m) ** 2 for a, m in zip(row, unit.mean(dim=0).tolist())) for row in unit.tolist())
                      / len(unit))
    assert spread(unit) == pytest.approx(sigma, rel=1e-9)
    loss = OldNeighborLoss(old, old_labels, scale=4.0, relative=True)
    assert loss.scale == pytest.approx(4.0 / sigma, rel=1e-6)  # the buffer is float32
    hand = _hand_old_neighbors(new.tolist(), idx.tolist(), y.tolist(), old.tolist(), old_labels.tolist(), 4.0 / sigma,
                               range(12))
    assert loss(new, idx, y).item() == pytest.approx(hand, rel=1e-5)
    # The same old features squeezed into a narrow cone around a shared axis (as an untrained box's
    # ReLU features are), queries off the axis: the fixed scale's loss flattens towards the uniform
    # one, the relative scale's stays what it was on the spread features.
    uniform = _hand_old_neighbors(new.tolist(), idx.tolist(), y.tolist(), old.tolist(), old_labels.tolist(), 0.0,
                                  range(12))
    spread_loss = OldNeighborLoss(unit, old_labels, scale=4.0, relative=True)(new[:, :4], idx, y).item()
    for eps in (0.1, 0.01):
        cone = torch.cat([torch.ones(12, 1, dtype=torch.float64), eps * unit], dim=1)
        query = torch.cat([torch.zeros(5, 1, dtype=torch.float64), new[:, :4]], dim=1)
        assert OldNeighborLoss(cone, old_labels, 4.0, relative=True)(query, idx, y).item() == pytest.approx(
            spread_loss, rel=1e-5)
        assert abs(OldNeighborLoss(cone, old_labels, 4.0)(query, idx, y).item() - uniform) < 0.04
    assert abs(spread_loss - uniform) > 0.5
    with pytest.raises(DataError, match="no spread"):
        OldNeighborLoss(torch.ones(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), 1.0, relative=True)
