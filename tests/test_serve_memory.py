"""The serving KV cache sized from the memory the machine has: the plan, the refusals, and the real
SmolLM2 served in its own process with a bounded footprint."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slmkit
from slmkit import devices
from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model import Transformer
from slmkit.serve import engine as engine_module
from slmkit.serve.engine import Engine, Request
from slmkit.serve.kv_pages import GIB, MIB, KVPool, kv_budget, plan_pool, size

# SmolLM2-135M's shape: 30 layers x 3 KV heads x 64 dims; 2 x 30 x 3 x 64 x 4 B = 45 KiB a token in float32
SMOL = ModelConfig(vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                   ffn_hidden=1536)
TOKEN = 2 * 30 * 3 * 64 * 4
TINY = ModelConfig(vocab_size=128, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   ffn_hidden=64)


def test_block_bytes_are_what_the_pool_allocates():
    pool = KVPool(TINY, num_blocks=3, block_size=4, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert KVPool.block_bytes(TINY, 4, torch.bfloat16) * 3 == pool.k.nbytes + pool.v.nbytes


def test_default_share_of_the_available_memory():
    plan = plan_pool(SMOL, torch.float32, 8 * GIB)  # cpu: 25% -> 2 GiB -> 46,603 tokens
    assert plan.num_blocks == 2 * GIB // (16 * TOKEN) and plan.bytes <= 2 * GIB < plan.bytes + 16 * TOKEN
    assert plan.context == 8192 and plan.max_seqs == 64
    assert plan.describe() == (f"KV cache: {plan.bytes / GIB:.2f} GiB float32 for {plan.tokens:,} tokens "
                               f"({plan.num_blocks:,} blocks of 16; 25% of 8.00 GiB available on cpu): up to 64 "
                               f"sequences of at most 8,192 tokens, {plan.tokens / 8192:.1f} of them at full length")
    cuda = plan_pool(SMOL, torch.bfloat16, 8 * GIB, device_type="cuda")  # 80%, half the bytes a token
    assert cuda.num_blocks == int(0.8 * 8 * GIB) // (16 * TOKEN // 2)


def test_never_more_than_max_seqs_full_context_sequences():
    plan = plan_pool(SMOL, torch.float32, 1024 * GIB)  # a quarter of 1 TiB would hold 5,800 sequences
    assert plan.num_blocks == 64 * 8192 // 16 and plan.context == 8192
    plan = plan_pool(SMOL, torch.float32, 1024 * GIB, max_seqs=4, max_context=1000)
    assert plan.num_blocks == 4 * 63 and plan.context == 1000  # 1000 tokens take 63 blocks of 16


def test_the_context_is_capped_at_what_the_pool_holds():
    plan = plan_pool(SMOL, torch.float32, 400 * MIB)  # 100 MiB: 2,272 tokens, less than one full sequence
    assert plan.tokens == 100 * MIB // (16 * TOKEN) * 16 == plan.context < 8192


@pytest.mark.parametrize("kv_memory, budget, source", [
    ("0.5", 4 * GIB, "50% of 8.00 GiB available on cpu"),
    (0.5, 4 * GIB, "50% of 8.00 GiB available on cpu"),
    ("30%", int(0.3 * 8 * GIB), "30% of 8.00 GiB available on cpu"),
    ("1", 8 * GIB, "100% of 8.00 GiB available on cpu"),
    ("2GB", 2 * GIB, "--kv-memory"),
    ("1.5 GiB", int(1.5 * GIB), "--kv-memory"),
    ("3", 3 * GIB, "--kv-memory"),  # a bare number above 1 is GiB
    (3, 3 * GIB, "--kv-memory"),
    ("512MB", 512 * MIB, "--kv-memory"),
    ("64m", 64 * MIB, "--kv-memory"),
])
def test_kv_memory_is_a_fraction_or_an_amount(kv_memory, budget, source):
    assert kv_budget(kv_memory, 8 * GIB, "cpu") == (budget, source)


@pytest.mark.parametrize("kv_memory", ["0", "-1", "abc", "150%", "2TB", "", "1e3"])
def test_bad_kv_memory_is_one_clear_line(kv_memory):
    with pytest.raises(InputError, match=r"--kv-memory takes a fraction of the available memory \(0.3, 30%\) or an amount"):
        kv_budget(kv_memory, 8 * GIB, "cpu")


def test_a_fraction_needs_to_know_the_available_memory():
    with pytest.raises(InputError, match="cannot tell how much memory is free"):
        plan_pool(SMOL, torch.float32, None)
    assert plan_pool(SMOL, torch.float32, None, kv_memory="1GB").bytes <= GIB


def test_too_little_memory_for_one_sequence_is_refused():
    with pytest.raises(InputError) as e:
        plan_pool(SMOL, torch.float32, 100 * MIB)  # 25 MiB < 1,024 tokens x 45 KiB
    assert str(e.value) == ("the KV cache needs at least 45.0 MiB (one sequence of 1,024 tokens) but gets 25.0 MiB "
                            "(25% of 100.0 MiB available on cpu, once the model is loaded); free memory, raise "
                            "--kv-memory, lower --max-context or use a smaller --dtype")
    assert plan_pool(SMOL, torch.float32, 100 * MIB, max_context=512).context == 512  # a shorter context fits


def test_asking_for_more_than_there_is_is_refused():
    with pytest.raises(InputError, match=r"a KV cache of 4.00 GiB \(--kv-memory\) does not fit in the 2.00 GiB available on cpu"):
        plan_pool(SMOL, torch.float32, 2 * GIB, kv_memory="4GB")
    with pytest.raises(InputError, match=r"\(--kv-blocks\) does not fit"):
        plan_pool(SMOL, torch.float32, 2 * GIB, num_blocks=10_000)


def test_explicit_blocks_and_the_other_flags():
    plan = plan_pool(SMOL, torch.float32, 8 * GIB, num_blocks=10)  # a deliberate tiny pool is the user's choice
    assert (plan.num_blocks, plan.context, plan.source) == (10, 160, "--kv-blocks")
    for kwargs, message in [({"num_blocks": 10, "kv_memory": "1GB"}, "give --kv-blocks or --kv-memory, not both"),
                            ({"num_blocks": 0}, "--kv-blocks must be at least 1"),
                            ({"max_context": 9000}, "--max-context must be between 1 and the model's context of 8,192"),
                            ({"max_context": 0}, "--max-context must be between 1"),
                            ({"max_seqs": 0}, "--max-seqs must be at least 1")]:
        with pytest.raises(InputError, match=message):
            plan_pool(SMOL, torch.float32, 8 * GIB, **kwargs)


def test_the_engine_serves_the_planned_pool_and_context(monkeypatch):
    cfg = TINY.replace(context_length=2048)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    block = KVPool.block_bytes(cfg, 4, torch.float32)
    monkeypatch.setattr(engine_module, "available_memory", lambda device: 600 * block)
    engine = Engine(model, block_size=4, kv_memory="100%", max_seqs=2)  # 600 blocks, of 2 x 512 wanted
    assert engine.blocks.num_blocks == 600 and engine.context == 2048
    engine = Engine(model, block_size=4, kv_memory="50%", max_seqs=2)  # 300 blocks: 1,200 tokens a sequence
    assert engine.blocks.num_blocks == 300 and engine.context == 1200
    assert engine.runner.pool.k.shape[1] == 1200
    with pytest.raises(InputError, match=r"exceed the served context of 1200 tokens \(the model's is 2048; --max-context"):
        engine.submit(Request([1] * 1000, max_tokens=201))
    assert len(engine.generate([Request([1] * 1000, max_tokens=12, stop_tokens=[])])[0][0]) == 12


def test_available_memory_of_this_machine():
    ram = devices.available_memory(torch.device("cpu"))
    assert ram is None or 0 < ram < 1 << 50


@pytest.mark.parametrize("files, headroom", [
    ({"memory.max": "4294967296\n", "memory.current": "3221225472\n", "memory.stat": "anon 1\ninactive_file 1073741824\n"},
     2 * GIB),  # v2: 4 GiB limit, 3 GiB used of which 1 GiB is reclaimable page cache
    ({"memory.max": "max\n"}, None),
    ({"memory/memory.limit_in_bytes": "2147483648\n", "memory/memory.usage_in_bytes": "1073741824\n",
      "memory/memory.stat": "cache 5\ntotal_inactive_file 0\n"}, GIB),  # v1
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1's "no limit"
])
def test_a_container_limit_bounds_the_available_memory(tmp_path, monkeypatch, files, headroom):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(devices, "CGROUP", tmp_path)
    assert devices._cgroup_headroom() == headroom
    monkeypatch.setattr(devices, "_available_ram", lambda: 64 * GIB)
    assert devices.available_memory(torch.device("cpu")) == (64 * GIB if headroom is None else headroom)


# ---------------------------------------------------------------------------- refusing before loading
def test_a_model_that_leaves_no_room_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    from slmkit.cli import main
    from slmkit.model.io import save_model_dir
    from slmkit.serve.server import build_app

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    save_model_dir(Transformer(TINY), model_dir)
    weights = (model_dir / "model.safetensors").stat().st_size
    monkeypatch.setattr(devices, "available_memory", lambda device: weights // 2)
    with pytest.raises(InputError, match=re.escape(f"the model's weights take about {size(weights)} in float32 and only "
                                                   f"{size(weights // 2)} is available on cpu; free memory")):
        build_app(model_dir)
    monkeypatch.setattr(devices, "available_memory", lambda device: weights + 1000)  # no room for the KV cache
    assert main(["serve", str(model_dir), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the KV cache needs at least ") and err.count("\n") == 1
    assert "(one sequence of 64 tokens)" in err


# ---------------------------------------------------------------------------- the real model, its own process
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.real_model
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's RSS from /proc")
def test_smollm2_serves_with_a_bounded_footprint(smollm2):
    """Unsized, this model's pool would be 64 sequences x 8,192 tokens x 45 KiB = 22.5 GiB."""
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(slmkit.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", str(smollm2), "--port", str(port),
                             "--kv-memory", "1GB"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        rss = rss_bytes(proc.pid)
        r = httpx.post(url + "/v1/completions", json={"model": "model", "prompt": "The capital of France is",
                                                      "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
        assert rss < 3 * GIB, f"RSS {rss / GIB:.2f} GiB"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    line = next(line for line in err.splitlines() if "KV cache:" in line)
    tokens = int(re.search(r"for ([\d,]+) tokens", line).group(1).replace(",", ""))
    assert "float32" in line and "; --kv-memory)" in line and "at most 8,192 tokens" in line
    assert tokens == GIB // (16 * TOKEN) * 16
