"""LNSR: penalize how far later hidden states move when Gaussian noise is injected at one decoder layer's input.

Paper: Hua et al., "Improving Pre-trained Language Model Fine-tuning with Noise Stability Regularization",
https://arxiv.org/abs/2206.05658 (earlier version https://arxiv.org/abs/2107.04835).

For a batch of B rows of L tokens, a decoder with layers ``0 .. n-1`` and the injection layer ``k``::

    eps[b, t, :] = sigma * z[b, t, :] * r[b, t],     z = torch.randn((B, L, d), generator),  r = 1 on real tokens
    x_k   = input hidden states of layer k                          (B, L, d)
    h_l(x)       : output of layer l, clean forward                 (B, L, d), l >= k
    h_l(x + eps) : output of layer l, the same forward with x_k + eps fed to layer k
    penalty = (1 / N) * sum_{l in S} sum_{b, t} w[b, t] * || h_l(x + eps)[b, t] - h_l(x)[b, t] ||_2^2

With the defaults ``relative_sigma=True`` and ``normalize=True`` (what :class:`LNSRConfig` uses) two things are
measured in the units a pre-norm decoder works in::

    eps[b, t, :] = sigma * rms(x_k[b, t]) * z[b, t, :] * r[b, t]          rms(v) = sqrt(mean_i v_i^2), no gradient
    h_l  ->  h_l / sqrt(mean_i h_l[b, t, i]^2 + 1e-6)                       per token, both forwards

Why: the paper's BERT has a LayerNorm after every layer, so its hidden states are O(1) per entry and an absolute
``sigma`` means the same thing at every layer and in every model. A Llama-style decoder's residual stream is not
normalized: in SmolLM2-135M its RMS is 0.11 at the embeddings and about 260 in the middle layers (a few huge
"massive activation" channels), and with the raw formula at ``sigma = 0.01`` a 2-step ``noisyft train --method
lnsr`` logged a loss of 4193 against a cross-entropy of 1.69, dominated by those channels. Relative noise and RMS-normalized states (what each layer's
input norm sees) gave 0.47 there with ``sigma = 0.01``, summed over the 30 layers. ``relative_sigma=False,
normalize=False`` is the raw formula above.

``S`` is ``layers`` (default: every ``l`` in ``k .. n-1``), ``w`` marks the real tokens (``attention_mask``, and
``labels != -100`` with ``response_only``), and ``N = sum w``: the penalty is a sum over layers and hidden
dimensions and a mean over real tokens, so it does not grow with the batch or sequence size. ``h_l`` is the
decoder's ``hidden_states[l + 1]`` (transformers' convention; the last entry is after the final norm), for both
forwards. Padding gets no noise and no weight (and, masked out of attention, cannot reach the real tokens).

Cost: one extra forward (and its backward) of decoder layers ``k .. n-1`` (the layers below ``k`` are not
recomputed: layer ``k`` is fed ``x_k + eps`` with ``x_k`` taken from the clean forward), without the LM head, when
``clean_hidden`` comes from the main forward (``output_hidden_states=True``); one more clean forward otherwise. The penalty's gradient flows through
both branches when the clean hidden states carry a graph (the paper's regularizer is a function of both).

The noisy forward starts from ``clean_hidden[0]`` (the decoder's input embeddings in the clean forward) passed as
``inputs_embeds``, so an input-embedding hook (NEFTune, SymNoise's one-copy variant) is not run a second time and
both forwards see the same input; this assumes ``hidden_states[0]`` is the ``inputs_embeds`` the decoder was given,
true for Llama, Mistral, Qwen2 and SmolLM (not for Gemma, whose decoder rescales its input). The noise is drawn
once per call and added by a forward pre-hook on layer ``k``, so gradient checkpointing's recomputation adds the
same ``eps``. Dropout draws differ between the two forwards; without dropout ``sigma = 0`` gives exactly 0.

Differences from the paper: the paper perturbs BERT's hidden states and sums squared distances per example; here
the sum is normalized per real token (so ``coef`` does not depend on the sequence length), ``sigma`` is absolute
(in hidden-state units), and the layers are a Llama-style causal decoder's. Works through PEFT / DDP wrappers:
the decoder is found under them (``get_decoder()``, else ``.model``) and its ``layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from noisyft._torch import unwrap_model


def decoder_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder stack (e.g. ``LlamaModel``) under any PEFT / DDP / compile wrapper, and its ``layers``."""
    base = unwrap_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"LNSR needs a Llama-like decoder with a `layers` ModuleList; {type(decoder).__name__} has none"
        )
    return decoder, layers


def _penalized_layers(layer: int, layers: Sequence[int] | None, n: int) -> list[int]:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(
            f"LNSR layer {layer!r} is out of range: the model has {n} decoder layers (0..{n - 1})"
        )
    chosen = list(range(layer, n)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not layer <= i < n]
    if bad or not chosen:
        raise ValueError(
            f"LNSR layers {list(layers or [])} must be indices in [{layer}, {n}) (layer={layer})"
        )
    return chosen


def _token_weights(shape, attention_mask, labels, response_only, device) -> torch.Tensor:
    B, L = shape
    weights = torch.ones(B, L, device=device)
    if attention_mask is not None:
        weights = weights * attention_mask.to(device).expand(B, L)
    if response_only:
        if labels is None:
            raise ValueError("LNSR response_only=True needs the labels (-100 marks tokens without loss)")
        weights = weights * (labels != -100).to(device).expand(B, L)
    return weights  # (B, L), 1 on the tokens that count


def lnsr_penalty(
    model: nn.Module,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    layer: int = 0,
    sigma: float,
    layers: Sequence[int] | None = None,
    response_only: bool = False,
    generator: torch.Generator | None = None,
    clean_hidden: Sequence[torch.Tensor] | None = None,
    relative_sigma: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """The LNSR noise-stability penalty (a differentiable fp32 scalar); formula and normalization in the module
    docstring. ``clean_hidden``: the ``hidden_states`` of the main forward on the same batch
    (``output_hidden_states=True``), saving the clean forward; without it ``input_ids`` is required.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ValueError(f"LNSR sigma must be a number >= 0, got {sigma!r}")
    decoder, blocks = decoder_and_layers(model)
    chosen = _penalized_layers(layer, layers, len(blocks))
    forward_kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
    if clean_hidden is None:
        if input_ids is None:
            raise ValueError("LNSR needs input_ids, or clean_hidden from the main forward")
        embeds = unwrap_model(model).get_input_embeddings()(input_ids)  # (B, L, d)
        clean_hidden = decoder(
            inputs_embeds=embeds, output_hidden_states=True, **forward_kwargs
        ).hidden_states
    if len(clean_hidden) != len(blocks) + 1:
        raise ValueError(f"LNSR clean_hidden has {len(clean_hidden)} entries, expected {len(blocks) + 1}")
    embeds = clean_hidden[0]  # (B, L, d)
    B, L, d = embeds.shape
    weights = _token_weights((B, L), attention_mask, labels, response_only, embeds.device)  # (B, L)
    x_k = clean_hidden[layer]  # (B, L, d), layer k's input in the clean forward
    scale = sigma * weights  # (B, L)
    if relative_sigma:  # in units of each token's RMS at layer k (a constant: no gradient through the scale)
        scale = scale * x_k.detach().float().pow(2).mean(-1).sqrt()
    noise = torch.randn(
        (B, L, d), generator=generator, device=embeds.device, dtype=torch.float32
    )  # (B, L, d)
    noise = (noise * scale.unsqueeze(-1)).to(embeds.dtype)

    # Layer k's input in the noisy forward is the clean x_k + eps. The layers below k would only recompute x_k
    # (the same function of the same input), so they are skipped: each returns its input unchanged, and layer k
    # gets clean_hidden[k] itself, which keeps the gradient path into the layers below through the clean graph.

    def add_noise(module, args, kwargs):
        if args:
            return (x_k + noise, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x_k + noise}

    def skip(hidden_states=None, *args, **kwargs):
        return hidden_states

    handle = blocks[layer].register_forward_pre_hook(add_noise, with_kwargs=True)
    for block in blocks[:layer]:
        block.forward = skip  # an instance attribute over the class's forward; removed below
    try:
        noisy_hidden = decoder(
            inputs_embeds=embeds, output_hidden_states=True, **forward_kwargs
        ).hidden_states
    finally:
        handle.remove()
        for block in blocks[:layer]:
            del block.forward
    total = embeds.new_zeros((), dtype=torch.float32)

    def view(h: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> fp32, RMS-normalized per token if asked
        h = h.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) if normalize else h

    for index in chosen:
        diff = view(noisy_hidden[index + 1]) - view(clean_hidden[index + 1])  # (B, L, d)
        total = total + (diff.pow(2).sum(-1) * weights).sum()
    return total / weights.sum().clamp_min(1.0)
