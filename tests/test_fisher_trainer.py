"""The Fisher penalty inside NoisySFTTrainer: same loss as by hand, coefficient 0 = plain, warm-up, the cheaper
gated option, the diagnostic, and "does it lower the curvature" on a small over-fitting task."""

from __future__ import annotations

import pytest
import torch

from noisyft.methods.fisher.config import FisherConfig
from noisyft.methods.fisher.penalty import fisher_penalty
from noisyft.methods.neftune.config import NEFTuneConfig

from conftest import tiny_llama, tiny_tokenizer
from test_trainer import _args, _dataset, _params, _train


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_coefficient_zero_trains_exactly_like_plain_sft(tmp_path):
    from trl import SFTTrainer

    plain = _train(tmp_path / "a", trainer_cls=SFTTrainer)
    zero = _train(tmp_path / "b", fisher=FisherConfig(coef=0.0))
    a, b = _params(plain.model), _params(zero.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # and a positive coefficient does change training
    pen = _train(tmp_path / "c", fisher=FisherConfig(coef=0.05))
    c = _params(pen.model)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_trainer_loss_and_gradient_equal_ce_plus_coef_times_penalty(tmp_path, kind):
    """One micro-batch through TRL's collator: the trainer's total = TRL's loss + coef * fisher_penalty(...),
    same sampled y' (same generator seed), and the same parameter gradients."""
    from trl import SFTTrainer

    from noisyft import NoisySFTTrainer
    from noisyft._torch import rank_seed

    coef = 0.3
    trainer = NoisySFTTrainer(
        model=tiny_llama(),
        args=_args(tmp_path, completion_only_loss=True),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        fisher=FisherConfig(kind=kind, coef=coef, seed=11),
    )
    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (inputs["labels"] == -100).any() and (
        inputs["attention_mask"] == 0
    ).any()  # prompt and padding masked

    model.zero_grad()
    total = trainer.compute_loss(model, dict(inputs))
    total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    ce = SFTTrainer.compute_loss(trainer, model, dict(inputs))
    gen = torch.Generator().manual_seed(rank_seed(11, 0) ^ 0x5F15)
    pen = fisher_penalty(
        model,
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
        kind=kind,
        generator=gen,
    )
    expected = ce + coef * pen
    expected.backward()
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert pen.item() > 0


def test_warmup_logging_and_gated_option(tmp_path):
    trainer = _train(
        tmp_path,
        args=_args(tmp_path, max_steps=6),
        fisher=FisherConfig(coef=0.1, warmup_steps=4),
    )
    coefs = _history(trainer, "fisher/coef")
    assert coefs == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    applied = _history(trainer, "fisher/applied_fraction")
    assert applied == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # step 0 has coefficient 0: a plain step
    pens = _history(trainer, "fisher/penalty")
    assert len(pens) == 5 and all(p > 0 for p in pens)
    # the logged loss is the total: CE + coef * R (logging_steps = 1, no accumulation)
    for h in trainer.state.log_history:
        if "fisher/penalty" in h:
            assert h["loss"] == pytest.approx(
                h["fisher/ce_loss"] + h["fisher/coef"] * h["fisher/penalty"], rel=1e-3
            )

    gated = _train(
        tmp_path / "g",
        args=_args(tmp_path / "g", max_steps=12),
        fisher=FisherConfig(coef=0.1, probability=0.5),
    )
    applied = _history(gated, "fisher/applied_fraction")
    assert set(applied) == {0.0, 1.0} and 2 <= sum(applied) <= 10  # some steps with, some without
    for h in gated.state.log_history:
        if h.get("fisher/applied_fraction") == 1.0:  # applied steps carry coef / probability
            assert h["loss"] == pytest.approx(h["fisher/ce_loss"] + 0.2 * h["fisher/penalty"], rel=1e-3)
        elif "fisher/ce_loss" in h:
            assert h["loss"] == pytest.approx(h["fisher/ce_loss"], rel=1e-5)


def test_diagnostic_logs_a_trace_without_changing_training(tmp_path):
    a = _train(tmp_path / "a", neftune=NEFTuneConfig(alpha=5.0))
    b = _train(tmp_path / "b", neftune=NEFTuneConfig(alpha=5.0), fisher_diagnostic_steps=2)
    pa, pb = _params(a.model), _params(b.model)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    traces = _history(b, "fisher/trace_estimate")
    assert len(traces) == 2 and all(t > 0 for t in traces)  # steps 0 and 2 of 4
    assert not _history(a, "fisher/trace_estimate")


def test_resume_continues_the_sampling_stream(tmp_path):
    full = _train(
        tmp_path / "full", args=_args(tmp_path / "full", max_steps=4), fisher=FisherConfig(coef=0.2)
    )
    from noisyft import NoisySFTTrainer

    args = _args(tmp_path / "half", max_steps=4, save_strategy="steps", save_steps=2)
    first = NoisySFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        fisher=FisherConfig(coef=0.2),
    )
    first.train()
    ckpt = tmp_path / "half" / "out" / "checkpoint-2"
    assert (ckpt / "noisyft_fisher_rank0.pt").is_file()
    resumed = NoisySFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        fisher=FisherConfig(coef=0.2),
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    pf, pr = _params(full.model), _params(resumed.model)
    for n in pf:
        torch.testing.assert_close(pf[n], pr[n], rtol=1e-5, atol=1e-6, msg=n)


def _trace(model, dataset, n_draws=40):
    """Mean token-F estimate of Tr(F_X) over the training examples (eval mode, many y' draws)."""
    model.eval()
    g = torch.Generator().manual_seed(123)
    vals = []
    for row in dataset:
        ids = torch.tensor([row["input_ids"]])
        labels = ids.masked_fill(torch.tensor([row["assistant_masks"]]) == 0, -100)
        for _ in range(n_draws // 10):
            vals.append(
                fisher_penalty(
                    model, input_ids=ids, labels=labels, num_samples=10, generator=g, create_graph=False
                )
            )
    return torch.stack(vals).mean().item()


@pytest.mark.slow
def test_penalty_ends_with_lower_fisher_trace_than_plain_training(tmp_path):
    """Over-fit 8 examples for 40 steps: with the penalty the measured Tr(F_X) ends clearly lower."""
    from trl import SFTTrainer

    data = _dataset(n=8, seed=3)
    kw = dict(max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2, completion_only_loss=True)
    plain = _train(tmp_path / "p", trainer_cls=SFTTrainer, args=_args(tmp_path / "p", **kw), dataset=data)
    pen = _train(
        tmp_path / "f", args=_args(tmp_path / "f", **kw), dataset=data, fisher=FisherConfig(coef=0.05)
    )
    t_plain, t_pen = _trace(plain.model, data), _trace(pen.model, data)
    assert t_pen < 0.7 * t_plain, (t_plain, t_pen)
    # and it did still fit the data
    assert _history(pen, "fisher/ce_loss")[-1] < _history(pen, "fisher/ce_loss")[0]


@pytest.mark.slow
def test_cli_fisher_run_and_bad_combination(tmp_path, capsys):
    import json

    from test_cli import _run

    from noisyft.cli import main

    model_dir = tmp_path / "tinymodel"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"write w{i}", "output": "hello world w1 w2"}) + "\n"
            for i in range(16)
        )
    )
    out = tmp_path / "run"
    flags = ["--method", "noisytune+fisher", "--fisher-kind", "logit", "--fisher-coef", "0.01"]
    flags += ["--fisher-warmup-steps", "1", "--eval-data", "none"]
    assert _run(model_dir, data, out, *flags) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "noisytune+fisher" and metrics["fisher"]["kind"] == "logit"
    assert any("fisher/penalty" in h for h in metrics["log_history"])
    assert (out / "noisytune_report.json").is_file()
    # a kernel without double backward: a one-line error, not an autograd stack trace
    capsys.readouterr()
    code = _run(
        model_dir,
        data,
        tmp_path / "bad",
        "--method",
        "fisher",
        "--fisher-coef",
        "0.01",
        "--attn-implementation",
        "flex_attention",
        "--eval-data",
        "none",
    )
    err = capsys.readouterr().err
    assert code != 0 and "attn_implementation" in err and "Traceback" not in err
    assert main(["train", "--method", "fisher", "--fisher-kind", "hessian"]) == 2
