"""LNSR: the penalty against two forwards run by hand, zero at sigma = 0, gradients, padding, wrappers, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from noisyft.methods.lnsr.config import LNSRConfig
from noisyft.methods.lnsr.penalty import lnsr_penalty

from conftest import tiny_llama

# the paper's formula: absolute sigma and raw hidden states
RAW = {"relative_sigma": False, "normalize": False}


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return ids, mask


@torch.no_grad()
def _by_hand(model, ids, mask, *, layer, sigma, seed, layers):
    """Run the model twice, adding the documented noise to layer `layer`'s input by hand; loop over tokens."""
    B, L = ids.shape
    d = model.config.hidden_size
    eps = torch.randn((B, L, d), generator=torch.Generator().manual_seed(seed)) * sigma * mask[..., None]
    clean = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states

    def hook(module, args, kwargs):
        return (args[0] + eps, *args[1:]), kwargs

    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    noisy = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    handle.remove()
    total, count = 0.0, 0
    for b in range(B):
        for t in range(L):
            if mask[b, t]:
                count += 1
                for index in layers:
                    total += float(((noisy[index + 1][b, t] - clean[index + 1][b, t]) ** 2).sum())
    return total / count


@pytest.mark.parametrize(("layer", "layers"), [(0, None), (1, None), (0, [2])])
def test_penalty_equals_the_direct_computation(layer, layers):
    model = tiny_llama(layers=3)
    ids, mask = _batch()
    sigma, seed = 0.3, 5
    ours = lnsr_penalty(
        model, input_ids=ids, attention_mask=mask, layer=layer, layers=layers, sigma=sigma,
        generator=torch.Generator().manual_seed(seed), **RAW,
    )  # fmt: skip
    expected = _by_hand(
        model, ids, mask, layer=layer, sigma=sigma, seed=seed, layers=layers or range(layer, 3)
    )
    assert expected > 0
    assert ours.item() == pytest.approx(expected, rel=1e-5)


def test_default_relative_noise_and_normalized_states_equal_a_computation_by_hand():
    """Defaults: noise std sigma * rms(x_k) per token, and h / rms(h) compared, checked on two forwards by hand."""
    model = tiny_llama(layers=3)
    ids, mask = _batch()
    k, sigma, seed = 1, 0.2, 4
    ours = lnsr_penalty(
        model, input_ids=ids, attention_mask=mask, layer=k, sigma=sigma,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        rms = clean[k].pow(2).mean(-1, keepdim=True).sqrt()  # (B, L, 1)
        z = torch.randn((2, 7, model.config.hidden_size), generator=torch.Generator().manual_seed(seed))
        eps = sigma * rms * z * mask[..., None]
        handle = model.model.layers[k].register_forward_pre_hook(
            lambda m, args, kwargs: ((args[0] + eps, *args[1:]), kwargs), with_kwargs=True
        )
        noisy = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        handle.remove()
    total = 0.0
    for index in (1, 2):
        a = noisy[index + 1] / (noisy[index + 1].pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        b = clean[index + 1] / (clean[index + 1].pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        total += float(((a - b).pow(2).sum(-1) * mask).sum())
    expected = total / float(mask.sum())
    assert expected > 0
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    raw = lnsr_penalty(
        model, input_ids=ids, attention_mask=mask, layer=k, sigma=sigma,
        generator=torch.Generator().manual_seed(seed), **RAW,
    )  # fmt: skip
    assert raw.item() != pytest.approx(expected, rel=1e-2)  # the two settings differ


def test_zero_at_sigma_zero_and_clean_hidden_from_the_main_forward_gives_the_same_value():
    model = tiny_llama(layers=3)
    ids, mask = _batch()
    assert lnsr_penalty(model, input_ids=ids, attention_mask=mask, sigma=0.0).item() == 0.0
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    reused = lnsr_penalty(
        model,
        attention_mask=mask,
        sigma=0.2,
        clean_hidden=out.hidden_states,
        generator=torch.Generator().manual_seed(0),
    )
    fresh = lnsr_penalty(
        model, input_ids=ids, attention_mask=mask, sigma=0.2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(reused, fresh)


def test_gradient_flows_to_the_layers():
    model = tiny_llama(layers=3)
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    penalty = lnsr_penalty(model, attention_mask=mask, layer=1, sigma=0.5, clean_hidden=out.hidden_states)
    penalty.backward()
    for index in (1, 2):
        grad = model.model.layers[index].mlp.down_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_layers_below_the_noise_are_not_recomputed_and_the_gradient_is_the_full_recomputations():
    """With the noise at layer k > 0 the noisy forward starts at the clean x_k: layers below k run once (in the
    main forward), and every parameter's gradient equals that of two complete forwards computed by hand."""
    model = tiny_llama(layers=3)
    ids, mask = _batch()
    k, sigma, seed = 2, 0.4, 3
    calls = []
    handles = [
        block.mlp.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        for i, block in enumerate(model.model.layers)
    ]
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ours = lnsr_penalty(
        model, attention_mask=mask, layer=k, sigma=sigma, clean_hidden=out.hidden_states,
        generator=torch.Generator().manual_seed(seed), **RAW,
    )  # fmt: skip
    for handle in handles:
        handle.remove()
    assert calls == [0, 1, 2, 2]  # main forward: 0, 1, 2; the noisy one: layer 2 only
    ours.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    eps = torch.randn((2, 7, model.config.hidden_size), generator=torch.Generator().manual_seed(seed))
    eps = eps * sigma * mask[..., None]
    clean = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    handle = model.model.layers[k].register_forward_pre_hook(
        lambda m, args, kwargs: ((args[0] + eps, *args[1:]), kwargs), with_kwargs=True
    )
    noisy = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    handle.remove()
    w = mask[..., None].float()
    expected = ((noisy[k + 1] - clean[k + 1]).pow(2) * w).sum() / mask.sum()
    torch.testing.assert_close(ours, expected)
    expected.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0  # reached through x_k
    for name, param in model.named_parameters():
        if param.grad is not None or name in got:
            torch.testing.assert_close(got[name], param.grad, msg=name)
    assert all("forward" not in block.__dict__ for block in model.model.layers)  # the skip is removed


def test_padding_is_excluded():
    model = tiny_llama(layers=2)
    ids, mask = _batch()
    other_pad = ids.clone()
    other_pad[1, 4:] = 50  # different padding tokens: the penalty must not change

    def penalty(input_ids, attention_mask):
        return lnsr_penalty(
            model, input_ids=input_ids, attention_mask=attention_mask, sigma=0.3,
            generator=torch.Generator().manual_seed(2),
        ).item()  # fmt: skip

    assert penalty(ids, mask) == pytest.approx(penalty(other_pad, mask), rel=1e-6)
    assert penalty(ids, torch.ones_like(mask)) != pytest.approx(
        penalty(ids, mask), rel=1e-3
    )  # the mask matters


def test_through_a_peft_lora_wrapper_equals_the_base_model_while_lora_b_is_zero():
    from peft import LoraConfig, get_peft_model

    ids, mask = _batch()
    base = lnsr_penalty(
        tiny_llama(),
        input_ids=ids,
        attention_mask=mask,
        sigma=0.3,
        generator=torch.Generator().manual_seed(0),
    )
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped = lnsr_penalty(
        peft_model, input_ids=ids, attention_mask=mask, sigma=0.3, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(wrapped, base)


def test_bad_layer_indices_are_one_line_value_errors():
    model = tiny_llama(layers=2)
    ids, mask = _batch()
    for kwargs, match in [({"layer": 2}, "out of range"), ({"layer": -1}, "out of range"),
                          ({"layer": 1, "layers": [0]}, "layers"), ({"layers": [5]}, "layers")]:  # fmt: skip
        with pytest.raises(ValueError, match=match) as info:
            lnsr_penalty(model, input_ids=ids, attention_mask=mask, sigma=0.1, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="sigma"):
        lnsr_penalty(model, input_ids=ids, sigma=-1.0)


def test_config_validation_and_torch_free_import():
    assert LNSRConfig(layer=1, layers=[3, 1, 3]).layers == [1, 3]
    for bad, match in [({"sigma": -0.1}, "sigma"), ({"layer": -1}, "layer"), ({"layer": 2, "layers": [1]}, "layers"),
                       ({"layers": []}, "layers"), ({"coef": float("inf")}, "coef")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LNSRConfig(**bad)
    code = "import sys, noisyft.methods.lnsr.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gradient_checkpointing_adds_the_same_noise_in_the_recomputation():
    ids, mask = _batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(layers=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        gen = torch.Generator().manual_seed(4)
        lnsr_penalty(
            model, attention_mask=mask, layer=1, sigma=0.5, clean_hidden=out.hidden_states, generator=gen
        ).backward()
        grads.append(model.model.layers[2].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
