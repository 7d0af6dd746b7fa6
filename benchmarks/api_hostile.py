"""``ryzlab serve`` under a burst and under abuse: every request answered, memory flat.

Starts a real ``ryzlab serve`` (a subprocess on 127.0.0.1, the reference model, one worker) and:

1. **Burst** (repeated ``--repeats`` times): ``--burst`` concurrent requests at once (half
   streamed). Each must end completed (200 with every token) or refused with 429/503 and a
   ``Retry-After``; a request with no answer within ``--hang-s`` counts as hung. Prints the counts
   and the time until the last answer, per repeat and their spread.
2. **Disconnected streams**: ``--rounds`` rounds of ``--streams`` streams that the client drops
   after the first token. After each round the server must have aborted all of them (0 in flight,
   KV cache empty); the server's RSS is read after every round: it must stay flat.
3. **Hostile bodies**: deep nesting, a 5000-digit integer, seed 2**64, NaN, text/plain, an
   announced 100 MB body: each a 4xx, no 5xx, RSS before/after.

    python benchmarks/api_hostile.py [--burst 200] [--rounds 5] [--streams 40]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter

import httpx
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "ryzlab", "serve", "--model", "reference", "--port", str(port), "--threads", "1",
           "--max-num-seqs", "16", "--max-pending", str(args.max_pending)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ryzlab serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ryzlab serve did not become healthy within 120 s")


async def one(client: httpx.AsyncClient, i: int, max_tokens: int, hang_s: float) -> str:
    body = {"prompt": f"def f{i}(x):", "max_tokens": max_tokens, "stream": i % 2 == 1}
    try:
        async with asyncio.timeout(hang_s):
            if not body["stream"]:
                r = await client.post("/v1/completions", json=body)
                if r.status_code == 200:
                    return "completed" if r.json()["usage"]["completion_tokens"] == max_tokens else "short"
                return _refusal(r)
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _refusal(r)
                n, done = 0, False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        n += sum(len(c.get("token_ids", [])) for c in json.loads(line[6:]).get("choices", []))
                return "completed" if done and n == max_tokens else "short"
    except TimeoutError:
        return "hung"
    except httpx.HTTPError as e:
        return f"transport error {type(e).__name__}"


def _refusal(r: httpx.Response) -> str:
    if r.status_code in (429, 503):
        return f"refused {r.status_code}" + ("" if r.headers.get("retry-after") else " (no Retry-After)")
    return f"HTTP {r.status_code}"


async def burst(base: str, n: int, max_tokens: int, hang_s: float) -> tuple[Counter, float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(one(client, i, max_tokens, hang_s) for i in range(n)))
        return Counter(outcomes), time.monotonic() - t0


async def dropped_streams(base: str, n: int) -> int:
    """Open n streams, read until the first token, drop them; returns how many saw a token."""
    async def drop(client: httpx.AsyncClient, i: int) -> bool:
        async with client.stream("POST", "/v1/completions",
                                 json={"prompt": f"class C{i}:", "max_tokens": 400, "stream": True}) as r:
            if r.status_code != 200:
                return False
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # leaving the block closes the connection mid-stream
        return False

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        return sum(await asyncio.gather(*(drop(client, i) for i in range(n))))


def settle(base: str, timeout_s: float = 120) -> dict:
    """Wait until nothing is in flight and the KV cache is empty (abort is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = httpx.get(f"{base}/stats", timeout=10).json()
        if s["pending"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_cache_usage_perc"] == 0:
            return s
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not settle: {s}")
        time.sleep(0.1)


def hostile(base: str) -> Counter:
    host, port = base.removeprefix("http://").split(":")
    cases = {
        "deep nesting": b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "5000-digit int": b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
        "seed 2**64": b'{"prompt": "x", "seed": 18446744073709551616}',
        "NaN": b'{"prompt": "x", "temperature": NaN}',
    }
    out = Counter()
    for name, raw in cases.items():
        r = httpx.post(f"{base}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
        out[f"{name}: {r.status_code}"] += 1
    r = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    out[f"text/plain: {r.status_code}"] += 1
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        out[f"100 MB announced: {s.recv(100).split(b' ')[1].decode()}"] += 1
    with socket.create_connection((host, int(port)), timeout=60) as s:  # 100 MB really sent, chunked
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
                  b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 2**20
        sent = 0
        try:
            for _ in range(100):
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += 1
        except OSError:
            pass  # the server answered and closed: the rest is not read
        try:
            status = s.recv(100).split(b" ")[1].decode()
        except (OSError, IndexError):
            status = "connection closed"
        out[f"100 MB chunked (client got {sent} MiB out before the close): {status}"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-pending", type=int, default=64)
    ap.add_argument("--hang-s", type=float, default=300.0, help="no answer within this = hung")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=40)
    args = ap.parse_args()
    port = free_port()
    proc = start_server(port, args)
    base = f"http://127.0.0.1:{port}"
    server = psutil.Process(proc.pid)
    try:
        print(f"ryzlab serve --model reference (pid {proc.pid}), device=cpu, max-pending {args.max_pending}, "
              f"{os.cpu_count()} cores shared with other work")
        print(f"\n1. burst: {args.burst} concurrent requests (half streamed), max_tokens {args.max_tokens}")
        walls, bad = [], 0
        for rep in range(args.repeats):
            counts, wall = asyncio.run(burst(base, args.burst, args.max_tokens, args.hang_s))
            settle(base)
            walls.append(wall)
            bad += sum(v for k, v in counts.items() if k not in ("completed", "refused 429", "refused 503"))
            print(f"   repeat {rep + 1}: {dict(sorted(counts.items()))}; all answered in {wall:.2f} s")
        print(f"   time to answer all: median {statistics.median(walls):.2f} s, min {min(walls):.2f}, "
              f"max {max(walls):.2f}; neither completed nor refused 429/503: {bad}")

        print(f"\n2. disconnected streams: {args.rounds} rounds x {args.streams} streams dropped after the first token")
        rss = [server.memory_info().rss]
        for rnd in range(args.rounds):
            seen = asyncio.run(dropped_streams(base, args.streams))
            s = settle(base)
            rss.append(server.memory_info().rss)
            print(f"   round {rnd + 1}: {seen}/{args.streams} streamed a token then dropped; aborted so far "
                  f"{s.get('aborted', 0)}; in flight 0, KV usage {s['kv_cache_usage_perc']:.0%}; "
                  f"server RSS {rss[-1] / 2**20:.1f} MiB")
        if args.rounds:
            growth = (rss[-1] - rss[1]) / 2**20
            print(f"   RSS after round 1 -> after round {args.rounds}: {rss[1] / 2**20:.1f} -> "
                  f"{rss[-1] / 2**20:.1f} MiB ({growth:+.1f} MiB; before any round {rss[0] / 2**20:.1f} MiB)")

        print("\n3. hostile bodies")
        before = server.memory_info().rss
        counts = hostile(base)
        stats = httpx.get(f"{base}/stats", timeout=10).json()
        print(f"   {dict(counts)}; 5xx so far: {stats['http_errors_5xx']}; RSS {before / 2**20:.1f} -> "
              f"{server.memory_info().rss / 2**20:.1f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
