"""noisyft's methods under torch's own FSDP2 (``fully_shard``), two CPU processes (gloo), against torch DDP.

accelerate runs FSDP on GPUs only (``noisyft train`` refuses ``fsdp`` on CPU), so this tests the methods' pure-torch
components directly: ``fsdp2_worker.py`` shards a tiny Llama (every decoder layer and the root) and runs a plain
AdamW loop on fixed per-rank batches, once under FSDP2 and once under DDP, in one ``torchrun`` launch.
Run with ``-s`` to see the FSDP2/DDP wall-time ratio.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from conftest import run_two_ranks, tiny_llama

pytestmark = pytest.mark.slow

NOISYTUNE_SEED = 7  # as in fsdp2_worker.py
TOL = 1e-5


def _fully_shard_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """One launch of the worker; each rank's results."""
    if not _fully_shard_available():
        pytest.skip("torch.distributed.fsdp.fully_shard or gloo not available")
    out = tmp_path_factory.mktemp("fsdp2")
    proc = run_two_ranks(Path(__file__).with_name("fsdp2_worker.py"), out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in results] == [2, 2]
    return results


def _ok(result: dict) -> dict:
    """A mode's result; a mode that raised in the worker fails here with its error."""
    assert "error" not in result, result["error"]
    return result


def _assert_losses_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL, (a, b)


def test_model_is_really_sharded(ranks):
    for r in ranks:
        (rows, width), (local_rows, local_width) = r["shard"]["global"], r["shard"]["local"]
        assert (local_rows, local_width) == (rows // 2, width)  # dim-0 shards, half the vocabulary per rank


def test_noisytune_on_sharded_model_equals_single_process(ranks):
    """Every rank ends with the same full perturbation, equal to NoisyTune of the unsharded model with the same
    seed: std(W) of the whole matrix, each shard the matching slice of the full noise."""
    from noisyft import NoisyTuneConfig
    from noisyft.methods.noisytune.perturb import apply_noisytune

    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = apply_noisytune(
        NoisyTuneConfig(), model, generator=torch.Generator().manual_seed(NOISYTUNE_SEED)
    )
    expected = dict(model.named_parameters())
    perturbed = {rec.name for rec in records if rec.skipped is None}
    assert len(perturbed) >= 10  # every matrix (the RMSNorm weights are constant: zero std, skipped)
    for r in ranks:
        result = _ok(r["noisytune"])
        for name, value in expected.items():
            torch.testing.assert_close(r["initial"][name], initial[name], rtol=0, atol=0)
            torch.testing.assert_close(result["params"][name], value.detach(), rtol=0, atol=1e-7)
            assert torch.equal(result["params"][name], initial[name]) == (name not in perturbed), name
        for rec in records:
            if rec.skipped is None:
                assert result["std"][rec.name] == pytest.approx(rec.std, rel=1e-6)


@pytest.mark.parametrize("mode", ["plain", "neftune", "noisytune_neftune"])
def test_fsdp2_losses_and_weights_equal_ddp(ranks, mode):
    """5 AdamW steps on the same per-rank batches: FSDP2 and DDP give the same losses on each rank (1e-5) and the
    same weights; with NEFTune each rank draws its own noise, the same stream under FSDP2 as under DDP."""
    for r in ranks:
        fsdp2, ddp = _ok(r[mode]["fsdp2"]), _ok(r[mode]["ddp"])
        _assert_losses_close(fsdp2["losses"], ddp["losses"])
        for name, value in ddp["params"].items():
            torch.testing.assert_close(fsdp2["params"][name], value, rtol=0, atol=1e-6)
        assert any(not torch.equal(v, r["initial"][n]) for n, v in fsdp2["params"].items())  # it trained
    if mode == "plain":
        return
    for r in ranks:  # the noise changed the losses
        noisy, plain = r[mode]["fsdp2"]["losses"], r["plain"]["fsdp2"]["losses"]
        assert max(abs(x - y) for x, y in zip(noisy, plain, strict=True)) > 1e-4
        draws_fsdp2, draws_ddp = r[mode]["fsdp2"]["draws"], r[mode]["ddp"]["draws"]
        assert len(draws_fsdp2) == len(draws_ddp) == 5
        for a, b in zip(draws_fsdp2, draws_ddp, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(ranks[0][mode]["fsdp2"]["draws"], ranks[1][mode]["fsdp2"]["draws"], strict=True):
        # real first tokens on both ranks: the signs would coincide if the ranks shared one stream
        assert not torch.equal(a[0, 0].sign(), b[0, 0].sign())


def test_resumed_fsdp2_run_continues_the_noise_stream(ranks):
    """Save after step 2 (torch.distributed.checkpoint for the sharded model and optimizer, the hook's state_dict),
    rebuild, load, 3 more steps: the losses of the uninterrupted run (1e-5)."""
    for r in ranks:
        _assert_losses_close(_ok(r["resume"])["losses"], _ok(r["neftune"]["fsdp2"])["losses"])


def test_fisher_penalty_is_refused_under_fsdp2(ranks):
    """The penalty back-propagates twice through one forward; FSDP2 frees the gathered weights after the first
    backward (a segmentation fault without the check; with resharding turned off the losses were wrong from step 2).
    It is refused with one clear message; the same loop under DDP trains."""
    for r in ranks:
        message = r["fisher"]["fsdp2"]["error"]
        assert "FSDP2" in message and "fully_shard" in message and "DDP" in message
        losses = _ok(r["fisher"]["ddp"])["losses"]
        assert len(losses) == 5 and all(x == x for x in losses)
        assert losses[0] > r["plain"]["ddp"]["losses"][0] + 1e-3  # the penalty is in the loss


def test_fsdp2_ddp_time_ratio(ranks):
    """FSDP2/DDP wall time of the 5 steps (printed; run with -s). Only sanity-checked: a tiny model on a shared CPU."""
    ratios = {
        mode: statistics.median(r[mode]["fsdp2"]["seconds"] / r[mode]["ddp"]["seconds"] for r in ranks)
        for mode in ("plain", "neftune", "noisytune_neftune")
    }
    print(
        "FSDP2/DDP wall-time ratio (5 steps, tiny Llama, 2 CPU ranks):",
        {k: round(v, 2) for k, v in ratios.items()},
    )
    assert all(0 < v < 100 for v in ratios.values())
