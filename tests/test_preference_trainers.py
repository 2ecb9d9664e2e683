"""The methods in TRL's preference trainers: noise only in the policy's gradient-recording training forward.

transformers' NEFTune hook checks only ``module.training``; in DPOTrainer with a LoRA policy the reference pass is
the same model with the adapter disabled, under ``no_grad`` but still in training mode, so its log-probabilities
get noise of their own. The test reproduces that with ``neftune_noise_alpha`` and shows noisyft's NEFTune does not
leak: every noised embedding call records gradients, and no reference call is noised."""

from __future__ import annotations

import pytest
import torch

from noisyft.methods.fisher.config import FisherConfig
from noisyft.methods.neftune.config import NEFTuneConfig

from conftest import tiny_llama, tiny_tokenizer


def _preference_data(n=8):
    from datasets import Dataset

    rows = [
        {"prompt": f"write hello w{i}", "chosen": f" hello world w{i}", "rejected": f" w{i + 1} w{i + 2} w3"}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def _dpo_args(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        max_length=32,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return DPOConfig(**base)


class EmbeddingProbe:
    """Records, per call of the embedding, (grad enabled, training, noised): noised means the first decoder
    layer's input differs from the clean embedding lookup of the call's input_ids."""

    def __init__(self, model):
        from noisyft._torch import unwrap_model

        base = unwrap_model(model)
        self.weight = base.get_input_embeddings().weight
        self.calls: list[tuple[bool, bool, bool]] = []
        self._ids = None
        self.handles = [
            base.model.register_forward_pre_hook(self._ids_hook, with_kwargs=True),
            base.model.layers[0].register_forward_pre_hook(self._layer_hook, with_kwargs=True),
        ]

    def _ids_hook(self, module, args, kwargs):
        self._ids = kwargs.get("input_ids", args[0] if args else None)

    def _layer_hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if self._ids is None or hidden is None:
            return
        clean = self.weight[self._ids].to(hidden.dtype)
        noised = not torch.allclose(hidden.detach(), clean.detach(), atol=1e-6)
        self.calls.append((torch.is_grad_enabled(), module.training, noised))


def _dpo(tmp_path, trainer_cls, **kw):
    from peft import LoraConfig

    model = tiny_llama()
    trainer = trainer_cls(
        model=model,
        args=kw.pop("args", None) or _dpo_args(tmp_path),
        train_dataset=_preference_data(),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        **kw,
    )
    probe = EmbeddingProbe(trainer.model)
    trainer.train()
    return probe.calls


def test_transformers_neftune_leaks_into_the_dpo_reference_pass(tmp_path):
    from trl import DPOTrainer

    calls = _dpo(tmp_path, DPOTrainer, args=_dpo_args(tmp_path, neftune_noise_alpha=5.0))
    reference = [c for c in calls if not c[0] and c[1]]  # no gradient, training mode: the reference pass
    assert reference, f"no reference pass seen: {calls}"
    assert any(noised for *_, noised in reference), "expected transformers' hook to noise the reference pass"


def test_noisyft_neftune_noises_only_the_policy_forward_in_dpo(tmp_path):
    from noisyft import NoisyDPOTrainer

    calls = _dpo(tmp_path, NoisyDPOTrainer, neftune=NEFTuneConfig(alpha=5.0))
    policy = [c for c in calls if c[0] and c[1]]
    reference = [c for c in calls if not c[0]]
    assert policy and all(noised for *_, noised in policy), calls
    assert reference and not any(noised for *_, noised in reference), calls


def test_loss_methods_are_refused_where_there_are_no_token_labels(tmp_path):
    from noisyft import NoisyDPOTrainer
    from noisyft.methods.base import MethodSetupError

    with pytest.raises(MethodSetupError, match="needs a token-level loss"):
        NoisyDPOTrainer(
            model=tiny_llama(),
            args=_dpo_args(tmp_path),
            train_dataset=_preference_data(),
            processing_class=tiny_tokenizer(),
            fisher=FisherConfig(coef=0.1),
        )
