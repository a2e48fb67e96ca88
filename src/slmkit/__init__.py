"""slmkit: build and own a small, domain-specific language model end to end."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slmkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from slmkit.errors import SlmkitError
from slmkit.tokenizer import Tokenizer, train_bpe

__all__ = ["SlmkitError", "Tokenizer", "train_bpe", "__version__"]
