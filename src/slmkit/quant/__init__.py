"""Post-training quantization: int8/int4 round-to-nearest, GPTQ, SmoothQuant W8A8, fp8.

`quantize(model_dir, method=..., out=...)` writes a quantized model directory (loadable with
`slmkit.load`) and its quality report; `quantize_model(model, method, ...)` works in memory.
"""

METHODS = ("int8", "int4", "gptq", "smoothquant", "fp8")

__all__ = ["METHODS", "QuantReport", "quantize", "quantize_model"]


def __getattr__(name: str):  # torch-backed parts load on first use, keeping `slmkit --help` light
    if name in ("QuantReport", "quantize", "quantize_model"):
        from slmkit.quant import api

        return getattr(api, name)
    raise AttributeError(f"module 'slmkit.quant' has no attribute {name!r}")
