"""2-process DDP on CPU (gloo) through torchrun: each rank draws its own noise, replicas stay identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_two_ranks


@pytest.mark.slow
def test_two_process_ddp_draws_different_noise_per_rank(tmp_path):
    proc = run_two_ranks(Path(__file__).with_name("ddp_worker.py"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["draws"]) == len(r1["draws"]) == 2  # one noise draw per step and rank
    for a, b in zip(r0["draws"], r1["draws"], strict=True):
        assert a.abs().max() > 0 and b.abs().max() > 0
        # the first token of every row is real (right padding): compare the signs of its first entries, which
        # would coincide if both ranks drew from one stream, whatever their batch shapes and scales
        assert not torch.equal(a[0, 0, :16].sign(), b[0, 0, :16].sign())
    # same NoisyTune perturbation on both ranks + DDP gradient averaging: replicas end identical
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name


def test_a_run_ends_its_process_group(tmp_path):
    # `noisyft train` under torchrun ends with this; left to interpreter exit, gloo aborted a rank now and then
    import torch.distributed as dist

    from noisyft._torch import end_process_group

    end_process_group(wait=True)  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        end_process_group(wait=True)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
