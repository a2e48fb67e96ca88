"""Paged KV cache: a preallocated pool of fixed-size blocks, per-sequence block tables, and a
prefix cache that lets requests with the same beginning share blocks.

Memory is allocated once: `KVPool` holds keys and values of every layer for `num_blocks *
block_size` token slots. A sequence owns a list of block ids (its block table); token i of the
sequence lives in slot `table[i // block_size] * block_size + i % block_size`.

A block that is full is keyed by a hash of every token up to its end (and the LoRA adapter that
computed it), so a later request whose prompt starts the same way reuses it instead of
recomputing it. Blocks are reference counted; a cached block nobody uses stays in the cache until
its slot is needed, evicted least recently used first.

`plan_pool` sizes the pool to the machine: a share of the memory left once the model is loaded
(`kv_memory`: a fraction, or an amount), never more than `max_seqs` full-context sequences need,
and refuses one too small to hold a single sequence of `MIN_POOL_TOKENS` tokens. A sequence's
context is at most what the pool holds.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model.cache import RaggedCache

MIN_POOL_TOKENS = 1024  # a pool sized from memory holds one sequence of this many tokens (or of the context), or is refused
KV_FRACTION = {"cuda": 0.8, "cpu": 0.25, "mps": 0.25}  # share of the available memory the pool takes by default
GIB, MIB = 1 << 30, 1 << 20


class KVPool:
    """Keys and values for `num_blocks * block_size` token slots of every layer: [L, slots, Hkv, D]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layers, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block: keys and values of `block_size` tokens in every layer."""
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def size(n: float) -> str:
    """Bytes, for people: 1.88 GiB, 45.0 MiB, 8.0 KiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class PoolPlan:
    """How large the pool is and why: `num_blocks` blocks of `block_bytes`, sequences of at most
    `context` tokens, chosen from `source` (the share of memory or the flag that set it)."""

    num_blocks: int
    block_size: int
    block_bytes: int
    context: int
    max_seqs: int
    dtype: torch.dtype
    source: str

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"KV cache: {size(self.bytes)} {dtype} for {self.tokens:,} tokens ({self.num_blocks:,} blocks of "
                f"{self.block_size}; {self.source}): up to {self.max_seqs} sequences of at most {self.context:,} "
                f"tokens, {self.tokens / self.context:.1f} of them at full length")


def kv_budget(kv_memory: float | str | None, available: int | None, device_type: str) -> tuple[int, str]:
    """Bytes the pool may take, and where that figure comes from. `kv_memory`: a fraction of the
    available memory (0.3 or "30%"), or an amount ("4GB", "512MB"; a bare number above 1 is GiB);
    None: the device's default share (`KV_FRACTION`)."""
    fraction = KV_FRACTION.get(device_type, 0.25)
    if kv_memory is not None:
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(%|gib|gb|g|mib|mb|m)?", str(kv_memory).strip().lower().replace(" ", ""))
        value, unit = (float(match.group(1)), match.group(2) or "") if match else (0.0, "")
        if value <= 0 or (unit == "%" and value > 100):
            raise InputError(f"--kv-memory takes a fraction of the available memory (0.3, 30%) or an amount "
                             f"(4GB, 512MB), not {kv_memory!r}")
        if unit == "%":
            fraction = value / 100
        elif not unit and value <= 1:
            fraction = value
        else:
            return int(value * (MIB if unit.startswith("m") else GIB)), "--kv-memory"
    if available is None:
        raise InputError("cannot tell how much memory is free on this system; give --kv-memory as an amount (4GB) "
                         "or --kv-blocks")
    return int(fraction * available), f"{fraction:.0%} of {size(available)} available on {device_type}"


def plan_pool(cfg: ModelConfig, dtype: torch.dtype, available: int | None, *, device_type: str = "cpu",
              kv_memory: float | str | None = None, num_blocks: int | None = None, block_size: int = 16,
              max_seqs: int = 64, max_context: int | None = None) -> PoolPlan:
    """The pool for a loaded model, `available` bytes left on its device: `num_blocks` if given,
    else as many blocks as `kv_budget` allows, up to `max_seqs` sequences of the full context.
    Raises InputError for a pool that cannot be allocated or cannot hold one sequence."""
    if block_size < 1 or max_seqs < 1:
        raise InputError(f"--block-size and --max-seqs must be at least 1, not {block_size} and {max_seqs}")
    context = cfg.context_length if max_context is None else max_context
    if not 1 <= context <= cfg.context_length:
        raise InputError(f"--max-context must be between 1 and the model's context of {cfg.context_length:,} tokens, "
                         f"not {max_context}")
    block_bytes = KVPool.block_bytes(cfg, block_size, dtype)
    if num_blocks is not None:
        if kv_memory is not None:
            raise InputError("give --kv-blocks or --kv-memory, not both")
        if num_blocks < 1:
            raise InputError(f"--kv-blocks must be at least 1, not {num_blocks}")
        source = "--kv-blocks"
    else:
        budget, source = kv_budget(kv_memory, available, device_type)
        num_blocks = min(budget // block_bytes, max_seqs * -(-context // block_size))
        smallest = min(context, MIN_POOL_TOKENS)
        if num_blocks * block_size < smallest:
            raise InputError(f"the KV cache needs at least {size(-(-smallest // block_size) * block_bytes)} (one sequence "
                             f"of {smallest:,} tokens) but gets {size(budget)} ({source}, once the model is loaded); "
                             "free memory, raise --kv-memory, lower --max-context or use a smaller --dtype")
    if available is not None and num_blocks * block_bytes > available:
        raise InputError(f"a KV cache of {size(num_blocks * block_bytes)} ({source}) does not fit in the "
                         f"{size(available)} available on {device_type} once the model is loaded; ask for less")
    return PoolPlan(num_blocks, block_size, block_bytes, min(context, num_blocks * block_size), max_seqs, dtype, source)


def block_hash(parent: bytes, tokens: Sequence[int], salt: str = "") -> bytes:
    """Key of a full block: its tokens chained to the key of the block before it (so equal
    keys mean equal whole prefixes), salted with the adapter name."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(salt.encode())
    h.update(b"\0")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


class BlockManager:
    """Hands out blocks of the pool, counts their users, and keeps full blocks findable by hash."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used or evicted blocks
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.hash_of: dict[int, bytes] = {}  # block -> hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first
        self.queries = self.hits = 0  # prefix-cache lookups of full blocks, and those found

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable from the prefix cache)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def allocate(self) -> int:
        """One block for a new user; the least recently used cached block goes when none is free."""
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:
            raise RuntimeError("no free KV block; the scheduler must check num_free first")
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one user of each block; cached blocks stay findable until evicted."""
        for block in reversed(blocks):  # the ends of sequences are evicted before their shared starts
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def match_prefix(self, tokens: Sequence[int], salt: str = "") -> tuple[list[int], list[bytes]]:
        """Cached blocks that hold the longest cached beginning of `tokens` (full blocks only, and
        never the last token, whose logits the caller still needs); each gains a user."""
        blocks, hashes, parent = [], [], b""
        if not self.prefix_caching:
            return blocks, hashes
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            parent = block_hash(parent, tokens[start : start + self.block_size], salt)
            self.queries += 1
            block = self.cached.get(parent)
            if block is None:
                break
            self.hits += 1
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def register(self, block: int, key: bytes) -> None:
        """Make a just-filled block findable (a block with the same key already cached wins)."""
        if self.prefix_caching and key not in self.cached and block not in self.hash_of:
            self.cached[key] = block
            self.hash_of[block] = key


class PagedBatch(RaggedCache):
    """The cache the model sees in one engine step: rows of different lengths, each
    feeding its next tokens (a prefill chunk, one decode token, or a token plus drafts).

    `update` writes the new keys/values into the sequences' slots of the pool, then gathers
    every row's keys/values [B, Hkv, K, D] back through its block table for the attention.
    Positions are per row, so the forward's own single-length bookkeeping does not apply:
    `length` stays 0 and the engine checks each sequence against the context.
    """

    length = 0

    def __init__(self, pool: KVPool, tables: Sequence[Sequence[int]], starts: Sequence[int], counts: Sequence[int]) -> None:
        device = pool.k.device
        bs = pool.block_size
        b, t, k = len(tables), max(counts), max(s + n for s, n in zip(starts, counts))
        table = torch.zeros(b, -(-k // bs), dtype=torch.long)
        for row, blocks in enumerate(tables):
            table[row, : len(blocks)] = torch.tensor(blocks[: table.shape[1]], dtype=torch.long)
        keys = torch.arange(k)
        self.key_slots = (table[:, keys // bs] * bs + keys % bs).to(device)  # [B, K]
        start = torch.tensor(starts)[:, None]
        steps = torch.arange(t)[None, :]
        valid = steps < torch.tensor(counts)[:, None]  # [B, T]: real (not padding) query
        self.positions = torch.where(valid, start + steps, 0).to(device)  # [B, T]
        self.key_positions = keys.expand(b, k).to(device)
        allowed = (keys[None, None, :] <= (start + steps)[:, :, None]) & valid[:, :, None]
        allowed[:, :, 0] |= ~valid  # a padding query sees one key, so its softmax stays finite
        self.mask = allowed[:, None].to(device)  # [B, 1, T, K]
        self.valid = valid.to(device)
        self.write_slots = self.key_slots.gather(1, self.positions)[self.valid]  # slots of the new tokens
        self.pool = pool

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        pool_k[self.write_slots] = k.transpose(1, 2)[self.valid]
        pool_v[self.write_slots] = v.transpose(1, 2)[self.valid]
        return pool_k[self.key_slots].transpose(1, 2), pool_v[self.key_slots].transpose(1, 2)

    def advance(self, n: int) -> None:
        """The engine advances each sequence itself."""
