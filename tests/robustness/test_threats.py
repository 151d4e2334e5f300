"""Threat models: registry, eps rescaling, YAML, per-image worst case."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustness.attacks import APGD, PGD, CosPGD, SegPGD, seg_scores
from robustness.threats import (
    EPS_SWEEP, THREAT_MODELS, ThreatError, WorstCase, build_sweep, build_threat, load_threats_yaml, parse_eps,
    resolve_threat,
)

REPO = Path(__file__).resolve().parents[2]


def test_named_threats_match_the_protocols(toy):
    paif = build_threat("paif", toy)
    assert isinstance(paif, PGD) and paif.steps == 5 and paif.norm == "linf" and paif.loss == "seg"
    assert paif.eps == pytest.approx(8 / 255) and paif.alpha == pytest.approx(2 / 255)
    assert paif.targets == ("ir", "vis")
    a2r = build_threat("a2rnet", toy)
    assert a2r.eps == pytest.approx(4 / 255) and a2r.steps == 20
    old = build_threat("strong-v1", toy)
    assert isinstance(old, WorstCase)
    assert [type(a) for a in old.attacks] == [PGD, SegPGD, CosPGD]
    assert all(a.steps == 20 and a.eps == pytest.approx(8 / 255) and not a.keep_best for a in old.attacks)
    assert len({a.seed for a in old.attacks}) == 3
    sea = build_threat("sea", toy)
    assert [(type(a), a.seg_loss) for a in sea.attacks] == [(APGD, k) for k in ("ce-bal", "mce", "msl", "js")]
    assert all(a.alpha == pytest.approx(2 * 8 / 255) for a in sea.attacks)  # APGD starts at 2 eps
    strong = build_threat("strong", toy)  # SEA's losses at larger budgets + the old members, best iterates
    assert [type(a) for a in strong.attacks] == [APGD] * 4 + [PGD, SegPGD, CosPGD]
    assert [(a.seg_loss, a.steps) for a in strong.attacks[:4]] == [("ce-bal", 25), ("mce", 50), ("msl", 100),
                                                                    ("js", 100)]
    # the same seeds as `sea`: each APGD member is the run `sea` makes with that loss, only longer
    assert [a.seed for a in strong.attacks[:4]] == [a.seed for a in sea.attacks]
    assert all(a.keep_best and a.eps == pytest.approx(8 / 255) for a in strong.attacks)
    assert len({a.seed for a in strong.attacks}) == 7
    assert strong.budget()["backward"] == 25 + 50 + 100 + 100 + 60
    v2 = build_threat("strong-v2", toy)  # the previous `strong`: SEA's ensemble (25 steps each) + the old members
    assert [(type(a), a.steps) for a in v2.attacks] == [(APGD, 25)] * 4 + [(PGD, 20), (SegPGD, 20), (CosPGD, 20)]
    assert v2.budget()["backward"] == 4 * sea.attacks[0].steps + 60
    assert set(THREAT_MODELS) >= {"paif", "a2rnet", "strong", "strong-v1", "strong-v2", "sea", "sea-lite"}


def test_eps_override_scales_alpha(toy):
    a = build_threat("paif", toy, eps=4 / 255)
    assert a.eps == pytest.approx(4 / 255) and a.alpha == pytest.approx(1 / 255)
    s = build_threat("strong-v1", toy, eps="16/255")
    assert all(m.eps == pytest.approx(16 / 255) and m.alpha == pytest.approx(4 / 255) for m in s.attacks)
    s = build_threat("sea", toy, eps="4/255")
    assert all(m.eps == pytest.approx(4 / 255) and m.alpha == pytest.approx(8 / 255) for m in s.attacks)
    sweep = build_sweep("paif", toy)
    assert list(sweep) == pytest.approx(list(EPS_SWEEP))
    assert sweep[0.0].eps == 0
    assert [round(a.alpha * 255, 6) for a in sweep.values()] == [0, 0.5, 1, 2, 4]


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(" 0.5 ") == 0.5 and parse_eps(3) == 3.0
    for bad in ("-1/255", "eight", True, -0.1, "1/0x"):
        with pytest.raises(ThreatError):
            parse_eps(bad)


def _scores(model, ir, vis, label):
    with torch.no_grad():
        return seg_scores(model(ir, vis).logits, label)


def _not_better(s, ref):
    """Per image, s is at least as bad for the model as ref in lexicographic (error, CE) order."""
    return (s[0] > ref[0]) | ((s[0] == ref[0]) & (s[1] >= ref[1]))


def test_strong_is_per_image_at_least_as_strong_as_each_member(batch, toy_cls):
    torch.manual_seed(0)
    model = toy_cls().eval()
    ir, vis, label = batch["ir"], batch["vis"], batch["label"]
    spec = {"attack": "worst_case", "members": [
        {"attack": a, "eps": "8/255", "alpha": "2/255", "steps": 6, "seed": i}
        for i, a in enumerate(("pgd", "segpgd", "cospgd"))]}
    strong = build_threat(spec, model)
    ir_adv, vis_adv = strong(ir, vis, label)
    assert (ir_adv - ir).abs().max() <= 8 / 255 + 1e-6 and (vis_adv - vis).abs().max() <= 8 / 255 + 1e-6
    s = _scores(model, ir_adv, vis_adv, label)
    assert _not_better(s, _scores(model, ir, vis, label)).all()
    member_scores = []
    for member in strong.attacks:  # same seeds -> the same adversarial candidates
        member_scores.append(_scores(model, *member(ir, vis, label), label))
        assert _not_better(s, member_scores[-1]).all()
    # and the returned pair is one of the candidates: its scores equal the chosen member's
    for i, c in enumerate(strong.last_choice.tolist()):
        if c >= 0:
            assert s[0][i] == member_scores[c][0][i] and s[1][i] == pytest.approx(member_scores[c][1][i].item())
    # the default strong threat runs too, and the model is left in its mode
    model.train()
    build_threat("strong", model, eps=2 / 255, steps=2)(ir, vis, label)
    assert model.training


def test_worst_case_loss_criterion_and_fusion_variant(toy, batch):
    wc = build_threat({"attack": "worst_case", "criterion": "loss", "members": [
        {"attack": "pgd", "eps": "8/255", "steps": 3, "seed": 0},
        {"attack": "fgsm", "eps": "8/255"}]}, toy)
    ir_adv, _ = wc(batch["ir"], batch["vis"], batch["label"])
    assert not torch.equal(ir_adv, batch["ir"])
    fus = build_threat("strong-v1", toy, loss="fusion", eps=4 / 255)
    assert all(type(a) is PGD and a.loss == "fusion" for a in fus.attacks)
    assert len({a.seed for a in fus.attacks}) == 3
    sea = build_threat("sea", toy, loss="fusion", steps=2)  # APGD keeps its schedule on the fused-image distance
    assert all(type(a) is APGD and a.loss == "fusion" for a in sea.attacks)
    sea(batch["ir"], batch["vis"])
    ir_adv, vis_adv = fus(batch["ir"], batch["vis"])  # no labels
    assert (vis_adv - batch["vis"]).abs().max() <= 4 / 255 + 1e-6
    with torch.no_grad():
        clean = toy(batch["ir"], batch["vis"]).fused_y
        d = (toy(ir_adv, vis_adv).fused_y - clean).square().flatten(1).mean(1)
    assert (d > 0).all()
    paif_fusion = build_threat("paif", toy, loss="fusion")
    assert paif_fusion.loss == "fusion"
    paif_fusion(batch["ir"], batch["vis"])


def test_worst_case_errors(toy, toy_cls):
    with pytest.raises(ValueError, match="same model"):
        WorstCase([PGD(toy), PGD(toy_cls())])
    with pytest.raises(ValueError, match="same loss"):
        WorstCase([PGD(toy), PGD(toy, loss="fusion")])
    with pytest.raises(ValueError, match="criterion"):
        WorstCase([PGD(toy)], criterion="miou")


def test_example_yaml_loads_and_builds(toy, batch):
    reg = load_threats_yaml(REPO / "configs" / "threats.yaml")
    assert {"paif", "strong", "ir_only", "l2_both", "strong_ir"} <= set(reg)
    for name in reg:
        build_threat(name, toy, registry=reg)
    ir_adv, vis_adv = build_threat("ir_only", toy, registry=reg, eps=2 / 255)(batch["ir"], batch["vis"], batch["label"])
    assert torch.equal(vis_adv, batch["vis"])
    l2 = build_threat("l2_both", toy, registry=reg)
    assert l2.norm == "l2" and l2.eps == 1.0


@pytest.mark.parametrize("body, match", [
    ("threats:\n  x: {attack: pgd, eps: 8/255, steps: 5, stepz: 3}\n", "unknown keys.*stepz"),
    ("threats:\n  x: {attack: pgdd, eps: 8/255, steps: 5}\n", "expected attack in"),
    ("threats:\n  x: {attack: pgd, steps: 5}\n", "missing key 'eps'"),
    ("threats:\n  x: {attack: pgd, eps: -8/255, steps: 5}\n", "x.eps"),
    ("threats:\n  x: {attack: pgd, eps: 8/255, steps: 5, norm: l1}\n", "x.norm"),
    ("threats:\n  x: {attack: pgd, eps: 8/255, steps: 5, targets: [rgb]}\n", "x.targets"),
    ("threats:\n  x: {attack: pgd, eps: 8/255, steps: five}\n", "steps"),
    ("threats:\n  paif: {attack: pgd, eps: 8/255, steps: 5}\n", "redefines a built-in"),
    ("threats:\n  x: {attack: worst_case, members: []}\n", "members"),
    ("threats:\n  x: {attack: worst_case, members: [{attack: pgd, eps: 1, steps: 1, bad: 1}]}\n", r"members\[0\].*bad"),
    ("attacks: {}\n", "top-level key 'threats'"),
    ("threats: [\n", "invalid YAML"),
])
def test_yaml_validation_errors(tmp_path, body, match):
    p = tmp_path / "threats.yaml"
    p.write_text(body)
    with pytest.raises(ThreatError, match=match) as e:
        load_threats_yaml(p)
    assert str(p) in str(e.value)


def test_unknown_threat_and_bad_loss(toy):
    with pytest.raises(ThreatError, match="unknown threat model 'pgd100'.*paif"):
        build_threat("pgd100", toy)
    with pytest.raises(ThreatError, match="loss"):
        build_threat("paif", toy, loss="dice")
    with pytest.raises(ThreatError, match="missing path"):
        load_threats_yaml("/nonexistent/threats.yaml")
    spec = resolve_threat({"attack": "pgd", "eps": "4/255", "steps": 10})
    assert spec["alpha"] == pytest.approx(2.5 * 4 / 255 / 10)
