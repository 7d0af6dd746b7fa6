"""Prometheus ``/metrics`` in the text format, with vLLM's metric names under ``ryzlab:``.

Dashboards and alerts written for vLLM read these after replacing ``vllm:`` by ``ryzlab:``:

* gauges ``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage_perc`` (a fraction,
  1.0 = full, as vLLM's) and the counter ``num_preemptions_total``, read from the backend's
  ``metrics()`` at scrape time (one engine, or summed / averaged over a router's workers);
* counters ``prompt_tokens_total``, ``generation_tokens_total``,
  ``request_success_total{finished_reason}`` and histograms ``time_to_first_token_seconds``,
  ``time_per_output_token_seconds`` (per request: (e2e - ttft) / (tokens - 1)),
  ``e2e_request_latency_seconds``, observed by the API per engine sequence (one per choice);
* ``http_requests_total{code}`` (every answer, errors included, also those refused before
  routing) and ``http_errors_total{code}`` (4xx/5xx, and ``stream`` for a stream that ended with
  an error after its 200).

Each app has its own :class:`~prometheus_client.CollectorRegistry` (several apps can live in
one process: tests, notebooks).
"""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServeMetrics", "CONTENT_TYPE", "engine_numbers"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def engine_numbers(m: dict[str, Any]) -> dict[str, float]:
    """running / waiting / kv usage / preemptions from a backend's ``metrics()`` dict: an engine's
    own keys, or a router's per-worker figures (summed; cache usage averaged)."""
    per = [w for w in m.get("per_worker") or [] if isinstance(w, dict)]

    def total(key: str) -> float:
        if key in m and m[key] is not None:
            return float(m[key])
        return float(sum(w.get(key) or 0 for w in per))

    return {"num_requests_running": total("num_running"), "num_requests_waiting": total("num_waiting"),
            "kv_cache_usage_perc": float(m.get("kv_cache_usage_perc") or 0.0),
            "num_preemptions": float(m.get("preemptions") or 0)}


class _EngineCollector:
    """Scrape-time gauges from ``backend.metrics()`` (no copy to keep in sync)."""

    def __init__(self, backend: Any, model_name: str):
        self.backend, self.model = backend, model_name

    def collect(self) -> Any:
        try:
            nums = engine_numbers(self.backend.metrics())
        except Exception:  # noqa: BLE001 - a scrape must not fail because a worker is restarting
            log.warning("backend metrics unavailable for this scrape", exc_info=True)
            return
        for name, doc in (("num_requests_running", "Sequences in the engines' running batches."),
                          ("num_requests_waiting", "Sequences waiting in the engines' queues."),
                          ("kv_cache_usage_perc", "KV-cache usage as a fraction (1 = full).")):
            g = GaugeMetricFamily(f"ryzlab:{name}", doc, labels=["model_name"])
            g.add_metric([self.model], nums[name])
            yield g
        c = CounterMetricFamily("ryzlab:num_preemptions", "Sequences preempted (cache full).", labels=["model_name"])
        c.add_metric([self.model], nums["num_preemptions"])
        yield c


class ServeMetrics:
    """The registry of one app and the instruments the API records into."""

    def __init__(self, backend: Any, model_name: str):
        self.registry = CollectorRegistry()
        self.model = model_name
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter("ryzlab:prompt_tokens", "Prompt tokens of admitted sequences.", lab, registry=r)
        self.generation_tokens = Counter("ryzlab:generation_tokens", "Tokens generated.", lab, registry=r)
        self.request_success = Counter("ryzlab:request_success", "Sequences that finished.",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("ryzlab:time_to_first_token_seconds", "Time to first token (from admission).", lab,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("ryzlab:time_per_output_token_seconds", "Mean time per output token of a sequence.",
                              lab, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("ryzlab:e2e_request_latency_seconds", "Admission to last token.", lab,
                             buckets=E2E_BUCKETS, registry=r)
        self.http_requests = Counter("ryzlab:http_requests", "HTTP answers by status code.", ["code"], registry=r)
        self.http_errors = Counter("ryzlab:http_errors", "HTTP errors by status code ('stream': failed mid-stream).",
                                   ["code"], registry=r)
        r.register(_EngineCollector(backend, model_name))
        self.counts = {"http_requests": 0, "http_errors_4xx": 0, "http_errors_5xx": 0}
        """The same answers as plain numbers, for the JSON ``/stats``."""

    def answered(self, status: int) -> None:
        """Count one HTTP answer (every path, every status)."""
        self.http_requests.labels(str(status)).inc()
        self.counts["http_requests"] += 1
        if status >= 400:
            self.http_errors.labels(str(status)).inc()
            self.counts["http_errors_4xx" if status < 500 else "http_errors_5xx"] += 1

    def stream_failed(self) -> None:
        self.http_errors.labels("stream").inc()
        self.counts["http_errors_5xx"] += 1

    def sequence_done(self, *, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float,
                      finished_reason: str | None) -> None:
        """Record one sequence (a choice); ``finished_reason`` None: it failed or was aborted
        (its tokens count, its latency does not)."""
        m = self.model
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(output_tokens)
        if finished_reason is None:
            return
        self.request_success.labels(m, finished_reason).inc()
        self.e2e.labels(m).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
            if output_tokens > 1:
                self.tpot.labels(m).observe((e2e_s - ttft_s) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
