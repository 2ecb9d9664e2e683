"""Run by test_ddp.py under torchrun: 2 CPU processes (gloo) train a tiny model with NoisySFTTrainer."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main(out_dir: str) -> None:
    from trl import SFTConfig

    from noisyft import NEFTuneConfig, NoisySFTTrainer, NoisyTuneConfig
    from noisyft._torch import end_process_group
    from noisyft.methods.neftune import noise as neftune_module

    from conftest import tiny_llama, tiny_tokenizer
    from test_trainer import _dataset

    rank = int(os.environ["RANK"])
    draws = []
    original = neftune_module.neftune_noise

    def record(embeds, **kw):
        noise = original(embeds, **kw)
        draws.append(noise.detach().clone())
        return noise

    neftune_module.neftune_noise = record
    args = SFTConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        max_length=32,
        disable_tqdm=True,
        completion_only_loss=False,
    )
    trainer = NoisySFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        neftune=NEFTuneConfig(alpha=5.0),
        noisytune=NoisyTuneConfig(),
    )
    trainer.train()
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "draws": draws,
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    end_process_group(wait=True)  # left to interpreter exit, gloo aborts a rank now and then


if __name__ == "__main__":
    main(sys.argv[1])
