"""Run by test_fsdp2_cpu.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): noisyft's pure-torch methods on a tiny
Llama sharded with torch's own FSDP2 (``fully_shard`` on every decoder layer and on the root), against the same loop
under torch DDP. One launch runs every mode and writes ``rank{r}.pt`` with what the test compares.

Modes (each a plain AdamW loop over fixed per-rank batches, 5 steps, after one untimed warm-up run of each wrapper):
  noisytune          NoisyTune on the sharded model (the plugin's generator: same seed on every rank), gathered with
                     ``full_tensor()``.
  plain, neftune,    under FSDP2 and under DDP: losses per step, wall time, final full weights and (NEFTune) each
  noisytune_neftune  rank's draws; NEFTuneHook seeded per rank as the trainer does.
  resume             FSDP2 + NEFTune: steps 1-2, save model/optimizer (torch.distributed.checkpoint) and the hook's
                     state_dict, rebuild everything, load, steps 3-5.
  fisher             cross-entropy + coef * penalty computed as FisherPlugin.compute_loss does, under FSDP2 (the
                     refusal message) and under DDP.
A mode that raises on both ranks is stored as ``{"error": ...}``, so it fails its own test only.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from conftest import VOCAB, tiny_llama  # the tests folder is on the path only now

STEPS = 5
LR = 1e-2
NOISYTUNE_SEED = 7
MODES = {  # name: _train's keyword arguments, each run under FSDP2 and under DDP
    "plain": {"neftune": False},
    "neftune": {"neftune": True},
    "noisytune_neftune": {"neftune": True, "noisytune": True},
    "fisher": {"neftune": False, "fisher_coef": 0.5},
}


def _batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Fixed per-rank batches (B=2, T=12): rank-specific tokens, the second row right-padded by 3."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (2, 12), generator=gen)  # (B, T)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        ids[1, -3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _model(parallel: str, *, noisytune: bool = False):
    """The tiny Llama of conftest (same weights on every rank), wrapped for ``parallel`` ("fsdp2" or "ddp")."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_llama()
    if parallel == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if noisytune:
            _noisytune(model)
        return model
    if noisytune:
        _noisytune(model)
    return DistributedDataParallel(model)


def _noisytune(model) -> list:
    """As NoisyTunePlugin.before_train: the same CPU generator seed on every rank."""
    from noisyft import NoisyTuneConfig
    from noisyft.methods.noisytune.perturb import apply_noisytune

    generator = torch.Generator(device="cpu").manual_seed(NOISYTUNE_SEED)
    return apply_noisytune(NoisyTuneConfig(), model, generator=generator)


def _full_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    model = getattr(model, "module", model)  # DDP's wrapped model: the same names as under FSDP2
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _step(model, optimizer, batch, *, fisher_coef: float = 0.0) -> float:
    """One optimizer step; returns this rank's loss (cross-entropy, plus the penalty when fisher_coef > 0)."""
    optimizer.zero_grad(set_to_none=True)
    if fisher_coef > 0:
        penalty, ce = _fisher_terms(model, batch)
        loss = ce + fisher_coef * penalty
    else:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _fisher_terms(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, cross-entropy) as FisherPlugin.compute_loss computes them: one forward through the root module
    (its wrappers' hooks run) with ``logits_to_keep=1``, the captured embeddings and final hidden states, the LM head
    on the predicted positions, one log-softmax for the penalty and the cross-entropy."""
    from noisyft._torch import unwrap_model
    from noisyft.methods.fisher.penalty import (
        capture_forward,
        fisher_penalty_from_logits,
        logits_from_hidden,
        next_token_targets,
        predicted_positions,
    )

    generator = torch.Generator().manual_seed(123 + dist.get_rank())
    forward = {k: v for k, v in batch.items() if k != "labels"}
    with capture_forward(model) as cap:
        model(**forward, use_cache=False, logits_to_keep=1)
    ids, labels = batch["input_ids"], batch["labels"]
    predicted = predicted_positions(tuple(ids.shape), labels=labels, attention_mask=batch["attention_mask"])
    logits = logits_from_hidden(unwrap_model(model), cap.hidden[predicted])  # (N, V)
    penalty, nll_sum = fisher_penalty_from_logits(
        cap.embeds,
        logits,
        token_mask=batch["attention_mask"],
        generator=generator,
        targets=next_token_targets(ids, predicted, labels),
    )
    return penalty, nll_sum / predicted.sum()


def _train(parallel: str, *, neftune: bool, fisher_coef: float = 0.0, noisytune: bool = False) -> dict:
    from noisyft import NEFTuneConfig
    from noisyft.methods.neftune.noise import NEFTuneHook

    rank = dist.get_rank()
    model = _model(parallel, noisytune=noisytune)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    draws: list[torch.Tensor] = []
    if neftune:
        _recording_hook(NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0, rank=rank), draws).attach(model)
    batches = _batches(rank)
    dist.barrier()
    start = time.perf_counter()
    losses = [_step(model, optimizer, b, fisher_coef=fisher_coef) for b in batches]
    dist.barrier()
    seconds = time.perf_counter() - start
    return {"losses": losses, "draws": draws, "seconds": seconds, "params": _full_params(model)}


def _recording_hook(hook, draws: list):
    """Keep a copy of every noise tensor the hook adds (to check the per-rank streams)."""
    original = hook.noise

    def noise(embeds, batch):
        value = original(embeds, batch)
        draws.append(value.detach().clone())
        return value

    hook.noise = noise
    return hook


def _resume(tmp: str) -> dict:
    """FSDP2 + NEFTune: 2 steps, save (DCP + the hook's state_dict), rebuild, load, 3 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from noisyft import NEFTuneConfig
    from noisyft.methods.neftune.noise import NEFTuneHook

    rank = dist.get_rank()
    batches = _batches(rank)
    model = _model("fsdp2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0, rank=rank).attach(model)
    losses = [_step(model, optimizer, b) for b in batches[:2]]
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    hook_state = hook.state_dict()
    del model, optimizer, hook

    model = _model("fsdp2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=tmp)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    hook = NEFTuneHook(NEFTuneConfig(alpha=5.0), seed=0, rank=rank)
    hook.load_state_dict(hook_state)
    hook.attach(model)
    losses += [_step(model, optimizer, b) for b in batches[2:]]
    return {"losses": losses}


def _guarded(fn, *args, **kwargs) -> dict:
    """``fn``'s result, or ``{"error": ...}``: a mode that fails (on both ranks alike: same code, same place)
    fails its own test, not the launch (the Fisher refusal is such an error)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # reported to the test, which names it
        return {"error": f"{type(exc).__name__}: {exc}"}


def _noisytune_mode() -> dict:
    model = _model("fsdp2")
    records = _noisytune(model)
    return {"params": _full_params(model), "std": {r.name: r.std for r in records}}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {"world_size": dist.get_world_size()}

    model = _model("fsdp2")
    weight = model.model.embed_tokens.weight
    result["shard"] = {
        "global": tuple(weight.shape),
        "local": tuple(weight.to_local().shape),
    }  # really sharded
    result["initial"] = _full_params(model)
    del model
    result["noisytune"] = _guarded(_noisytune_mode)

    for parallel in ("fsdp2", "ddp"):  # warm-up (first collectives, lazy inits), so the timed runs compare
        _train(parallel, neftune=False)

    for mode, kwargs in MODES.items():
        result[mode] = {p: _guarded(_train, p, **kwargs) for p in ("fsdp2", "ddp")}
    result["resume"] = _guarded(_resume, os.path.join(out_dir, "dcp"))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
