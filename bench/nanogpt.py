"""The peer, run here: nanoGPT's CPU recipe on tinyshakespeare, timed and scored as lm's runs are.

    python bench/nanogpt.py --nanogpt PATH/TO/nanoGPT --tinyshakespeare PATH/input.txt [--max-iters 2000]

nanoGPT (github.com/karpathy/nanoGPT) is not a dependency and nothing of it is copied here: give a
checkout of it. It is copied to a temporary folder (its configurator reads files relative to the
working folder) with the data laid out as its `prepare.py` for shakespeare_char lays it out: characters
as tokens, the first 90% to train on, the last 10% held out. Its README's CPU recipe trains (4 layers x
128, 4 heads, block 64, batch 12, lr decay to max-iters, dropout 0, no compile); the wall-clock of that
process is what other runs get as their budget. The checkpoint it saves is then read
(`torch.load(weights_only=True)`: plain tensors and numbers, nothing unpickled beyond them) into its own
model class and scored by lm's scorer (lm/eval.py) on the whole held-out 10%: sliding windows of 64
characters moving by 32, every character after the first scored once, bits per byte.

Prints one line of JSON (seconds, iterations, bits per byte), which bench/sweep.py --nanogpt reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lm.eval import score_tokens

RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
          "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
          "--dtype=float32",  # what its CPU path computes in anyway (no autocast there)
          "--always_save_checkpoint=True"]  # the model at the end of training, as lm's runs are scored
DATASET = "tinyshakespeare_lm_bench"


def prepare(text: str, folder: Path) -> tuple[np.ndarray, list[str]]:
    """train.bin, val.bin and meta.pkl as nanoGPT's shakespeare_char/prepare.py writes them; the held-out ids."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    folder.mkdir(parents=True)
    ids = {name: np.array([index[c] for c in part], dtype=np.uint16)
           for name, part in (("train", text[:cut]), ("val", text[cut:]))}
    for name, array in ids.items():
        array.tofile(folder / f"{name}.bin")
    # nanoGPT reads its vocabulary size from this pickle; we write it, nanoGPT reads it.
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": index}, f)
    return ids["val"], chars


def train(checkout: Path, max_iters: int, threads: int | None) -> tuple[float, Path]:
    out = checkout / "out-bench"
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *RECIPE, f"--dataset={DATASET}",
               f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", f"--out_dir={out}"]
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"nanoGPT's train.py failed:\n{done.stderr[-2000:]}")
    return seconds, out / "ckpt.pt"


def score(checkout: Path, checkpoint: Path, val: np.ndarray, chars: list[str]) -> tuple[float, int]:
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = module.GPT(module.GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()

    def logits_of(ids: torch.Tensor, logits_from: int = 0) -> tuple[torch.Tensor, None]:
        # With targets, nanoGPT's forward returns logits at every position (without, only the last).
        ids = ids.contiguous()  # its loss views the targets flat
        logits, _ = model(ids, targets=ids)
        return logits[:, logits_from:], None

    byte_lengths = torch.tensor([len(c.encode("utf-8")) for c in chars])
    scores = score_tokens(logits_of, torch.from_numpy(val.astype(np.int64)), byte_lengths,
                          saved["model_args"]["block_size"], eot_id=None, stride=32)
    return scores.total.bits_per_byte, int(saved["iter_num"])


def run_nanogpt(nanogpt: Path, tinyshakespeare: Path, max_iters: int = 2000,
                threads: int | None = None) -> dict[str, float]:
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "model.py").is_file():
        sys.exit(f"{nanogpt} is not a nanoGPT checkout (no train.py/model.py); "
                 "git clone https://github.com/karpathy/nanoGPT")
    with tempfile.TemporaryDirectory(prefix="lm-bench-nanogpt-") as tmp:
        checkout = Path(tmp) / "nanoGPT"
        shutil.copytree(nanogpt, checkout, ignore=shutil.ignore_patterns(".git", "out*", "assets"))
        val, chars = prepare(tinyshakespeare.read_text(encoding="utf-8"), checkout / "data" / DATASET)
        seconds, checkpoint = train(checkout, max_iters, threads)
        bits_per_byte, iters = score(checkout, checkpoint, val, chars)
    return {"seconds": seconds, "iters": iters, "bits_per_byte": bits_per_byte}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, metavar="CHECKOUT")
    parser.add_argument("--tinyshakespeare", type=Path, required=True, metavar="INPUT_TXT")
    parser.add_argument("--max-iters", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(run_nanogpt(args.nanogpt, args.tinyshakespeare, args.max_iters)))


if __name__ == "__main__":
    main()
