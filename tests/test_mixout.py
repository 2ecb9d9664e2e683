"""Mixout: E[W_eff] = w and Var[W_eff] = p/(1-p) (w-u)^2 by Monte Carlo, exact eval, exact gradient, and a
checkpoint that reloads as a plain AutoModelForCausalLM."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from noisyft.methods.mixout.config import MixoutConfig
from noisyft.methods.mixout.mixout import BUFFER, mixout_, mixout_mask, mixout_weight, remove_mixout_

from conftest import tiny_llama


def _linear_with_moved_weights(p_in=4, p_out=3) -> tuple[nn.Linear, torch.Tensor]:
    """A Linear whose u is its weight at the call, then w moved away from u (as training would)."""
    torch.manual_seed(0)
    lin = nn.Linear(p_in, p_out)
    u = lin.weight.detach().clone()
    return lin, u


def _effective_weight(lin: nn.Linear) -> torch.Tensor:
    """W_eff of one training forward, read from the output: x = I gives rows x W^T + b."""
    eye = torch.eye(lin.in_features)
    return (lin(eye) - lin.bias).T  # (out, in)


def test_expectation_and_variance_match_the_closed_form_by_monte_carlo():
    p, n = 0.3, 20000
    lin, u = _linear_with_moved_weights()
    mixout_(lin, p=p)
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))  # w != u
    w = lin.weight.detach()
    lin.train()
    samples = torch.stack([_effective_weight(lin).detach() for _ in range(n)])  # (n, out, in)
    # W_eff = w + (M - q) (w - u) / q with q = 1 - p: a scaled Bernoulli(q) around w
    q = 1 - p
    var = p / (1 - p) * (w - u) ** 2
    se_mean = (var / n).sqrt()
    assert ((samples.mean(0) - w).abs() <= 4.5 * se_mean + 1e-6).all()
    # standard error of the sample variance: sqrt((mu4 - sigma^4) / n), mu4 of Bernoulli(q) = q(1-q)(1 - 3q + 3q^2)
    c2 = ((w - u) / q) ** 2
    mu4 = c2**2 * q * (1 - q) * (1 - 3 * q + 3 * q**2)
    se_var = ((mu4 - var**2) / n).sqrt()
    assert ((samples.var(0) - var).abs() <= 4.5 * se_var + 1e-6).all()


def test_eval_and_no_grad_use_w_exactly_and_p_zero_is_plain():
    lin, _ = _linear_with_moved_weights()
    mixout_(lin, p=0.5)
    with torch.no_grad():
        lin.weight.add_(1.0)
    x = torch.randn(5, 4)
    plain = x @ lin.weight.T + lin.bias
    lin.eval()
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    lin.train()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), plain)  # generate runs under no_grad
    assert not torch.allclose(lin(x), plain)  # a training forward is mixed
    lin2, _ = _linear_with_moved_weights()
    mixout_(lin2, p=0.0)
    with torch.no_grad():
        lin2.weight.add_(1.0)
    torch.testing.assert_close(lin2(x), torch.nn.functional.linear(x, lin2.weight, lin2.bias))


def test_gradient_equals_autograd_on_the_explicit_formula_with_the_same_mask():
    p = 0.4
    lin, u = _linear_with_moved_weights()
    mixout_(lin, p=p, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        lin.weight.mul_(3.0).add_(0.5)
    x = torch.randn(6, 4)
    target = torch.randn(6, 3)
    ((lin(x) - target) ** 2).sum().backward()
    mask = mixout_mask(lin.weight.shape, p, generator=torch.Generator().manual_seed(7))
    assert mask.float().mean() < 1  # some entries are swapped
    w = lin.weight.detach().clone().requires_grad_(True)
    w_eff = (mask * w + (~mask) * u - p * u) / (1 - p)  # the paper's formula, written out
    ((x @ w_eff.T + lin.bias.detach() - target) ** 2).sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad)
    torch.testing.assert_close(mixout_weight(w.detach(), u, p, mask), w_eff.detach())


def test_state_dict_classes_and_checkpoint_reload_as_plain_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    names = mixout_(model, p=0.5, exclude="lm_head")
    assert len(names) == 14  # 2 layers x 7 Linears
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == classes
    assert BUFFER in dict(model.model.layers[0].mlp.up_proj.named_buffers(recurse=False))
    ids = torch.randint(3, 96, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)  # saved while attached: no extra keys, no custom module
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    saved = reloaded.state_dict()
    assert set(saved) == set(keys)
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), k
    assert remove_mixout_(model) == names
    assert not any(BUFFER in dict(m.named_buffers(recurse=False)) for m in model.modules())
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits)


def test_lm_head_excluded_by_nothing_on_untied_model_and_refused_when_tied():
    assert "lm_head" in mixout_(tiny_llama(), p=0.1)
    with pytest.raises(ValueError, match=r"lm_head.*tied.*embed_tokens"):
        mixout_(tiny_llama(tie=True), p=0.1)
    assert "lm_head" not in mixout_(tiny_llama(tie=True), p=0.1, exclude="lm_head")


def test_refusals_are_one_line_value_errors():
    for bad in (-0.1, 1.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="p must be"):
            mixout_(nn.Linear(2, 2), p=bad)
    with pytest.raises(ValueError, match=r"match no nn\.Linear"):
        mixout_(tiny_llama(), p=0.1, include="no_such_layer")
    frozen = nn.Sequential(nn.Linear(2, 2))
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="only frozen"):
        mixout_(frozen, p=0.1)
    quant = nn.Linear(2, 2)
    quant.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized"):
        mixout_(nn.Sequential(quant, nn.Linear(2, 2)), p=0.1)
    lin = nn.Linear(2, 2)
    mixout_(lin, p=0.1)
    with pytest.raises(ValueError, match="already applied"):
        mixout_(lin, p=0.1)
    for err in (
        lambda: mixout_(nn.Linear(2, 2), p=0.1, targets={}),
        lambda: mixout_(nn.Sequential(nn.Linear(2, 2)), p=0.1, targets={"0.weight": torch.zeros(3)}),
    ):
        with pytest.raises(ValueError, match="target"):
            err()


def test_targets_set_u_and_neighbouring_dropout_is_zeroed_then_restored():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(3, 3)
            self.dropout = nn.Dropout(0.2)
            self.other = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3))
            self.far = nn.Sequential(nn.Sequential(nn.Dropout(0.4)))

    block = Block()
    u = {"dense.weight": torch.full((3, 3), 2.0)}
    assert mixout_(block, p=0.5, include=r"^dense$", targets=u) == ["dense"]
    assert torch.equal(block.dense.mixout_target, u["dense.weight"])
    assert block.dropout.p == 0.0 and block.other[1].p == 0.0  # child, and inside a container child
    assert block.far[0][0].p == 0.4  # two containers down: not next to the layer
    remove_mixout_(block)
    assert block.dropout.p == 0.2 and block.other[1].p == 0.3


def test_lora_adapters_are_mixed_and_the_frozen_base_is_skipped(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    names = mixout_(model, p=0.5, exclude="lm_head")
    assert names and all(("lora_A" in n or "lora_B" in n) for n in names)
    assert len(names) == 8  # 2 layers x (q, v) x (A, B)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_dropout["default"].p == 0.0
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any(BUFFER in k for k in saved) and len(saved) == 8


def test_config_validation_and_torch_free_import():
    assert MixoutConfig().exclude == "lm_head" and MixoutConfig().target == "pretrained"
    for bad, match in [({"p": 1.0}, "p"), ({"p": -0.5}, "p"), ({"include": "("}, "include"),
                       ({"target": "x"}, "target"), ({"seed": "1"}, "seed")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            MixoutConfig(**bad)
    code = "import sys, noisyft.methods.mixout.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mask_rate_is_one_minus_p():
    mask = mixout_mask((400, 500), 0.3, generator=torch.Generator().manual_seed(0))
    n = mask.numel()
    assert abs(mask.float().mean().item() - 0.7) < 4 * math.sqrt(0.21 / n)


def test_gradient_checkpointing_recomputes_the_same_masks():
    ids = torch.randint(3, 96, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mixout_(model, p=0.5, exclude="lm_head")
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05)  # w != u, so the masks matter
        model.train()
        torch.manual_seed(3)  # masks from the global RNG, as dropout
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_gradient_on_the_global_rng_path_is_the_mask_over_one_minus_p():
    p = 0.3
    lin, u = _linear_with_moved_weights()
    mixout_(lin, p=p)  # no generator: the mask comes from the global RNG
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))  # every entry differs from u
    seen = {}
    lin.register_forward_pre_hook(lambda m, a: seen.update(w_eff=m.__dict__["weight"].detach().clone()))
    x, c = torch.randn(6, 4), torch.randn(6, 3)
    (lin(x) * c).sum().backward()
    mask = ~torch.isclose(seen["w_eff"], u)  # entries that kept w (u + (w - u) / (1 - p) != u)
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(seen["w_eff"], mixout_weight(lin.weight.detach(), u, p, mask))
    torch.testing.assert_close(lin.weight.grad, mask / (1 - p) * (c.T @ x))  # dL/dW_eff = c^T x
