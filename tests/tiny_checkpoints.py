"""Tiny random checkpoints built on the spot (no hub): HF folders per architecture and GGUF files.

* :func:`bpe_tokenizer` trains a ~300-token byte-level BPE on a few lines of text and wraps it as
  a transformers fast tokenizer (special tokens, chat template) so ``save_pretrained`` writes the
  same files a real checkpoint has;
* :func:`save_hf` builds ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``
  with random weights (biases made non-zero) and saves model + tokenizer;
* :func:`write_gguf` writes an HF Llama as llama.cpp would: names, Q/K rows permuted for its
  RoPE layout, tensors quantized (``gguf.quants.quantize``), tokenizer as ``tokenizer.ggml.*``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["def add(a, b):\n    return a + b  # 12345 and 678\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "The quick brown fox jumps over the lazy dog. Hello, world! It's 2024; we're here.\n",
        "for i in range(10):\n    print(i, i * i)\n", "naïve café — ünïcödé text ✓ 東京\n"]


def bpe_tokenizer(vocab_size: int = 300) -> Any:
    """A transformers ``PreTrainedTokenizerFast`` over a freshly trained byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=500000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4096, head_dim=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0)),
}


def hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random HF causal LM of ``arch`` (float32, eval mode); biases drawn non-zero."""
    import transformers

    cfg_name, cls_name, extra = ARCHS[arch]
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, **extra)
    kw.update(overrides)
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zero-initialised: make them matter
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def save_hf(folder: Path, arch: str, *, seed: int = 0, dtype: torch.dtype | None = None,
            max_shard_size: str | None = None, **overrides: Any) -> Any:
    """Save a tiny ``arch`` model + the BPE tokenizer into ``folder``; return the (float32) model."""
    model = hf_model(arch, seed, **overrides)
    bpe_tokenizer().save_pretrained(folder)
    to_save = model if dtype is None else hf_model(arch, seed, **overrides).to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    to_save.save_pretrained(folder, **kw)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, *mid, kind = hf.split(".")
    return f"blk.{i}.{GGUF_LAYER['.'.join(mid)]}.{kind}"


def write_gguf(path: Path, model: Any, tokenizer: Any, qtypes: dict[str, str], *, name: str = "tiny llama",
               pre: str = "default", rope_freqs: np.ndarray | None = None) -> Path:
    """Write ``model`` (an HF Llama) as a llama.cpp GGUF; ``qtypes`` maps a substring of the GGUF
    tensor name (first match wins, ``""`` = everything else 2-D) to a ggml type name (``Q8_0``...)."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if isinstance(tokenizer, dict):  # a SentencePiece-style vocabulary (spm_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        w.add_token_scores(tokenizer["scores"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        _write_tensors(w, model, qtypes, rope_freqs)
        return path
    # tokenizer: byte-level BPE as llama.cpp's convert writes it (model "gpt2", merges "a b")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), c.vocab_size)]
    import json

    model_json = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    types = [3 if t in SPECIALS else (5 if t.startswith("[PAD") else 1) for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    _write_tensors(w, model, qtypes, rope_freqs)
    return path


def _write_tensors(w: Any, model: Any, qtypes: dict[str, str], rope_freqs: np.ndarray | None) -> None:
    import gguf

    c = model.config
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name = gguf_tensor_name(hf)
        arr = t.detach().float().numpy()
        if ".attn_q." in name:
            arr = _permute(arr, c.num_attention_heads)
        elif ".attn_k." in name:
            arr = _permute(arr, c.num_key_value_heads)
        qname = "F32"
        if arr.ndim == 2:
            qname = next((q for key, q in qtypes.items() if key and key in name), qtypes.get("", "F32"))
        qtype = gguf.GGMLQuantizationType[qname]
        if qname in ("F32", "F16"):
            w.add_tensor(name, arr.astype(np.float32 if qname == "F32" else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def spm_vocab(vocab_size: int = 400) -> dict[str, list]:
    """A SentencePiece-style BPE vocabulary as llama.cpp stores one (``tokenizer.ggml.model = llama``):
    ``<unk> <s> </s>``, 256 byte-fallback tokens ``<0xNN>``, pieces with ``▁`` for spaces, scores
    = -rank (no merges: readers derive them from the scores)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens]
    scores = [-float(i) if ty == 1 else 0.0 for i, ty in enumerate(types)]
    return {"tokens": tokens, "types": types, "scores": scores}
