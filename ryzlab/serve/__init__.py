"""Serving: continuous-batching engine, workers + router, load generator, metrics, HTTP API.

Modules (import what you need; nothing heavy is imported here):

* :mod:`.engine`   ``Engine`` (scheduler: admission while blocks are free, chunked prefill,
  batched decode, recompute/swap preemption, prefix reuse), ``AsyncEngine`` (background
  thread, async token streams, progress-based health), ``build_engine``, ``EngineConfig``.
* :mod:`.sampling` ``SamplingParams`` (temperature, top-k, top-p, seed, logprobs), ``sample``,
  ``TokenChunk`` (token ids + their logprobs).
* :mod:`.runner`   ``ModelRunner``: one ragged forward of the reference model over a paged step.
* :mod:`.worker` / :mod:`.router`  one engine per process (per GPU where present) behind the
  orchestrator's load-balancing policies; heartbeats, re-routing of a dead worker's requests,
  restart. ``Router`` has the same ``generate/abort/health/metrics`` interface as ``AsyncEngine``.
* :mod:`.loadgen`  ``LoadSpec`` (Poisson / gamma / closed loop / JSONL trace, length
  distributions), ``run_load`` (latency from each request's scheduled time), ``run_sync``.
* :mod:`.metrics`  ``summarize`` -> TTFT/TPOT/ITL/E2EL mean/p50/p90/p99, throughput, goodput
  under ``parse_slo("ttft:200,tpot:50")``.
* :mod:`.api`      ``create_app(backend)``: OpenAI-compatible ``/v1/completions``,
  ``/v1/chat/completions``, ``/v1/models`` (SSE streaming), bounded admission, ``/health``,
  ``/metrics`` (Prometheus), ``/stats`` (JSON).
* :mod:`.protocol` OpenAI request bodies checked -> ``GenerationRequest``; :mod:`.output` text,
  stop strings, logprobs and OpenAI's response shapes; :mod:`.guard` Host / API key / content
  type / body size and time; :mod:`.prom` the Prometheus registry (vLLM's names, ``ryzlab:``).
* :mod:`.client`   ``backend_client``, ``openai_client`` + ``probe_endpoint`` (any OpenAI-compatible
  endpoint, text prompts, server-counted tokens), ``serve_in_thread``.
* :mod:`.peer`     transformers' continuous batching behind the same OpenAI surface (the peer engine).
* :mod:`.cli`      ``ryzlab serve``.
"""
