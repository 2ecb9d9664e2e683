"""Fisher penalties (token-F, logit-F) against brute force on tiny models.

The exact values enumerate the whole (12-token) vocabulary: for every predicted position t and every label y,
g_{t,y} = grad_X log p_t(y) from the full Jacobian of the log-softmax w.r.t. the input embeddings X.
"""

from __future__ import annotations

import pytest
import torch

from noisyft.methods.fisher.config import FisherConfig
from noisyft.methods.fisher.penalty import (
    differentiable_attention,
    fisher_penalty,
    predicted_positions,
)

from conftest import tiny_llama

V = 12


def _model(layers: int = 1, hidden: int = 8, **kw):
    model = tiny_llama(vocab_size=V, hidden_size=hidden, layers=layers, **kw).double().eval()
    return model


def _peaked_model():
    """Predictions close to one-hot (token 3 or 4 by the sign of one hidden unit): the model's Fisher is small,
    while a uniform y' still sees large gradients, so the two samplings target clearly different values."""
    model = _model()
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[3, 0] = 8.0
        model.lm_head.weight[4, 0] = -8.0
    return model


def _batch():
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 4, 3, 5, 0, 0]])  # row 1: two right-padding tokens
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = ids.clone()
    labels[:, :2] = -100  # a two-token prompt
    labels[attention_mask == 0] = -100
    return ids, attention_mask, labels


def _exact_traces(model, ids, attention_mask, labels):
    """(model-weighted, uniform-weighted) sums over predicted positions of E_y ||grad_X log p_t(y)||^2, / |P|."""
    emb = model.get_input_embeddings()(ids).detach()  # (B, T, D)
    pred = predicted_positions(ids.shape, labels=labels, attention_mask=attention_mask)  # (B, T)

    def log_probs(x):
        out = model(inputs_embeds=x, attention_mask=attention_mask)
        return torch.log_softmax(out.logits[pred], dim=-1)  # (N, V)

    with differentiable_attention(model):
        jac = torch.autograd.functional.jacobian(log_probs, emb)  # (N, V, B, T, D)
        lp = log_probs(emb)
    sq = jac.pow(2).sum(dim=(2, 3, 4))  # (N, V): ||g_{t,y}||^2
    n = pred.sum()
    return (lp.exp() * sq).sum() / n, sq.mean(dim=1).sum() / n


@pytest.mark.parametrize("kind", ["token", "logit"])
@pytest.mark.parametrize("sampling", ["model", "uniform"])
def test_estimator_mean_matches_enumerated_trace(kind, sampling):
    model = _peaked_model()
    ids, am, labels = _batch()
    exact_model, exact_uniform = _exact_traces(model, ids, am, labels)
    exact = exact_model if sampling == "model" else exact_uniform
    g = torch.Generator().manual_seed(1)
    draws = torch.stack(
        [
            fisher_penalty(
                model,
                input_ids=ids,
                attention_mask=am,
                labels=labels,
                kind=kind,
                sampling=sampling,
                generator=g,
                create_graph=False,
            ).detach()
            for _ in range(300)
        ]
    )
    mean, se = draws.mean(), draws.std() / len(draws) ** 0.5
    # unbiased: within 4 standard errors; and the target really depends on the sampling distribution
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert abs(exact_model - exact_uniform) > 8 * se


def test_one_backward_with_many_samples_matches_average_of_single_samples():
    """num_samples=m is the mean of m independent single-sample estimates (same draws, same order)."""
    model = _model()
    ids, am, labels = _batch()
    many = fisher_penalty(
        model,
        input_ids=ids,
        attention_mask=am,
        labels=labels,
        num_samples=3,
        generator=torch.Generator().manual_seed(5),
        create_graph=False,
    )
    # the (N, 3) draw is one inverse-CDF call; reproduce its columns one at a time by hand
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    pred = predicted_positions(ids.shape, labels=labels, attention_mask=am)
    with differentiable_attention(model):
        logits = model(inputs_embeds=emb, attention_mask=am).logits[pred].float()  # (N, V)
    cdf = torch.softmax(logits, -1).cumsum(-1)
    u = torch.rand(len(cdf), 3, generator=torch.Generator().manual_seed(5), dtype=torch.float32) * cdf[:, -1:]
    y = torch.searchsorted(cdf, u, right=True)
    lp = torch.log_softmax(logits, -1)
    total = 0.0
    for s in range(3):
        (grad,) = torch.autograd.grad(lp.gather(1, y[:, s : s + 1]).sum(), emb, retain_graph=True)
        total += grad.pow(2).sum() / pred.sum()
    torch.testing.assert_close(many, total / 3)


def test_sampler_draws_from_the_model_distribution():
    from noisyft.methods.fisher.penalty import _draw_labels

    p = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 0.0, 1.0]])
    y = _draw_labels(p.log(), 40000, "model", torch.Generator().manual_seed(0))  # (2, 40000)
    freq = torch.stack([torch.bincount(row, minlength=4) for row in y]).float() / 40000
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)  # 4 sigma ~ 0.01 at n = 40000
    assert (y[0] != 1).all() and (y[1] == 3).all()  # zero-probability tokens are never drawn
    uni = _draw_labels(p.log(), 40000, "uniform", torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        torch.bincount(uni.flatten(), minlength=4).float() / 80000, torch.full((4,), 0.25), atol=0.01, rtol=0
    )


def test_token_and_logit_give_the_same_value_but_different_gradients():
    model = _model()
    ids, am, labels = _batch()
    values, grads = {}, {}
    for kind in ("token", "logit"):
        model.zero_grad()
        r = fisher_penalty(
            model,
            input_ids=ids,
            attention_mask=am,
            labels=labels,
            kind=kind,
            generator=torch.Generator().manual_seed(3),
        )
        r.backward()
        values[kind] = r.detach()
        grads[kind] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(values["token"], values["logit"])
    assert values["token"] > 0
    assert not torch.allclose(grads["token"], grads["logit"])  # logit-F holds p constant


def test_expected_hessian_equals_fisher():
    """E_{y~p}[d^2 (-log p(y)) / dX^2] = E_{y~p}[g g^T] = F_X, with exact Hessians of a 12-dim input."""
    model = _model(hidden=4)
    ids = torch.tensor([[1, 5, 7]])
    emb = model.get_input_embeddings()(ids).detach()  # (1, 3, 4)
    t = 1  # the logits at position 1 (predicting token 2)

    def nll(x, y):
        logits = model(inputs_embeds=x.view(1, 3, 4)).logits[0, t]  # (V,)
        return -torch.log_softmax(logits, -1)[y]

    with differentiable_attention(model):
        p = torch.softmax(model(inputs_embeds=emb).logits[0, t], -1).detach()
        expected_h = torch.zeros(12, 12, dtype=torch.float64)
        fisher = torch.zeros(12, 12, dtype=torch.float64)
        for y in range(V):
            x = emb.flatten()
            expected_h += p[y] * torch.autograd.functional.hessian(lambda v, y=y: nll(v, y), x)
            g = torch.autograd.functional.jacobian(lambda v, y=y: nll(v, y), x)
            fisher += p[y] * torch.outer(g, g)
    # exact identity; Llama's RMSNorm computes in float32 even for a float64 model, hence float32 tolerances
    torch.testing.assert_close(expected_h, fisher, atol=1e-5, rtol=1e-5)
    assert fisher.trace() > 0
    # and the single-position estimator averages to its trace
    labels = torch.tensor([[-100, -100, 7]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            fisher_penalty(model, input_ids=ids, labels=labels, generator=g, create_graph=False)
            for _ in range(800)
        ]
    )
    assert abs(draws.mean() - fisher.trace()) < 4 * draws.std() / 800**0.5


def test_predicted_positions_masks_prompt_padding_and_document_starts():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    am = torch.tensor([[1, 1, 1, 1, 0]])
    pred = predicted_positions((1, 5), labels=labels, attention_mask=am)
    assert pred.tolist() == [[False, True, True, False, False]]
    # packed: two documents [a b c][d e]; position 2 (c) does not predict d
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    pred = predicted_positions((1, 5), position_ids=pos)
    assert pred.tolist() == [[True, True, False, True, False]]


def test_padding_and_prompt_tokens_do_not_change_the_penalty():
    model = _model()
    ids, am, labels = _batch()

    def value(ids, am, labels):
        return fisher_penalty(
            model,
            input_ids=ids,
            attention_mask=am,
            labels=labels,
            generator=torch.Generator().manual_seed(2),
            create_graph=False,
        )

    base = value(ids, am, labels)
    other = ids.clone()
    other[1, 4:] = 7  # different token ids under the padding
    torch.testing.assert_close(value(other, am, labels), base)
    # a batch with nothing to predict is a differentiable 0
    zero = fisher_penalty(model, input_ids=ids, attention_mask=am, labels=torch.full_like(ids, -100))
    assert zero.item() == 0 and zero.requires_grad


def test_left_padding_matches_right_padding():
    model = _model()
    right = torch.tensor([[1, 5, 6, 7], [1, 4, 3, 0]])
    am_r = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    left = torch.tensor([[1, 5, 6, 7], [0, 1, 4, 3]])
    am_l = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    pos_l = (am_l.cumsum(-1) - 1).clamp(min=0)

    def value(ids, am, pos):
        labels = ids.masked_fill(am == 0, -100)
        return fisher_penalty(
            model,
            input_ids=ids,
            attention_mask=am,
            labels=labels,
            position_ids=pos,
            kind="logit",
            generator=torch.Generator().manual_seed(4),
            create_graph=False,
            reduction="none",
        )

    torch.testing.assert_close(value(left, am_l, pos_l), value(right, am_r, None))


def test_packed_row_equals_padded_batch():
    """Two documents packed into one row (position_ids restart) give the penalty of the two rows batched."""
    model = _model()
    docs = torch.tensor([[1, 5, 6, 7], [1, 4, 3, 9]])
    packed = docs.reshape(1, 8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])

    def value(ids, **kw):
        return fisher_penalty(
            model, input_ids=ids, generator=torch.Generator().manual_seed(6), create_graph=False, **kw
        )

    torch.testing.assert_close(value(packed, position_ids=pos), value(docs))


def test_reduction_none_sums_to_mean_and_sum_is_unnormalized():
    model = _model()
    ids, am, labels = _batch()
    kw = dict(input_ids=ids, attention_mask=am, labels=labels, create_graph=False)
    per = fisher_penalty(model, generator=torch.Generator().manual_seed(0), reduction="none", **kw)
    mean = fisher_penalty(model, generator=torch.Generator().manual_seed(0), **kw)
    total = fisher_penalty(model, generator=torch.Generator().manual_seed(0), reduction="sum", **kw)
    assert per.shape == (2,)
    torch.testing.assert_close(per.sum(), mean)
    n = predicted_positions(ids.shape, labels=labels, attention_mask=am).sum()
    torch.testing.assert_close(total / n, mean)


def test_penalty_backpropagates_into_parameters_with_sdpa_math_switch():
    """As loaded (SDPA), the fused CPU kernel has no double backward; the penalty switches to the math backend."""
    model = tiny_llama(vocab_size=V, hidden_size=8, layers=1)  # float32, sdpa
    assert model.config._attn_implementation == "sdpa"
    ids, am, labels = _batch()
    r = fisher_penalty(model, input_ids=ids, attention_mask=am, labels=labels)
    r.backward()
    q = model.model.layers[0].self_attn.q_proj.weight.grad
    assert q is not None and q.abs().sum() > 0  # the attention's second derivative reached the parameters


def test_unsupported_attention_and_reentrant_checkpointing_get_clear_errors():
    model = _model()
    ids, am, labels = _batch()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        fisher_penalty(model, input_ids=ids, attention_mask=am, labels=labels)
    model.config._attn_implementation = "sdpa"
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        fisher_penalty(model, input_ids=ids, attention_mask=am, labels=labels)


def test_non_reentrant_checkpointing_and_lora_match_the_plain_model():
    from peft import LoraConfig, get_peft_model

    ids, am, labels = _batch()

    def value(model):
        model.zero_grad()
        r = fisher_penalty(
            model, input_ids=ids, attention_mask=am, labels=labels, generator=torch.Generator().manual_seed(9)
        )
        r.backward()
        return r.detach()

    plain = _model()
    expected = value(plain)
    ref_grad = plain.model.layers[0].mlp.up_proj.weight.grad.clone()
    ckpt = _model()
    ckpt.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.config.use_cache = False
    torch.testing.assert_close(value(ckpt), expected)
    torch.testing.assert_close(ckpt.model.layers[0].mlp.up_proj.weight.grad, ref_grad)

    lora = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    # B = 0 at init, so the LoRA model computes the plain function; the penalty reaches the adapters
    torch.testing.assert_close(value(lora), expected)
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_config_validation_and_warmup():
    cfg = FisherConfig(kind="logit", coef=1e-3, warmup_steps=4)
    assert [cfg.coefficient(s) for s in (0, 1, 2, 4, 9)] == pytest.approx([0, 2.5e-4, 5e-4, 1e-3, 1e-3])
    assert FisherConfig(coef=2.0).coefficient(0) == 2.0
    for bad in (
        dict(kind="hessian"),
        dict(sampling="greedy"),
        dict(coef=-1),
        dict(num_samples=0),
        dict(probability=0.0),
        dict(probability=1.5),
        dict(warmup_steps=-2),
    ):
        with pytest.raises(ValueError):
            FisherConfig(**bad)


# -- the chunked LM head (FusedHead) against the logits path -------------------------------------------------------
@pytest.mark.parametrize(
    "kind,sampling,samples,tie,bias",
    [
        ("token", "model", 1, False, False),
        ("logit", "model", 1, False, False),
        ("token", "uniform", 2, False, False),
        ("logit", "uniform", 1, True, False),
        ("token", "model", 3, True, True),
    ],
)
def test_fused_head_gives_the_logits_path_values_and_gradients(
    kind, sampling, samples, tie, bias, monkeypatch
):
    """Same draws, penalty, cross-entropy, TRL statistics and gradient w.r.t. every parameter, with chunks of 2
    rows (the last one short) and with tied embeddings (the head's gradient adds to the embedding's)."""
    import noisyft.methods.fisher.head as head_module

    monkeypatch.setattr(head_module, "HEAD_CHUNK_ROWS", 2)
    model = _model(layers=2, tie=tie)
    if bias:
        head = torch.nn.Linear(8, V, bias=True, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(generator=torch.Generator().manual_seed(3))
        model.lm_head = head
    assert head_module.plain_head(model) is not None
    model.train()  # parameters get gradients; no dropout in the tiny config
    ids, am, labels = _batch()
    results = {}
    for fused in (True, False):
        model.zero_grad()
        pen, ce = fisher_penalty(
            model, input_ids=ids, attention_mask=am, labels=labels, kind=kind, sampling=sampling,
            num_samples=samples, generator=torch.Generator().manual_seed(5), return_loss=True, fused_head=fused,
        )  # fmt: skip
        (ce + 0.7 * pen).backward()
        results[fused] = (pen.detach(), ce.detach(), [p.grad.clone() for p in model.parameters()])
    (pen_f, ce_f, grads_f), (pen_l, ce_l, grads_l) = results[True], results[False]
    assert pen_f > 0
    torch.testing.assert_close(pen_f, pen_l, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ce_f, ce_l, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), grads_f, grads_l, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_fused_head_passes_gradcheck(monkeypatch):
    import noisyft.methods.fisher.head as head_module

    monkeypatch.setattr(head_module, "HEAD_CHUNK_ROWS", 2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([1, 0, 6, 3, 3])
    # token-F only: logit-F stops the gradient at p by definition, which finite differences cannot see (its
    # gradients are pinned against the logits path above)
    for kind, sampling in (("token", "model"), ("token", "uniform")):

        def fn(h, w, b, kind=kind, sampling=sampling):
            # the same draws on every call: gradcheck perturbs the inputs, the samples must not move
            nll, dh, *_ = head_module.FusedHead.apply(
                h, w, b, targets, kind, 2, sampling, torch.Generator().manual_seed(1)
            )
            return nll, dh

        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_fused_head_statistics_and_fallbacks():
    """TRL's entropy / accuracy sums from the chunks equal those of the full logits; a soft-capped head (Gemma)
    falls back to the logits path."""
    import noisyft.methods.fisher.head as head_module
    import noisyft.methods.fisher.penalty as penalty_module

    model = _model()
    ids, am, labels = _batch()
    stats = {}
    for fused in (True, False):
        with penalty_module.capture_forward(model) as cap:
            model.model(input_ids=ids, attention_mask=am)
        pred = predicted_positions(tuple(ids.shape), labels=labels, attention_mask=am)
        targets = penalty_module.next_token_targets(ids, pred, labels)
        *_, stats[fused] = penalty_module.fisher_penalty_from_hidden(
            model, cap.embeds, cap.hidden[pred], targets=targets, fused_head=fused, stats=True,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        *_, unasked = penalty_module.fisher_penalty_from_hidden(
            model, cap.embeds, cap.hidden[pred], targets=targets, fused_head=fused,
        )  # fmt: skip
        assert unasked is None  # not computed unless asked (a plain Trainer logs no such metrics)
    logits = model.lm_head(cap.hidden[pred]).detach()
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(stats[True][0], -(logp.exp() * logp).sum())
    assert stats[True][1] == (logits.argmax(-1) == targets).sum() == stats[False][1]
    model.config.final_logit_softcapping = 30.0
    assert head_module.plain_head(model) is None
