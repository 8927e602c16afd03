"""Several processes, one training run: PyTorch's own torch.distributed, started by torchrun.

torchrun (or `lm train --nproc N`, which calls it) starts one process per device and tells each its
RANK, WORLD_SIZE and LOCAL_RANK. Each process trains the same model on its own slice of every batch:
- DDP (default) keeps a full copy of the model in each process and averages the gradients after
  each optimiser step's last micro-batch (the others skip that exchange);
- FSDP2 (`--fsdp`, `fully_shard`) splits parameters, gradients and optimiser state across processes,
  gathering each block's weights only while it runs: for models that do not fit one device.
The averaged gradient equals the single-process gradient of the whole batch, so a run with 2
processes x batch 4 follows the same loss curve as 1 process x batch 8.

NCCL connects GPUs, gloo CPUs. Rank 0 alone writes logs, metrics and checkpoints; checkpoints hold
full (gathered) tensors, so a run resumes on any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lm.errors import LmError

DEFAULT_TIMEOUT_S = 600


class DistributedError(LmError):
    """Another process of the run failed, disagrees, or cannot be reached."""


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group is up (also with torchrun --nproc-per-node 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str) -> Distributed:
    """Join the process group torchrun set up; a plain single process gets a disabled context."""
    if not launched_by_torchrun():
        return Distributed()
    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    timeout = float(os.environ.get("LM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # A timeout, so that a process that never arrives ends the job instead of hanging it.
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    return Distributed(rank, world, local, enabled=True)


def shutdown(context: Distributed) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Distributed) -> None:
    if context.enabled:
        dist.barrier()


def broadcast(context: Distributed, values: list[Any]) -> None:
    """Replace `values` (in place) on every process by process 0's."""
    if context.enabled:
        dist.broadcast_object_list(values, src=0)


def mean(context: Distributed, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all processes (in place)."""
    if context.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= context.world_size
    return value


def any_process(context: Distributed, flag: bool, device: torch.device) -> bool:
    """True on every process as soon as one says True (a Ctrl-C seen by any stops all at the same step)."""
    if not context.enabled:
        return flag
    signal = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(signal, op=dist.ReduceOp.MAX)
    return bool(signal.item())


def check_same(context: Distributed, what: str, value: Any) -> None:
    """Raise on every process if `value` (anything JSON can hold) differs between processes."""
    if not context.enabled:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str] = [""] * context.world_size
    dist.all_gather_object(digests, digest)
    different = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if different:
        raise DistributedError(f"process {different[0]} has a different {what} from process 0; start every "
                               "process with the same command, data and files")


def wrap(model: nn.Module, context: Distributed, fsdp: bool, device: torch.device) -> nn.Module:
    """The module to train with: DDP around the model, or the model sharded in place by FSDP2."""
    if not context.enabled:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # pragma: no cover - torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.blocks:  # type: ignore[attr-defined]
            fully_shard(block)
        fully_shard(model)  # the rest: embeddings, final norm, (tied) output head
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # Gradients live in DDP's communication buckets: no copy in and out of them at every step.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
