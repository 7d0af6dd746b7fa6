"""Decode attention over paged, compressed KV on a GPU: time and achieved bandwidth per codec.

One decode step of one layer: ``batch`` sequences, one query token each, attend over ``context``
cached tokens stored in pages (block table shuffled, as a long-running pool leaves it). For each
codec the Triton kernel (:func:`ryzlab.kv.triton.decode.paged_attention`) reads the pages in
their stored format; the figure of merit is bytes read / time against the device copy bandwidth
measured in the same run, and the speed-up over bf16 pages at the same point. Peers in the same
run: the torch path (decode pages to bf16, then attention; only where its bf16 copy fits
``--torch-max-gib``) and FlashInfer's paged decode (bf16 and fp8 e4m3 pages) when ``flashinfer``
is importable. vLLM's kernels are not wired in (their Python API changes between releases).

Targets (issue 14), checked and printed when the points exist: >= 70% of copy bandwidth at 32k
context; fp8 >= 1.6x and int4 >= 2.5x faster than bf16 at 32k.

Every point is timed ``--iters`` times after ``--warmup`` (CUDA events around each call);
the median and the p10-p90 spread are reported. On a machine without a GPU it prints
"no GPU" and exits 0 (``--interpreter`` runs tiny points on the CPU in Triton's interpreter to
check the script itself: those times are not GPU figures and are labelled so).

    python benchmarks/gpu_decode.py --json gpu_decode.json
    python benchmarks/gpu_decode.py --contexts 32768 --batches 1,16 --codecs none,fp8_e4m3,int4

``--engine-step`` measures the whole engine decode step instead (issue 20): for each batch, the
serving engine (:func:`ryzlab.serve.replica.build_engine`, Triton attention) decodes with its
step eager and replayed as a CUDA graph (``EngineConfig.cuda_graphs``); printed per step: CUDA
API launches (kernel launches, graph launches, async copies, from the torch profiler), GPU
kernels executed, and milliseconds (median of ``--iters`` steps, CUDA-synchronised), with the
greedy tokens of both modes compared.

    python benchmarks/gpu_decode.py --engine-step --batches 1,16 --engine-model reference
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (codec, key granularity, value granularity, symmetric). "none" = bf16 pages.
FORMATS = {
    "none": ("none", "token_head", "token_head", True),
    "fp8_e4m3": ("fp8_e4m3", "token_head", "token_head", True),
    "fp8_e5m2": ("fp8_e5m2", "token_head", "token_head", True),
    "int8": ("int8", "token_head", "token_head", True),
    "int4": ("int4", "token_head", "token_head", True),
    "int4_kivi": ("int4", "channel", "token_head", False),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=ints, default=[4096, 8192, 32768, 131072])
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--codecs", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--heads", type=int, default=32, help="query heads (Llama-3-8B shape)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-kv-gib", type=float, default=48.0, help="skip points whose pages exceed this")
    p.add_argument("--torch-max-gib", type=float, default=4.0, help="run the torch path below this bf16 size")
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    p.add_argument("--engine-step", action="store_true",
                   help="launches and ms per engine decode step, eager vs CUDA graphs (see the module doc)")
    p.add_argument("--engine-model", default="reference", help="model of --engine-step (a ryzlab model spec)")
    p.add_argument("--engine-prompt", type=int, default=128, help="prompt tokens per sequence in --engine-step")
    p.add_argument("--interpreter", action="store_true",
                   help="no GPU: run tiny points on CPU in Triton's interpreter (checks the script, not speed)")
    a = p.parse_args(argv)
    a.codecs = [c for c in a.codecs.split(",") if c]
    bad = [c for c in a.codecs if c not in FORMATS]
    if bad:
        p.error(f"unknown codecs {bad}; choose from {', '.join(FORMATS)}")
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    return a


class Timer:
    """Per-call times in seconds: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out


def make_pages(name: str, a: argparse.Namespace, ctx: int, batch: int, device: torch.device, gen: torch.Generator):
    """K and V pages (one layer) holding ``batch`` x ``ctx`` random tokens, shuffled block table."""
    from ryzlab.kv.codecs import KVFormat
    from ryzlab.kv.pages import PagedTensor

    codec, kg, vg, sym = FORMATS[name]
    bs, h, d = a.block_size, a.kv_heads, a.head_dim
    nb = -(-ctx // bs)
    cap = batch * nb
    fk = KVFormat(codec, kg, 32, sym, torch.bfloat16)
    fv = KVFormat(codec, vg, 32, sym, torch.bfloat16)
    k, v = PagedTensor(fk, 1, cap, bs, h, d, device), PagedTensor(fv, 1, cap, bs, h, d, device)
    chunk = max(1, (256 << 20) // (bs * h * d * 4))  # encode ~256 MiB of float32 at a time
    for p in (k, v):
        for c0 in range(0, cap, chunk):
            blocks = torch.arange(c0, min(cap, c0 + chunk), device=device)
            x = torch.randn(len(blocks), bs, h, d, generator=gen, device=device)
            p.write_blocks(0, blocks, x)
    tables = torch.randperm(cap, generator=gen, device=device).view(batch, nb)
    return k, v, tables


def kv_bytes(k, v, ctx: int, batch: int) -> int:
    """Bytes a decode step must read: payload + scales (+ zero points) of the touched pages."""
    nb = -(-ctx // k.bs)
    per_page = sum(t[0, 0].numel() * t.element_size() for p in (k, v) for t in p.tensors())
    return batch * nb * per_page


def run_triton(k, v, tables, q, ctx: int):
    from ryzlab.kv.triton.decode import plan_from_gather, paged_attention

    batch, nb = tables.shape
    dev = q.device
    rows = torch.arange(batch, device=dev)
    kpos = torch.arange(nb * k.bs, device=dev).view(1, -1)
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    plan = plan_from_gather(rows, torch.full((batch,), ctx - 1, device=dev), tables, kpos, k.bs, empty, empty, empty)
    tail = torch.zeros(0, k.heads, k.head_dim, dtype=q.dtype, device=dev)
    return lambda: paged_attention(q, k, v, 0, plan, tail, tail)


def run_torch(k, v, tables, q, ctx: int):
    """The torch path the cache uses without kernels: decode pages to bf16, then SDPA."""
    import torch.nn.functional as F

    def step():
        kk = k.gather(0, tables, torch.bfloat16)[:, :, :ctx]  # [B, H, S, D]
        vv = v.gather(0, tables, torch.bfloat16)[:, :, :ctx]
        return F.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)
    return step


def run_flashinfer(name: str, k, v, tables, q, ctx: int):
    """FlashInfer's paged decode on the same pages (bf16, or fp8 e4m3 with a per-tensor scale of 1)."""
    import flashinfer

    if name not in ("none", "fp8_e4m3"):
        raise ValueError(f"FlashInfer has no {name} page format")
    batch, nb = tables.shape
    dev = q.device
    kv_dtype = torch.bfloat16 if name == "none" else torch.float8_e4m3fn
    cache = torch.stack([k.payload[0], v.payload[0]], dim=1).to(kv_dtype)  # [pages, 2, bs, H, D] (NHD)
    indptr = torch.arange(0, batch * nb + 1, nb, dtype=torch.int32, device=dev)
    indices = tables.reshape(-1).to(torch.int32)
    last = torch.full((batch,), ctx - (nb - 1) * k.bs, dtype=torch.int32, device=dev)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(indptr, indices, last, q.shape[1], k.heads, k.head_dim, k.bs, q_data_type=q.dtype, kv_data_type=kv_dtype)
    return lambda: w.run(q, cache)


_API_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
                 "cudaMemcpyAsync", "cudaMemsetAsync")


def engine_step(a: argparse.Namespace) -> list[dict]:
    """Launches and time per decode step of the engine, eager vs CUDA graphs (``--engine-step``)."""
    from torch.profiler import ProfilerActivity, profile

    from ryzlab.config import CacheConfig
    from ryzlab.serve.engine import EngineConfig, SamplingParams
    from ryzlab.serve.replica import build_engine
    from ryzlab.serve.spec import ReplicaSpec

    rows, tokens = [], {}
    steps = a.warmup + a.iters + 4
    for batch in a.batches:
        for graphs in (False, True):
            max_len = a.engine_prompt + steps + 8
            spec = ReplicaSpec(model=a.engine_model, device="cuda",
                               cache=CacheConfig(block_size=a.block_size,
                                                 num_blocks=batch * -(-max_len // a.block_size) + 8),
                               engine=EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(256, batch),
                                                   max_model_len=max_len, cuda_graphs=graphs))
            eng = build_engine(spec)
            gen = torch.Generator().manual_seed(0)
            for i in range(batch):
                prompt = torch.randint(0, eng.vocab_size, (a.engine_prompt,), generator=gen).tolist()
                eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=steps))
            out: dict[str, list[int]] = {}
            while eng.waiting or any(s.pending > 1 for s in eng.running):  # prefill
                for o in eng.step():
                    out.setdefault(o.request_id, []).extend(o.new_tokens)
            for _ in range(a.warmup):   # the first decode steps capture the graphs
                for o in eng.step():
                    out.setdefault(o.request_id, []).extend(o.new_tokens)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for o in eng.step():
                    out.setdefault(o.request_id, []).extend(o.new_tokens)
                torch.cuda.synchronize()
            ev = prof.events()
            api = sum(1 for e in ev if e.name in _API_LAUNCHES)
            kernels = sum(1 for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
            times = []
            for _ in range(a.iters):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for o in eng.step():
                    out.setdefault(o.request_id, []).extend(o.new_tokens)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            replayed = eng.graphs.counters["replayed"] if eng.graphs is not None else 0
            tokens[(batch, graphs)] = out
            rows.append(dict(batch=batch, cuda_graphs=graphs, api_launches_per_step=api, gpu_kernels_per_step=kernels,
                             step_ms=statistics.median(times) * 1e3, step_ms_min=min(times) * 1e3,
                             step_ms_max=max(times) * 1e3, replayed_steps=replayed, model=a.engine_model,
                             kernel=eng.cache.kernel, device_name=torch.cuda.get_device_name()))
            del eng
            torch.cuda.empty_cache()
    print(f"engine decode step, {a.engine_model}, prompt {a.engine_prompt}, {torch.cuda.get_device_name()}")
    print(f"{'B':>4} {'graphs':>6} {'API launches':>12} {'GPU kernels':>11} {'ms/step':>8} {'min-max':>15} {'replayed':>8}")
    for r in rows:
        print(f"{r['batch']:4d} {str(r['cuda_graphs']):>6} {r['api_launches_per_step']:12d} "
              f"{r['gpu_kernels_per_step']:11d} {r['step_ms']:8.3f} {r['step_ms_min']:7.3f}-{r['step_ms_max']:<7.3f} "
              f"{r['replayed_steps']:8d}")
    for batch in a.batches:
        same = tokens[(batch, False)] == tokens[(batch, True)]
        print(f"B={batch}: greedy tokens eager vs graphs {'identical' if same else 'DIFFER'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not torch.cuda.is_available() and not a.interpreter:
        print("no GPU: the GPU decode figures are not measured on this machine")
        return 0
    if a.engine_step:
        if not torch.cuda.is_available():
            print("--engine-step needs a GPU (CUDA graphs): not measured on this machine")
            return 0
        rows = engine_step(a)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))
        return 0
    if a.interpreter:
        os.environ["TRITON_INTERPRET"] = "1"
    from ryzlab.experiments.attention_bench import copy_bandwidth
    from ryzlab.kv.triton import unavailable_reason
    from ryzlab.provenance import cpu_model

    device = torch.device("cpu" if a.interpreter else "cuda")
    why = unavailable_reason(device)
    if why:
        print(f"cannot run the Triton kernels: {why}")
        return 1
    name = cpu_model() + " (Triton interpreter: not GPU figures)" if a.interpreter else torch.cuda.get_device_name()
    copy_bps = copy_bandwidth(device, a.copy_mib)
    print(f"device: {name}; copy bandwidth {copy_bps / 1e9:.1f} GB/s (read + write, best of 5)")
    try:
        import flashinfer  # noqa: F401
        peers = ["flashinfer"]
    except ImportError:
        peers = []
        print("flashinfer not importable: no FlashInfer peer in this run")
    gen = torch.Generator(device=device).manual_seed(0)
    timer = Timer(device)
    rows = []
    for ctx in a.contexts:
        for batch in a.batches:
            for codec in a.codecs:
                page_gib = batch * ctx * a.kv_heads * a.head_dim * 2 * 2 / 2**30  # bf16 K + V
                if page_gib > a.max_kv_gib:
                    print(f"skip {codec} ctx={ctx} batch={batch}: ~{page_gib:.1f} GiB bf16 pages > --max-kv-gib")
                    continue
                k, v, tables = make_pages(codec, a, ctx, batch, device, gen)
                q = torch.randn(batch, a.heads, a.head_dim, generator=gen, device=device).to(torch.bfloat16)
                nbytes = kv_bytes(k, v, ctx, batch)
                kernels = {"triton": run_triton(k, v, tables, q, ctx)}
                if page_gib <= a.torch_max_gib:
                    kernels["torch"] = run_torch(k, v, tables, q, ctx)
                for peer in peers:
                    try:
                        kernels[peer] = run_flashinfer(codec, k, v, tables, q, ctx)
                    except Exception as e:  # noqa: BLE001 - a peer that cannot run this point is reported, not fatal
                        print(f"  {peer} skipped for {codec}: {type(e).__name__}: {e}")
                for kern, fn in kernels.items():
                    times = timer(fn, a.iters, a.warmup)
                    med = statistics.median(times)
                    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [med] * 9
                    rows.append(dict(codec=codec, context=ctx, batch=batch, kernel=kern, decode_us=med * 1e6,
                                     decode_us_p10=qs[0] * 1e6, decode_us_p90=qs[-1] * 1e6, kv_bytes=nbytes,
                                     achieved_gbps=nbytes / med / 1e9, copy_gbps=copy_bps / 1e9,
                                     frac_of_copy_bw=nbytes / med / copy_bps, device=device.type, device_name=name,
                                     iters=a.iters))
                del k, v, tables
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    base = {(r["context"], r["batch"]): r["decode_us"] for r in rows
            if r["codec"] == "none" and r["kernel"] == "triton"}
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        r["speedup_vs_bf16_triton"] = b / r["decode_us"] if b else None
    print(f"{'codec':10} {'ctx':>7} {'B':>3} {'kernel':10} {'us':>9} {'p10-p90':>17} {'GB/s':>7} "
          f"{'of copy':>7} {'vs bf16':>7}")
    for r in rows:
        sp = f"{r['speedup_vs_bf16_triton']:.2f}x" if r["speedup_vs_bf16_triton"] else "-"
        print(f"{r['codec']:10} {r['context']:7d} {r['batch']:3d} {r['kernel']:10} {r['decode_us']:9.1f} "
              f"{r['decode_us_p10']:8.1f}-{r['decode_us_p90']:<8.1f} {r['achieved_gbps']:7.1f} "
              f"{r['frac_of_copy_bw']:7.1%} {sp:>7}")
    at32 = [r for r in rows if r["context"] == 32768 and r["kernel"] == "triton"]
    for r in at32:
        goal = {"none": ("bandwidth", 0.7)}.get(r["codec"])
        if goal:
            print(f"target 32k B={r['batch']} bf16: {r['frac_of_copy_bw']:.0%} of copy bandwidth "
                  f"({'met' if r['frac_of_copy_bw'] >= 0.7 else 'NOT met'}, goal >= 70%)")
        need = {"fp8_e4m3": 1.6, "int4": 2.5}.get(r["codec"])
        if need and r["speedup_vs_bf16_triton"]:
            ok = r["speedup_vs_bf16_triton"] >= need
            print(f"target 32k B={r['batch']} {r['codec']}: {r['speedup_vs_bf16_triton']:.2f}x vs bf16 "
                  f"({'met' if ok else 'NOT met'}, goal >= {need}x)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {len(rows)} rows to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
