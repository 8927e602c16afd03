"""Choices that depend on the CPU, made by measuring on the machine that runs them, once, and remembered.

A kernel or a precision that wins on one CPU can lose badly on another: bfloat16 matrix products are
twice as fast as float32 ones on a CPU with AVX-512 BF16 or AMX, and forty times slower on one with
AVX2 only (it has no bfloat16 arithmetic, so every product is emulated); oneDNN's float32 products
beat MKL's on an AMD Zen 5 and lose to them on an Intel Xeon. So no choice here is taken from the
CPU's name or flags: each is timed, the first time it is needed, on the shape it is needed for, and
the answer is stored in the cache folder (see lm/cache.py), keyed by `machine_key()` (the CPU model,
the instruction sets PyTorch, oneDNN and MKL are allowed, the torch version and the thread count), so
the next process on the same machine reads it instead of measuring again.

Each kind of choice has its own `MeasuredChoices` (lm/linear.py's matmul kernel, lm/optim.py's
Newton-Schulz precision) and its own environment variable that forces an answer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch

from lm.atomic import atomic_write_text
from lm.cache import cache_dir
from lm.device import cpu_name
from lm.errors import UsageError

# The variables that hold oneDNN's and MKL's kernels to older instructions (how an AVX2-only CPU is emulated).
ISA_LIMITS = {"ONEDNN_MAX_CPU_ISA": "oneDNN", "MKL_ENABLE_INSTRUCTIONS": "MKL"}


def machine_key() -> str:
    """What a measured choice depends on besides the shape: the CPU and the instructions PyTorch, oneDNN and
    MKL may use on it (ATEN_CPU_CAPABILITY and ISA_LIMITS lower them), the torch build, the threads."""
    limits = "".join(f", {library} up to {os.environ[variable].strip()}" for variable, library in ISA_LIMITS.items()
                     if os.environ.get(variable, "").strip())
    return (f"{cpu_name()}; {torch.backends.cpu.get_cpu_capability()}{limits}; torch {torch.__version__}; "
            f"{torch.get_num_threads()} threads")


class MeasuredChoices:
    """One kind of choice among `options`, measured per key (a shape) and kept in `cache_file`.

    `env` names the variable that overrides it: 'auto' (or unset) measures, an option forces that option.
    `machine` is called at each lookup (not bound once), so a test can swap the machine's identity.
    """

    def __init__(self, cache_file: str, env: str, options: tuple[str, ...],
                 machine: Callable[[], str] = machine_key) -> None:
        self.cache_file, self.env, self.options, self.machine = cache_file, env, options, machine
        self._decisions: dict[str, str] = {}  # this process: key -> option
        self._stored: dict[str, str] | None = None  # the cache file's decisions for this machine, once read

    def requested(self) -> str:
        """What the environment variable asks for: 'auto' (measure; the default) or one of the options."""
        value = os.environ.get(self.env, "auto").strip().lower() or "auto"
        if value not in ("auto", *self.options):
            raise UsageError(f"{self.env}={value!r} is not one of {', '.join(('auto', *self.options))}; "
                             "unset it or pick one")
        return value

    def choose(self, key: str, measure: Callable[[], str]) -> str:
        """The option for `key`: forced by the variable, known already, or measured now by `measure`."""
        requested = self.requested()
        if requested != "auto":
            return requested
        if key not in self._decisions:
            stored = self._machine_decisions()
            if stored.get(key) not in self.options:
                stored[key] = measure()
                self._save(key, stored[key])
            self._decisions[key] = stored[key]
        return self._decisions[key]

    def adopt(self, key: str, option: str) -> None:
        """Take `option` for `key` in this process without measuring (another process's choice)."""
        if option not in self.options:
            raise ValueError(f"{option!r} is not one of {self.options}")
        self._decisions[key] = option

    def chosen(self) -> dict[str, str]:
        """The option each key got in this process so far."""
        return dict(self._decisions)

    def forget(self) -> None:
        """Drop what this process knows (the cache file stays): the next lookup decides again."""
        self._decisions.clear()
        self._stored = None

    def _machine_decisions(self) -> dict[str, str]:
        if self._stored is None:
            self._stored = dict(self._read().get(self.machine(), {}))
        return self._stored

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads((cache_dir() / self.cache_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, key: str, option: str) -> None:
        """Add one decision to the cache file (re-read first: other processes may have added theirs)."""
        data = self._read()
        machine = data.setdefault(self.machine(), {})
        if not isinstance(machine, dict):
            machine = data[self.machine()] = {}
        machine[key] = option
        path = cache_dir() / self.cache_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only cache folder: the choice holds for this process and is measured again next time


def fastest(runs: dict[str, Callable[[], object]], rounds: int = 3, budget_s: float = 1.0) -> dict[str, float]:
    """The best time of each run over `rounds` alternating rounds, after one warm-up call each.

    Alternating makes a machine that drifts in speed hit every run alike. Once `budget_s` is spent, only
    the rounds under way finish: a run far slower than the others (an emulated bfloat16 product) is
    then not timed again, since its first timings already settle the choice.
    """
    best = dict.fromkeys(runs, float("inf"))
    started = time.perf_counter()
    for run in runs.values():  # warm up: first-call allocations and kernel set-up
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            begun = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - begun)
        if time.perf_counter() - started > budget_s:
            break
    return best
