"""Post-training quantization: int8/int4 round-to-nearest, GPTQ, SmoothQuant W8A8, fp8.

`quantize(model_dir, method=..., out=...)` writes a quantized model directory (loadable with
`slmkit.load`) and its quality report; `quantize_model(model, method, ...)` works in memory.
"""

from slmkit.quant.api import METHODS, QuantReport, quantize, quantize_model

__all__ = ["METHODS", "QuantReport", "quantize", "quantize_model"]
