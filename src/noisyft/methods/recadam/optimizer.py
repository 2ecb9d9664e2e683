"""RecAdam: Adam whose task step is annealed in while a decoupled quadratic pull toward the anchor is annealed out.

Paper: Chen et al., "Recall and Learn: Fine-tuning Deep Pretrained Language Models with Less Forgetting",
EMNLP 2020, https://arxiv.org/abs/2004.12651

Objective: ``lambda(t) L(theta) + (1 - lambda(t)) gamma/2 ||theta - theta*||^2`` with
``lambda(t) = 1 / (1 + exp(-k (t - t0)))``. Per parameter tensor and step ``t`` (1 for the first), with ``g`` the
gradient of the task loss ``L`` only::

    theta <- theta * (1 - lr * weight_decay)                                   decoupled weight decay (AdamW)
    m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
    theta <- theta - lr * lambda(t) * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)    annealed Adam step
    theta <- theta - lr * (1 - lambda(t)) * gamma * (theta - theta*)                          decoupled pull

The annealing multiplies the *step*, not the gradient fed to Adam: Adam's direction is invariant to a rescaled
gradient, so ``lambda(t) * g`` would cancel out; the paper's code does the same. ``lambda(t) = 1`` exactly (large
``k``, ``t >> t0``) gives torch's ``Adam`` / ``AdamW`` update bit for bit.

Where this differs from the paper's code: (1) eps is added after the bias correction of ``sqrt(v)``, as in
``torch.optim.Adam`` (the code, like the old ``transformers.AdamW``, adds it before: the same update with eps
scaled by ``sqrt(1 - beta2^t)``); (2) the decoupled weight decay is applied before the Adam step, as in
``torch.optim.AdamW`` (the code applies it last, a difference of order ``lr^2``); (3) only the sigmoid annealing
(the paper's choice), with its weight ``anneal_w`` fixed to 1.

The anchor ``theta*`` is held in each parameter's optimizer state (``state[p]["anchor"]``, a copy in the
parameter's dtype and device, one extra copy of the trainable weights), so ``state_dict()`` /
``load_state_dict()`` carry it together with the step counters and moments: a Trainer checkpoint resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch


def anneal_lambda(step: float, k: float, t0: float) -> float:
    """``1 / (1 + exp(-k (step - t0)))`` without overflow for any k, step."""
    x = k * (step - t0)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _check(name: str, value, low: float = 0.0) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
    ):
        raise ValueError(f"RecAdam {name} must be a finite number >= {low}, got {value!r}")


class RecAdam(torch.optim.Optimizer):
    """Adam(W) on ``lambda(t) L + (1 - lambda(t)) gamma/2 ||theta - theta*||^2`` (see the module docstring).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``. ``gamma``, ``anneal_k`` and
            ``anneal_t0`` may be overridden per group (``gamma=0`` in a group: no pull for it).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        anneal_k, anneal_t0: ``lambda(t) = 1 / (1 + exp(-anneal_k (t - anneal_t0)))``.
        gamma: coefficient of the quadratic pull, >= 0, required (the paper's 5000 suits lr ~ 2e-5);
            ``lr * gamma`` must be <= 2.
        anchor: ``theta*``. ``None``: a copy of the parameters now. Otherwise a sequence of tensors in the order of
            the parameters over the groups, or a mapping from each parameter (the tensor object) to its anchor.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        gamma: float,
        anneal_k: float = 0.5,
        anneal_t0: float = 250.0,
        anchor: Sequence[torch.Tensor] | Mapping[torch.Tensor, torch.Tensor] | None = None,
    ):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("gamma", gamma)):
            _check(name, value)
        _check("anneal_k", anneal_k)
        _check("anneal_t0", anneal_t0)
        if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"RecAdam betas must be two numbers in [0, 1), got {betas!r}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "anneal_k": anneal_k,
            "anneal_t0": anneal_t0,
            "gamma": gamma,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for name in ("gamma", "anneal_k", "anneal_t0"):
                _check(name, group[name])
            if group["lr"] * group["gamma"] > 2:
                raise ValueError(
                    f"RecAdam lr * gamma = {group['lr'] * group['gamma']:g} > 2: the pull multiplies theta - theta* "
                    "by 1 - lr*gamma*(1 - lambda) per step and would diverge; lower gamma"
                )
        self._set_anchors(anchor)

    def _set_anchors(self, anchor) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        if anchor is None:
            anchors = [p.detach() for p in params]
        elif isinstance(anchor, Mapping):
            missing = sum(1 for p in params if p not in anchor)
            if missing:
                raise ValueError(
                    f"RecAdam anchor has no tensor for {missing} of the {len(params)} parameters"
                )
            anchors = [anchor[p] for p in params]
        else:
            anchors = list(anchor)
            if len(anchors) != len(params):
                raise ValueError(f"RecAdam anchor has {len(anchors)} tensors for {len(params)} parameters")
        for i, (p, a) in enumerate(zip(params, anchors, strict=True)):
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(
                    f"RecAdam anchor {i} has shape {tuple(a.shape)}, its parameter {tuple(p.shape)}"
                )
            self.state[p]["anchor"] = a.detach().to(device=p.device, dtype=p.dtype, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, gamma = group["lr"], group["eps"], group["weight_decay"], group["gamma"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RecAdam does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                lam = anneal_lambda(t, group["anneal_k"], group["anneal_t0"])
                grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
                if wd != 0:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**t
                bias_correction2_sqrt = (1 - beta2**t) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                if lam != 0:
                    p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1) * lam)
                pull = lr * (1 - lam) * gamma
                if pull != 0:
                    p.add_(p - state["anchor"], alpha=-pull)
        return loss

    def current_lambda(self) -> float:
        """``lambda(t)`` of the first group at its last step (0 before any step), for logging."""
        group = self.param_groups[0]
        steps = [self.state[p]["step"].item() for p in group["params"] if "step" in self.state[p]]
        if not steps:
            return 0.0
        return anneal_lambda(max(steps), group["anneal_k"], group["anneal_t0"])
