"""Adaptive adversarial training (AAT): Reptile pretext initialisation and the adaptive ε sampler.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979), §3.3. The paper describes AAT only in a figure; this is
the reconstruction of ``DESIGN.md`` §7:

1. **Pretext initialisation** (Reptile: Nichol et al., "On First-Order Meta-Learning Algorithms", 2018).
   The tasks are attacks of growing strength (ε = 2, 4, 8 /255). From the weights θ, each task k runs
   ``n`` inner optimiser steps on ``L(u) + λ·L(u + δ_εk)`` starting at θ and ends at θ_k; the outer
   update moves θ toward the mean task weights: ``θ ← θ + β·(mean_k θ_k − θ)``.
2. **Online adversarial training** from that initialisation: every batch draws its ε from the tasks with
   probabilities that grow with each task's weakness (:class:`AdaptiveEpsSampler`): its running robust gap
   (adversarial minus clean loss) per unit of budget, so the model trains most where it is weakest relative
   to the attack's strength. (The raw adversarial loss would not do: it grows with ε whatever the model,
   so it would always favour the largest budget.)

Everything here works on generic callables (a model, an ``objective(model, batch, eps)``, a batch source),
so it is tested with toy models; ``trainer.module`` plugs in the fusion + segmentation pipeline.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from trainer.finite import StepGuard, grad_norm

__all__ = [
    "PROB_MODES", "INNER_OPTIMIZERS", "AATConfig", "AdaptiveEpsSampler", "mix_seed",
    "reptile_outer_update", "reptile_meta_step", "pretext_initialise", "snapshot", "load_snapshot",
]

log = logging.getLogger(__name__)

PROB_MODES = ("softmax", "proportional", "uniform")
INNER_OPTIMIZERS = ("sgd", "adam")

#: ``objective(model, batch, eps) -> (loss, adv_loss)``: the robust loss ``L(u) + λ·L(u+δ_eps)`` to
#: minimise (scalar, differentiable) and the detached adversarial part ``L(u+δ_eps)`` (float).
Objective = Callable[[nn.Module, Any, float], "tuple[Tensor, float]"]
#: ``batches(meta_iter, task, inner_step) -> batch``: a deterministic batch source for the inner loops.
BatchSource = Callable[[int, int, int], Any]


@dataclass
class AATConfig:
    """AAT hyper-parameters (the ``aat`` section of ``configs/retrain.yaml``)."""

    #: attack budgets of the tasks small / moderate / heavy, in [0, 1] pixel units (2, 4, 8 /255)
    eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    #: Reptile meta-iterations of the pretext stage (0 disables the pretext stage)
    meta_iters: int = 2
    #: inner optimiser steps per task and meta-iteration
    inner_steps: int = 2
    #: inner optimiser: "sgd" or "adam" (a fresh Adam state for every task)
    inner_optimizer: str = "adam"
    #: inner learning rate
    inner_lr: float = 5e-4
    #: Reptile outer step size β in (0, 1]: θ ← θ + β·(mean task weights − θ)
    beta: float = 1.0
    #: how the weaknesses (robust gap per unit budget) become probabilities: "softmax" or "proportional"
    prob_mode: str = "softmax"
    #: softmax temperature, relative to the mean weakness (scale-free, see AdaptiveEpsSampler)
    temperature: float = 0.5
    #: EMA momentum of the running adversarial and clean losses per task
    momentum: float = 0.9

    def __post_init__(self) -> None:
        self.eps = tuple(float(e) for e in self.eps)
        if not self.eps or any(not (0 <= e <= 1) for e in self.eps):
            raise ValueError(f"aat.eps: expected a non-empty list of budgets in [0, 1] (e.g. [0.00784, 0.0157, "
                             f"0.0314] = 2, 4, 8 /255), got {self.eps}")
        if self.meta_iters < 0 or self.inner_steps < 1:
            raise ValueError(f"aat: expected meta_iters >= 0 and inner_steps >= 1, got {self.meta_iters} "
                             f"and {self.inner_steps}")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"aat.inner_optimizer: expected one of {INNER_OPTIMIZERS}, got {self.inner_optimizer!r}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"aat.beta: expected 0 < beta <= 1, got {self.beta}")
        if self.prob_mode not in PROB_MODES:
            raise ValueError(f"aat.prob_mode: expected one of {PROB_MODES}, got {self.prob_mode!r}")
        if not self.temperature > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"aat: expected temperature > 0 and 0 <= momentum < 1, got {self.temperature} "
                             f"and {self.momentum}")


def mix_seed(*keys: int | str) -> int:
    """A 63-bit seed mixed from integers/strings (NumPy ``SeedSequence``): stable across runs and ranks.

    Used to make every random draw a pure function of (seed, step, rank, ...), which is what makes a
    resumed run bit-identical to an uninterrupted one.
    """
    ints = [k if isinstance(k, int) else int.from_bytes(str(k).encode(), "little") for k in keys]
    return int(np.random.SeedSequence([abs(k) for k in ints]).generate_state(1, np.uint64)[0]) >> 1


# ----------------------------------------------------------------------------------------------------
# Adaptive ε sampler (online stage)
# ----------------------------------------------------------------------------------------------------
class AdaptiveEpsSampler:
    """Draws a task (an attack budget ε) per batch, favouring the task where the model is weakest for its budget.

    Weakness rule. Each task k keeps exponential moving averages of the adversarial loss ``a_k`` and of the
    clean loss ``c_k`` of the same batches, observed when k was drawn (``r ← m·r + (1−m)·loss``; the first
    observation initialises them). Its weakness is the robust gap per unit of budget

        ``g_k = max(a_k − c_k, 0) / ε_k``,

    i.e. how much loss the attack adds per unit of ε. The raw adversarial loss grows with ε for any model, so
    ranking by it always favours the largest budget; the gap per unit budget is roughly constant in ε for a
    model that is uniformly (locally linearly) vulnerable, and it is largest at the budget where the model
    gives way most relative to the attack's strength (for a model robust at 8/255 but brittle at 2/255 it
    favours 2/255). Probabilities:

    * ``"softmax"``: ``p = softmax(g / (T · mean(g)))`` — the temperature is relative to the mean weakness, so
      the rule does not depend on the loss scale (λ weights, number of classes); lower T is greedier. Every
      task keeps a positive probability.
    * ``"proportional"``: ``p = g / sum(g)``.
    * ``"uniform"``: ``p = 1/K`` whatever the losses (the ablation that isolates the adaptive sampler; the
      running losses are still kept, for the logs).

    Tasks never observed get the largest observed weakness (optimistic: they will be tried); with no
    observation at all, or all gaps 0, the distribution is uniform. Draws use a generator seeded per call
    (``sample(seed)``), so the sampler's whole state is the running losses (:meth:`state_dict`).

    Args:
        eps: the task budgets (> 0), e.g. ``(2/255, 4/255, 8/255)``.
        mode: "softmax" or "proportional".
        temperature: softmax temperature relative to the mean weakness (> 0).
        momentum: EMA momentum in [0, 1).
    """

    def __init__(self, eps: Sequence[float], mode: str = "softmax", temperature: float = 0.5,
                 momentum: float = 0.9) -> None:
        if not len(eps):
            raise ValueError("AdaptiveEpsSampler: expected at least one task budget, got none")
        if any(not float(e) > 0 for e in eps):
            raise ValueError(f"AdaptiveEpsSampler: expected budgets > 0 (the weakness is a gap per unit of budget), "
                             f"got {tuple(eps)}")
        if mode not in PROB_MODES:
            raise ValueError(f"AdaptiveEpsSampler: expected mode in {PROB_MODES}, got {mode!r}")
        if not temperature > 0 or not 0 <= momentum < 1:
            raise ValueError(f"AdaptiveEpsSampler: expected temperature > 0 and 0 <= momentum < 1, got "
                             f"{temperature} and {momentum}")
        self.eps = tuple(float(e) for e in eps)
        self.mode, self.temperature, self.momentum = mode, float(temperature), float(momentum)
        self.running = torch.full((len(self.eps),), math.nan, dtype=torch.float64)  # EMA adversarial loss
        self.running_clean = torch.full((len(self.eps),), math.nan, dtype=torch.float64)  # EMA clean loss
        self.counts = torch.zeros(len(self.eps), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.eps)

    def __repr__(self) -> str:
        return (f"AdaptiveEpsSampler(eps={tuple(round(e * 255, 3) for e in self.eps)}/255, mode={self.mode!r}, "
                f"temperature={self.temperature}, momentum={self.momentum})")

    def weakness(self) -> Tensor:
        """(K,) float64 ``max(a_k − c_k, 0) / ε_k`` (NaN for tasks never observed)."""
        clean = torch.nan_to_num(self.running_clean, nan=0.0)
        eps = torch.tensor(self.eps, dtype=torch.float64)
        return (self.running - clean).clamp_min(0.0) / eps

    def probabilities(self) -> Tensor:
        """(K,) float64 probabilities, summing to 1, non-decreasing in each task's weakness."""
        g = self.weakness()
        seen = ~torch.isnan(g)
        if self.mode == "uniform" or not seen.any():
            return torch.full_like(g, 1.0 / len(g))
        g[~seen] = g[seen].max()
        if self.mode == "proportional":
            total = g.sum()
            return g / total if total > 0 else torch.full_like(g, 1.0 / len(g))
        scale = g.mean().clamp_min(1e-12)
        return torch.softmax(g / (self.temperature * scale), dim=0)

    def sample(self, seed: int) -> int:
        """Index of the task drawn with :meth:`probabilities`, from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(int(seed) % (2**63))
        return int(torch.multinomial(self.probabilities(), 1, generator=gen).item())

    def _ema(self, running: Tensor, task: int, loss: float) -> None:
        old = running[task].item()
        running[task] = loss if math.isnan(old) else self.momentum * old + (1 - self.momentum) * loss

    def update(self, task: int, loss: float, clean_loss: float | None = None) -> None:
        """Record the adversarial ``loss`` and the ``clean_loss`` of the same batch observed for ``task`` (EMA).

        Pass ``clean_loss``: without it the task's clean reference is taken as 0 (its weakness is then the raw
        adversarial loss per unit budget).
        """
        if not 0 <= task < len(self.eps):
            raise IndexError(f"AdaptiveEpsSampler.update: expected task in [0, {len(self.eps)}), got {task}")
        loss = float(loss)
        clean = None if clean_loss is None else float(clean_loss)
        if not math.isfinite(loss) or (clean is not None and not math.isfinite(clean)):
            log.warning("AdaptiveEpsSampler: ignoring non-finite losses (adv %s, clean %s) for task %d", loss,
                        clean, task)
            return
        self._ema(self.running, task, loss)
        if clean is not None:
            self._ema(self.running_clean, task, clean)
        self.counts[task] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"eps": list(self.eps), "running": self.running.clone(), "running_clean": self.running_clean.clone(),
                "counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state without ``running_clean`` (older checkpoints) has no clean reference."""
        eps = tuple(float(e) for e in state["eps"])
        if len(eps) != len(self.eps) or any(abs(a - b) > 1e-12 for a, b in zip(eps, self.eps)):
            raise ValueError(f"AdaptiveEpsSampler.load_state_dict: expected tasks {self.eps}, got {eps}; "
                             "resume with the same aat.eps")
        self.running = state["running"].clone().to(torch.float64)
        clean = state.get("running_clean")
        self.running_clean = (clean.clone().to(torch.float64) if clean is not None
                              else torch.full_like(self.running, math.nan))
        self.counts = state["counts"].clone().to(torch.int64)


# ----------------------------------------------------------------------------------------------------
# Reptile pretext initialisation
# ----------------------------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of every parameter and buffer (``state_dict`` keys)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_snapshot(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the model's tensors in place (optimisers keep pointing at the same tensors)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])


def reptile_outer_update(theta: Mapping[str, Tensor], task_weights: Sequence[Mapping[str, Tensor]],
                         beta: float) -> dict[str, Tensor]:
    """``θ + β·(mean_k θ_k − θ)`` for every floating tensor; integer tensors (``num_batches_tracked``)
    take the last task's value.

    Args:
        theta: the weights before the inner loops.
        task_weights: the weights after each task's inner loop (same keys).
        beta: outer step size in (0, 1]; β = 1 is plain averaging of the task weights.
    """
    if not task_weights:
        raise ValueError("reptile_outer_update: expected at least one task's weights, got none")
    out = {}
    for k, t in theta.items():
        if t.is_floating_point():
            mean = torch.stack([w[k].to(t.dtype) for w in task_weights]).mean(0)
            out[k] = t + beta * (mean - t)
        else:
            out[k] = task_weights[-1][k].clone()
    return out


def _inner_optimizer(params: list[Tensor], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"expected inner optimizer in {INNER_OPTIMIZERS}, got {name!r}")


def reptile_meta_step(
    model: nn.Module,
    eps: Sequence[float],
    objective: Objective,
    batches: BatchSource,
    meta_iter: int = 0,
    inner_steps: int = 1,
    inner_lr: float = 1e-3,
    beta: float = 1.0,
    inner_optimizer: str = "sgd",
    average: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    guard: StepGuard | None = None,
) -> list[float]:
    """One Reptile meta-iteration over the attack tasks, updating ``model`` in place.

    For each task k (budget ``eps[k]``): reset the model to θ, run ``inner_steps`` steps of a fresh
    ``inner_optimizer`` on ``objective(model, batches(meta_iter, k, i), eps[k])[0]``, keep θ_k. Then
    θ ← :func:`reptile_outer_update` (θ, [θ_k], β), optionally passed through ``average`` (e.g. an
    all-reduce mean across data-parallel ranks, so every rank holds the same weights).

    ``guard`` applies the run's ``nan_policy`` to every inner step (default: stop at the first non-finite loss or
    gradient norm); a skipped inner step leaves the weights unchanged.

    Returns:
        The mean adversarial loss observed per task during its inner loop (to initialise the sampler; NaN for a
        task whose every inner step was skipped).
    Raises:
        NonFiniteError: an inner step's loss or gradient norm is NaN or ±inf (the step is named).
    """
    guard = guard if guard is not None else StepGuard("stop")
    theta = snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    task_weights, adv_losses = [], []
    for k, e in enumerate(eps):
        load_snapshot(model, theta)
        opt = _inner_optimizer(params, inner_optimizer, inner_lr)
        seen = []
        for i in range(inner_steps):
            opt.zero_grad(set_to_none=True)
            loss, adv = objective(model, batches(meta_iter, k, i), float(e))
            where = f"AAT pretext meta-iteration {meta_iter}, task eps {e * 255:.1f}/255, inner step {i}"
            if not guard.check(loss, {"adv": adv}, where):
                continue
            loss.backward()
            if not guard.check(grad_norm(params), {"loss": loss, "adv": adv}, where, what="gradient norm"):
                continue
            guard.good_step()
            opt.step()
            seen.append(float(adv))
        task_weights.append(snapshot(model))
        adv_losses.append(sum(seen) / len(seen) if seen else float("nan"))
        log.debug("reptile meta-iter %d task eps=%.4f: adversarial loss %.4f", meta_iter, e, adv_losses[-1])
    for p in params:
        p.grad = None
    new = reptile_outer_update(theta, task_weights, beta)
    if average is not None:
        new = average(new)
    load_snapshot(model, new)
    return adv_losses


def pretext_initialise(model: nn.Module, cfg: AATConfig, objective: Objective, batches: BatchSource,
                       average: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                       on_meta_iter: Callable[[int, list[float]], None] | None = None,
                       guard: StepGuard | None = None) -> list[float]:
    """The AAT pretext stage: ``cfg.meta_iters`` Reptile meta-iterations over the tasks ``cfg.eps``.

    Returns the last meta-iteration's mean adversarial loss per task ([] when ``meta_iters == 0``).
    """
    losses: list[float] = []
    for it in range(cfg.meta_iters):
        losses = reptile_meta_step(model, cfg.eps, objective, batches, meta_iter=it, inner_steps=cfg.inner_steps,
                                   inner_lr=cfg.inner_lr, beta=cfg.beta, inner_optimizer=cfg.inner_optimizer,
                                   average=average, guard=guard)
        log.info("AAT pretext meta-iteration %d/%d: adversarial loss per task %s", it + 1, cfg.meta_iters,
                 ", ".join(f"{e * 255:.0f}/255: {l:.4f}" for e, l in zip(cfg.eps, losses)))
        if on_meta_iter is not None:
            on_meta_iter(it, losses)
    return losses
