"""Byte-level BPE training.

1. Pre-tokenize the corpus once and count each distinct chunk ("word"); the corpus is streamed,
   only the counts are kept.
2. Count adjacent pairs over the distinct words, weighted by word frequency, and remember which
   words hold each pair.
3. Repeatedly take the most frequent pair (a max-heap with lazy deletion; ties go to the smaller
   pair of ids, so runs are deterministic), merge it inside the words that hold it, and update
   only the counts of those words. Nothing is recounted from scratch.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing
import multiprocessing.pool
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex
from tqdm.auto import tqdm

from slmkit.data.corpus import Corpus, batched_by_chars
from slmkit.errors import TokenizerError
from slmkit.tokenizer.pretokenize import compiled, resolve_pattern
from slmkit.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, utf8_safe

CorpusLike = Iterable[str] | os.PathLike | Sequence[os.PathLike]


def _count_batch(args: tuple[list[str], str, str | None]) -> tuple[Counter, int]:
    texts, pattern, protected = args
    split = compiled(pattern)
    cut = compiled(protected) if protected else None
    counts: Counter = Counter()
    for text in texts:
        for part in cut.split(text) if cut else (text,):
            counts.update(split.findall(part))
    return counts, sum(map(len, texts))


def _pieces(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Documents, with very long ones cut into pieces of about `max_chars` (for parallel counting).

    Cuts fall only between a newline and a non-space character, where neither split pattern can
    match across, so the counts are exactly those of the uncut text.
    """
    for text in texts:
        text = utf8_safe(text)
        while len(text) > max_chars:
            cut = text.find("\n", max_chars)
            while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
                cut = text.find("\n", cut + 1)
            if cut == -1 or cut + 1 >= len(text):
                break
            yield text[: cut + 1]
            text = text[cut + 1 :]
        yield text


def count_words(
    texts: Iterable[str],
    pattern: str,
    protected: Sequence[str] = (),
    progress: bool = False,
    workers: int | None = None,
    batch_chars: int = 1 << 18,
) -> Counter:
    """Distinct pre-tokenized chunks of the corpus (as bytes) with their counts.

    Special and domain-token strings are cut out first: they become tokens of their own, so
    their bytes must not shape the merges. Batches of text are counted on all cores.
    """
    cut = "|".join(regex.escape(s) for s in sorted(protected, key=len, reverse=True)) or None
    batches = batched_by_chars(_pieces(texts, batch_chars), batch_chars)
    head = list(itertools.islice(batches, 2))
    jobs = ((batch, pattern, cut) for batch in itertools.chain(head, batches))
    workers = (workers or os.cpu_count() or 1) if len(head) > 1 else 1  # one batch: no processes
    counts: Counter = Counter()
    with _pool(workers) as pool, tqdm(desc="counting", unit="char", unit_scale=True, disable=not progress) as bar:
        for part, chars in pool.imap_unordered(_count_batch, jobs) if pool else map(_count_batch, jobs):
            counts.update(part)
            bar.update(chars)
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    if workers <= 1:
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield pool


def _find(word: list[int], symbol: int, start: int) -> int:
    try:
        return word.index(symbol, start)
    except ValueError:
        return -1


def learn_merges(word_counts: Counter, n_merges: int, progress: bool = False) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn up to `n_merges` merges. Returns the vocabulary (bytes by id) and the merges."""
    vocab = [bytes([b]) for b in range(256)]
    token_ids = {tok: i for i, tok in enumerate(vocab)}
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (word, freq) in enumerate(zip(words, freqs)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(wi)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="merging", unit="merge", disable=not progress)
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:  # stale entry: the pair lost occurrences since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        merged = vocab[a] + vocab[b]
        del pair_counts[pair]
        if merged in token_ids:  # these bytes are already a token, reached by another merge
            continue
        new_id = token_ids[merged] = len(vocab)
        vocab.append(merged)
        merges.append(pair)
        bar.update()

        # Merge inside each word holding the pair and patch only the neighbouring pair counts:
        # (left, a) becomes (left, new) and (b, right) becomes (new, right).
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(pair):
            word, freq = words[wi], freqs[wi]
            n = len(word)
            new: list[int] = []
            start = 0
            while (i := _find(word, a, start)) >= 0:
                if i + 1 < n and word[i + 1] == b:
                    new.extend(word[start:i])
                    if new:
                        left = new[-1]
                        pair_counts[left, a] -= freq
                        pair_counts[left, new_id] += freq
                        touched.add((left, new_id))
                        where[left, new_id].add(wi)
                    if i + 2 < n:
                        right = word[i + 2]
                        pair_counts[b, right] -= freq
                        pair_counts[new_id, right] += freq
                        touched.add((new_id, right))
                        where[new_id, right].add(wi)
                    new.append(new_id)
                    start = i + 2
                else:
                    new.extend(word[start : i + 1])
                    start = i + 1
            if len(new) + n - start < n:  # otherwise stale membership: no occurrence left here
                new.extend(word[start:])
                words[wi] = new
        pair_counts.pop(pair, None)
        for new_pair in touched:
            heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
    bar.close()
    return vocab, merges


def _texts(corpus: CorpusLike) -> Iterable[str]:
    """Paths (files or directories) are read through `slmkit.data`; anything else is taken as texts."""
    if isinstance(corpus, (str, bytes)):
        raise TokenizerError("train_bpe takes an iterable of texts or a list of paths, not a single string")
    if isinstance(corpus, os.PathLike):
        corpus = [corpus]
    if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(p, os.PathLike) for p in corpus):
        return Corpus([Path(p) for p in corpus])
    return corpus


def train_bpe(
    corpus: CorpusLike,
    vocab_size: int,
    *,
    pattern: str = "gpt4",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    domain_tokens: Sequence[str] = (),
    progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens (bytes + merges + domain + specials).

    `corpus` is an iterable of texts, or a `Path` / list of `Path`s to files and directories.
    `domain_tokens` are terms that must each be a single token whatever the corpus says.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    domain_tokens = [t for t in dict.fromkeys(domain_tokens) if t and t not in special_tokens]
    reserved = 256 + len(special_tokens) + len(domain_tokens)
    if vocab_size < reserved:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: 256 byte tokens + {len(special_tokens)} special "
            f"+ {len(domain_tokens)} domain tokens need at least {reserved}"
        )
    regex_ = resolve_pattern(pattern)
    words = count_words(_texts(corpus), regex_, [*special_tokens, *domain_tokens], progress)
    if not words:
        raise TokenizerError("the corpus is empty: there is no text to learn merges from")
    vocab, merges = learn_merges(words, vocab_size - reserved, progress)
    added = {}
    for token in domain_tokens:
        added[token] = len(vocab)
        vocab.append(token.encode("utf-8"))
    specials = {}
    for token in special_tokens:
        specials[token] = len(vocab)
        vocab.append(token.encode("utf-8"))
    return Tokenizer(vocab, merges, regex_, specials, added)
