"""Started by torchrun from test_distributed.py: situations the command line cannot set up."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from lm import distributed, rundir
from lm.config import ModelConfig, TrainConfig
from lm.data import split_text, tokenize_split
from lm.textfiles import find_text_files
from lm.tokenizer import TokenizerConfig, train_tokenizer
from lm.train import Trainer, TrainingSetup


def main() -> None:
    case, workdir = sys.argv[1], Path(sys.argv[2])
    context = distributed.init("cpu")
    if case == "mismatch":
        distributed.check_same(context, "configuration", {"seed": context.rank})  # raises on every process
        return
    sample = Path(__file__).resolve().parents[1] / "data" / "sample.txt"
    tokenizer, _ = train_tokenizer(find_text_files([sample]), TokenizerConfig(vocab_size=300))
    model = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_layer=1, n_head=2, d_model=16)
    train = TrainConfig(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=50, eval_every=10, log_every=1,
                        sample_tokens=0, val_fraction=0.1, device="cpu")
    splits = tokenize_split(split_text([sample], None, 0.1), tokenizer, cache_root=workdir / "cache")
    run = workdir / "run"
    if context.is_main:
        rundir.prepare_run_dir(run, resume=False, force=True)
    distributed.barrier(context)
    trainer = Trainer(TrainingSetup(run, model, train, tokenizer, splits,
                                    distributed=context))
    if case == "rank-dies" and context.rank == 1:
        real_step = trainer._train_step

        def dying(lr: float) -> torch.Tensor:
            if trainer.step == 3:
                print("rank 1: simulated crash", file=sys.stderr, flush=True)
                os._exit(3)
            return real_step(lr)

        trainer._train_step = dying
    try:
        trainer.run()
    except distributed.DistributedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
