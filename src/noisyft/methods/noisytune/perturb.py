"""NoisyTune: perturb the pretrained weights once, with noise scaled to each matrix, before fine-tuning.

Pure torch: nothing here knows about a Trainer. Call :func:`noisytune_` (or :func:`apply_noisytune` with a ``NoisyTuneConfig``)
on the model after it is loaded (and after PEFT adapters are attached, if any) and before the first step.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from .config import NoisyTuneConfig

logger = logging.getLogger(__name__)

__all__ = ["NoisyTuneConfig", "NoisyTuneRecord", "apply_noisytune", "noisytune_", "summarize_records"]


# Skip reasons written to `NoisyTuneRecord.skipped`.
SKIP_NOT_FLOAT = "not a floating-point tensor"
SKIP_META = "on the meta device (no data)"
SKIP_SINGLE = "single element (std undefined)"
SKIP_ZERO_STD = "zero std (constant tensor)"
SKIP_NONFINITE = "non-finite values (std is NaN or inf)"


@dataclass
class NoisyTuneRecord:
    """What happened to one selected parameter tensor.

    Attributes:
        name: Parameter name (as in ``model.named_parameters()``).
        numel: Number of values.
        std: The std the noise was scaled by (the tensor's own, or the global one); NaN when not computed.
        rel_change: ``||dW|| / ||W||`` (0 when skipped).
        skipped: Why the tensor was left alone, or ``None`` if it was perturbed.
    """

    name: str
    numel: int
    std: float
    rel_change: float
    skipped: str | None = None


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Statistics in float64 for float64 tensors, else float32 (so bf16/fp16 are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _var_mean(t: torch.Tensor) -> tuple[float, float]:
    """Unbiased variance and mean of all values, computed in float32 (or float64)."""
    var, mean = torch.var_mean(t.detach().to(_stat_dtype(t)), correction=1)
    return float(var), float(mean)


def _is_dtensor(t: torch.Tensor) -> bool:
    """A parameter sharded by FSDP2 / tensor parallelism (``torch.distributed.tensor.DTensor``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _full(param: torch.Tensor) -> torch.Tensor:
    """All the values of ``param``: a sharded DTensor is gathered (``full_tensor()``) so its std is the whole
    matrix's, as in the unsharded model; a plain tensor is returned as is."""
    return param.detach().full_tensor() if _is_dtensor(param) else param.detach()


def _add_(param: torch.Tensor, delta: torch.Tensor) -> None:
    """``param += delta`` for a full-shape ``delta``; a DTensor parameter adds its own slice of it (every rank
    drew the same full noise from the same seed, so the shards together hold exactly that noise)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: each rank takes its local slice of its own copy, no communication
        delta = distribute_tensor(delta, param.device_mesh, param.placements, src_data_rank=None)
    param.add_(delta)


class _GeneratorPerDevice:
    """Hand out a generator for each device, all derived from the one the caller passed (if any).

    Noise is drawn on the parameter's own device, and a torch generator only works for its own device,
    so for other devices a child generator is seeded from the caller's (reproducibly).
    """

    def __init__(self, base: torch.Generator | None) -> None:
        self.base = base
        self.children: dict[str, torch.Generator] = {}

    @staticmethod
    def _same_device(a: torch.device, b: torch.device) -> bool:
        if a.type != b.type:
            return False
        return a.type == "cpu" or a.index is None or b.index is None or a.index == b.index

    def get(self, device: torch.device) -> torch.Generator | None:
        if self.base is None or self._same_device(self.base.device, device):
            return self.base
        key = str(device)
        if key not in self.children:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.base, device=self.base.device).item())
            self.children[key] = torch.Generator(device=device).manual_seed(seed)
        return self.children[key]


def _draw_noise(
    param: torch.Tensor, distribution: str, lam: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Unit-scale noise (not yet multiplied by std) with the shape of `param`, in float32 on its device."""
    dtype = _stat_dtype(param)
    if distribution == "uniform":
        noise = torch.rand(param.shape, dtype=dtype, device=param.device, generator=generator)
        return noise.sub_(0.5).mul_(lam)  # U(-lam/2, lam/2)
    noise = torch.randn(param.shape, dtype=dtype, device=param.device, generator=generator)
    return noise.mul_(lam / math.sqrt(12.0))  # N(0, lam^2 / 12): same variance as the uniform


@torch.no_grad()
def noisytune_(
    model: torch.nn.Module,
    *,
    lam: float = 0.15,
    distribution: str = "uniform",
    mode: str = "matrix",
    include: str | None = None,
    exclude: str | None = None,
    trainable_only: bool = True,
    generator: torch.Generator | None = None,
) -> list[NoisyTuneRecord]:
    """Apply NoisyTune to `model` in place and return one record per selected parameter tensor.

    See :class:`NoisyTuneConfig` for the formula and the meaning of every argument. Parameters left out by
    `include` / `exclude` / `trainable_only` get no record; selected tensors that cannot be perturbed (zero
    std, a single element, non-float, meta, non-finite) get a record with ``skipped`` set and keep their
    values. The noise is drawn in float32 (float64 for float64 tensors) on the parameter's device from
    `generator` (or torch's global RNG) and cast to the parameter's dtype before it is added.

    Sharded parameters (FSDP2 ``fully_shard``: DTensors) get the perturbation of the unsharded model: the std is
    the whole tensor's (gathered with ``full_tensor()``, one tensor at a time), every rank draws the full noise
    from the same generator state and adds its own slice. Pass the same seed on every rank.
    """
    config = NoisyTuneConfig(
        lam=lam,
        distribution=distribution,
        mode=mode,
        include=include,
        exclude=exclude,
        trainable_only=trainable_only,
    )
    include_re = re.compile(config.include) if config.include is not None else None
    exclude_re = re.compile(config.exclude) if config.exclude is not None else None

    # 1) select, and compute each tensor's statistics once.
    records: list[NoisyTuneRecord] = []
    todo: list[tuple[NoisyTuneRecord, torch.nn.Parameter, float, float]] = []  # record, param, var, mean
    n_unselected = 0
    for name, param in model.named_parameters():  # deduplicates tied weights: each Parameter once
        if (
            (config.trainable_only and not param.requires_grad)
            or (include_re is not None and include_re.search(name) is None)
            or (exclude_re is not None and exclude_re.search(name) is not None)
        ):
            n_unselected += 1
            continue
        record = NoisyTuneRecord(name=name, numel=param.numel(), std=math.nan, rel_change=0.0)
        records.append(record)
        if not param.is_floating_point():
            record.skipped = SKIP_NOT_FLOAT
            continue
        if param.is_meta:
            record.skipped = SKIP_META
            continue
        if param.numel() < 2:
            record.skipped = SKIP_SINGLE
            continue
        var, mean = _var_mean(_full(param))
        if not (math.isfinite(var) and math.isfinite(mean)):
            record.skipped = SKIP_NONFINITE
            continue
        if var <= 0.0:
            record.std = 0.0
            record.skipped = SKIP_ZERO_STD
            continue
        record.std = math.sqrt(var)
        todo.append((record, param, var, mean))

    # 2) global mode: one std over the values of all tensors that will be perturbed, by merging the
    #    per-tensor (count, mean, M2) in float64 (Chan et al.'s pairwise update), no concatenation.
    if config.mode == "global" and todo:
        count, mean_all, m2_all = 0, 0.0, 0.0
        for record, _, var, mean in todo:
            n = record.numel
            delta = mean - mean_all
            total = count + n
            mean_all += delta * n / total
            m2_all += var * (n - 1) + delta * delta * count * n / total
            count = total
        global_std = math.sqrt(m2_all / (count - 1))
        for record, *_ in todo:
            record.std = global_std

    # 3) perturb.
    generators = _GeneratorPerDevice(generator)
    for record, param, _, _ in todo:
        noise = _draw_noise(param, config.distribution, config.lam, generators.get(param.device))
        delta = noise.mul_(record.std).to(param.dtype)  # full shape, also for a sharded parameter
        weight_norm = float(torch.linalg.vector_norm(_full(param).to(_stat_dtype(param))))
        delta_norm = float(torch.linalg.vector_norm(delta.to(_stat_dtype(param))))
        _add_(param, delta)
        record.rel_change = delta_norm / weight_norm if weight_norm > 0 else math.inf

    summary = summarize_records(records)
    reasons: dict[str, int] = {}
    for record in records:
        if record.skipped is not None:
            reasons[record.skipped] = reasons.get(record.skipped, 0) + 1
    logger.info(
        "NoisyTune (%s, %s, lam=%g): perturbed %d tensors (%d values), skipped %d%s, %d not selected; "
        "mean relative change %.4g (uniform expectation for zero-mean weights: lam/sqrt(12) = %.4g)",
        config.distribution,
        config.mode,
        config.lam,
        summary["perturbed"],
        summary["perturbed_numel"],
        summary["skipped"],
        (" (" + ", ".join(f"{reason}: {n}" for reason, n in reasons.items()) + ")") if reasons else "",
        n_unselected,
        summary["mean_rel_change"],
        config.lam / math.sqrt(12.0),
    )
    return records


def summarize_records(records: list[NoisyTuneRecord]) -> dict[str, float]:
    """Counts and mean/max relative change of a NoisyTune report (e.g. to log it with the run's metrics)."""
    done = [r for r in records if r.skipped is None]
    rel = [r.rel_change for r in done]
    return {
        "perturbed": len(done),
        "skipped": len(records) - len(done),
        "perturbed_numel": sum(r.numel for r in done),
        "mean_rel_change": sum(rel) / len(rel) if rel else 0.0,
        "max_rel_change": max(rel) if rel else 0.0,
    }


def apply_noisytune(
    config: NoisyTuneConfig, model: torch.nn.Module, generator: torch.Generator | None = None
) -> list[NoisyTuneRecord]:
    """Perturb ``model`` in place with ``config``'s settings; ``generator`` (if given) wins over ``config.seed``."""
    if generator is None and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    return noisytune_(
        model,
        lam=config.lam,
        distribution=config.distribution,
        mode=config.mode,
        include=config.include,
        exclude=config.exclude,
        trainable_only=config.trainable_only,
        generator=generator,
    )
