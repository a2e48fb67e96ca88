"""slmkit: build and own a small, domain-specific language model end to end."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slmkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from slmkit.errors import SlmkitError
from slmkit.tokenizer import Tokenizer, train_bpe

__all__ = ["SlmkitError", "Tokenizer", "train_bpe", "load", "load_classifier", "generate", "__version__"]

# torch-backed parts are imported on first use, so that `import slmkit` (and the tokenizer CLI) stays light
_LAZY = {"load": "slmkit.model.io", "generate": "slmkit.generation", "load_classifier": "slmkit.model.classifier"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slmkit' has no attribute {name!r}")
