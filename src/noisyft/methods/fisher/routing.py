"""Make a causal LM's forward pass twice differentiable for the Fisher penalty: route SDPA calls to an attention
with a double backward, keep gradient-checkpoint recomputation on the same path, and refuse what cannot work
(flash-attention 2/3 and flex attention, reentrant checkpointing, FSDP2-sharded models) with a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from noisyft._torch import unwrap_model

from .attention import FusedDoubleBackwardSDPA

logger = logging.getLogger(__name__)


class FisherSetupError(ValueError):
    """The model cannot be differentiated twice as configured (attention kernel, reentrant checkpointing)."""


# -- attention kernels and checkpointing: make the forward pass twice differentiable --------------------------------
@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _checkpointed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that checkpoint their forward; raises for reentrant checkpointing (it has no torch.autograd.grad)."""
    found = []
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant", True) is not False:
            raise FisherSetupError(
                "The Fisher penalty differentiates a gradient, which reentrant gradient checkpointing does not "
                "support (torch.autograd.grad through torch.utils.checkpoint(use_reentrant=True)). Enable "
                "checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default), "
                "or turn it off."
            )
        found.append(module)
    return found


def _refuse_fsdp2(model: torch.nn.Module) -> None:
    """FSDP2 (``fully_shard``) frees each layer's gathered weights after its part of a backward pass; the penalty's
    ``torch.autograd.grad`` is such a pass, so the loss's backward then runs the same graph over freed storage (a
    two-process CPU run of a tiny Llama crashed with a segmentation fault in it). Refuse rather than crash."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        raise FisherSetupError(
            "The Fisher penalty (and the Fisher diagnostic) cannot run on a model sharded with FSDP2 (fully_shard): "
            "it back-propagates twice through one forward pass, and FSDP2 frees the gathered weights after the first "
            "backward. Use DDP (plain torchrun), or drop the Fisher method for FSDP runs."
        )


class _MathSDPA:
    """A re-enterable ``sdpa_kernel(SDPBackend.MATH)``: checkpoint recomputation may enter it more than once."""

    def __enter__(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._stack = getattr(self, "_stack", [])
        self._stack.append(sdpa_kernel(SDPBackend.MATH))
        return self._stack[-1].__enter__()

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)


@contextlib.contextmanager
def _recompute_under(modules: list[torch.nn.Module], make_context) -> Iterator[None]:
    """Checkpointed segments recompute their forward during the backward pass, i.e. after the body has exited;
    ``context_fn`` makes the recomputation run under the same attention backend as the original forward."""
    saved = [(m, m._gradient_checkpointing_func) for m in modules]
    try:
        for module, func in saved:
            module._gradient_checkpointing_func = functools.partial(
                func, context_fn=lambda: (make_context(), make_context())
            )
        yield
    finally:
        for module, func in saved:
            module._gradient_checkpointing_func = func


SDPA_PATHS = ("fused", "math")


@contextlib.contextmanager
def differentiable_attention(model: torch.nn.Module, *, sdpa: str = "fused") -> Iterator[str]:
    """Run the body with an attention path that has a double backward; yields the implementation used.

    ``eager`` attention is plain autograd ops. ``sdpa`` calls go, for the body, to
    :func:`noisyft.methods.fisher.attention.attention` (``sdpa="fused"``: the fused kernel forward and an explicit
    double backward that keeps no L x L tensor) or to ``SDPBackend.MATH`` (``sdpa="math"``: the reference; the
    fused kernels alone raise "derivative for ... _scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"); logged once. Other kernels and reentrant gradient checkpointing raise ``ValueError``: switching
    them silently could change which tokens attend to which (padding-free batches rely on the flash kernel's
    sequence boundaries). Raises :class:`FisherSetupError` (a ``ValueError``).
    """
    if sdpa not in SDPA_PATHS:
        raise ValueError(f"sdpa must be one of {SDPA_PATHS}, got {sdpa!r}")
    base = unwrap_model(model)
    _refuse_fsdp2(base)
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    checkpointed = _checkpointed_modules(base)
    if impl == "eager":
        yield impl
        return
    if impl != "sdpa":
        raise FisherSetupError(
            f"The Fisher penalty needs the second derivative of the attention, which attn_implementation={impl!r} "
            f"does not provide. Load the model with attn_implementation='sdpa' (the default; noisyft then routes "
            f"the penalized forward pass through an attention with a double backward) or 'eager'."
        )
    if sdpa == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        _log_once("Fisher penalty: SDPA runs on its math backend for the penalized forward passes.")
        with sdpa_kernel(SDPBackend.MATH), _recompute_under(checkpointed, _MathSDPA):
            yield "math-sdpa"
        return
    _log_once(
        "Fisher penalty: SDPA calls of the penalized forward passes run the fused kernel forward with an explicit "
        "double backward (noisyft.methods.fisher.attention)."
    )
    with FusedDoubleBackwardSDPA(), _recompute_under(checkpointed, FusedDoubleBackwardSDPA):
        yield "sdpa-fused-double-backward"
