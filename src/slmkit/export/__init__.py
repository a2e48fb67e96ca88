"""Export a model directory to the formats other runtimes read: ONNX (ONNX Runtime) and GGUF
(llama.cpp, Ollama)."""

from slmkit.export.gguf import export_gguf, write_modelfile
from slmkit.export.onnx import export_onnx

__all__ = ["export_gguf", "export_onnx", "write_modelfile"]
