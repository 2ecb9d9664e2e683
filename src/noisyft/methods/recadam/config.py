"""RecAdam settings. Torch-free: importing this module must not import torch (``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_number

ANCHORS = ("pretrained", "start")


@dataclass
class RecAdamConfig:
    """RecAdam, Chen et al., "Recall and Learn: Fine-tuning Deep Pretrained Language Models with Less Forgetting",
    EMNLP 2020, https://arxiv.org/abs/2004.12651

    Adam on the annealed objective::

        lambda(t) * L(theta) + (1 - lambda(t)) * gamma / 2 * ||theta - theta*||^2,
        lambda(t) = 1 / (1 + exp(-k (t - t0)))                  (t = optimizer step, 1 for the first)

    with the quadratic part applied as a decoupled update, as in the paper's code: each step moves
    ``theta -= lr * lambda(t) * adam_direction(grad L)`` and then ``theta -= lr * (1 - lambda(t)) * gamma *
    (theta - theta*)``. ``theta*`` (the anchor) is the pre-trained weights. Early (t << t0) the pull dominates and
    the task step is scaled by ~0; late (t >> t0) it is plain Adam(W). The learning rate, betas, eps and weight
    decay are the Trainer's own settings.

    Args:
        gamma (`float`, defaults to 5000.0): coefficient of the quadratic pull, >= 0 (the code's
            ``pretrain_cof``; 5000 in the paper's runs). The pull multiplies ``theta - theta*`` by
            ``1 - lr * gamma * (1 - lambda)`` per step, so ``lr * gamma`` must stay <= 2 (checked when the
            optimizer is built). ``gamma = 0`` is Adam with the task step scaled by ``lambda(t)``.
        anneal_k (`float`, defaults to 0.5): steepness ``k`` of the sigmoid, >= 0 (the paper sweeps 0.05 to 1).
        anneal_t0 (`float`, defaults to 250.0): step ``t0`` where ``lambda = 1/2``, >= 0 (swept 100 to 1000).
        anchor (`str`, defaults to ``"pretrained"``): ``theta*`` when NoisyTune also runs: ``"pretrained"``, the
            weights before NoisyTune's perturbation; ``"start"``, the weights training starts from (after it).
            Without NoisyTune both are the loaded weights.
    """

    gamma: float = field(
        default=5000.0, metadata={"help": "quadratic pull coefficient gamma (>= 0, lr*gamma <= 2)"}
    )
    anneal_k: float = field(
        default=0.5, metadata={"help": "sigmoid steepness k of lambda(t)=1/(1+exp(-k(t-t0)))"}
    )
    anneal_t0: float = field(default=250.0, metadata={"help": "step t0 at which lambda(t) = 1/2"})
    anchor: str = field(
        default="pretrained",
        metadata={
            "help": "theta* with NoisyTune: 'pretrained' (before its perturbation) or 'start' (after it)"
        },
    )

    def __post_init__(self) -> None:
        check_number("RecAdam gamma", self.gamma, low=0)
        check_number("RecAdam anneal_k", self.anneal_k, low=0)
        check_number("RecAdam anneal_t0", self.anneal_t0, low=0)
        check_choice("RecAdam anchor", self.anchor, ANCHORS)
