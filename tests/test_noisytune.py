"""NoisyTune (arXiv 2202.12024): the noise has the right shape and scale and lands only where it should."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from noisyft.methods.noisytune.perturb import (
    SKIP_SINGLE,
    SKIP_ZERO_STD,
    NoisyTuneConfig,
    apply_noisytune,
    noisytune_,
    summarize_records,
)

LAM = 0.15
UNIFORM_STD = LAM / math.sqrt(12.0)  # std of U(-lam/2, lam/2)


def tiny_llama(**overrides) -> torch.nn.Module:
    kwargs = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    kwargs.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kwargs))


class BigLinear(torch.nn.Module):
    """One large matrix (for statistics), with a non-zero mean so std != rms."""

    def __init__(self, rows: int = 512, cols: int = 512, mean: float = 0.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(mean + 0.02 * torch.randn(rows, cols, generator=g))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def deltas(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the noise itself --------------------------------------------------------------------------------


def test_uniform_noise_is_bounded_and_fills_the_range():
    model = tiny_llama()
    before = snapshot(model)
    records = noisytune_(model, lam=LAM, generator=gen())
    diffs = deltas(model, before)
    perturbed = [r for r in records if r.skipped is None]
    assert len(perturbed) == 16  # 7 matrices per layer x 2 layers + embed_tokens + lm_head
    for record in perturbed:
        w = before[record.name]
        bound = LAM / 2 * w.std().item()
        assert record.std == pytest.approx(w.std().item(), rel=1e-5)
        d = diffs[record.name].abs()
        assert d.max().item() <= bound * (1 + 1e-4)
        # 256+ draws from U(-b, b): the largest |draw| is within a few % of b.
        assert d.max().item() >= 0.95 * bound
        assert (d > 0).float().mean().item() > 0.99


def test_uniform_noise_std_matches_lam_over_sqrt12_on_a_big_tensor():
    model = BigLinear()
    w = model.weight.detach().clone()
    (record,) = noisytune_(model, lam=LAM, generator=gen())
    d = model.weight.detach() - w
    assert (d.std() / w.std()).item() == pytest.approx(UNIFORM_STD, rel=0.01)
    assert abs(d.mean().item()) < 0.01 * d.std().item()
    bound = LAM / 2 * w.std().item()
    assert d.abs().max().item() <= bound * (1 + 1e-5)
    assert d.abs().max().item() >= 0.999 * bound
    # Uniform: excess kurtosis -1.2.
    z = d / d.std()
    assert (z**4).mean().item() - 3 == pytest.approx(-1.2, abs=0.05)
    # Zero-mean weights: std == rms, so the relative change is lam/sqrt(12).
    assert record.rel_change == pytest.approx(UNIFORM_STD, rel=0.01)


def test_gaussian_noise_has_the_same_variance_as_the_uniform():
    model = BigLinear()
    w = model.weight.detach().clone()
    noisytune_(model, lam=LAM, distribution="gaussian", generator=gen())
    d = model.weight.detach() - w
    assert (d.std() / w.std()).item() == pytest.approx(UNIFORM_STD, rel=0.01)
    z = d / d.std()
    assert (z**4).mean().item() - 3 == pytest.approx(0.0, abs=0.1)  # Gaussian, not uniform
    # Unbounded: sqrt(3) sigma (the uniform's bound) is exceeded by ~8% of the draws.
    frac = (d.abs() > LAM / 2 * w.std()).float().mean().item()
    assert frac == pytest.approx(0.083, abs=0.01)


def test_rel_change_follows_std_over_rms():
    model = BigLinear(mean=0.05)  # std 0.02, rms ~0.054
    w = model.weight.detach().clone()
    (record,) = noisytune_(model, lam=LAM, generator=gen())
    rms = w.pow(2).mean().sqrt().item()
    expected = UNIFORM_STD * w.std().item() / rms
    assert record.rel_change == pytest.approx(expected, rel=0.02)
    d = model.weight.detach() - w
    assert record.rel_change == pytest.approx((d.norm() / w.norm()).item(), rel=1e-4)


def test_lam_zero_changes_nothing():
    model = tiny_llama()
    before = snapshot(model)
    records = noisytune_(model, lam=0.0, generator=gen())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(r.rel_change == 0.0 for r in records)


def test_bfloat16_parameters_keep_their_dtype():
    model = tiny_llama().to(torch.bfloat16)
    before = snapshot(model)
    records = noisytune_(model, lam=LAM, generator=gen())
    name = "model.layers.0.mlp.up_proj.weight"
    p = dict(model.named_parameters())[name]
    assert p.dtype == torch.bfloat16
    rec = next(r for r in records if r.name == name)
    assert math.isfinite(rec.std) and rec.std > 0
    d = (p.float() - before[name].float()).abs()
    assert d.max().item() > 0
    # bf16 rounding of W + dW: allow one ulp of |W| on top of the bound.
    assert (d <= LAM / 2 * rec.std + before[name].float().abs() * 2**-7 + 1e-8).all()


# --- what gets perturbed -----------------------------------------------------------------------------


class Odd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.const = torch.nn.Parameter(torch.ones(8))
        self.single = torch.nn.Parameter(torch.tensor([3.0]))
        self.scalar = torch.nn.Parameter(torch.tensor(2.0))


@pytest.mark.parametrize("mode", ["matrix", "global"])
def test_zero_std_and_single_element_tensors_are_skipped_and_untouched(mode):
    model = Odd()
    before = snapshot(model)
    records = {r.name: r for r in noisytune_(model, lam=LAM, mode=mode, generator=gen())}
    assert records["const"].skipped == SKIP_ZERO_STD
    assert records["single"].skipped == SKIP_SINGLE
    assert records["scalar"].skipped == SKIP_SINGLE
    for name in ("const", "single", "scalar"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])
        assert records[name].rel_change == 0.0
    assert records["lin.weight"].skipped is None and records["lin.bias"].skipped is None
    assert not torch.equal(model.lin.weight, before["lin.weight"])


def test_fresh_llama_norm_weights_are_skipped():
    model = tiny_llama()
    records = noisytune_(model, lam=LAM, generator=gen())
    norms = [r for r in records if "norm" in r.name]
    assert len(norms) == 5
    assert all(r.skipped == SKIP_ZERO_STD for r in norms)
    assert torch.all(model.model.norm.weight == 1)


def test_include_and_exclude_patterns():
    model = tiny_llama()
    before = snapshot(model)
    records = noisytune_(model, lam=LAM, include=r"\.mlp\.", exclude=r"down_proj", generator=gen())
    names = {r.name for r in records}
    assert names == {f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj")}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in names), name

    model = tiny_llama()
    records = noisytune_(model, lam=LAM, exclude="embed_tokens", generator=gen())
    assert all("embed_tokens" not in r.name for r in records)
    assert any(r.name == "lm_head.weight" for r in records)


def test_trainable_only_with_lora_leaves_the_frozen_base_alone():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    before = snapshot(model)
    records = noisytune_(model, lam=LAM, generator=gen())
    assert len(records) == 8  # lora_A and lora_B for q and v in 2 layers
    assert all(".lora_" in r.name for r in records)
    for r in records:
        p = dict(model.named_parameters())[r.name]
        if ".lora_B." in r.name:  # LoRA B starts at zero: constant, skipped
            assert r.skipped == SKIP_ZERO_STD
            assert torch.count_nonzero(p) == 0
        else:
            assert r.skipped is None
            assert not torch.equal(p, before[r.name])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name

    # trainable_only=False reaches the frozen base too.
    records = noisytune_(model, lam=LAM, trainable_only=False, generator=gen())
    base_q = next(
        n for n, p in model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.base_layer.weight")
    )
    assert any(r.name == base_q and r.skipped is None for r in records)
    assert not torch.equal(dict(model.named_parameters())[base_q], before[base_q])


def test_global_mode_scales_by_one_std_over_all_perturbed_values():
    model = tiny_llama()
    with torch.no_grad():  # give the matrices different spreads, so per-matrix and global std differ
        model.model.layers[0].mlp.up_proj.weight.mul_(5)
        model.lm_head.weight.add_(0.3)
    before = snapshot(model)
    records = noisytune_(model, lam=LAM, mode="global", generator=gen())
    perturbed = [r for r in records if r.skipped is None]
    brute = torch.cat([before[r.name].double().flatten() for r in perturbed]).std().item()
    assert len({r.std for r in perturbed}) == 1
    assert perturbed[0].std == pytest.approx(brute, rel=1e-6)
    diffs = deltas(model, before)
    up = diffs["model.layers.0.mlp.up_proj.weight"].abs().max().item()
    assert up <= LAM / 2 * brute * (1 + 1e-5)
    assert up >= 0.9 * LAM / 2 * brute  # scaled by the global std, not the (5x larger) own one


def test_generator_makes_it_reproducible():
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama()
    noisytune_(a, lam=LAM, generator=gen(7))
    noisytune_(b, lam=LAM, generator=gen(7))
    noisytune_(c, lam=LAM, generator=gen(8))
    pa, pb, pc = snapshot(a), snapshot(b), snapshot(c)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["lm_head.weight"], pc["lm_head.weight"])

    d, e = tiny_llama(), tiny_llama()
    apply_noisytune(NoisyTuneConfig(seed=7), d)
    apply_noisytune(NoisyTuneConfig(seed=7), e)
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), e.parameters(), strict=True))


def test_tied_embeddings_are_perturbed_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    w = model.lm_head.weight.detach().clone()
    records = noisytune_(model, lam=LAM, generator=gen())
    names = [r.name for r in records]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert sum(("embed_tokens" in n) or ("lm_head" in n) for n in names) == 1
    d = (model.lm_head.weight.detach() - w).abs()
    assert d.max().item() <= LAM / 2 * w.std().item() * (1 + 1e-5)  # twice would break this bound
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_logs_a_summary_and_summarizes(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="noisyft.methods.noisytune.perturb"):
        records = noisytune_(model, lam=LAM, generator=gen())
    assert "perturbed 16 tensors" in caplog.text and "skipped 5" in caplog.text
    summary = summarize_records(records)
    assert summary["perturbed"] == 16 and summary["skipped"] == 5
    assert summary["mean_rel_change"] == pytest.approx(UNIFORM_STD, rel=0.1)


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_lam_is_rejected(lam):
    with pytest.raises(ValueError, match="lam"):
        NoisyTuneConfig(lam=lam)
    with pytest.raises(ValueError, match="lam"):
        noisytune_(tiny_llama(), lam=lam)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distribution": "laplace"}, "distribution"),
        ({"mode": "layer"}, "mode"),
        ({"include": "(unclosed"}, "include"),
        ({"exclude": "[a-"}, "exclude"),
        ({"seed": 1.5}, "seed"),
        ({"trainable_only": "yes"}, "trainable_only"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisyTuneConfig(**kwargs)


def test_validation_happens_before_any_change():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError):
        noisytune_(model, lam=LAM, exclude="[")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_config_defaults_follow_the_paper():
    cfg = NoisyTuneConfig()
    assert cfg.lam == 0.15 and cfg.distribution == "uniform" and cfg.mode == "matrix"
    assert cfg.trainable_only is True and cfg.include is None and cfg.exclude is None
    copy.deepcopy(cfg)  # a plain dataclass: copyable, serializable
