"""Mixout: mix each selected Linear weight with its pre-trained value, entry by entry, in training forwards.

Paper: Lee, Cho & Kang, "Mixout: Effective Regularization to Finetune Large-scale Pretrained Language Models",
ICLR 2020, https://arxiv.org/abs/1909.11299

For a selected ``nn.Linear`` with weight ``w`` (out, in) and target ``u`` (a frozen copy of ``w`` taken by
:func:`mixout_`, or the tensor given in ``targets``), a training forward uses::

    M ~ Bernoulli(1 - p) iid per entry                                  (out, in), bool
    W_eff = (M * w + (1 - M) * u - p * u) / (1 - p)                     (out, in)
    y = x @ W_eff^T + b

equivalently ``W_eff = u + M * (w - u) / (1 - p)``, inverted dropout on ``w - u`` (computed that way, in one
autograd function that saves only the bool mask). So ``E[W_eff] = ((1 - p) w + p u - p u) / (1 - p) = w``
and ``Var[W_eff] = p / (1 - p) * (w - u)^2`` per entry, and ``dL/dw = M / (1 - p) * dL/dW_eff``. The bias is not
mixed (the paper's MixLinear mixes the weight only). A fresh mask is drawn per forward call. Evaluation
(``module.training`` False) and anything under ``no_grad`` (``generate``) use ``w`` exactly.

How it attaches, without changing the model's classes or its state dict: ``u`` is a *non-persistent* buffer
``mixout_target`` on the Linear (it follows ``.to(device)``, is absent from ``state_dict()`` and from
``save_pretrained``), a forward pre-hook puts ``W_eff`` in the module's instance ``__dict__`` so that
``nn.Linear.forward`` reads it as ``self.weight``, and a forward hook (``always_call=True``) removes it again. The
parameter ``w`` itself is never overwritten. :func:`remove_mixout_` removes hooks and buffers and restores dropout.

Which layers: every ``nn.Linear`` whose module name matches ``include`` (``re.search``; ``None`` = all) and not
``exclude``, and whose weight is trainable. Frozen matches (a LoRA base layer) are skipped: ``w == u`` always, so
mixout would be the identity. With PEFT LoRA the selected layers are then the ``lora_A`` / ``lora_B`` Linears, with
``u`` their values at the call (their init when called before training: ``lora_B`` mixes toward 0); the masks of A
and B are independent, so ``E[B_eff A_eff] = B A``. Refused with a ``ValueError``: ``p`` outside [0, 1), patterns
matching no Linear (or only frozen ones), a selected weight shared with another parameter (tied embeddings /
``lm_head``), and quantized or non-floating-point weights (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, tensor
subclasses), whose ``u`` could not be mixed in.

Dropout, as in the paper (which swaps dropout for mixout): the ``nn.Dropout`` modules *next to* each selected
Linear are set to p = 0, namely the dropout children of the Linear's parent module, and the dropout entries of
containers (``ModuleDict`` / ``ModuleList`` / ``Sequential``) among those children; a Linear inside a container
(``lora_A["default"]``) takes the container's parent as its parent. In BERT that is the attention-probability and
output dropouts of each block; in a PEFT LoRA layer ``lora_dropout``; Llama-family models have no dropout modules
(their ``attention_dropout`` is a float, 0.0 by default, left alone). Differences from the paper's code: the paper
replaces modules by a ``MixLinear`` class; here the class stays ``nn.Linear`` so saved models load as plain
``AutoModelForCausalLM``.

Randomness: with ``generator=None`` the masks come from torch's global RNG, like ``nn.Dropout``, so gradient
checkpointing's recomputation (which restores that RNG) redraws the same mask. A dedicated ``generator`` is not
replayed by checkpointing: do not combine it with gradient checkpointing.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

BUFFER = "mixout_target"
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential)

# Linear module -> its hooks; dropout module -> its original p. Weak keys: nothing is stored on the modules.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, _LinearMixout] = weakref.WeakKeyDictionary()
_ZEROED: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def mixout_mask(
    shape: torch.Size | tuple[int, ...], p: float, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool mask, True (keep ``w``) with probability ``1 - p`` per entry, False (take ``u``) with probability p."""
    return torch.rand(shape, device=device, generator=generator) >= p


def mixout_weight(w: torch.Tensor, u: torch.Tensor, p: float, mask: torch.Tensor) -> torch.Tensor:
    """``(M * w + (1 - M) * u - p * u) / (1 - p)`` for a bool mask ``M``; differentiable in ``w``."""
    return (torch.where(mask, w, u) - p * u) / (1.0 - p)


class _MixedWeight(torch.autograd.Function):
    """``W_eff = u + keep * (w - u) / (1 - p)`` with a hand-written backward ``dL/dw = keep / (1 - p) * dL/dW_eff``:
    three elementwise passes forward, two backward, and only the bool mask saved (autograd on the same expression,
    or ``u + F.dropout(w - u)``, keeps more and makes more passes over the weights)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.addcmul(u, keep, w - u, value=ctx.scale)  # (out, in)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None, None


class _LinearMixout:
    """The two hooks of one mixed Linear."""

    def __init__(self, p: float, generator: torch.Generator | None):
        self.p = p
        self.generator = generator
        self.handles: list = []

    def before(self, module: nn.Module, args):
        if not (module.training and torch.is_grad_enabled()) or self.p == 0:
            return None
        w = module._parameters["weight"]
        u = module._buffers[BUFFER]
        generator = self.generator
        if generator is None:
            # torch's global RNG, like nn.Dropout (so checkpointing's recomputation redraws the same mask)
            keep = torch.empty(w.shape, dtype=torch.bool, device=w.device).bernoulli_(1.0 - self.p)
        else:
            if generator.device != w.device:
                raise ValueError(f"Mixout generator is on {generator.device}, the weights on {w.device}")
            keep = mixout_mask(w.shape, self.p, device=w.device, generator=generator)  # (out, in)
        module.__dict__["weight"] = _MixedWeight.apply(w, u, keep, self.p)  # read by nn.Linear.forward
        return None

    def after(self, module: nn.Module, args, output):
        module.__dict__.pop("weight", None)
        return None


def _is_quantized(linear: nn.Linear) -> bool:
    weight = linear.weight
    return (
        not weight.is_floating_point()
        or type(linear).__module__.split(".")[0] == "bitsandbytes"
        or type(weight) not in (torch.Tensor, nn.Parameter)
        or type(weight.data) is not torch.Tensor
    )


def _neighbour_dropouts(model: nn.Module, name: str) -> list[nn.Module]:
    """Dropout children of the Linear's (non-container) parent, and of that parent's container children."""
    parts = name.split(".")
    parent = model
    path = []
    for depth in range(len(parts) - 1, -1, -1):
        path = parts[:depth]
        parent = model.get_submodule(".".join(path)) if path else model
        if not isinstance(parent, CONTAINERS):
            break
    found = []
    for child in parent.children():
        if isinstance(child, DROPOUTS):
            found.append(child)
        elif isinstance(child, CONTAINERS):
            found.extend(c for c in child.children() if isinstance(c, DROPOUTS))
    return found


def _select(model: nn.Module, include: str | None, exclude: str | None) -> list[tuple[str, nn.Linear]]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched = [
        (n, m)
        for n, m in linears
        if (include is None or re.search(include, n)) and not (exclude is not None and re.search(exclude, n))
    ]
    if not matched:
        example = f", e.g. {linears[0][0]!r}" if linears else ""
        raise ValueError(
            f"Mixout include={include!r} / exclude={exclude!r} match no nn.Linear module "
            f"(the model has {len(linears)}{example})"
        )
    for n, m in matched:
        if _is_quantized(m):
            raise ValueError(
                f"Mixout cannot mix the quantized layer {n!r} ({type(m).__name__}, weight {m.weight.dtype}): it needs "
                "floating-point weights; select only float layers (with QLoRA: include='lora_')"
            )
    selected = [(n, m) for n, m in matched if m.weight.requires_grad]
    if not selected:
        raise ValueError(
            f"Mixout include={include!r} / exclude={exclude!r} match only frozen nn.Linear modules "
            f"({len(matched)}, e.g. {matched[0][0]!r}); mixout of a frozen weight is the identity"
        )
    return selected


def _check_untied(model: nn.Module, selected: list[tuple[str, nn.Linear]]) -> None:
    names_of: dict[int, list[str]] = {}
    for n, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(n)
    for n, m in selected:
        names = names_of.get(id(m.weight), [])
        if len(names) > 1:
            raise ValueError(
                f"Mixout: the weight of {n!r} is tied to {', '.join(x for x in names if x != n + '.weight')}; "
                f"mixing it would also mix the tied use. Exclude it (e.g. exclude={n.rsplit('.', 1)[-1]!r}) "
                "or untie the weights"
            )


def mixout_(
    model: nn.Module,
    *,
    p: float,
    include: str | None = None,
    exclude: str | None = None,
    targets: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Apply Mixout in place to the selected ``nn.Linear`` layers of ``model``; returns their module names.

    ``u`` is a copy of each weight as it is now, or ``targets[name + ".weight"]`` (parameter names as in
    ``model.named_parameters()``) when given, e.g. the weights saved before NoisyTune perturbed them.
    ``generator=None`` draws masks from torch's global RNG (see the module docstring).
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"Mixout p must be a number in [0, 1), got {p!r}")
    selected = _select(model, include, exclude)
    _check_untied(model, selected)
    for n, m in selected:
        if m in _ATTACHED or BUFFER in m._buffers:
            raise ValueError(f"Mixout is already applied to {n!r}; call remove_mixout_(model) first")
    zeroed = 0
    for n, m in selected:
        w = m.weight
        if targets is not None:
            key = f"{n}.weight"
            if key not in targets:
                raise ValueError(f"Mixout targets have no tensor for {key!r}")
            if tuple(targets[key].shape) != tuple(w.shape):
                raise ValueError(
                    f"Mixout target {key!r} has shape {tuple(targets[key].shape)}, the weight {tuple(w.shape)}"
                )
            u = targets[key].detach().to(device=w.device, dtype=w.dtype).clone()
        else:
            u = w.detach().clone()
        m.register_buffer(BUFFER, u, persistent=False)
        state = _LinearMixout(float(p), generator)
        state.handles = [
            m.register_forward_pre_hook(state.before),
            m.register_forward_hook(state.after, always_call=True),
        ]
        _ATTACHED[m] = state
        for dropout in _neighbour_dropouts(model, n):
            if dropout not in _ZEROED:
                _ZEROED[dropout] = dropout.p
                dropout.p = 0.0
                zeroed += 1
    logger.info(
        "Mixout p=%s on %d Linear layers (e.g. %s); %d dropout modules set to p=0",
        p,
        len(selected),
        selected[0][0],
        zeroed,
    )
    return [n for n, _ in selected]


def remove_mixout_(model: nn.Module) -> list[str]:
    """Undo :func:`mixout_` on ``model``: hooks and ``u`` buffers removed, dropout p restored. The weights ``w``
    (what training changed) stay. Returns the module names it was removed from."""
    removed = []
    for n, m in model.named_modules():
        state = _ATTACHED.pop(m, None)
        if state is not None:
            for handle in state.handles:
                handle.remove()
            m._buffers.pop(BUFFER, None)
            m.__dict__.pop("weight", None)
            removed.append(n)
        if m in _ZEROED:
            m.p = _ZEROED.pop(m)
    return removed
