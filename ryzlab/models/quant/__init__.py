"""Weight formats beside KV formats: bf16 / int8 / int4 group-wise / BitNet ternary, and GGUF blocks kept packed.

    from ryzlab.models.quant import quantize_weights, weight_ledger, linear_weight_bytes
    model, tok = load_model("reference")
    quantize_weights(model, "int4-g32")        # after the model is built (after apply_tp: each rank its shard)
    weight_ledger(model)["total"]              # bytes held, scales and zeros included

* :mod:`.formats` — :class:`WeightFormat`, ``--weights`` strings, shape / tp checks made before loading;
* :mod:`.packing` — quantize, pack and unpack tensors (error bounds in its docstring);
* :mod:`.linear` — the packed layers (each names its CPU ``kernel``) and :func:`quantize_weights`;
* :mod:`.ledger` — :func:`linear_weight_bytes` (the one bytes-per-format formula), :func:`model_weight_bytes`,
  :func:`weight_ledger`;
* :mod:`.gguf_native` — Q8_0 / Q4_0 / Q4_1 tensors of a GGUF file straight into packed layers;
* :mod:`.w4a8` — int4 weights x int8 activations (``int4-g<N>-a8``): ryzlab's C++ kernel, built on first use.
"""
from ryzlab.models.quant.formats import (INT4_GROUP_SIZES, WEIGHT_FORMAT_CHOICES, WeightFormat, check_weight_format,
                                         parse_weight_format, weight_format_problems)
from ryzlab.models.quant.ledger import linear_weight_bytes, linear_weight_parts, model_weight_bytes, weight_ledger
from ryzlab.models.quant.linear import (Bf16Linear, Int4A8Linear, Int4Linear, Int8Linear, PackedEmbedding, PackedLinear,
                                        TernaryLinear, quantize_weights)

__all__ = ["WeightFormat", "WEIGHT_FORMAT_CHOICES", "INT4_GROUP_SIZES", "parse_weight_format", "check_weight_format",
           "weight_format_problems", "quantize_weights", "weight_ledger", "linear_weight_bytes", "linear_weight_parts",
           "model_weight_bytes", "PackedLinear", "Int8Linear", "Int4Linear", "Int4A8Linear", "TernaryLinear", "Bf16Linear",
           "PackedEmbedding"]
