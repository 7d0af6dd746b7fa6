"""Serving: continuous-batching engine, workers + router, load generator, metrics, HTTP API.

Modules (import what you need; nothing heavy is imported here):

* :mod:`.engine`   ``Engine`` (one ragged forward of the model per step over the paged cache,
  sampling, tp x cp plans for the other ranks), ``ragged_forward``, ``StepOutput`` (with its
  ``finish_reason``).
* :mod:`.scheduler` ``Scheduler`` (admission while blocks are free, chunked prefill, recompute/swap
  preemption, prefix reuse), ``EngineConfig``, ``EngineSequence``.
* :mod:`.async_engine` ``AsyncEngine`` (background thread, async token streams, progress-based
  health); :mod:`.stream` ``TokenStream``, the one token-stream queue of the engine and the router.
* :mod:`.spec`     ``ReplicaSpec``: model, dtype, device, cache, tp x cp, engine config of one replica,
  validated once; :mod:`.replica` ``build_engine(spec)``, ``start_replica``.
* :mod:`.sampling` ``SamplingParams`` (temperature, top-k, top-p, seed, logprobs), ``sample``,
  ``TokenChunk`` (token ids + their logprobs, and the ``finish_reason`` on the last chunk).
* :mod:`.worker` / :mod:`.router`  one engine per process (per GPU where present) behind the
  orchestrator's load-balancing policies; heartbeats, re-routing of a dead worker's requests,
  restart. ``Router`` has the same ``generate/abort/health/metrics`` interface as ``AsyncEngine``.
* :mod:`.api`      ``create_app(backend)``: OpenAI-compatible ``/v1/completions``,
  ``/v1/chat/completions``, ``/v1/models`` (SSE streaming), bounded admission, ``/health``,
  ``/metrics`` (Prometheus), ``/stats`` (JSON).
* :mod:`.protocol` OpenAI request bodies checked -> ``GenerationRequest``; :mod:`.output` text,
  stop strings, logprobs and OpenAI's response shapes; :mod:`.guard` Host / API key / content
  type / body size and time; :mod:`.conn` request-head time and connections per client (below the
  app, in uvicorn's protocol); :mod:`.prom` the Prometheus registry (vLLM's names, ``ryzlab:``).
* :mod:`.local`    ``serve_in_thread`` (an app on a free local port), ``backend_client`` (the load
  generator's client of an in-process engine or router; the load generator is :mod:`ryzlab.loadgen`).
* :mod:`.peer`     transformers' continuous batching behind the same OpenAI surface (the peer engine).
* :mod:`.cli`      ``ryzlab serve``.
"""
