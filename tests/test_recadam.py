"""RecAdam: one step by hand, the Adam and the pull limits, and an exact checkpoint resume."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from noisyft.methods.recadam.config import RecAdamConfig
from noisyft.methods.recadam.optimizer import RecAdam, anneal_lambda


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)  # a fixed batch per step
    x = torch.randn(8, 5, generator=g)
    y = torch.randn(8, 1, generator=g)
    return ((model(x) - y) ** 2).mean()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def test_one_step_matches_a_hand_computation():
    lr, b1, b2, eps, wd, gamma = 0.01, 0.8, 0.9, 1e-3, 0.1, 20.0
    theta0 = [0.5, -1.0, 2.0]
    anchor = [0.0, 1.0, 2.5]
    grad = [0.3, -2.0, 0.0]
    p = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = RecAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, anneal_k=0.1, anneal_t0=1.0,
                  gamma=gamma, anchor=[torch.tensor(anchor, dtype=torch.float64)])  # fmt: skip
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    lam = 0.5  # t = 1 = t0
    expected = []
    for th, a, g in zip(theta0, anchor, grad, strict=True):
        th = th * (1 - lr * wd)
        m_hat = (1 - b1) * g / (1 - b1)  # bias-corrected first moment = g at t = 1
        v_hat = (1 - b2) * g * g / (1 - b2)  # = g^2
        th = th - lr * lam * m_hat / (math.sqrt(v_hat) + eps)
        th = th - lr * (1 - lam) * gamma * (th - a)
        expected.append(th)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert opt.current_lambda() == 0.5


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_large_k_after_t0_is_plain_adam_bit_for_bit(weight_decay):
    a, b = _model(), _model()
    ours = RecAdam(
        a.parameters(), lr=0.01, weight_decay=weight_decay, anneal_k=1e6, anneal_t0=0.0, gamma=50.0
    )
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = ref_cls(b.parameters(), lr=0.01, weight_decay=weight_decay, foreach=False)
    _train(a, ours, range(20))
    _train(b, ref, range(20))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_before_t0_parameters_are_pulled_to_the_anchor_geometrically():
    model = _model()
    anchor = [torch.zeros_like(p) for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    lr, gamma, n = 0.01, 30.0, 10
    opt = RecAdam(model.parameters(), lr=lr, anneal_k=1.0, anneal_t0=1000.0, gamma=gamma, anchor=anchor)
    _train(model, opt, range(n))
    # lambda ~ e^-990: the task step vanishes and theta - theta* shrinks by (1 - lr gamma) per step
    for p, s in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach(), s * (1 - lr * gamma) ** n, rtol=1e-6, atol=1e-9)


def test_anchor_mapping_and_default_copy():
    model = _model()
    params = list(model.parameters())
    opt = RecAdam(model.parameters(), lr=0.01, gamma=1.0)
    assert all(torch.equal(opt.state[p]["anchor"], p) and opt.state[p]["anchor"] is not p for p in params)
    mapping = {p: torch.full_like(p, 3.0) for p in params}
    opt = RecAdam(
        [{"params": params[:2]}, {"params": params[2:], "gamma": 0.0}], lr=0.01, gamma=1.0, anchor=mapping
    )
    assert torch.all(opt.state[params[3]]["anchor"] == 3.0)
    assert opt.param_groups[1]["gamma"] == 0.0


def test_state_dict_round_trip_resumes_exactly():
    n, k = 12, 5
    full = _model()
    anchor = [torch.randn_like(p) for p in full.parameters()]
    kwargs = {"lr": 0.01, "weight_decay": 0.01, "anneal_k": 0.5, "anneal_t0": 6.0, "gamma": 40.0}
    opt = RecAdam(full.parameters(), anchor=anchor, **kwargs)
    _train(full, opt, range(n))

    part = _model()
    opt = RecAdam(part.parameters(), anchor=anchor, **kwargs)
    _train(part, opt, range(k))
    buffer = io.BytesIO()
    torch.save({"model": part.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model()  # fresh weights and a fresh optimizer, as after a restart
    resumed.load_state_dict(saved["model"])
    opt = RecAdam(resumed.parameters(), lr=0.5, anneal_k=9.0, anneal_t0=0.0, gamma=1.0)  # anchor: wrong copy
    opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    assert opt.param_groups[0]["gamma"] == 40.0 and opt.param_groups[0]["lr"] == 0.01
    _train(resumed, opt, range(k, n))
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_bad_settings_are_refused():
    params = list(_model().parameters())
    for bad, match in [({"gamma": -1.0}, "gamma"), ({"anneal_k": float("inf")}, "anneal_k"),
                       ({"lr": 0.1, "gamma": 100.0}, "lr \\* gamma"), ({"betas": (0.9, 1.0)}, "betas"),
                       ({"anchor": [torch.zeros(1)]}, "anchor"), ({"anchor": {}}, "anchor")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            RecAdam(params, **{"gamma": 1.0, **bad})
    with pytest.raises(ValueError, match="gamma"):
        RecAdamConfig(gamma=-1)
    with pytest.raises(ValueError, match="anchor"):
        RecAdamConfig(anchor="init")
    code = "import sys, noisyft.methods.recadam.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_anneal_lambda_closed_form_and_no_overflow():
    assert anneal_lambda(250, 0.5, 250) == 0.5
    assert anneal_lambda(252, 0.5, 250) == pytest.approx(1 / (1 + math.exp(-1)))
    assert anneal_lambda(1e9, 1e3, 0) == 1.0 and anneal_lambda(0, 1e3, 1e9) == 0.0
