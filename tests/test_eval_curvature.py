"""noisyft.eval.curvature: Hutchinson vs the exact Hessian, the MC noise gap vs a^2/6 Tr(H), Fisher vs enumeration.

The model is small enough for exact Hessians: Llama, hidden 4, 2 layers, vocabulary 10, sequences of <= 4 tokens,
so X (B, T, d) has 32 entries and H is 32 x 32. Everything runs in float64 (transformers' RMSNorm still computes in
float32, which bounds the agreement of exact and estimated values at about 1e-6 relative).
"""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisyft.eval.curvature import (
    _hvp_samples,
    _unit_noise,
    batch_from_dataset,
    curvature_report,
    fisher_trace,
    hutchinson_trace,
    mc_noise_gap,
    noise_scales,
)

from conftest import tiny_llama

D = 4
# sequence 0: 4 real tokens, 3 predicted; sequence 1: 3 real tokens + 1 padding, 1 predicted
BATCH = {
    "input_ids": torch.tensor([[1, 3, 4, 5], [1, 6, 7, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    "labels": torch.tensor([[-100, 3, 4, 5], [-100, -100, 7, -100]]),
}
LENGTHS = [4, 3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama(vocab_size=10, hidden_size=D, layers=2).double().eval()


def _loss(model, X):
    """Mean cross-entropy over predicted positions, computed directly (independent of the module under test)."""
    logits = model(inputs_embeds=X, attention_mask=BATCH["attention_mask"]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), BATCH["labels"][:, 1:])


@pytest.fixture(scope="module")
def exact(model):
    """The exact Hessian (32 x 32) of the mean loss w.r.t. the embeddings, and its per-sequence block traces."""
    X = model.get_input_embeddings()(BATCH["input_ids"]).detach()  # (B, T, d)
    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(lambda x: _loss(model, x), X)  # (B, T, d, B, T, d)
    n = X.numel()
    blocks = [float(H[s, :, :, s].reshape(4 * D, 4 * D).trace()) for s in range(2)]
    return {"X": X, "H": H.reshape(n, n), "blocks": blocks}


def test_exact_hessian_setup(exact):
    H = exact["H"]
    assert torch.allclose(H, H.T, atol=1e-5 * H.abs().max())
    # padding embeddings (sequence 1, position 3) do not reach the loss
    Hb = H.reshape(2, 4, D, 2, 4, D)
    assert Hb[1, 3].abs().max() == 0 and Hb[:, :, :, 1, 3].abs().max() == 0
    assert abs(sum(exact["blocks"]) - float(H.trace())) < 1e-9 * abs(float(H.trace())) + 1e-12


def test_hvp_with_basis_vectors_gives_the_exact_trace(model, exact):
    X = exact["X"]
    probes = torch.eye(X.numel(), dtype=X.dtype).reshape(-1, *X.shape)  # (32, B, T, d): every unit vector
    with sdpa_kernel(SDPBackend.MATH):
        values = _hvp_samples(model, X, BATCH["attention_mask"], BATCH["labels"], probes)  # (32, B)
    assert torch.allclose(values.sum(1), torch.diagonal(exact["H"]), rtol=1e-5, atol=1e-8)
    assert values.sum(0).tolist() == pytest.approx(exact["blocks"], rel=1e-6)


def test_hutchinson_matches_exact_trace_and_variance(model, exact):
    est = hutchinson_trace(
        model, BATCH, num_samples=2000, generator=torch.Generator().manual_seed(0), max_batch_rows=1024
    )
    H = exact["H"]
    trace = float(H.trace())
    assert abs(est.mean - trace) < 4 * est.se
    assert est.se < 0.1 * abs(trace)  # precise enough for the check to mean something
    for s in range(2):
        assert abs(est.per_sequence[s] - exact["blocks"][s]) < 4 * est.per_sequence_se[s]
    # a Rademacher sample's variance is 2 * sum_{i != j} H_ij^2
    off = H - torch.diag(torch.diagonal(H))
    assert float(est.samples.sum(1).std()) == pytest.approx(math.sqrt(2 * float((off**2).sum())), rel=0.1)


def test_mc_noise_is_neftune_noise_with_real_lengths():
    X = torch.ones(2, 4, D, dtype=torch.float64)
    draws = torch.stack(
        [_unit_noise(X, BATCH["attention_mask"], torch.Generator().manual_seed(i)) for i in range(200)]
    )
    assert draws[:, 1, 3].abs().max() == 0  # padding: no noise
    for s, L in enumerate(LENGTHS):
        bound = 1 / math.sqrt(L * D)  # U(-1, 1) / sqrt(L_s d), L_s the real length
        real = draws[:, s, :L]
        assert real.abs().max() <= bound and real.abs().max() > 0.98 * bound
        assert float((real**2).mean()) == pytest.approx(bound**2 / 3, rel=0.1)


def test_hutchinson_with_noise_scales(model, exact):
    scale = noise_scales(BATCH["attention_mask"], D)  # (B, T)
    expected_a = [1 / math.sqrt(L * D) for L in LENGTHS]
    assert scale[0].tolist() == pytest.approx([expected_a[0]] * 4)
    assert scale[1].tolist() == pytest.approx([expected_a[1]] * 3 + [0.0])  # L = real length, 0 on padding
    est = hutchinson_trace(
        model,
        BATCH,
        num_samples=1000,
        generator=torch.Generator().manual_seed(1),
        scale=scale,
        max_batch_rows=1024,
    )
    weighted = sum(a**2 * t for a, t in zip(expected_a, exact["blocks"], strict=True))
    assert abs(est.mean - weighted) < 4 * est.se
    # per-sequence (B,) scales are the same estimator
    per_seq = hutchinson_trace(
        model,
        BATCH,
        num_samples=1000,
        generator=torch.Generator().manual_seed(1),
        scale=torch.tensor(expected_a, dtype=torch.float64),
        max_batch_rows=1024,
    )
    assert per_seq.mean == pytest.approx(est.mean, rel=1e-9)


def test_mc_gap_converges_to_second_order_term(model, exact):
    alphas = [0.3, 0.1, 0.01, 0.001]
    rows = mc_noise_gap(
        model,
        BATCH,
        alphas,
        num_samples=3000,
        generator=torch.Generator().manual_seed(2),
        max_batch_rows=1024,
    )
    weighted = sum(exact["blocks"][s] / (LENGTHS[s] * D) for s in range(2))  # sum_s Tr(H_s) / (L_s d)
    with torch.no_grad():
        assert rows[0]["base_loss"] == pytest.approx(float(_loss(model, exact["X"])), rel=1e-9)
    z = {}
    for row in rows:
        second = row["alpha"] ** 2 / 6 * weighted
        z[row["alpha"]] = (row["mc_gap"] - second) / row["se"]
    # small alpha: agreement within sampling error; alpha = 0.3: the higher-order terms show (the check has power)
    assert abs(z[0.01]) < 3 and abs(z[0.001]) < 3
    assert rows[3]["se"] < 0.1 * abs(0.001**2 / 6 * weighted)
    assert abs(z[0.3]) > 10
    # the same draws serve every alpha, so gap / alpha^2 differs between alphas only by the higher-order
    # remainder (O(alpha^2) relative), which shrinks with alpha
    curv = [row["mc_gap"] / row["alpha"] ** 2 for row in rows]
    remainder = [abs(c / curv[-1] - 1) for c in curv[:-1]]
    assert remainder[0] > 0.2 and remainder[0] > remainder[1] > remainder[2] and remainder[2] < 0.01


def _exact_fisher(model, X):
    """(1/P) sum_t sum_y p_t(y) ||grad_X log p_t(y)||^2 by enumerating the 10-token vocabulary."""
    X = X.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(inputs_embeds=X, attention_mask=BATCH["attention_mask"]).logits  # (B, T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    positions = [(b, t) for b in range(2) for t in range(3) if BATCH["labels"][b, t + 1] != -100]
    total = [0.0, 0.0]
    for b, t in positions:
        for y in range(10):
            (g,) = torch.autograd.grad(logp[b, t, y], X, retain_graph=True)
            total[b] += float(logp[b, t, y].detach().exp()) * float((g**2).sum())
    return [v / len(positions) for v in total]


def test_fisher_trace_matches_enumeration(model, exact):
    expected = _exact_fisher(model, exact["X"])
    est = fisher_trace(model, BATCH, num_samples=120, generator=torch.Generator().manual_seed(3))
    assert abs(est.mean - sum(expected)) < 4 * est.se
    assert est.se < 0.2 * sum(expected)
    for s in range(2):
        assert abs(est.per_sequence[s] - expected[s]) < 4 * est.per_sequence_se[s] + 1e-12


def test_curvature_report(exact):
    torch.manual_seed(0)
    model32 = tiny_llama(vocab_size=10, hidden_size=D, layers=2).train()  # float32, training mode
    report = curvature_report(
        model32,
        BATCH,
        alphas=(0.1, 0.03),
        mc_samples=500,
        hutchinson_samples=500,
        fisher_samples=50,
        seed=0,
        max_batch_rows=1024,
    )
    assert model32.training and next(model32.parameters()).dtype == torch.float32  # untouched
    assert report["settings"]["dtype"] == "float64"
    assert report["batch"]["lengths"] == LENGTHS and report["batch"]["predicted_positions"] == [3, 1]
    # the same weights in float64: the traces are the exact ones within sampling error
    h = report["traces"]["hessian"]
    assert abs(h["mean"] - float(exact["H"].trace())) < 4 * h["se"]
    weighted = report["traces"]["hessian_weighted"]["mean"]
    assert weighted == pytest.approx(
        sum(t / (L * D) for t, L in zip(report["traces"]["hessian"]["per_sequence"], LENGTHS, strict=True)),
        rel=1e-12,
    )
    assert [r["alpha"] for r in report["table"]] == [0.1, 0.03]
    for row in report["table"]:
        assert row["second_order"] == pytest.approx(row["alpha"] ** 2 * weighted / 6, rel=1e-12)
        assert row["ratio"] == pytest.approx(row["mc_gap"] / row["second_order"])
        assert row["fisher"] > 0 and row["fisher_se"] > 0
    assert abs(report["table"][1]["z"]) < 4
    json.dumps(report)
    no_fisher = curvature_report(
        model32,
        BATCH,
        alphas=(0.1,),
        mc_samples=2,
        hutchinson_samples=2,
        fisher_samples=0,
        max_batch_rows=1024,
    )
    assert no_fisher["table"][0]["fisher"] is None and no_fisher["traces"]["fisher"] is None


def test_batch_from_dataset():
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [8, 9], [1, 2, 3, 4]], "assistant_masks": [[0, 1, 1], [0, 1], [0, 0, 0, 1]]}
    )
    batch = batch_from_dataset(ds, 2, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    with pytest.raises(ValueError, match="fewer than the 5"):
        batch_from_dataset(ds, 5, pad_token_id=0)


def test_bad_inputs(model):
    gen = torch.Generator().manual_seed(0)
    nothing = {**BATCH, "labels": torch.full_like(BATCH["labels"], -100)}
    with pytest.raises(ValueError, match="no predicted position"):
        mc_noise_gap(model, nothing, [1.0], num_samples=4, generator=gen)
    with pytest.raises(ValueError, match="packed"):
        hutchinson_trace(
            model, {**BATCH, "position_ids": torch.arange(4).expand(2, 4)}, num_samples=4, generator=gen
        )
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        hutchinson_trace(model, BATCH, num_samples=1, generator=gen)
    with pytest.raises(ValueError, match="scale must have shape"):
        hutchinson_trace(model, BATCH, num_samples=2, generator=gen, scale=torch.ones(3))
