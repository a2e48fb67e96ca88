"""An open index: its store, the tokenizer its chunks are counted in, its embedder and its vector
index, each checked against what the index was built with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import InputError, SlmkitError
from slmkit.rag.embedders import Embedder, load_embedder
from slmkit.rag.store import Store
from slmkit.rag.vectors import VectorIndex, open_vectors
from slmkit.tokenizer import Tokenizer


class Index:
    """`Index(dir)` opens an index built by `build_index`; the embedder and vector index load on
    first use. `embedder` replaces the recorded one (it must produce the same vectors)."""

    def __init__(self, directory: str | os.PathLike, *, embedder: Embedder | None = None, device: str = "cpu") -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(f"index {self.directory} does not exist; build one with `slmkit rag index`")
        self.store = Store(self.directory)
        self.device = device
        self._embedder = embedder
        if embedder is not None:
            check_embedder(self.directory, self.store.settings, embedder)
        self._tokenizer: Tokenizer | None = None
        self._vectors: VectorIndex | None = None
        self._vectors_generation = -1

    @property
    def settings(self) -> dict[str, Any]:
        return self.store.settings

    @property
    def name(self) -> str:
        return self.directory.resolve().name

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            try:
                self._tokenizer = Tokenizer.load(self.directory)
            except SlmkitError as e:
                raise InputError(f"the tokenizer of index {self.directory} cannot be loaded ({e}); rebuild the index "
                                 "with `slmkit rag index --force`") from None
        return self._tokenizer

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            recorded = self.settings["embedder"]
            self._embedder = load_embedder(recorded["spec"], pooling=recorded.get("pooling", "mean"),
                                           model=recorded.get("model"), device=self.device)
            check_embedder(self.directory, self.settings, self._embedder)
        return self._embedder

    @property
    def vectors(self) -> VectorIndex:
        """The vector index, reopened when another process has updated the index."""
        generation = self.store.generation
        if self._vectors is None or generation != self._vectors_generation:
            if self._vectors is not None:
                self._vectors.close()
            self._vectors = open_vectors(self.store)
            self._vectors_generation = generation
        return self._vectors

    def updated(self) -> None:
        """This process committed an update: the open vector index already reflects it."""
        self._vectors_generation = self.store.generation

    def embed_query(self, text: str) -> np.ndarray:
        return self.embedder.embed([text])[0]

    def check_tokenizer(self, tokenizer: Tokenizer, what: str = "the model") -> None:
        if tokenizer.fingerprint() != self.settings["tokenizer"]:
            raise InputError(f"index {self.directory} counts chunks in another tokenizer than {what}'s; rebuild it with "
                             f"`slmkit rag index --tokenizer` set to {what}")

    def close(self) -> None:
        if self._vectors is not None:
            self._vectors.close()
        self.store.close()


def check_embedder(directory: Path, settings: dict[str, Any], embedder: Embedder) -> None:
    recorded = {k: v for k, v in settings["embedder"].items() if k != "spec"}
    found = embedder.identity()
    if found != recorded:
        raise InputError(f"index {directory} was built with embedder {recorded.get('name')} ({recorded.get('dim')}-dim); "
                         f"{found.get('name')} ({found.get('dim')}-dim) makes other vectors; use the index's embedder "
                         "or rebuild it with `slmkit rag index --force`")
