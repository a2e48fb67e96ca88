"""Retrieval-augmented generation over a user's own documents, answered by their own model.

    build_index(["docs/"], "docs.index", "model_dir")           # chunk, embed, store
    index = Index("docs.index")
    hits = Retriever("hybrid").search(index, "how do I ...?", k=5)
    reply = answer(index, "how do I ...?", LocalGenerator("model_dir"))
    print(reply.render())                                        # the answer and its citations
"""

from slmkit.rag.answer import Answer, Citation, LocalGenerator, OpenAIGenerator, answer, load_generator
from slmkit.rag.chunking import ChunkConfig
from slmkit.rag.embedders import load_embedder
from slmkit.rag.index import Index
from slmkit.rag.indexing import UpdateReport, add, build_index, remove
from slmkit.rag.retrieve import Hit, Retriever, parse_filters

__all__ = ["Answer", "ChunkConfig", "Citation", "Hit", "Index", "LocalGenerator", "OpenAIGenerator", "Retriever",
           "UpdateReport", "add", "answer", "build_index", "load_embedder", "load_generator", "parse_filters", "remove"]
