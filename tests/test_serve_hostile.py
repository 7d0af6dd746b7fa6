"""Hostile requests against a real ``ryzlab serve`` app: each gets its 4xx with OpenAI's error
body (never a 500), is counted in the error counters, and leaves the server healthy."""
import json
import logging
import socket

import httpx
import pytest

from serving import serve_app

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def served():
    with serve_app(max_body_bytes=64 * 1024, body_timeout_s=1.0, max_pending=64) as s:
        yield s


def _post(url, raw: bytes, headers=JSON, path="/v1/completions"):
    return httpx.post(f"{url}{path}", content=raw, headers=headers, timeout=60)


def _check_error(r, status, needle):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err["message"]
    return err


DEEP = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"


@pytest.mark.parametrize("raw,status,needle", [
    (DEEP, 400, "nested too deeply"),
    (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),      # > 4300 digits
    (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 200 + b"}", 400, "max_tokens"),          # huge but parseable
    (b'{"prompt": "hi", "seed": 18446744073709551616}', 400, "seed"),                       # 2**64
    (b'{"prompt": "hi", "seed": -9223372036854775809}', 400, "seed"),                       # -2**63 - 1
    (b'{"prompt": "hi", "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": "hi", "temperature": Infinity}', 400, "Infinity"),
    (b'{"prompt": "hi", "temperature": 1e999}', 400, "temperature"),                         # parses to inf
    (b'{"prompt": "hi", "top_p": 1' + b"0" * 400 + b"}", 400, "top_p"),                    # int past float range
    (b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "hi", "top_k": -2}', 400, "top_k"),
    (b'{"prompt": "hi", "logprobs": 21}', 400, "logprobs"),
    (b'{"prompt": "hi", "n": 100}', 400, "'n'"),
    (b'{"prompt": "hi", "n": 8, "logprobs": 20, "max_tokens": 400}', 400, "logprob entries"),  # 67,200: ~3 MB
    (b'{"prompt": "hi", "stream_options": {"include_usage": true}}', 400, "stream: true"),
    (b'{"prompt": "hi", "presence_penalty": 0.5}', 400, "not supported"),
    (b'{"prompt": "hi", "echo": true}', 400, "not supported"),
    (b'{"prompt": "hi", "stop": [""]}', 400, "stop"),
    (b'{"prompt": "hi", "model": "gpt-9"}', 404, "does not exist"),
    (b'{"prompt": [1, 999]}', 400, "[0, 256)"),
    (b'{"prompt": [' + b"1," * 600 + b'1]}', 400, "601 tokens"),                                 # length before ids
    (b'{"prompt": "' + b"x" * 600 + b'"}', 400, "characters"),                             # before tokenizing
    (b'{"prompt": "x", "max_tokens": 500}', 400, "maximum length 500"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": 12}', 400, "'prompt' must be"),
    (b'{"max_tokens": 3}', 400, "missing field 'prompt'"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{not json', 400, "not valid JSON"),
    (b'\xff\xfe{}', 400, "not valid JSON"),
])
def test_hostile_completion_bodies_get_4xx(served, raw, status, needle):
    url, _, app = served
    before = app.state.metrics.counts["http_errors_4xx"]
    _check_error(_post(url, raw), status, needle)
    assert app.state.metrics.counts["http_errors_4xx"] == before + 1
    assert app.state.metrics.counts["http_errors_5xx"] == 0
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "text only"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "logprobs: true"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "max_tokens"),
])
def test_hostile_chat_bodies_get_4xx(served, body, status, needle):
    url, _, _ = served
    _check_error(_post(url, json.dumps(body).encode(), path="/v1/chat/completions"), status, needle)


@pytest.mark.parametrize("raw,path,param", [
    (rb'{"prompt": "\ud800"}', "/v1/completions", "prompt"),
    (rb'{"prompt": ["ok", "a\udfffb"]}', "/v1/completions", "prompt"),
    (rb'{"prompt": "hi", "stop": ["\ud83d"]}', "/v1/completions", "stop"),
    (rb'{"messages": [{"role": "user", "content": "\ud800"}]}', "/v1/chat/completions", "messages"),
    (rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]}',
     "/v1/chat/completions", "messages"),
])
def test_lone_surrogates_get_400_naming_the_field(served, raw, path, param):
    url, _, app = served
    err = _check_error(_post(url, raw, path=path), 400, "surrogate")
    assert err["param"] == param and param in err["message"]
    assert app.state.metrics.counts["http_errors_5xx"] == 0


def test_unknown_fields_are_ignored_with_a_warning(served, caplog):
    url, _, _ = served
    with caplog.at_level(logging.WARNING, logger="ryzlab.serve.protocol"):
        r = _post(url, json.dumps({"prompt": "hi", "max_tokens": 2, "frobnicate": 1}).encode())
    assert r.status_code == 200
    assert any("frobnicate" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("headers,status,code", [
    ({"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({}, 415, "unsupported_media_type"),
    ({**JSON, "host": "evil.example:8000"}, 400, "invalid_host"),
    ({**JSON, "host": "127.0.0.1.evil.example"}, 400, "invalid_host"),
])
def test_wrong_content_type_and_foreign_host_are_refused(served, headers, status, code):
    url, _, _ = served
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}', headers=headers, timeout=60)
    assert r.status_code == status and r.json()["error"]["code"] == code
    ok = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                    headers={**JSON, "host": "localhost:1"}, timeout=60)
    assert ok.status_code == 200  # loopback names are fine whatever the port


def test_404_405_and_422_use_openai_error_bodies(served):
    url, _, _ = served
    _check_error(httpx.get(f"{url}/v1/nope"), 404, "Not Found")
    _check_error(httpx.delete(f"{url}/v1/models"), 405, "Method Not Allowed")
    _check_error(httpx.get(f"{url}/v1/completions"), 405, "Method Not Allowed")


def _raw(url, data: bytes, read_timeout=60.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):  # the server answers and closes
            out += chunk
        return out


def _head(url, extra: bytes) -> bytes:
    host = url.removeprefix("http://").encode()
    return b"POST /v1/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n" + extra


def test_huge_content_length_is_refused_before_reading(served):
    url, _, _ = served
    out = _raw(url, _head(url, b"Content-Length: 100000000\r\n\r\n"))  # announces 100 MB, sends none
    assert out.startswith(b"HTTP/1.1 413") and b"body_too_large" in out


def test_chunked_body_is_cut_at_the_limit(served):
    url, _, _ = served
    piece = b"x" * 8192
    # 72 KiB of an unending chunked body (no terminator): cut at the 64 KiB limit, not read to the end
    chunks = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(9))
    out = _raw(url, _head(url, b"Transfer-Encoding: chunked\r\n\r\n") + chunks)
    assert out.startswith(b"HTTP/1.1 413")


def test_body_that_never_arrives_gets_408_and_the_connection_closes(served):
    url, _, _ = served
    out = _raw(url, _head(url, b"Content-Length: 100\r\n\r\n") + b'{"prompt"')  # 9 of 100 bytes, then nothing
    assert out.startswith(b"HTTP/1.1 408") and b"body_timeout" in out
    assert httpx.get(f"{url}/health").status_code == 200


def test_hostile_inputs_are_counted_in_prometheus(served):
    from prometheus_client.parser import text_string_to_metric_families

    url, _, app = served
    before = app.state.metrics.counts["http_errors_4xx"]
    _post(url, DEEP)
    _post(url, b"{}", headers={"content-type": "text/plain"})
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    errors = {s.labels["code"]: s.value for s in fams["ryzlab:http_errors"].samples if s.name.endswith("_total")}
    assert sum(errors.values()) == before + 2 and errors["415"] >= 1 and errors["400"] >= 1


def test_api_key_is_required_when_set():
    with serve_app(api_key="s3cret") as (url, _, _):
        body = {"prompt": "hi", "max_tokens": 1}
        for h in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer s3cret"}, timeout=60)
        assert r.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key (as vLLM)


@pytest.mark.parametrize("metrics_auth", [False, True])
def test_metrics_auth_puts_metrics_and_stats_behind_the_key(metrics_auth):
    with serve_app(api_key="s3cret", metrics_auth=metrics_auth) as (url, _, _):
        key = {"authorization": "Bearer s3cret"}
        for path in ("/metrics", "/stats"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == (401 if metrics_auth else 200), path  # default: open for scrapers
            assert httpx.get(f"{url}{path}", headers=key).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # probes never need the key


def test_metrics_auth_needs_an_api_key():
    import argparse

    from ryzlab.serve.cli import check_exposure

    with pytest.raises(ValueError, match="--metrics-auth needs --api-key"):
        check_exposure(argparse.Namespace(host="127.0.0.1", api_key=None, no_auth=False, metrics_auth=True))


@pytest.mark.parametrize("host,key,no_auth,ok", [
    ("127.0.0.1", None, False, True), ("::1", None, False, True), ("localhost", None, False, True),
    ("0.0.0.0", None, False, False), ("192.168.1.5", None, False, False),
    ("0.0.0.0", "k", False, True), ("0.0.0.0", None, True, True), ("0.0.0.0", " ", False, False),
])
def test_binding_beyond_loopback_needs_a_key_or_no_auth(host, key, no_auth, ok):
    import argparse

    from ryzlab.serve.cli import check_exposure

    args = argparse.Namespace(host=host, api_key=key, no_auth=no_auth)
    if ok:
        check_exposure(args)
    else:
        with pytest.raises(ValueError, match="--api-key|empty"):
            check_exposure(args)


def test_serve_cli_refuses_an_open_bind_before_loading_anything(capsys, monkeypatch):
    from ryzlab.cli import main
    from ryzlab.serve import replica

    monkeypatch.delenv("RYZLAB_API_KEY", raising=False)
    monkeypatch.setattr(replica, "build_engine", lambda **k: pytest.fail("the model was loaded"))
    assert main(["serve", "--host", "0.0.0.0", "--model", "random"]) == 2
    assert "--api-key" in capsys.readouterr().err


def _connect(url: str, timeout: float = 60.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def _read_to_close(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):  # returns b"" once the server closes (the socket timeout only bounds a failure)
        out += chunk
    return out


def test_an_unfinished_request_head_is_answered_408_and_closed():
    with serve_app(header_timeout_s=0.3) as (url, _, _):
        with _connect(url) as s:
            s.sendall(b"GET /health HTTP/1.1\r\n")  # the request line, and never the blank line
            out = _read_to_close(s)
        assert out.startswith(b"HTTP/1.1 408") and b"header_timeout" in out
        with _connect(url) as s:  # a kept-alive connection: the next head is bounded too
            host = url.removeprefix("http://").encode()
            s.sendall(b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\n\r\nGET /health HTT")
            out = _read_to_close(s)
        assert out.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in out
        assert httpx.get(f"{url}/health").status_code == 200


def test_connections_per_client_are_bounded():
    from serving import wait_for

    def admitted() -> bool:
        try:
            with _connect(url) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: " + url.removeprefix("http://").encode()
                          + b"\r\nConnection: close\r\n\r\n")
                return _read_to_close(s).startswith(b"HTTP/1.1 200")
        except ConnectionError:  # refused: the server closed before reading the request
            return False

    with serve_app(header_timeout_s=600, max_connections_per_client=3) as (url, _, _):
        held = [_connect(url) for _ in range(3)]
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\n")  # unfinished heads: each holds its connection
        try:
            with _connect(url) as extra:  # the fourth is refused at once, before it sends anything
                out = _read_to_close(extra)
            assert out.startswith(b"HTTP/1.1 429") and b"too_many_connections" in out and b"retry-after" in out
        finally:
            held.pop().close()
        assert wait_for(admitted), "a closed connection frees its place"
        for s in held:
            s.close()


def test_one_request_or_one_client_cannot_take_the_whole_queue():
    """max_pending 8: one client address holds at most 6 sequences; a request of 8 can never be
    admitted (400), and a client at its share gets 429 while another address still gets in."""
    from serving import PausedForward, wait_for

    other = httpx.HTTPTransport(local_address="127.0.0.2")  # all of 127/8 is this machine: a second client
    with serve_app(max_pending=8) as (url, backend, app), PausedForward(backend.engine), \
            httpx.Client(timeout=60) as a, httpx.Client(timeout=60, transport=other) as b:
        body = {"prompt": "hi", "max_tokens": 2, "stream": True}
        r = a.post(f"{url}/v1/completions", json={**body, "n": 8})
        _check_error(r, 400, "at most 6")
        assert r.json()["error"]["param"] == "n"
        with a.stream("POST", f"{url}/v1/completions", json={**body, "n": 6}) as held:
            assert held.status_code == 200 and app.state.pending == 6
            r = a.post(f"{url}/v1/completions", json={**body, "n": 1})
            assert r.status_code == 429 and r.json()["error"]["code"] == "client_queue_full"
            with b.stream("POST", f"{url}/v1/completions", json={**body, "n": 2}) as theirs:
                assert theirs.status_code == 200 and app.state.pending == 8
                assert app.state.pending_by_client == {"127.0.0.1": 6, "127.0.0.2": 2}
        assert wait_for(lambda: app.state.pending == 0 and not app.state.pending_by_client)
