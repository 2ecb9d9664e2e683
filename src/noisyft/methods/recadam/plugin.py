"""RecAdam as the trainer's optimizer, built on the Trainer's own parameter groups (weight decay / no decay)."""

from __future__ import annotations

import logging

from noisyft.methods.base import MethodPlugin
from noisyft.methods.mixout.plugin import snapshot_trainable

from .optimizer import RecAdam, anneal_lambda

logger = logging.getLogger(__name__)


class RecAdamPlugin(MethodPlugin):
    """Logs ``recadam/lambda``, the weight of the task loss at the last step."""

    name = "recadam"

    def __init__(self, config, *, seed: int, rank: int):
        super().__init__(config, seed=seed, rank=rank)
        self.anchors = None
        self.optimizer: RecAdam | None = None

    def on_init(self, trainer) -> None:
        # theta* = the weights before NoisyTune perturbs them, unless anchor=start (then: the weights at the start)
        if self.config.anchor == "pretrained" and trainer.plugin("noisytune") is not None:
            self.anchors = snapshot_trainable(trainer.model)

    def create_optimizer(self, trainer, model) -> RecAdam:
        args = trainer.args
        steps = getattr(getattr(trainer, "state", None), "max_steps", 0) or getattr(args, "max_steps", -1)
        cfg = self.config
        if steps and steps > 0 and anneal_lambda(steps, cfg.anneal_k, cfg.anneal_t0) < 0.5:
            logger.warning(
                "RecAdam: lambda(t) stays below 1/2 for all %d steps (anneal_t0=%g): the task loss is mostly "
                "switched off and training mainly pulls the weights to their anchors; lower --recadam.anneal-t0",
                steps,
                cfg.anneal_t0,
            )
        decay = set(trainer.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        anchor = None
        if self.anchors is not None:
            anchor = {p: self.anchors[n] for n, p in named}
            self.anchors = None
        self.optimizer = RecAdam(
            groups,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            gamma=self.config.gamma,
            anneal_k=self.config.anneal_k,
            anneal_t0=self.config.anneal_t0,
            anchor=anchor,
        )
        return self.optimizer

    def log_entries(self, trainer) -> dict[str, float]:
        return {} if self.optimizer is None else {"recadam/lambda": self.optimizer.current_lambda()}
