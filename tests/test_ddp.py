"""2-process DDP on CPU (gloo) through torchrun: each rank draws its own noise, replicas stay identical."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_draws_different_noise_per_rank(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
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
