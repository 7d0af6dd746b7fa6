"""Bring your own model: Hugging Face folders and GGUF files as ryzlab Transformers.

    from ryzlab.models import check_model, load_model
    src = check_model("~/models/SmolLM2-135M-Instruct")      # metadata only: config, shapes, tokenizer
    model, tok = load_model("~/models/SmolLM2-135M-Instruct", dtype="bfloat16", device="cuda")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])

Every checkpoint lands in ryzlab's own :class:`ryzlab.models.transformer.Transformer`, so the paged and
compressed KV cache, tensor parallelism (``load_model(..., tp=comm)`` reads only the rank's
shard) and the serving engine apply unchanged.

* :mod:`.source` — what a spec names (:func:`check_model`, :class:`ModelSource`), dtypes;
* :mod:`.hf` — ``config.json`` + safetensors (Llama, Mistral, Qwen2);
* :mod:`.gguf` — llama-architecture GGUF files, dequantized on load;
* :mod:`.tokenizer` — byte, ``tokenizer.json`` and GGUF tokenizers, chat templates;
* :mod:`.loader` — :func:`load_model`.
* :mod:`.quant` — weight formats (bf16 / int8 / int4 / ternary, GGUF blocks kept packed): ``load_model(..., weights=)``.
"""
from ryzlab.models.gguf import GGUF_ARCHITECTURES
from ryzlab.models.hf import HF_ARCHITECTURES
from ryzlab.models.loader import load_model, load_tokenizer
from ryzlab.models.check import check_model
from ryzlab.models.source import DTYPES, MODEL_CHOICES, ModelSource, resolve_dtype, smollm2_gguf_path
from ryzlab.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, render_chat_template

__all__ = ["MODEL_CHOICES", "ModelSource", "check_model", "load_model", "load_tokenizer", "resolve_dtype", "DTYPES",
           "Tokenizer", "ByteTokenizer", "HFTokenizer", "render_chat_template", "smollm2_gguf_path",
           "HF_ARCHITECTURES", "GGUF_ARCHITECTURES"]
