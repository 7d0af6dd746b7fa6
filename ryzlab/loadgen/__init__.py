"""Load generation for any OpenAI-compatible endpoint, beside (not inside) the server.

* :mod:`.load` — ``LoadSpec`` (Poisson / gamma / closed loop / JSONL trace, length distributions),
  ``run_load`` (latency from each request's scheduled time);
* :mod:`.metrics` — ``summarize``: TTFT/TPOT/ITL/E2EL percentiles, throughput, goodput under an SLO;
* :mod:`.client` — ``openai_client`` + ``probe_endpoint`` (text prompts, server-counted tokens);
* :mod:`.cli` — ``ryzlab loadgen``.
"""
