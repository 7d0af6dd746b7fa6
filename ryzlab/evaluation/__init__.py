"""Evaluation on top of the KV cache and the models (never inside them).

* :mod:`.accuracy` — perplexity and KL of a KV layout against the float model, per layer;
* :mod:`.plan` — ``plan_kv``: the smallest layout within a KL budget (``ryzlab kv-plan``);
* :mod:`.peers` — optimum-quanto's KV cache measured the same way.
"""
