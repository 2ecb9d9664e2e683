"""SymNoise: the +/- noise's exact scale per sequence / document, its symmetry, and the pair's loss."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from noisyft.methods.symnoise.config import SymNoiseConfig
from noisyft.methods.symnoise.noise import symmetric_pair, symmetric_pair_batch, symnoise_noise

from conftest import tiny_llama

D = 64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_entry_is_plus_or_minus_the_closed_form_scale_and_padding_is_zero():
    alpha = 5.0
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [0] * 7 + [1] * 3])  # full, right-, left-padded
    noise = symnoise_noise(torch.zeros(3, 10, D), alpha=alpha, attention_mask=mask, generator=_gen())
    for i, length in enumerate([10, 4, 3]):
        real = mask[i].bool()
        expected = alpha / math.sqrt(length * D)
        torch.testing.assert_close(noise[i, real].abs(), torch.full_like(noise[i, real], expected))
        assert torch.all(noise[i, ~real] == 0)
        # squared norm of a sequence's noise is exactly alpha^2, whatever its length
        assert noise[i].pow(2).sum().item() == pytest.approx(alpha**2, rel=1e-5)


def test_signs_are_fair_and_independent_mean_zero_variance_closed_form():
    alpha, B, L = 3.0, 64, 16
    noise = symnoise_noise(torch.zeros(B, L, D), alpha=alpha, generator=_gen(1))
    n = noise.numel()
    var = alpha**2 / (L * D)  # per-entry variance of +/- alpha/sqrt(L d)
    # the mean of n fair signs times the scale has standard error sqrt(var / n)
    assert abs(noise.mean().item()) < 4 * math.sqrt(var / n)
    assert noise.pow(2).mean().item() == pytest.approx(var, rel=1e-5)  # exact: every entry squared is var
    # neighbouring entries are uncorrelated: E[s_k s_(k+1)] = 0, standard error 1/sqrt(n)
    signs = torch.sign(noise).flatten()
    assert abs((signs[1:] * signs[:-1]).mean().item()) < 4 / math.sqrt(n)


def test_packed_rows_are_scaled_per_document():
    alpha, d = 4.0, 128
    # one padding-free row with documents of 3, 5 and 8 tokens; a second row: [2, 3] + 3 pads
    position_ids = torch.tensor(
        [list(range(3)) + list(range(5)) + list(range(8)), [0, 1, 0, 1, 2] + [0] * 11]
    )
    mask = torch.tensor([[1] * 16, [1] * 5 + [0] * 11])
    noise = symnoise_noise(
        torch.zeros(2, 16, d), alpha=alpha, attention_mask=mask, position_ids=position_ids, generator=_gen()
    )
    for row, lo, hi, length in [(0, 0, 3, 3), (0, 3, 8, 5), (0, 8, 16, 8), (1, 0, 2, 2), (1, 2, 5, 3)]:
        chunk = noise[row, lo:hi].abs()
        torch.testing.assert_close(chunk, torch.full_like(chunk, alpha / math.sqrt(length * d)))
    assert torch.all(noise[1, 5:] == 0)


def test_padded_scale_noises_every_position_with_the_row_width():
    noise = symnoise_noise(
        torch.zeros(2, 8, D), alpha=2.0, attention_mask=torch.tensor([[1] * 8, [1] * 2 + [0] * 6]),
        scale="padded", generator=_gen(),
    )  # fmt: skip
    torch.testing.assert_close(noise.abs(), torch.full_like(noise, 2.0 / math.sqrt(8 * D)))


def test_response_only_and_alpha_zero():
    labels = torch.tensor([[-100] * 6 + [7, 8, 9, 2]])
    noise = symnoise_noise(
        torch.zeros(1, 10, D), alpha=5.0, labels=labels, response_only=True, generator=_gen()
    )
    assert torch.all(noise[0, :6] == 0)
    torch.testing.assert_close(noise[0, 6:].abs(), torch.full_like(noise[0, 6:], 5.0 / math.sqrt(10 * D)))
    with pytest.raises(ValueError, match="labels"):
        symnoise_noise(torch.zeros(1, 10, D), alpha=5.0, response_only=True)
    assert torch.all(symnoise_noise(torch.randn(2, 5, 8), alpha=0.0) == 0)


def test_deterministic_with_a_generator_and_different_across_seeds():
    e = torch.randn(2, 7, D)
    a = symnoise_noise(e, alpha=5.0, generator=_gen(3))
    b = symnoise_noise(e, alpha=5.0, generator=_gen(3))
    c = symnoise_noise(e, alpha=5.0, generator=_gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pair_is_exactly_symmetric():
    e = torch.zeros(3, 6, D)  # exact in floating point: (0 + n) and (0 - n)
    noise = symnoise_noise(e, alpha=5.0, generator=_gen())
    pair = symmetric_pair(e, noise)
    assert pair.shape == (6, 6, D)
    assert torch.equal(pair[:3], noise)
    assert torch.equal(pair[3:], -noise)
    e = torch.randn(3, 6, D)
    pair = symmetric_pair(e, noise)
    torch.testing.assert_close((pair[:3] + pair[3:]) / 2, e)  # the pair is centred on the clean embeddings
    torch.testing.assert_close((pair[:3] - pair[3:]) / 2, noise)


def test_pair_average_cancels_the_first_order_term_of_a_quadratic_exactly():
    # f(x) = x^T A x + b^T x: (f(x + n) + f(x - n)) / 2 = f(x) + n^T A n  (no b^T n term, unlike one copy)
    torch.manual_seed(0)
    d = 12
    A = torch.randn(d, d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    x = torch.randn(1, 1, d, dtype=torch.float64)
    noise = symnoise_noise(x, alpha=1.0, generator=_gen())
    pair = symmetric_pair(x, noise).reshape(2, d)

    def f(v):
        return v @ A @ v + b @ v

    n = noise.reshape(d)
    avg = (f(pair[0]) + f(pair[1])) / 2
    torch.testing.assert_close(avg, f(x.reshape(d)) + n @ A @ n)
    assert abs((f(pair[0]) - f(x.reshape(d)) - n @ A @ n).item()) > 1e-6  # one copy keeps b^T n


def test_pair_batch_loss_is_the_average_of_both_copies_on_a_tiny_model():
    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    labels = ids.masked_fill(mask == 0, -100)
    embeds = model.get_input_embeddings()(ids)
    noise = symnoise_noise(embeds, alpha=5.0, attention_mask=mask, generator=_gen())
    batch = symmetric_pair_batch(embeds, noise, attention_mask=mask, labels=labels)
    assert batch["inputs_embeds"].shape == (4, 9, 16) and batch["labels"].shape == (4, 9)
    pair_loss = model(**batch).loss
    plus = model(inputs_embeds=embeds + noise, attention_mask=mask, labels=labels).loss
    minus = model(inputs_embeds=embeds - noise, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(pair_loss, (plus + minus) / 2)
    # a shared (1, L) position_ids is expanded to every row of both copies
    pos = torch.arange(9)[None]
    assert symmetric_pair_batch(embeds, noise, position_ids=pos)["position_ids"].shape == (4, 9)


def test_config_validation_and_torch_free_import():
    assert SymNoiseConfig().alpha == 5.0 and SymNoiseConfig().pair is True
    for bad, match in [({"alpha": -1}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"scale": "row"}, "scale"),
                       ({"pair": "yes"}, "pair"), ({"seed": 1.5}, "seed")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            SymNoiseConfig(**bad)
    code = "import sys, noisyft.methods.symnoise.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
