"""`serve`: load a model directory into an engine and run the HTTP server until SIGTERM/Ctrl-C."""

from __future__ import annotations

import contextlib
import copy
import logging.config
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmkit.errors import InputError, MissingExtraError


def build_app(
    model_dir: str | os.PathLike,
    *,
    api_key: str | None = None,
    adapters: dict[str, str] | None = None,
    max_batch_tokens: int = 512,
    max_seqs: int = 64,
    max_queue: int = 256,
    kv_blocks: int | None = None,
    kv_memory: float | str | None = None,
    max_context: int | None = None,
    block_size: int = 16,
    prefix_caching: bool = True,
    draft_model: str | os.PathLike | None = None,
    draft_layers: int | None = None,
    draft_mtp: bool = False,
    num_draft: int = 4,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> Any:
    """The FastAPI app for a model directory. Adapters under MODEL_DIR/adapters/ are served by
    their directory names, plus `adapters` {name: path}. Speculative decoding drafts with
    `draft_model` (a smaller model directory with the same tokenizer) or with the model's own
    first `draft_layers` layers or, with `draft_mtp`, its own multi-token-prediction modules.
    The KV cache takes `kv_blocks` blocks, or a share of the memory left (`kv_memory`, see
    `slmkit.serve.kv_pages.plan_pool`); a model that leaves no room for it is refused before loading."""
    from slmkit.chat import ChatFormat
    from slmkit.model.io import generation_defaults, load, load_model
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.serve.speculative import DraftModel, MTPDrafter, early_exit_draft

    pool = {"kv_memory": kv_memory, "num_blocks": kv_blocks, "block_size": block_size, "max_seqs": max_seqs,
            "max_context": max_context}
    refuse_what_cannot_fit(model_dir, device, dtype, **pool)
    model, tokenizer = load(model_dir, device, dtype)
    found = {p.name: str(p) for p in sorted((Path(model_dir) / "adapters").glob("*")) if p.is_dir()}
    adapters = {**found, **(adapters or {})}
    if (draft_model is not None) + (draft_layers is not None) + draft_mtp > 1:
        raise InputError("choose one drafter: a draft model directory, a number of early-exit layers or the MTP modules")
    drafter = None
    if draft_model is not None:
        draft = load_model(draft_model, device, dtype)
        if draft.cfg.vocab_size != model.cfg.vocab_size:
            raise InputError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the model's "
                             f"({model.cfg.vocab_size}); it must share the tokenizer")
        drafter = DraftModel(draft)
    elif draft_layers is not None:
        drafter = DraftModel(early_exit_draft(model, draft_layers))
    elif draft_mtp:
        drafter = MTPDrafter(model)
    engine = Engine(model, tokenizer, **pool, max_batch_tokens=max_batch_tokens, prefix_caching=prefix_caching,
                    drafter=drafter, num_draft=num_draft, adapters=adapters or None)
    name = model_name or Path(model_dir).resolve().name
    return create_app(engine, tokenizer, name, chat_format=ChatFormat.for_model(model_dir, tokenizer),
                      defaults=generation_defaults(model_dir), api_key=api_key, max_queue=max_queue)


def refuse_what_cannot_fit(model_dir: str | os.PathLike, device: str, dtype: str | None, **pool: Any) -> None:
    """Before loading: raise InputError unless the weights (their file's size, in the dtype they
    will take) leave room on the device for the KV cache `plan_pool` would plan with `pool`."""
    from slmkit.devices import available_memory, resolve_device, resolve_dtype
    from slmkit.model.io import WEIGHTS, read_config, stored_dtype
    from slmkit.serve.kv_pages import plan_pool, size

    weights = Path(model_dir) / WEIGHTS
    if not weights.is_file() or not (Path(model_dir) / "config.json").is_file():
        return  # loading says what is missing
    cfg, quantization = read_config(model_dir)
    where = resolve_device(device)
    stored = stored_dtype(weights)
    target = stored if dtype is None else resolve_dtype(dtype, where)
    available = available_memory(where)
    if available is None:
        return
    weight_bytes = int(weights.stat().st_size * (1 if quantization else target.itemsize / stored.itemsize))
    if weight_bytes >= available:
        raise InputError(f"the model's weights take about {size(weight_bytes)} in {str(target).removeprefix('torch.')} "
                         f"and only {size(available)} is available on {where.type}; free memory, or serve a smaller "
                         "--dtype or a quantized model")
    plan_pool(cfg, target, available - weight_bytes, device_type=where.type, **pool)


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve until SIGTERM or Ctrl-C: stop accepting connections, let open requests finish (up to
    30 s, then cancel them), free the engine, return normally."""
    try:
        import uvicorn
        from uvicorn.config import LOGGING_CONFIG
    except ImportError:
        raise MissingExtraError("uvicorn", "serve") from None
    from slmkit.serve.http_errors import http_protocol

    # slmkit's own lines (the KV cache it sized, failed steps) print as uvicorn's do, from start-up on
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["slmkit"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    logging.config.dictConfig(log_config)
    app = build_app(model_dir, **settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, http=http_protocol(), log_level="info",
                                           log_config=log_config, timeout_graceful_shutdown=30))
    # uvicorn handles SIGTERM and re-raises it once shut down; a stop on request is a clean exit
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` on a background thread for the duration of a `with` block (port 0: any free
    port); yields the base URL. For tests, benchmarks and notebooks."""
    import uvicorn

    from slmkit.serve.http_errors import http_protocol

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, http=http_protocol(), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
