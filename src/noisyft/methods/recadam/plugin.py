"""RecAdam as the trainer's optimizer, built on the Trainer's own parameter groups (weight decay / no decay)."""

from __future__ import annotations

from noisyft.methods.base import MethodPlugin
from noisyft.methods.mixout.plugin import snapshot_trainable

from .optimizer import RecAdam


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
