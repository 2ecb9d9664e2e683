"""The Fisher penalty's attention (fused forward, explicit double backward) against SDPA's math backend.

Float64, tiny shapes: first derivatives, second derivatives (a gradient of a gradient) and torch's own
gradcheck / gradgradcheck of the explicit backward; causal, padding (right and left: fully masked query rows), GQA,
fewer queries than keys; each in one block of query rows and in blocks of 1 and 2 rows (the blocked passes skip the
key columns a block cannot see, so a wrong extent shows up as a wrong derivative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import noisyft.methods.fisher.attention as fisher_attention
from noisyft.methods.fisher.attention import FusedDoubleBackwardSDPA, _AttentionBackward, _blocks, attention

B, H, HKV, L, E = 2, 4, 2, 6, 3


def _inputs(seed=0, heads_kv=H, queries=L):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, queries, E, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, heads_kv, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, heads_kv, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _banded_mask():
    """(1, 1, L, L) float: a sliding window of 2 keys (-inf elsewhere): blocks see columns that do not start at 0."""
    i = torch.arange(L)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 2)
    return torch.zeros(1, 1, L, L, dtype=torch.float64).masked_fill_(~band, float("-inf"))


def _padding_mask(left: bool):
    """(B, 1, L, L) bool: causal, row 1 padded by two tokens (left padding masks whole query rows)."""
    real = torch.ones(B, L, dtype=torch.bool)
    if left:
        real[1, :2] = False
    else:
        real[1, -2:] = False
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return causal & real[:, None, None, :]


def _first_and_second(fn, q, k, v, seed=1):
    """dO -> (dQ, dK, dV) with create_graph, then the gradient of a random linear form of them w.r.t. q, k, v, dO."""
    g = torch.Generator().manual_seed(seed)
    out = fn(q, k, v)
    do = torch.randn(out.shape, generator=g, dtype=out.dtype, requires_grad=True)
    first = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in first]
    form = sum((w * t).sum() for w, t in zip(weights, first, strict=True))
    second = torch.autograd.grad(form, (q, k, v, do))
    return (out, *first, *second)


CASES = {
    "causal": dict(is_causal=True),
    "right-padding": dict(attn_mask=_padding_mask(left=False)),
    "left-padding": dict(attn_mask=_padding_mask(left=True)),
    "float-mask": dict(attn_mask=torch.randn(1, H, L, L, dtype=torch.float64)),
    "gqa": dict(is_causal=True, enable_gqa=True),
    "sliding-window": dict(attn_mask=_banded_mask()),
    "fewer-queries-causal": dict(is_causal=True, queries=4),
    "fewer-queries-mask": dict(attn_mask=_padding_mask(left=True)[..., 2:, :], queries=4),
}


@pytest.mark.parametrize("rows", [64, 2, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_first_and_second_derivatives_match_math_sdpa(case, rows, monkeypatch):
    monkeypatch.setattr(fisher_attention, "BLOCK_ROWS", rows)
    kwargs = dict(CASES[case])
    queries = kwargs.pop("queries", L)
    q, k, v = _inputs(heads_kv=HKV if kwargs.get("enable_gqa") else H, queries=queries)

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def ours(q, k, v):
        return attention(q, k, v, **kwargs)

    expected = _first_and_second(math, q, k, v)
    got = _first_and_second(ours, q, k, v)
    assert any(t.abs().max() > 0.1 for t in expected[4:])  # the second derivatives are not trivially zero
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_outer_backward_without_the_cpu_kernel_equals_the_kernel_path(monkeypatch):
    """Off CPU (or where SDPA would not pick its CPU kernel) the outer backward recomputes the forward instead."""
    q, k, v = _inputs(seed=2)
    mask = _padding_mask(left=True)
    expected = _first_and_second(lambda q, k, v: attention(q, k, v, attn_mask=mask), q, k, v)
    monkeypatch.setattr(fisher_attention, "_cpu_flash", lambda *args: False)
    got = _first_and_second(lambda q, k, v: attention(q, k, v, attn_mask=mask), q, k, v)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_blocks_stop_at_the_last_key_their_rows_can_see(monkeypatch):
    monkeypatch.setattr(fisher_attention, "BLOCK_ROWS", 2)
    assert _blocks(None, True, L, L) == [(0, 2, 2), (2, 4, 4), (4, 6, 6)]
    assert _blocks(None, False, L, L) == [(0, 2, 6), (2, 4, 6), (4, 6, 6)]
    # left padding: batch row 1 sees no key below 2, but batch row 0 does, so the extents are the causal ones
    assert _blocks(_padding_mask(left=True), False, L, L) == [(0, 2, 2), (2, 4, 4), (4, 6, 6)]
    only_first = torch.zeros(1, 1, L, L, dtype=torch.bool)
    only_first[..., :3, 0] = True  # rows 3.. see nothing
    assert _blocks(only_first, False, L, L) == [(0, 2, 1), (2, 4, 1), (4, 6, 0)]


@pytest.mark.parametrize("rows", [64, 2])
def test_explicit_double_backward_passes_gradcheck(rows, monkeypatch):
    monkeypatch.setattr(fisher_attention, "BLOCK_ROWS", rows)
    q, k, v = _inputs(seed=3)
    do = torch.randn(B, H, L, E, dtype=torch.float64, requires_grad=True)
    mask = _padding_mask(left=True)

    def fn(q, k, v, do):
        return _AttentionBackward.apply(q, k, v, do, mask, False, 0.7)

    assert torch.autograd.gradcheck(fn, (q, k, v, do))


def test_mode_routes_sdpa_calls_and_leaves_other_ops_alone():
    q, k, v = _inputs()
    with FusedDoubleBackwardSDPA():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        other = q.exp()
    assert out.grad_fn.name().endswith("_AttentionBackward") or "Attention" in out.grad_fn.name()
    torch.testing.assert_close(other, q.exp())


@pytest.mark.parametrize("rows", [64, 2])
def test_penalty_and_its_parameter_gradient_equal_the_math_backend_on_a_model(rows, monkeypatch):
    """The whole estimator on a tiny Llama (GQA, padding): same value and same gradient w.r.t. every parameter."""
    monkeypatch.setattr(fisher_attention, "BLOCK_ROWS", rows)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from noisyft.methods.fisher.penalty import fisher_penalty

    config = LlamaConfig(
        vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [0, 0, 1, 4, 3, 5]])  # row 1: left padding
    am = (ids != 0).long()
    labels = ids.masked_fill(am == 0, -100)
    results = {}
    for sdpa in ("fused", "math"):
        model.zero_grad()
        pen = fisher_penalty(
            model, input_ids=ids, attention_mask=am, labels=labels, sdpa=sdpa,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        pen.backward()
        results[sdpa] = (pen.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["fused"][0], results["math"][0])
    assert results["fused"][0] > 0
    for a, b in zip(results["fused"][1], results["math"][1], strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_sdpa_path_is_refused():
    from noisyft.methods.fisher.penalty import differentiable_attention

    from conftest import tiny_llama

    with (
        pytest.raises(ValueError, match="sdpa must be one of"),
        differentiable_attention(tiny_llama(), sdpa="flash"),
    ):
        pass
