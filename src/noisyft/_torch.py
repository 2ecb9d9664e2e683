"""Small torch helpers shared by the methods and the trainer (no Trainer import)."""

from __future__ import annotations

import hashlib

import torch


def rank_seed(seed: int, rank: int, stream: str = "neftune") -> int:
    """A per-rank seed: different data-parallel ranks must draw different noise from one base seed."""
    digest = hashlib.sha256(f"noisyft-{stream}:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def logit_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy summed over the rows, count of rows whose argmax is the target) of logits (N, V), targets (N,):
    the sums behind TRL's logged ``entropy`` and ``mean_token_accuracy``."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.detach().float(), dim=-1)
        return -(logp.exp() * logp).sum(), (logits.detach().argmax(-1) == targets.to(logits.device)).sum()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/FSDP/compile and PEFT wrappers (the one owning get_input_embeddings)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            type(model).__name__ in ("FullyShardedDataParallel", "DataParallel") and hasattr(model, "module")
        ):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        else:
            break
    return model


class SeededStream:
    """A dedicated random stream: a ``torch.Generator`` made on first use on the tensors' device, seeded once, whose
    state is saved with a checkpoint (:meth:`state_dict`) and restored on resume (:meth:`load_state_dict`)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None

    def __call__(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        return self._generator

    def state_dict(self) -> dict | None:
        return None if self._generator is None else {"generator_state": self._generator.get_state()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self._pending = state["generator_state"]
            self._generator = None


def end_process_group(*, wait: bool) -> None:
    """Destroy the default process group, if this process (torchrun, accelerate launch) started one.

    Left to interpreter exit, gloo's worker threads can outlive the interpreter and abort the process now and then
    ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489). ``wait``: first a barrier,
    so that no rank tears its connections down while another still uses them (the normal end of a run).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
