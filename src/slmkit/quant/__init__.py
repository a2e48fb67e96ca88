"""Post-training quantization: int8/int4 round-to-nearest, GPTQ, SmoothQuant W8A8, fp8.

`quantize(model_dir, method=..., out=...)` (quantize_dir.py) writes a quantized model directory
(loadable with `slmkit.load`) and its quality report; `quantize_model(model, method, ...)`
(methods.py) works in memory. Every quantized linear layer lives in linear.py, and
`targets.linear_targets` decides which linears a transform replaces.
"""

METHODS = ("int8", "int4", "gptq", "smoothquant", "fp8")

__all__ = ["METHODS", "QuantReport", "quantize", "quantize_model"]

_LAZY = {"QuantReport": "quantize_dir", "quantize": "quantize_dir", "quantize_model": "methods"}


def __getattr__(name: str):  # torch-backed parts load on first use, keeping `slmkit --help` light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"slmkit.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'slmkit.quant' has no attribute {name!r}")
