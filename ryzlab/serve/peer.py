"""The peer engine: transformers' own continuous batching behind the same OpenAI HTTP surface.

ryzlab's engine is compared with ``transformers``' ``ContinuousBatchingManager`` (paged
attention, its own scheduler; what ``generate_batch`` and ``transformers serve
--continuous-batching`` run) on the *same weights* and the *same workload*, both measured by
the load generator over HTTP, so neither side gets an in-process shortcut.

Why not ``transformers serve`` itself: it loads a model id or folder with a transformers
tokenizer. The reference checkpoint is a byte-level ryzlab checkpoint with no transformers
tokenizer, so the peer here is the same manager behind a small FastAPI app that tokenizes with
the model's own ryzlab tokenizer (the same ids ryzlab's server sees). The manager does every
step of generation; this module only moves requests in and tokens out.

    python -m ryzlab.serve.peer --model reference --port 8001

* :func:`hf_model` — the Hugging Face ``LlamaForCausalLM`` of a ryzlab model spec (the
  reference checkpoint converted in memory; an HF folder or ``.gguf`` loaded by transformers);
* :func:`create_peer_app` — ``/v1/completions`` (streaming with ``stream_options.include_usage``,
  ``usage`` on every answer, ``ignore_eos``), ``/v1/models``, ``/health``.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

__all__ = ["hf_model", "create_peer_app", "PeerEngine", "main"]

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20
"""A benchmark server's requests are small; anything larger is refused before parsing."""


def hf_model(spec: str, *, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers ``LlamaForCausalLM`` for ryzlab model ``spec`` (same weights as ryzlab's).

    ``reference`` / ``random`` / a ryzlab checkpoint: built from the ryzlab model's config and
    weights (parameter names mapped by :func:`ryzlab.models.hf.hf_name`). A Hugging Face folder:
    ``from_pretrained``; a ``.gguf`` file: ``from_pretrained(folder, gguf_file=name)``.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ryzlab.models import check_model, load_model
    from ryzlab.models.hf import hf_name

    src = check_model(spec)
    if src.kind in ("reference", "random", "checkpoint"):
        model, _ = load_model(spec, dtype=dtype)
        c = model.config
        if c.qkv_bias or c.o_bias or c.mlp_bias or c.rope_scaling != "none":
            raise ValueError(f"model {spec!r}: the peer conversion covers plain Llama blocks only "
                             f"(no biases, rope_scaling none)")
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None))
        state = {hf_name(k): v for k, v in model.state_dict().items() if k != "inv_freq"}
        missing, unexpected = hf.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (c.tie_embeddings and m == "lm_head.weight")]
        assert not missing and not unexpected, f"weight mapping broken: missing {missing}, unexpected {unexpected}"
        return hf.to(dtype).eval()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


class PeerEngine:
    """transformers' ``ContinuousBatchingManager`` with an asyncio face: ``generate`` yields token-id lists."""

    def __init__(self, model: Any, *, block_size: int = 16, num_blocks: int = 1024, max_batch_tokens: int = 256,
                 max_num_seqs: int | None = None, eos_token_ids: tuple[int, ...] = ()):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.eos_token_ids = tuple(eos_token_ids)
        gen = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=-1, pad_token_id=0)
        # max_num_seqs -> max_requests_per_batch: the same cap on the batch as ryzlab's scheduler
        cb = ContinuousBatchingConfig(page_size=block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                      max_requests_per_batch=max_num_seqs)
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self.manager.start()
        self._ids = itertools.count()

    async def generate(self, prompt: list[int], max_tokens: int, *, ignore_eos: bool = True):
        """Yield the new token ids of each step as transformers produces them."""
        rid = f"peer-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(rid, q.put_nowait)
        eos = -1 if ignore_eos or not self.eos_token_ids else list(self.eos_token_ids)
        if self.manager.add_request(prompt, request_id=rid, max_new_tokens=max_tokens, streaming=True,
                                    eos_token_id=eos) is None:
            raise RuntimeError("transformers continuous batching refused the request (manager stopping)")
        seen, finished = 0, False
        try:
            while not finished:
                try:
                    out = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:  # a dead generation thread delivers nothing: say so
                    fatal = self.manager.background_thread_status.fatal_error
                    if fatal is not None or not self.manager.is_running():
                        raise RuntimeError(f"transformers generation thread stopped: {fatal!r}") from None
                    continue
                if out.error:
                    raise RuntimeError(f"transformers continuous batching: {out.error}")
                toks = list(out.generated_tokens)
                if len(toks) > seen:
                    yield toks[seen:]
                    seen = len(toks)
                finished = out.is_finished()
        finally:
            if not finished:  # client gone or error: free its blocks
                self.manager.cancel_request(rid)

    def shutdown(self) -> None:
        self.manager.stop(block=True, timeout=30)


def create_peer_app(engine: PeerEngine, tokenizer: Any, *, model_name: str, max_model_len: int) -> Any:
    """A minimal OpenAI ``/v1/completions`` (text or token-id prompts) over :class:`PeerEngine`."""
    app = FastAPI(title="transformers continuous batching (ryzlab peer)")
    created = int(time.time())

    def error(msg: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=status)

    @app.get("/health")
    async def health() -> dict:
        alive = engine.manager.is_running()
        return {"healthy": alive, "reason": "ok" if alive else "generation thread stopped"}

    @app.get("/v1/models")
    async def models() -> dict:
        # max_num_seqs: transformers' batch cap after its own resolution (it may lower the one asked for)
        cap = engine.manager.continuous_batching_config.max_requests_per_batch
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "transformers", "max_num_seqs": cap}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error(f"body over {MAX_BODY_BYTES} bytes", 413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return error("body is not JSON")
        if not isinstance(body, dict):
            return error("body must be a JSON object")
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens", 16)
        if isinstance(prompt, str):
            ids = list(tokenizer.encode(prompt))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt):
            ids = prompt
        else:
            return error("'prompt' must be a string or a list of token ids")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return error(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}")
        if not ids or len(ids) + max_tokens > max_model_len:
            return error(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) must be in 1..{max_model_len}")
        if body.get("temperature", 0) not in (0, 0.0, None):
            return error("this peer samples greedily only: 'temperature' must be 0")
        ignore_eos = bool(body.get("ignore_eos", False))
        cid = f"cmpl-peer-{time.monotonic_ns()}"
        usage_opt = bool((body.get("stream_options") or {}).get("include_usage"))

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not body.get("stream"):
            out: list[int] = []
            async for toks in engine.generate(ids, max_tokens, ignore_eos=ignore_eos):
                out.extend(toks)
            return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": tokenizer.decode(out), "token_ids": out, "logprobs": None,
                                 "finish_reason": "length" if len(out) >= max_tokens else "stop"}],
                    "usage": usage(len(out))}

        async def sse():
            n = 0
            async for toks in engine.generate(ids, max_tokens, ignore_eos=ignore_eos):
                n += len(toks)
                chunk = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                         "choices": [{"index": 0, "text": tokenizer.decode(toks), "token_ids": toks,
                                      "logprobs": None, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            final = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                     "choices": [{"index": 0, "text": "", "logprobs": None,
                                  "finish_reason": "length" if n >= max_tokens else "stop"}]}
            yield f"data: {json.dumps(final)}\n\n"
            if usage_opt:
                last = {"id": cid, "object": "text_completion", "choices": [], "usage": usage(n)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ryzlab.serve.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="ryzlab model spec (reference, an HF folder, a .gguf file)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). Above 1 the peer is handicapped: transformers steps "
                        "in its own thread after the model was loaded in this one, two OpenMP pools "
                        "(ryzlab.serve.async_engine.AsyncEngine.build says why that is slow); compare at 1")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--max-batch-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests batched together (transformers' max_requests_per_batch; default: its own)")
    a = p.parse_args(argv)
    if a.max_num_seqs is not None and a.max_num_seqs < 1:
        p.error(f"--max-num-seqs must be >= 1, got {a.max_num_seqs}")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        p.error(f"--host {a.host!r}: the peer has no authentication; it binds loopback only (127.0.0.1, ::1)")
    import uvicorn

    from ryzlab.models import load_tokenizer
    from ryzlab.serve.cli import model_name

    if a.threads:
        torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.model)
    engine = PeerEngine(hf_model(a.model), block_size=a.block_size, num_blocks=a.num_blocks,
                        max_batch_tokens=a.max_batch_tokens, max_num_seqs=a.max_num_seqs, eos_token_ids=tuple(getattr(tok, "eos_token_ids", ())))
    name = model_name(a.model)
    print(f"transformers peer: http://{a.host}:{a.port}  model={name}", flush=True)
    try:
        uvicorn.run(create_peer_app(engine, tok, model_name=name, max_model_len=a.max_model_len),
                    host=a.host, port=a.port, log_level="warning")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
