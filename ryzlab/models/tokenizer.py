"""Tokenizers for every model ryzlab loads, behind one small protocol.

* :class:`ByteTokenizer` — the reference model's: UTF-8 bytes are the token ids (vocab 256),
  no special tokens, a tiny built-in chat format.
* :class:`HFTokenizer` — a ``tokenizers.Tokenizer`` (the Rust library transformers' fast
  tokenizers wrap), built either from a Hugging Face folder's ``tokenizer.json`` (+
  ``tokenizer_config.json``, ``generation_config.json``, ``chat_template.jinja``; local files
  only) or from a GGUF file's ``tokenizer.ggml.*`` metadata (:func:`tokenizer_from_gguf`).

Chat templates are Jinja templates rendered in a sandbox the way transformers renders them
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that does not escape HTML,
``raise_exception`` and ``strftime_now``), with the special tokens as variables; the rendered
text is encoded without adding special tokens (the template writes them itself).
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "render_chat_template", "tokenizer_from_folder",
           "tokenizer_from_gguf", "GGUF_TOKENIZER_MODELS", "GGUF_PRE_TOKENIZERS", "BYTE_CHAT_TEMPLATE"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the experiments, the accuracy harness and the serving API need from a tokenizer."""

    vocab_size: int
    """Ids run over ``[0, vocab_size)`` (added tokens included)."""
    eos_token_ids: tuple[int, ...]
    """Every id that ends a generation (chat models often have several, e.g. ``<|eot_id|>``)."""
    bos_token_id: int | None
    chat_template: str | None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
                            ) -> list[int]: ...


# ----------------------------------------------------------------------------- chat templates
@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as transformers)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    # Sandboxed: a chat template comes with a downloaded checkpoint, i.e. it is untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                         special_tokens: Mapping[str, str] | None = None, **kwargs: Any) -> str:
    """Render ``template`` for ``messages`` (``[{"role": ..., "content": ...}]``) to the prompt text.

    ``special_tokens`` (``bos_token``, ``eos_token``, ...) are template variables, as in
    transformers' ``apply_chat_template``; ``kwargs`` are passed on (``tools``, ``documents``...).
    """
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"chat message {i} is {m!r}; expected a dict with 'role' and 'content'")
    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                     **{**dict(special_tokens or {}), **kwargs})


# ----------------------------------------------------------------------------- bytes
BYTE_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")
"""The reference model never saw chat data (it is trained on Python source): a plain
``role: content`` line per message is the least surprising format for it."""


class ByteTokenizer:
    """UTF-8 bytes as token ids: the byte-level reference model's tokenizer (no download, no files)."""

    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()
    """No end-of-sequence token: generation stops at the length limit."""
    bos_token_id = None
    chat_template = BYTE_CHAT_TEMPLATE

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer ids must be in [0, 256); got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
                            ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


# ----------------------------------------------------------------------------- tokenizers.Tokenizer
class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus what the tokenizer config adds (special tokens, chat template)."""

    def __init__(self, tokenizer: Any, *, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None,
                 chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None,
                 name: str = ""):
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        """``bos_token`` / ``eos_token`` / ``unk_token`` / ``pad_token`` strings (chat template variables)."""
        self.name = name

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name or ''} has no chat template (no 'chat_template' in "
                             f"tokenizer_config.json, chat_template.jinja or the GGUF metadata); "
                             f"use a plain completion prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
                            ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_ids}, "
                f"bos={self.bos_token_id}, chat_template={'yes' if self.chat_template else 'no'})")


def _token_str(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def folder_chat_template(folder: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    """The default chat template of a folder: ``chat_template.jinja`` (transformers >= 4.50 saves it
    there), ``chat_template.json``, or ``tokenizer_config.json``'s ``chat_template`` (a string, or a
    list of named templates of which ``default`` is used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = _read_json(folder / "chat_template.json").get("chat_template", tok_cfg.get("chat_template"))
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def tokenizer_from_folder(folder: str | Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder, from its ``tokenizer.json`` (local files only).

    End-of-sequence ids are the union of the tokenizer config's ``eos_token``,
    ``generation_config.json``'s and ``config.json``'s ``eos_token_id`` (Llama 3 Instruct ends a
    turn with ``<|eot_id|>``, listed only in the generation config).
    """
    from tokenizers import Tokenizer as RustTokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"no tokenizer.json in {folder}: ryzlab reads the fast-tokenizer file (save one with "
                         f"AutoTokenizer.from_pretrained(...).save_pretrained({str(folder)!r}))")
    tok = RustTokenizer.from_file(str(path))
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    special = {k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if (s := _token_str(tok_cfg.get(k))) is not None}
    model_cfg = _read_json(folder / "config.json")
    gen_cfg = _read_json(folder / "generation_config.json")
    eos = [i for s in [special.get("eos_token")] if s is not None and (i := tok.token_to_id(s)) is not None]
    eos += _ids(gen_cfg.get("eos_token_id")) + _ids(model_cfg.get("eos_token_id"))
    bos = tok.token_to_id(special["bos_token"]) if "bos_token" in special else None
    if bos is None:
        bos = next(iter(_ids(gen_cfg.get("bos_token_id")) or _ids(model_cfg.get("bos_token_id"))), None)
    return HFTokenizer(tok, eos_token_ids=eos, bos_token_id=bos, chat_template=folder_chat_template(folder, tok_cfg),
                       special_tokens=special, name=folder.name)


# ----------------------------------------------------------------------------- GGUF metadata
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
"""``tokenizer.ggml.model`` values ryzlab builds: byte-level BPE with merges (``gpt2``: SmolLM,
Llama 3, Qwen2) and SentencePiece-style BPE with byte fallback (``llama``: Llama 1/2, Mistral)."""

# llama.cpp's pre-tokenizer split rules (src/llama-vocab.cpp), keyed by ``tokenizer.ggml.pre``.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,), "gpt-2": (_GPT2_SPLIT,), "gpt2": (_GPT2_SPLIT,),
    # digits one by one, then the GPT-2 rule: llama.cpp's STARCODER / REFACT / SMOLLM / CODESHELL group
    "smollm": (r"\p{N}", _GPT2_SPLIT), "starcoder": (r"\p{N}", _GPT2_SPLIT), "refact": (r"\p{N}", _GPT2_SPLIT),
    "codeshell": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,), "falcon3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,), "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
"""Each rule isolates its matches; rules apply one after the other on the pieces (llama.cpp's
``unicode_regex_split``). A ``pre`` not listed falls back to ``default`` with a warning."""

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _generate_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens
    of the vocabulary, best score (= earliest merge) first; ties by piece lengths (the rule
    transformers' ``generate_merges`` uses for GGUF files without merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def tokenizer_from_gguf(meta: Mapping[str, Any], name: str = "") -> HFTokenizer:
    """Build the tokenizer a GGUF file describes from its ``tokenizer.*`` metadata (already parsed
    into Python values: ``tokenizer.ggml.tokens`` as a list of str, and so on).

    * ``gpt2``: byte-level BPE from ``tokens`` + ``merges``, split by ``tokenizer.ggml.pre``'s rule;
    * ``llama``: SentencePiece-style BPE (``▁`` for spaces, a leading ``▁``, ``<0xNN>`` byte
      fallback) with merges from the file or derived from the token scores.

    Control tokens (type 3) become special tokens, user-defined ones (type 4) added tokens;
    ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` decide what ``encode`` adds.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZER_MODELS:
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: "
                         f"{', '.join(map(repr, GGUF_TOKENIZER_MODELS))}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges_meta = meta.get("tokenizer.ggml.merges")
    if kind == "gpt2":
        if not merges_meta:
            raise ValueError("GGUF gpt2 tokenizer without tokenizer.ggml.merges: cannot build the BPE")
        merges = [tuple(m.split(" ", 1)) for m in merges_meta]
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre") or "default"
        rules = GGUF_PRE_TOKENIZERS.get(pre)
        if rules is None:
            log.warning("GGUF tokenizer.ggml.pre=%r is not one ryzlab knows (%s): FALLBACK to the GPT-2 split "
                        "rule; token ids may differ from llama.cpp's on some text", pre,
                        ", ".join(sorted(GGUF_PRE_TOKENIZERS)))
            rules = GGUF_PRE_TOKENIZERS["default"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rules]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        merges = ([tuple(m.split(" ", 1)) for m in merges_meta] if merges_meta
                  else _generate_merges(tokens, scores))
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                       byte_fallback=True))
        add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    def tid(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = tid("bos_token_id"), tid("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    single = ([f"{tokens[bos]}:0"] if add_bos and bos is not None else []) + ["$A:0"] + (
        [f"{tokens[eos]}:0"] if add_eos and eos is not None else [])
    pair = single + ["$B:1"]
    specials = [(tokens[i], i) for i in {bos, eos} if i is not None and ((i == bos and add_bos) or (i == eos and add_eos))]
    if len(single) > 1:
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=specials)
    # end-of-generation: EOS plus llama.cpp's end-of-turn / end-of-message ids when the file has them
    eos_ids = [i for i in (eos, tid("eot_token_id"), tid("eom_token_id")) if i is not None]
    names = {"bos_token": bos, "eos_token": eos, "unk_token": tid("unknown_token_id"),
             "pad_token": tid("padding_token_id")}
    return HFTokenizer(tok, eos_token_ids=eos_ids, bos_token_id=bos,
                       chat_template=meta.get("tokenizer.chat_template"),
                       special_tokens={k: tokens[i] for k, i in names.items() if i is not None}, name=name)
