"""Settings of the preference tasks (`noisyft train --task dpo|kto`): the few TRL settings users need as a YAML
section (``dpo: {beta: 0.1}``) and flags (``--dpo.beta 0.1``). Every other ``trl.DPOConfig`` / ``trl.KTOConfig``
argument passes through ``--sft-arg KEY=VALUE`` (checked against the task's TRL config). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._checks import check_choice, check_number

KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class DPOSettings:
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290) on prompt / chosen / rejected pairs.

    The loss (``sigmoid``) is ``-log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) -
    log ref(y_l|x))))``, log-probabilities summed over the reply tokens. The reference ``ref`` is the policy with its
    LoRA adapter disabled (``--lora``), else a frozen copy of the starting model (TRL makes it).
    """

    beta: float = field(
        default=0.1,
        metadata={"help": "DPO beta: how far the policy may move from the reference (TRL's default)"},
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "TRL DPO loss: sigmoid (DPO), ipo, hinge, robust, apo_zero, ... (checked by TRL)"},
    )

    def __post_init__(self):
        check_number("dpo beta", self.beta, low=0, low_open=True)
        if not isinstance(self.loss_type, str) or not self.loss_type.strip():
            raise ValueError(
                f"dpo loss_type must be a TRL DPO loss name such as 'sigmoid', got {self.loss_type!r}"
            )


@dataclass
class KTOSettings:
    """Kahneman-Tversky Optimization (https://arxiv.org/abs/2402.01306) on prompt / completion / label records.

    Each completion is desirable (``label: true``) or not; paired records (prompt / chosen / rejected) are unpaired
    as TRL does: chosen -> desirable, rejected -> undesirable. With unequal counts, weigh the two sides so that
    ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` lies in [1, 4/3] (the paper's Eq. 8).
    """

    beta: float = field(default=0.1, metadata={"help": "KTO beta (TRL's default)"})
    loss_type: str = field(default="kto", metadata={"help": "kto or apo_zero_unpaired"})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "weight of the desirable completions' loss"}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "weight of the undesirable completions' loss"}
    )

    def __post_init__(self):
        check_number("kto beta", self.beta, low=0, low_open=True)
        check_choice("kto loss_type", self.loss_type, KTO_LOSSES)
        check_number("kto desirable_weight", self.desirable_weight, low=0, low_open=True)
        check_number("kto undesirable_weight", self.undesirable_weight, low=0, low_open=True)
