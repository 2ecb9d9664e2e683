"""NEFTune noise: the maths per sequence / document, and the hook's train-only behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from noisyft.methods.neftune.noise import (
    NEFTuneConfig,
    NEFTuneHook,
    neftune_noise,
    rank_seed,
    token_sequence_lengths,
)

from conftest import tiny_llama

D = 64


def _bound(alpha, length, d=D):
    return alpha / math.sqrt(length * d)


def test_sequence_scale_bounds_and_zero_padding_right_and_left():
    alpha = 5.0
    embeds = torch.zeros(3, 10, D)
    mask = torch.tensor(
        [
            [1] * 10,  # full
            [1] * 4 + [0] * 6,  # right padding, length 4
            [0] * 7 + [1] * 3,  # left padding, length 3
        ]
    )
    g = torch.Generator().manual_seed(0)
    noise = neftune_noise(embeds, alpha=alpha, attention_mask=mask, generator=g)
    assert noise.shape == embeds.shape
    for i, length in enumerate([10, 4, 3]):
        real = mask[i].bool()
        bound = _bound(alpha, length)
        n = noise[i, real]
        assert n.abs().max() <= bound * (1 + 1e-6)
        assert n.abs().max() >= 0.95 * bound  # the draw fills the range, i.e. the scale is not smaller
        assert torch.all(noise[i, ~real] == 0)


def test_expected_squared_norm_is_alpha_squared_over_three_whatever_the_length():
    alpha = 3.0
    embeds = torch.zeros(400, 32, D)
    lengths = torch.tensor([32, 8] * 200)
    mask = (torch.arange(32)[None, :] < lengths[:, None]).long()
    noise = neftune_noise(
        embeds, alpha=alpha, attention_mask=mask, generator=torch.Generator().manual_seed(1)
    )
    sq = noise.pow(2).sum(dim=(1, 2))  # per sequence
    for length in (32, 8):
        mean = sq[lengths == length].mean().item()
        assert mean == pytest.approx(alpha**2 / 3, rel=0.03)


def test_padded_scale_shrinks_short_sequences_like_transformers():
    alpha = 5.0
    embeds = torch.zeros(2, 16, D)
    mask = torch.tensor([[1] * 16, [1] * 4 + [0] * 12])
    noise = neftune_noise(
        embeds, alpha=alpha, attention_mask=mask, scale="padded", generator=torch.Generator().manual_seed(0)
    )
    bound = _bound(alpha, 16)
    assert noise.abs().max() <= bound * (1 + 1e-6)
    assert (noise[1, 4:] != 0).all()  # padding is noised
    # the short sequence gets sqrt(4/16) = 1/2 of the noise norm it should have
    short = noise[1, :4].pow(2).sum().sqrt()
    assert short.item() < 0.8 * alpha / math.sqrt(3)


def test_packed_rows_get_per_document_scale():
    alpha = 4.0
    # one padding-free row with documents of length 3, 5 and 8, as TRL's collator builds it
    position_ids = torch.cat([torch.arange(3), torch.arange(5), torch.arange(8)])[None]
    lengths = token_sequence_lengths((1, 16), position_ids=position_ids)
    assert lengths.tolist() == [[3.0] * 3 + [5.0] * 5 + [8.0] * 8]
    embeds = torch.zeros(1, 16, 2048)
    noise = neftune_noise(
        embeds, alpha=alpha, position_ids=position_ids, generator=torch.Generator().manual_seed(0)
    )
    for lo, hi, length in [(0, 3, 3), (3, 8, 5), (8, 16, 8)]:
        chunk = noise[0, lo:hi]
        bound = _bound(alpha, length, 2048)
        assert chunk.abs().max() <= bound * (1 + 1e-6)
        assert chunk.abs().max() >= 0.99 * bound


def test_packed_rows_with_padding_and_attention_mask():
    # two packed rows padded to 8: documents [2, 3] + 3 pads; [4] + 4 pads
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    lengths = token_sequence_lengths((2, 8), attention_mask=mask, position_ids=position_ids)
    assert lengths.tolist() == [[2, 2, 3, 3, 3, 0, 0, 0], [4, 4, 4, 4, 0, 0, 0, 0]]


def test_padded_scale_equals_transformers_hook_under_same_seed():
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = torch.nn.Embedding(50, D)
    embedding.neftune_noise_alpha = 7.0
    ids = torch.randint(0, 50, (3, 11))
    clean = embedding(ids)
    torch.manual_seed(123)
    theirs = neftune_post_forward_hook(embedding, (ids,), clean)
    torch.manual_seed(123)
    ours = clean + neftune_noise(clean, alpha=7.0, scale="padded")
    assert torch.equal(ours, theirs)  # bit for bit


def test_gaussian_std():
    alpha = 2.0
    embeds = torch.zeros(8, 64, 256)
    noise = neftune_noise(
        embeds, alpha=alpha, distribution="gaussian", generator=torch.Generator().manual_seed(0)
    )
    assert noise.std().item() == pytest.approx(_bound(alpha, 64, 256), rel=0.02)
    uniform = neftune_noise(embeds, alpha=alpha, generator=torch.Generator().manual_seed(0))
    assert noise.std().item() / uniform.std().item() == pytest.approx(math.sqrt(3), rel=0.02)


def test_response_only_noises_labelled_tokens_with_full_sequence_length():
    alpha = 5.0
    embeds = torch.zeros(1, 10, 1024)
    labels = torch.tensor([[-100] * 6 + [7, 8, 9, 2]])
    noise = neftune_noise(
        embeds, alpha=alpha, labels=labels, response_only=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.all(noise[0, :6] == 0)
    assert noise[0, 6:].abs().max() == pytest.approx(_bound(alpha, 10, 1024), rel=0.01)
    with pytest.raises(ValueError, match="labels"):
        neftune_noise(embeds, alpha=alpha, response_only=True)


def test_alpha_zero_gives_zero_noise_and_config_validation():
    assert torch.all(neftune_noise(torch.randn(2, 5, 8), alpha=0.0) == 0)
    with pytest.raises(ValueError, match="alpha"):
        NEFTuneConfig(alpha=-1)
    with pytest.raises(ValueError, match="scale"):
        NEFTuneConfig(scale="row")
    with pytest.raises(ValueError, match="distribution"):
        NEFTuneConfig(distribution="laplace")


# -- the hook on a real (tiny) transformers model -------------------------------------------------------------


def _first_layer_inputs(model):
    """Capture what the first decoder layer receives (embeddings after every embedding hook)."""
    seen = []
    layer = model.model.layers[0]

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.detach().clone())

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    return seen, handle


def test_hook_noises_only_in_training_with_grad_and_respects_attention_mask():
    model = tiny_llama(hidden_size=32)
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    clean = model.get_input_embeddings()(ids).detach()
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0).attach(model)
    seen, handle = _first_layer_inputs(model)

    model.train()
    model(input_ids=ids, attention_mask=mask)
    noise = seen[-1] - clean
    assert noise[0].abs().max() > 0
    assert torch.all(noise[1, :4] == 0)  # padding untouched
    assert noise[1, 4:].abs().max() <= _bound(5.0, 5, 32) * (1 + 1e-5)
    assert noise[0].abs().max() <= _bound(5.0, 9, 32) * (1 + 1e-5)

    model.eval()
    model(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen[-1], clean)

    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen[-1], clean)

    model.train()  # generate runs under no_grad even when the model is left in training mode
    before = len(seen)
    model.generate(ids[:1], max_new_tokens=2, do_sample=False)
    assert torch.equal(seen[before], clean[:1])  # the prefill step saw clean embeddings

    hook.detach()
    model(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen[-1], clean)
    assert not model.get_input_embeddings()._forward_hooks
    handle.remove()


def test_hook_is_seeded_and_rank_dependent():
    model = tiny_llama()
    ids = torch.randint(3, 90, (2, 7))
    model.train()

    def draw(seed, rank):
        seen, handle = _first_layer_inputs(model)
        hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=seed, rank=rank).attach(model)
        model(input_ids=ids)
        hook.detach()
        handle.remove()
        return seen[-1]

    assert torch.equal(draw(0, 0), draw(0, 0))
    assert not torch.equal(draw(0, 0), draw(0, 1))
    assert not torch.equal(draw(0, 0), draw(1, 0))
    assert rank_seed(0, 0) != rank_seed(0, 1)


def test_hook_state_resumes_the_noise_stream():
    model = tiny_llama()
    ids = torch.randint(3, 90, (2, 7))
    model.train()
    seen, handle = _first_layer_inputs(model)
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=3).attach(model)
    model(input_ids=ids)
    state = hook.state_dict()
    model(input_ids=ids)
    model(input_ids=ids)
    expected = seen[-2:]
    hook.detach()

    resumed = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=999)
    resumed.load_state_dict(state)
    resumed.attach(model)
    model(input_ids=ids)
    model(input_ids=ids)
    assert torch.equal(seen[-2], expected[0]) and torch.equal(seen[-1], expected[1])
    resumed.detach()
    handle.remove()


def test_refuses_to_stack_on_transformers_neftune():
    from transformers.integrations.neftune import activate_neftune

    model = tiny_llama()
    activate_neftune(model, 5.0)
    with pytest.raises(ValueError, match="applied twice"):
        NEFTuneHook(NEFTuneConfig(alpha=5.0)).attach(model)


def test_hook_through_peft_lora_with_gradient_checkpointing():
    peft = pytest.importorskip("peft")
    model = tiny_llama(hidden_size=32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    ids = torch.randint(3, 90, (2, 6))
    clean = model.get_input_embeddings()(ids).detach()
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0).attach(lora)
    seen, handle = _first_layer_inputs(model)
    lora.train()
    out = lora(input_ids=ids, labels=ids)
    out.loss.backward()
    noise = seen[0] - clean
    assert noise.abs().max() > 0 and noise.abs().max() <= _bound(5.0, 6, 32) * (1 + 1e-5)
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
    assert hook.pop_stats()["noise_to_embed_norm"] > 0
    hook.detach()
    handle.remove()


def test_positional_model_call_still_reads_the_attention_mask():
    model = tiny_llama(hidden_size=32)
    ids = torch.randint(3, 90, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    clean = model.get_input_embeddings()(ids).detach()
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0).attach(model)
    seen, handle = _first_layer_inputs(model)
    model.train()
    model(ids, mask)  # positional: input_ids, attention_mask
    noise = seen[-1] - clean
    assert torch.all(noise[0, 5:] == 0)
    assert noise[0, :5].abs().max() <= _bound(5.0, 5, 32) * (1 + 1e-5)
    hook.detach()
    handle.remove()


def test_gemma_noise_lands_after_the_embedding_scale():
    from transformers import AutoModelForCausalLM, GemmaConfig

    d = 64
    config = GemmaConfig(
        vocab_size=96,
        hidden_size=d,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(3, 90, (1, 10))
    with torch.no_grad():
        clean = model.get_input_embeddings()(ids)  # scaled by sqrt(d) inside the module
    assert clean.norm() > 5 * torch.nn.functional.embedding(ids, model.get_input_embeddings().weight).norm()
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0).attach(model)
    seen, handle = _first_layer_inputs(model)
    model.train()
    model(input_ids=ids)
    noise = seen[-1] - clean
    # the noise is added to the scaled output, with the plain alpha / sqrt(L d) bound (not multiplied by sqrt(d))
    assert 0.9 * _bound(5.0, 10, d) <= noise.abs().max() <= _bound(5.0, 10, d) * (1 + 1e-4)
    hook.detach()
    handle.remove()
