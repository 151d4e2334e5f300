"""Gradient-masking checks that follow every labelled white-box evaluation.

A defence can look robust because its gradients are useless (shattered, vanishing or obfuscated), not
because it is robust (Athalye, Carlini & Wagner, "Obfuscated gradients give a false sense of security",
ICML 2018). Following AutoAttack (Croce & Hein, ICML 2020), which adds a black-box attack to its white-box
ones, :class:`MaskingChecks` runs three checks on the inputs a white-box threat was evaluated on:

``loss_rise``  the attacked loss must rise over the iterations: per image, the mean cross-entropy of some
               gradient member (whose objective does not vanish on fooled pixels: not APGD with masked
               CE or masked spherical loss) must end above where it started. Fires for an image where
               none rose: the gradients did not lead anywhere.
``square``     a query-based black-box attack (:class:`robustness.attacks.Square`, a fixed number of
               queries) in the same eps-ball on the same modalities. Fires for an image where it beats
               the white-box worst case (lower pixel accuracy): a gradient-free search should never win.
``transfer``   adversarial inputs crafted on a surrogate model (e.g. the same architecture trained
               without adversarial training; any model with the same call signature) with a threat model
               (default ``sea-lite``) and applied to the evaluated model. Fires when it beats the
               white-box worst case on an image. Skipped without a surrogate.

Whatever fires, the returned worst case per image is the worst of the white-box result and the two
attacks' results (lexicographic: pixel accuracy, then CE), so the reported number includes them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from robustness.attacks import APGD, MODALITIES, Attack, Square, model_guard, seg_scores

__all__ = ["MaskingChecks", "CHECKS", "loss_rose", "rising_members", "summarise"]

log = logging.getLogger(__name__)

CHECKS: dict[str, str] = {
    "loss_rise": "the attacked loss (mean cross-entropy) rises over the iterations of some gradient attack",
    "square": "a query-based black-box attack (Square, random search) does not beat the white-box worst case",
    "transfer": "inputs attacked on a surrogate model do not beat the white-box worst case",
}
_MASKED_LOSSES = ("mce", "msl")  # their objective is 0 once every pixel is fooled: no rise expected


def rising_members(attack: Any) -> list[Attack]:
    """The gradient attacks of ``attack`` (an Attack or a WorstCase) whose loss should keep rising."""
    members = list(getattr(attack, "attacks", [attack]))
    return [a for a in members if isinstance(a, Attack) and not isinstance(a, Square) and a.steps > 0
            and not (isinstance(a, APGD) and a.seg_loss in _MASKED_LOSSES)]


def loss_rose(attack: Any, rtol: float = 1e-3, atol: float = 1e-4) -> Tensor | None:
    """Per image (B,) bool: did the mean CE of some rising member exceed its starting value?

    Uses ``last_trace`` of the last call (every restart); ``rise > atol + rtol * |CE at the start|``.
    Returns None when no member qualifies (e.g. only masked losses).
    """
    rose = None
    for a in rising_members(attack):
        for trace in a.last_trace:
            ce = trace["ce"]  # (T + 1, B): the start, every iterate, the final point
            up = ce.max(0).values - ce[0] > atol + rtol * ce[0].abs()
            rose = up if rose is None else rose | up
    return rose


def _worse(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """(B,) bool: scores ``a`` are worse for the model than ``b`` (higher error, ties higher CE)."""
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] > b[1]))


class MaskingChecks:
    """The three gradient-masking checks of the module docstring, bound to the evaluated model.

    Args:
        model: the evaluated model (``model(ir, vis)`` -> ``.logits``).
        eps: the white-box threat's L-inf budget; the black-box and transfer attacks use the same ball.
        targets: the perturbed modalities of the white-box threat.
        queries: Square's query budget per image (one forward each).
        p_init: Square's initial window fraction.
        surrogate: a model to craft transfer attacks on, or None (the transfer check is skipped).
        transfer: ``surrogate -> attack`` builder, e.g. ``lambda m: build_threat("sea-lite", m, eps=eps)``.
        seed: Square's seed (reproducible).
        ignore_index: label value excluded from the scores.
    """

    def __init__(self, model: nn.Module, eps: float, targets: Sequence[str] = MODALITIES, *, queries: int = 100,
                 p_init: float = 0.3, surrogate: nn.Module | None = None,
                 transfer: Callable[[nn.Module], Any] | None = None, seed: int = 0, ignore_index: int = 255) -> None:
        if surrogate is not None and transfer is None:
            raise ValueError("expected a transfer attack builder with a surrogate model, got transfer=None")
        self.model, self.eps, self.ignore_index = model, float(eps), int(ignore_index)
        self.square = Square(model, eps, steps=queries, p_init=p_init, targets=targets, seed=seed,
                             ignore_index=ignore_index)
        self.transfer = transfer(surrogate) if surrogate is not None else None
        self.surrogate = surrogate

    def config(self) -> dict[str, Any]:
        return {"square": self.square.config(),
                "transfer": None if self.transfer is None else self.transfer.config()}

    def budget(self) -> dict[str, int]:
        """Passes per image on the evaluated model (Square, scoring) and on the surrogate (transfer)."""
        scoring = 2 + (self.transfer is not None)  # the white-box, Square and transfer results
        out = {"forward": self.square.budget()["forward"] + scoring, "backward": 0}
        if self.transfer is not None:
            t = self.transfer.budget()
            out.update(surrogate_forward=t["forward"], surrogate_backward=t["backward"])
        return out

    def _scores(self, ir: Tensor, vis: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad(), model_guard(self.model, "eval"):
            return seg_scores(self.model(ir, vis).logits, label, self.ignore_index)

    def __call__(self, ir: Tensor, vis: Tensor, label: Tensor, adv: tuple[Tensor, Tensor], white_box: Any
                 ) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor | None]]:
        """Run the checks on one labelled batch.

        Args:
            ir, vis: the clean inputs (B, C, H, W) in [0, 1]; label: (B, H, W) int64.
            adv: the white-box worst case (ir_adv, vis_adv) of ``white_box`` on this batch.
            white_box: the attack that produced ``adv`` (its ``last_trace`` feeds ``loss_rise``).
        Returns:
            ((ir_worst, vis_worst), flags): the per-image worst of white-box, Square and transfer inputs;
            ``flags[check]`` is a (B,) bool tensor, True where the check FIRED (None: not run).
        """
        rose = loss_rose(white_box)
        flags: dict[str, Tensor | None] = {"loss_rise": None if rose is None else ~rose}
        best = [t.clone() for t in adv]
        best_score = white = self._scores(*adv, label)
        others: list[tuple[str, Any]] = [("square", self.square)]
        if self.transfer is not None:
            others.append(("transfer", self.transfer))
        flags["transfer"] = None
        for name, attack in others:
            cand = attack(ir, vis, label)
            s = self._scores(*cand, label)
            flags[name] = s[0] > white[0]  # a strictly lower pixel accuracy than the white-box worst case
            take = _worse(s, best_score)
            for b, c in zip(best, cand):
                b[take] = c[take]
            best_score = tuple(torch.where(take, x, y) for x, y in zip(s, best_score))
        return (best[0], best[1]), flags


def summarise(counts: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
    """Report entries from per-check counts ``{check: {"fired": n, "images": m}}`` (None checks skipped)."""
    out = []
    for name, what in CHECKS.items():
        c = counts.get(name)
        if c is None:
            out.append({"check": name, "what": what, "status": "skipped", "fired_images": 0, "images": 0})
            continue
        status = "FIRED" if c["fired"] > 0 else "passed"
        out.append({"check": name, "what": what, "status": status, "fired_images": c["fired"],
                    "images": c["images"]})
    return out
