"""Quantization: INT8, NF4, RTN, GPTQ and AWQ by module swap, HF quantized checkpoints, GGUF export.

    from ember.quant import QuantConfig, quantize_model, calibration_ids
    model = quantize_model(ember.load_model("dir"), QuantConfig(method="gptq", bits=4),
                           calibration_ids(tok, ["bundled"]))
    ember.save_model(model, "out")          # reloads with ember.load_model("out")

See quantize.py for the methods and formats, linear.py and gguf_linear.py for the runtime modules.
"""

from ember.quant.calibration import calibration_ids
from ember.quant.gguf_linear import GGUFLinear
from ember.quant.linear import GroupQuantLinear, Int8Linear, NF4Linear, weight_bytes
from ember.quant.quantize import METHODS, QuantConfig, QuantizationError, quantize_model

__all__ = ["GGUFLinear", "GroupQuantLinear", "Int8Linear", "METHODS", "NF4Linear", "QuantConfig", "QuantizationError",
           "calibration_ids", "quantize_model", "weight_bytes"]
