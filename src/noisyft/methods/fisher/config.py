"""Fisher penalty settings (torch-free, so ``noisyft --help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_int, check_number

KINDS = ("token", "logit")
SAMPLINGS = ("model", "uniform")


@dataclass
class FisherConfig:
    """Explicit Fisher penalty added to the training loss: ``loss + coef(step) * R``.

    Source: the analysis of noise injection in instruction tuning with explicit regularizers (token-F, logit-F);
    NEFTune is https://arxiv.org/abs/2310.05914. Noise eps ~ U(-a, a) on the embeddings X costs, to second order,
    ``a^2/6 * Tr(H_X)``; the Fisher F_X = E_{y~p}[g g^T] is its PSD surrogate, estimated by

        token-F:  R = 1/m sum_s || grad_X sum_{t in P} log p_t(y'_{s,t}) ||^2 / |P|,   y'_{s,t} ~ p_t
        logit-F:  R = 1/m sum_s || grad_X sum_{t in P} z_t . (e_{y'_{s,t}} - sg(p_t)) ||^2 / |P|

    over the predicted positions P (the estimator and its normalization: ``noisyft.methods.fisher.penalty``).

    Args:
        kind (`str`, defaults to ``"token"``): ``"token"`` (token-F) or ``"logit"`` (logit-F: same value, the
            parameter gradient treats the softmax probabilities as constants; cheaper).
        coef (`float`, defaults to 2e-6): the penalty coefficient after warm-up. The study used 2e-6 for token-F
            and 1e-6 for logit-F with Tulu 3's SFT settings on Llama-3.1-8B.
        warmup_steps (`int`, defaults to 0): the coefficient grows linearly from 0 at optimizer step 0 to ``coef``
            at step ``warmup_steps`` (the study: 600 token-F, 800 logit-F). While it is 0 the penalty is not
            computed at all, so the step is exactly a plain step.
        num_samples (`int`, defaults to 1): m, sampled label sets per step (one extra gradient each).
        sampling (`str`, defaults to ``"model"``): draw y' from the model (``"model"``) or uniformly over the
            vocabulary (``"uniform"``, the study's ablation, which it found clearly worse).
        probability (`float`, defaults to 1.0): the cheaper unbiased option. Each micro-batch gets the penalty
            with this probability, scaled by ``1 / probability``, so the expected gradient equals the full one.
            The draw is the same on every data-parallel rank (same seed), so ranks stay in step.
        seed (`int`, *optional*): seed of the y' sampling and of the ``probability`` draws (``None``: the
            training seed). The sampling stream differs per rank; the ``probability`` stream does not.
    """

    kind: str = field(
        default="token", metadata={"help": "token (token-F) or logit (logit-F: same value, cheaper gradient)"}
    )
    coef: float = field(
        default=2e-6,
        metadata={
            "help": "penalty coefficient after warm-up; R is a mean over predicted tokens (study: token-F 2e-6, "
            "logit-F 1e-6 on Llama-3.1-8B)"
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={"help": "linear warm-up of the coefficient from 0 (study: 600 token-F, 800 logit-F)"},
    )
    num_samples: int = field(default=1, metadata={"help": "sampled label sets y' per step (study: 1)"})
    sampling: str = field(
        default="model", metadata={"help": "model (y' ~ p, the study) or uniform (its ablation)"}
    )
    probability: float = field(
        default=1.0,
        metadata={
            "help": "apply the penalty to this random fraction of micro-batches, scaled by 1/probability "
            "(unbiased, cheaper on average)"
        },
    )
    seed: int | None = field(default=None, metadata={"help": "sampling seed (None: the training seed)"})

    def __post_init__(self):
        check_choice("Fisher kind", self.kind, KINDS)
        check_choice("Fisher sampling", self.sampling, SAMPLINGS)
        check_number("Fisher coef", self.coef, low=0)
        check_int("Fisher warmup_steps", self.warmup_steps, low=0)
        check_int("Fisher num_samples", self.num_samples, low=1)
        check_number("Fisher probability", self.probability, low=0, high=1, low_open=True)
        check_int("Fisher seed", self.seed, low=0, optional=True)

    def coefficient(self, step: int) -> float:
        """The effective coefficient at optimizer step ``step`` (0-based): linear warm-up from 0, then ``coef``."""
        if self.warmup_steps == 0:
            return float(self.coef)
        return float(self.coef) * min(1.0, step / self.warmup_steps)
