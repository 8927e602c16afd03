"""`lm serve`: answer OpenAI-style HTTP requests with trained runs (the API itself is cli/openai_api.py)."""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lm.cli.chat import Quantize

if TYPE_CHECKING:
    import torch

    from lm.cli.openai_api import ServedRun

SERVE_INSTALL = "pip install 'lm-from-text[serve]'"
SERVER_PACKAGES = ("starlette", "uvicorn")
LIMITS = "Load"


def command(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", show_default=False,
        help="Run directories to serve; each is the model named by its folder's name (see GET /v1/models).")],
    host: Annotated[str, typer.Option(
        "--host", metavar="ADDRESS",
        help="Address to listen on. 127.0.0.1 answers this machine only. 0.0.0.0 (or this machine's network "
             "address) answers every machine that can reach the port: anyone there can run the models on this "
             "machine's processors and read their answers, over plain HTTP (requests, answers and the key "
             "travel unencrypted); set --api-key, and put a TLS proxy in front beyond a trusted network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="TCP port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", metavar="KEY", envvar="LM_API_KEY", show_default=False,
        help="Answer only requests with the header 'Authorization: Bearer KEY' (others get 401); the "
             "environment variable keeps the key out of the process list.")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", metavar="N", rich_help_panel=LIMITS,
        help="Requests each model decodes together in one batch; more wait in the queue.")] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", metavar="N", rich_help_panel=LIMITS,
        help="Requests that may wait for a place in a full batch, per model; beyond them a request gets 429.")
    ] = 64,
    device: Annotated[str, typer.Option("--device", metavar="DEV", help="auto | cpu | cuda | mps.")] = "auto",
    dtype: Annotated[str, typer.Option(
        "--dtype", metavar="TYPE",
        help="auto | float32 | bfloat16 | float16: the weights' precision (auto: bf16 on GPUs, fp32 on CPU).")
    ] = "auto",
    quantize: Quantize = "none",
) -> None:
    """Serve runs over HTTP with OpenAI's API, for any OpenAI client.

    GET /v1/models lists the runs; POST /v1/chat/completions answers conversations (runs fine-tuned on
    them, which record a chat format); POST /v1/completions continues a prompt (any run). Both stream
    with "stream": true and take temperature, top_p, top_k, max_tokens (or max_completion_tokens),
    stop and seed. A reply is at most what the context leaves after the prompt; /v1/completions
    gives 16 tokens unless max_tokens says otherwise, as OpenAI's does. Requests arriving together
    are decoded together (continuous batching). One log line per request goes to standard error.

    Try: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model": "RUN", "messages": [{"role": "user", "content": "Hello"}]}'
    """
    from lm.config import DTYPES
    from lm.errors import UsageError

    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {port}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if quantize not in ("none", "int8"):
        raise UsageError(f"--quantize {quantize!r} is not one of: none, int8")
    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be 0 or more, got {max_queue}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give a key, or leave the option out to answer without one")
    require_server_packages()
    import uvicorn

    from lm.cli.openai_api import create_app
    from lm.cli.render import stderr
    from lm.device import resolve_device

    runs = load_runs(run_dirs, resolve_device(device), dtype, quantize, max_batch, max_queue)
    app = create_app(runs, api_key)
    console = stderr()
    for run in runs:
        kind = "chat and completions" if run.chat_format is not None else "completions only (a base run)"
        console.print(f"model [bold]{run.name}[/]: {kind}, context {run.context_length:,} tokens, "
                      f"batches of {max_batch}, {max_queue} may wait, decoded by {run.scheduler.kernels}",
                      soft_wrap=True)
    if not is_loopback(host):
        console.print(f"[yellow]listening on {host}: every machine that can reach port {port} can use these "
                      "models" + ("" if api_key else ", with no key (set --api-key)") + "[/]", soft_wrap=True)
    console.print(f"OpenAI base URL: http://{display_host(host)}:{port}/v1")
    configure_request_log()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=5)


def require_server_packages() -> None:
    """Stop with the install command when the `serve` extra is missing."""
    from lm.errors import UsageError

    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"lm serve needs {' and '.join(missing)}; install with: {SERVE_INSTALL}")


def load_runs(run_dirs: list[Path], device: torch.device, dtype: str, quantize: str, max_batch: int,
              max_queue: int) -> list[ServedRun]:
    """Each run's model (prepared for decoding on `device`), tokenizer, chat format and scheduler."""
    from lm.chat import chat_token_ids, load_chat_format
    from lm.checkpoint import load_run
    from lm.cli.openai_api import ServedRun
    from lm.device import resolve_dtype
    from lm.errors import UsageError
    from lm.generate import prepare_for_generation
    from lm.serving import Scheduler

    names = [Path(path).resolve().name for path in run_dirs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"two runs are named {repeated[0]!r} (a model is named by its folder); "
                         "serve runs whose folders have different names")
    runs = []
    for path, name in zip(run_dirs, names, strict=True):
        chat_format = load_chat_format(path)
        model, tokenizer, _ = load_run(path, device)
        if chat_format is not None:
            chat_token_ids(tokenizer, chat_format)  # a chat run whose tokenizer lacks the tokens: say so now
        model = prepare_for_generation(model, resolve_dtype(dtype, device), quantize)
        runs.append(ServedRun(name, tokenizer, Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue),
                              chat_format))
    return runs


def configure_request_log() -> None:
    """One line per request on standard error, formatted as uvicorn's own lines are."""
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log = logging.getLogger("lm.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
