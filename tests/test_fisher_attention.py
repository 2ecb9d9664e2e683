"""The Fisher penalty's attention (fused forward, explicit double backward) against SDPA's math backend.

Float64, tiny shapes: first derivatives, second derivatives (a gradient of a gradient) and torch's own
gradcheck / gradgradcheck of the explicit backward; causal, padding (right and left: fully masked query rows), GQA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisyft.methods.fisher.attention import FusedDoubleBackwardSDPA, _AttentionBackward, attention

B, H, HKV, L, E = 2, 4, 2, 6, 3


def _inputs(seed=0, heads_kv=H):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, heads_kv, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, heads_kv, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


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
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_and_second_derivatives_match_math_sdpa(case):
    kwargs = CASES[case]
    q, k, v = _inputs(heads_kv=HKV if kwargs.get("enable_gqa") else H)

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


def test_explicit_double_backward_passes_gradcheck():
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


def test_penalty_and_its_parameter_gradient_equal_the_math_backend_on_a_model():
    """The whole estimator on a tiny Llama (GQA, padding): same value and same gradient w.r.t. every parameter."""
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
