"""Open-weights interop: Hugging Face checkpoints in and out, GGUF files in, with exact logit parity."""

__all__ = ["from_gguf", "from_hf", "list_models", "resize_token_embeddings", "to_hf"]

# torch-backed parts are imported on first use, so that the CLI can list the families cheaply
_LAZY = {"from_gguf": "slmkit.convert.import_gguf", "list_models": "slmkit.convert.local_models", "from_hf": "slmkit.convert.import_hf", "to_hf": "slmkit.convert.export_hf", "resize_token_embeddings": "slmkit.model.resize"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slmkit.convert' has no attribute {name!r}")
