"""The four newer methods inside NoisySFTTrainer: each step equals its formula computed by hand, the
"off" setting equals plain training, anchors are the pre-NoisyTune weights, and bad settings fail before training."""

from __future__ import annotations

import pytest
import torch

from noisyft.methods.lnsr.config import LNSRConfig
from noisyft.methods.lnsr.penalty import lnsr_penalty
from noisyft.methods.mixout.config import MixoutConfig
from noisyft.methods.noisytune.config import NoisyTuneConfig
from noisyft.methods.recadam.config import RecAdamConfig
from noisyft.methods.symnoise.config import SymNoiseConfig
from noisyft.methods.symnoise.noise import symnoise_noise

from conftest import tiny_llama, tiny_tokenizer
from test_trainer import _args, _dataset, _params, _train


def _trainer(tmp_path, **kw):
    from noisyft import NoisySFTTrainer

    return NoisySFTTrainer(
        model=tiny_llama(),
        args=_args(tmp_path, completion_only_loss=True),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        **kw,
    )


def _batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _loss_and_grads(trainer, inputs, fn):
    model = trainer.model
    model.zero_grad()
    loss = fn(dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    return all(torch.allclose(a[n], b[n], atol=tol, rtol=tol) for n in a)


def test_symnoise_pair_loss_is_the_mean_of_the_two_noisy_copies(tmp_path):
    from trl import SFTTrainer

    trainer = _trainer(tmp_path, symnoise=SymNoiseConfig(alpha=8.0, seed=3))
    inputs = _batch(trainer)
    model, plugin = trainer.model, trainer.plugin("symnoise")
    loss, grads = _loss_and_grads(trainer, inputs, lambda b: trainer.compute_loss(model, b))

    gen = torch.Generator().manual_seed(plugin.stream.seed)  # the same stream, from its start
    mask, labels = inputs["attention_mask"], inputs["labels"]

    def by_hand(batch):
        e = model.get_input_embeddings()(batch["input_ids"])
        delta = symnoise_noise(e, alpha=8.0, attention_mask=mask, labels=labels, generator=gen)
        plus = SFTTrainer.compute_loss(
            trainer, model, {**batch, "input_ids": None, "inputs_embeds": e + delta}
        )
        minus = SFTTrainer.compute_loss(
            trainer, model, {**batch, "input_ids": None, "inputs_embeds": e - delta}
        )
        return (plus + minus) / 2

    ref, ref_grads = _loss_and_grads(trainer, inputs, lambda b: by_hand(b))
    assert torch.allclose(loss, ref, atol=1e-6), (loss, ref)
    assert _close(grads, ref_grads)


def test_symnoise_alpha_zero_is_plain_training(tmp_path):
    from trl import SFTTrainer

    plain = _params(_train(tmp_path / "a", trainer_cls=SFTTrainer).model)
    zero = _params(_train(tmp_path / "b", symnoise=SymNoiseConfig(alpha=0.0)).model)
    assert _close(plain, zero, 1e-5)


def test_lnsr_step_is_loss_plus_coef_times_penalty(tmp_path):
    from trl import SFTTrainer

    coef, sigma = 0.7, 0.05
    trainer = _trainer(tmp_path, lnsr=LNSRConfig(sigma=sigma, layer=1, coef=coef, seed=5))
    inputs = _batch(trainer)
    model, plugin = trainer.model, trainer.plugin("lnsr")
    loss, grads = _loss_and_grads(trainer, inputs, lambda b: trainer.compute_loss(model, b))

    gen = torch.Generator().manual_seed(plugin.stream.seed)

    def by_hand(batch):
        ce = SFTTrainer.compute_loss(trainer, model, batch)
        pen = lnsr_penalty(
            model,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            layer=1,
            sigma=sigma,
            generator=gen,
        )
        return ce + coef * pen

    ref, ref_grads = _loss_and_grads(trainer, inputs, by_hand)
    assert torch.allclose(loss, ref, atol=1e-6) and loss > 0
    assert _close(grads, ref_grads)
    logged = plugin.log_entries(trainer)
    assert logged["lnsr/penalty"] > 0


def test_lnsr_coef_zero_and_mixout_p_zero_are_plain_training(tmp_path):
    from trl import SFTTrainer

    plain = _params(_train(tmp_path / "a", trainer_cls=SFTTrainer).model)
    assert _close(plain, _params(_train(tmp_path / "b", lnsr=LNSRConfig(coef=0.0)).model))
    mixed = _train(tmp_path / "c", mixout=MixoutConfig(p=0.0, exclude=None))
    assert _close(plain, _params(mixed.model))
    assert not any("mixout" in n for n in mixed.model.state_dict())  # removed after training


def test_mixout_and_recadam_anchor_is_the_pretrained_weights_before_noisytune(tmp_path):
    original = _params(tiny_llama())
    trainer = _trainer(
        tmp_path,
        noisytune=NoisyTuneConfig(lam=0.5, seed=1),
        mixout=MixoutConfig(p=0.3, include="mlp"),
        recadam=RecAdamConfig(gamma=10.0, anneal_k=1.0, anneal_t0=2.0),
    )
    seen = {}
    mix = trainer.plugin("mixout")
    original_before = mix.before_train

    def spy(trainer_, model, *, fresh):
        original_before(trainer_, model, fresh=fresh)
        seen.update(
            {n: b.clone() for n, b in trainer_.model.named_buffers(remove_duplicate=False) if "mixout" in n}
        )

    mix.before_train = spy
    trainer.train()
    assert seen, "Mixout attached no target buffers"
    for name, u in seen.items():
        param = name.rsplit(".", 1)[0] + ".weight"
        assert torch.equal(u, original[param]), name  # u = pretrained, not the perturbed start
    opt = trainer.plugin("recadam").optimizer
    names = {p: n for n, p in trainer.model.named_parameters()}
    anchors = {names[p]: s["anchor"] for p, s in opt.state.items() if "anchor" in s}
    assert anchors and all(torch.equal(a, original[n]) for n, a in anchors.items())
    assert any(k.startswith("recadam/lambda") for h in trainer.state.log_history for k in h)


def test_recadam_with_lambda_one_is_adamw(tmp_path):
    from trl import SFTTrainer

    plain = _params(_train(tmp_path / "a", trainer_cls=SFTTrainer).model)
    rec = _params(
        _train(tmp_path / "b", recadam=RecAdamConfig(gamma=0.0, anneal_k=50.0, anneal_t0=0.0)).model
    )
    assert _close(plain, rec, 1e-5)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mixout": MixoutConfig(include="no_such_layer")}, "match"),
        ({"lnsr": LNSRConfig(layer=7)}, "out of range"),
    ],
)
def test_bad_method_settings_fail_before_training(tmp_path, kw, message):
    from noisyft.methods.base import MethodSetupError

    with pytest.raises(MethodSetupError, match=message):
        _train(tmp_path, **kw)


def test_bad_values_are_rejected_by_the_configs():
    for make in (
        lambda: MixoutConfig(p=1.0),
        lambda: MixoutConfig(p=float("nan")),
        lambda: RecAdamConfig(gamma=-1.0),
        lambda: LNSRConfig(sigma=-0.1),
        lambda: SymNoiseConfig(alpha=float("inf")),
    ):
        with pytest.raises(ValueError):
            make()


def test_symnoise_one_copy_hook_trains_and_keeps_padding_clean(tmp_path):
    """pair=False: one noisy copy through the embedding hook; exactly +/- alpha/sqrt(L d) per entry."""
    trainer = _trainer(tmp_path, symnoise=SymNoiseConfig(alpha=4.0, pair=False, seed=1))
    hook = trainer.plugin("symnoise").hook
    seen = []
    original = hook.noise

    def spy(embeds, batch):
        noise = original(embeds, batch)
        seen.append((noise.detach(), batch.get("attention_mask")))
        return noise

    hook.noise = spy
    trainer.train()
    assert seen
    noise, mask = seen[0]
    lengths = mask.sum(1, keepdim=True).float()  # (B, 1)
    expected = 4.0 / torch.sqrt(lengths * noise.shape[-1])  # (B, 1)
    real = mask.bool()
    assert torch.allclose(
        noise.abs()[real], expected.expand_as(mask)[real].unsqueeze(-1).expand(-1, noise.shape[-1])
    )
    assert torch.all(noise[~real] == 0)
    assert any("symnoise/noise_to_embed_norm" in h for h in trainer.state.log_history)


def test_recadam_warns_when_the_run_ends_before_the_task_loss_switches_on(tmp_path, caplog):
    from noisyft.methods.recadam.config import RecAdamConfig

    for t0, warned in ((250.0, True), (1.0, False)):
        trainer = _trainer(tmp_path, recadam=RecAdamConfig(anneal_t0=t0, gamma=1.0))
        caplog.clear()
        with caplog.at_level("WARNING", logger="noisyft.methods.recadam.plugin"):
            trainer.create_optimizer()
        assert ("lambda(t) stays below 1/2" in caplog.text) is warned, t0
