"""Data pipeline: read a corpus, clean and deduplicate it, tokenize it into shards, feed a model.

    docs = Corpus(["corpus/"])                                   # stream of documents
    result = prepare(["corpus/"], tokenizer, "shards/")          # clean, split, tokenize, write
    print(result.summary_table())
    x, y = RandomWindowSampler("shards/", context_length=256).get_batch(8)
"""

from slmkit.data.clean import CleanConfig, Cleaner, CleanReport
from slmkit.data.corpus import Corpus, Document, iter_texts, read_documents, read_file
from slmkit.data.shards import PrepareResult, load_shards, prepare, read_manifest

_TORCH_NAMES = ("RandomWindowSampler", "SlidingWindowDataset", "TokenStream")

__all__ = [
    "CleanConfig",
    "CleanReport",
    "Cleaner",
    "Corpus",
    "Document",
    "PrepareResult",
    "iter_texts",
    "load_shards",
    "prepare",
    "read_documents",
    "read_file",
    "read_manifest",
    *_TORCH_NAMES,
]


def __getattr__(name: str):
    # The datasets need torch, which takes a second or two to import; reading, cleaning and
    # sharding (the tokenizer trainer, `slmkit prepare`) do not, so they are imported on first use.
    if name in _TORCH_NAMES:
        from slmkit.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
