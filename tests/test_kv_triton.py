"""Triton paged attention and write kernels against the torch path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set here before ``ryzlab.kv.triton`` is imported); with one they run compiled on CUDA. Shapes are
tiny: the interpreter executes every program in Python.

Bounds (issue 14): relative max error <= 1e-3 for bf16/fp16 pages, <= 1e-2 for compressed
codecs. Both paths read the very same dequantized values, so in float32 the observed error is
~1e-6; the bounds are what the issue promises, and the tighter exact checks (write kernel bytes,
log-sum-exp) sit beside them.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from ryzlab.config import CacheConfig, ModelConfig  # noqa: E402
from ryzlab.kv import triton as kv_triton  # noqa: E402
from ryzlab.kv.cache import PagedKVCache  # noqa: E402
from ryzlab.kv.codecs import KVFormat  # noqa: E402
from ryzlab.kv.attention import attention_with_lse  # noqa: E402
from ryzlab.kv.pages import PagedTensor  # noqa: E402
from ryzlab.kv.store import KeyRope  # noqa: E402
from ryzlab.kv.triton.decode import paged_attention, plan_from_gather  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
D = 32
LENS = (5, 37, 20)  # ragged: under one block, several blocks, one block and a bit
# (codec, cache dtype): "none" stores the model dtype, so bf16/fp16 pages are codec none
CODECS = [("none", torch.bfloat16), ("none", torch.float16), ("fp8_e4m3", torch.float32),
          ("fp8_e5m2", torch.float32), ("int8", torch.float32), ("int4", torch.float32)]


def bound(codec: str) -> float:
    return 1e-3 if codec == "none" else 1e-2


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def run_pair(cache_cfg: CacheConfig, hq: int, hkv: int, dtype: torch.dtype, lens=LENS, decode_steps: int = 2,
             attend_prefill: bool = False, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Same writes into a torch-path and a Triton-path cache; (torch, triton) attention per step."""
    model = ModelConfig(dim=hq * D, n_heads=hq, n_kv_heads=hkv, n_layers=1, head_dim=D)
    caches = [PagedKVCache(model, cache_cfg, dtype=dtype, device=DEV, kernel=k) for k in ("torch", "triton")]
    assert [c.kernel for c in caches] == ["torch", "triton"]
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(len(lens)))
    for i, n in enumerate(lens):
        for c in caches:
            assert c.add_sequence(i, n) == 0
    pairs = []
    for s in range(decode_steps + 1):
        steps = [c.extend(ids, None if s == 0 else [1] * len(ids)) for c in caches]
        n = steps[0].num_tokens
        k, v, q = (torch.randn(n, h, D, generator=gen).to(DEV) for h in (hkv, hkv, hq))
        q = q.to(dtype).float()  # float32 holding model-dtype values: a GPU's low-precision dot is exact on it
        outs = []
        for c in caches:
            c.write(0, k, v)
            if s or attend_prefill:
                outs.append(c.attend(0, q))  # q float32: neither path rounds it
        if outs:
            pairs.append((outs[0], outs[1]))
    return pairs


@pytest.mark.parametrize("codec,dtype", CODECS, ids=[f"{c}-{str(t)[6:]}" for c, t in CODECS])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("gqa", [1, 4])
def test_decode_matches_torch_path(codec, dtype, bs, gqa):
    """Every codec x default granularity (token_head) x block size x GQA ratio, ragged batch."""
    hkv = 2
    pairs = run_pair(CacheConfig(codec=codec, block_size=bs), hkv * gqa, hkv, dtype)
    for ref, out in pairs:
        assert out.shape == ref.shape == (len(LENS), hkv * gqa, D)
        assert rel_err(out, ref) <= bound(codec)
        # float32 work on both sides over identical dequantized values: far inside the bound (on a
        # GPU a bf16/fp16 model's P @ V takes two rounded parts of P: ~2**-16)
        assert rel_err(out, ref) <= (1e-4 if CUDA and dtype != torch.float32 else 1e-5)


GRANULAR = [  # (codec, key granularity, value granularity, symmetric, residual)
    ("int4", "channel", "token_head", True, 0),    # KIVI: per-channel keys, per-token values
    ("int4", "channel", "token_head", False, 8),   # asymmetric, with a full-precision window
    ("int8", "group", "group", False, 0),
    ("int8", "head", "tensor", True, 4),
    ("fp8_e4m3", "channel", "group", True, 0),
    ("fp8_e5m2", "tensor", "head", True, 0),
    ("int4", "group", "group", False, 0),
]


@pytest.mark.parametrize("codec,kg,vg,sym,residual", GRANULAR)
def test_granularities_and_zero_points(codec, kg, vg, sym, residual):
    """Every scale granularity, zero points and the tail (open block / residual window)."""
    cfg = CacheConfig(codec=codec, key_granularity=kg, value_granularity=vg, symmetric=sym, residual=residual,
                      block_size=16, group_size=8)
    for ref, out in run_pair(cfg, 4, 2, torch.float32, decode_steps=3):
        assert rel_err(out, ref) <= 1e-5


def test_prefill_chunk_is_causal_through_the_kernel():
    """Many queries per sequence (prefill) go through the same kernel, causally."""
    cfg = CacheConfig(codec="int8", block_size=16)
    pairs = run_pair(cfg, 2, 1, torch.float32, lens=(3, 19), decode_steps=1, attend_prefill=True)
    assert pairs[0][0].shape == (22, 2, D)
    for ref, out in pairs:
        assert rel_err(out, ref) <= 1e-5


def test_write_kernel_stores_the_codec_bytes():
    """write_slots quantizes exactly as KVFormat.encode (same payload bytes, scales, zero points)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2, D, generator=gen) * 3
    x[0] = 0.0  # all-zero token: minimum scale
    x[1, 0, 5] = -1e-6  # rounds to -0 in fp8
    slots = torch.tensor([3, 0, 7, 12, 5, 9, 1, 14, 2])
    n_checked = 0
    for codec in ("fp8_e4m3", "fp8_e5m2", "int8", "int4"):
        for gran in ("token_head", "group"):
            for sym in (True, False):
                fmt = KVFormat(codec, gran, 8, sym)
                assert kv_triton.supports_write(fmt, D)
                pages = [PagedTensor(fmt, 1, 4, 4, 2, D, DEV) for _ in range(2)]
                pages[0].write_slots(0, slots.to(DEV), x.to(DEV))  # torch: KVFormat.encode
                kv_triton.write_slots(pages[1], 0, slots.to(DEV), x.to(DEV))
                for a, b in zip(pages[0].tensors(), pages[1].tensors()):
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (codec, gran, sym)
                n_checked += 1
    assert n_checked == 16
    assert not kv_triton.supports_write(KVFormat("int8", "channel"), D)  # block commits stay in torch
    assert not kv_triton.supports_write(KVFormat("none"), D)


def test_kernel_lse_splits_and_sparse_positions():
    """Direct kernel call: several key splits, cp-style tables (positions skip blocks), tail rows.

    Reference: decode the gathered pages, overlay the tail, mask by position, attention_with_lse;
    output and log-sum-exp must agree (the lse is what context parallelism merges).
    """
    gen = torch.Generator().manual_seed(5)
    bs, h, g = 4, 2, 3
    fmt_k, fmt_v = KVFormat("int4", "channel", symmetric=False), KVFormat("fp8_e4m3", "token_head")
    kp, vp = PagedTensor(fmt_k, 1, 8, bs, h, D, DEV), PagedTensor(fmt_v, 1, 8, bs, h, D, DEV)
    for p in (kp, vp):
        p.write_blocks(0, torch.arange(8, device=DEV), torch.randn(8, bs, h, D, generator=gen).to(DEV))
    # row 0 holds global blocks 1, 3, 4 (positions 4.., 12.., 16..); row 1 holds blocks 0 and 2
    tables = torch.tensor([[5, 2, 7], [1, 6, 0]], device=DEV)
    starts = torch.tensor([[4, 12, 16], [0, 8, 1 << 40]], device=DEV)  # padding far beyond any query
    kpos = (starts[:, :, None] + torch.arange(bs, device=DEV)).view(2, -1)
    tail = torch.randn(2, 6, h, D, generator=gen).to(DEV)  # [K/V, rows, H, D]
    ov_b, ov_idx, ov_row = (torch.tensor(x, device=DEV) for x in ([0, 0, 1, 1], [9, 10, 6, 7], [4, 1, 3, 5]))
    q_row, q_pos = torch.tensor([0, 1, 0], device=DEV), torch.tensor([18, 11, 13], device=DEV)
    q = torch.randn(3, h * g, D, generator=gen).to(DEV)
    plan = plan_from_gather(q_row, q_pos, tables, kpos, bs, ov_b, ov_idx, ov_row)
    assert plan.pend.tolist() == [17, 10] and plan.tail_ptr.tolist() == [0, 2, 4]
    k, v = kp.gather(0, tables, torch.float32), vp.gather(0, tables, torch.float32)  # [2, H, 12, D]
    k[ov_b, :, ov_idx], v[ov_b, :, ov_idx] = tail[0, ov_row], tail[1, ov_row]
    mask = kpos[q_row][:, None, :] <= q_pos[:, None, None]  # [3, 1, S]
    ref, ref_lse = attention_with_lse(q[:, None], k[q_row], v[q_row], mask, None)
    for splits in (1, 3):
        out, lse = paged_attention(q, kp, vp, 0, plan, tail[0], tail[1], splits=splits, block_n=16)
        assert rel_err(out, ref[:, 0]) <= 1e-5
        torch.testing.assert_close(lse, ref_lse[:, 0], atol=1e-5, rtol=1e-5)
    # a query that sees no key: output 0, lse -inf (what merge_partials expects of an empty part)
    empty = plan_from_gather(q_row[:1], torch.tensor([2], device=DEV), tables, kpos, bs, ov_b[:0], ov_idx[:0],
                             ov_row[:0])
    out, lse = paged_attention(q[:1], kp, vp, 0, empty, tail[0], tail[1], splits=2, block_n=16)
    assert torch.equal(out, torch.zeros_like(out)) and lse.isneginf().all()
    # explicit scale: lse scales accordingly
    out2, lse2 = paged_attention(q, kp, vp, 0, plan, tail[0], tail[1], scale=0.5 / math.sqrt(D), splits=2)
    ref2, ref_lse2 = attention_with_lse(q[:, None], k[q_row], v[q_row], mask, 0.5 / math.sqrt(D))
    torch.testing.assert_close(lse2, ref_lse2[:, 0], atol=1e-5, rtol=1e-5)


def test_kernel_choice_is_validated(monkeypatch):
    model = ModelConfig(dim=64, n_heads=2, n_kv_heads=1, n_layers=1)
    with pytest.raises(ValueError, match="auto, torch, triton"):
        PagedKVCache(model, CacheConfig(), kernel="cuda")
    assert PagedKVCache(model, CacheConfig(), kernel="torch").kernel == "torch"
    if not CUDA:
        assert PagedKVCache(model, CacheConfig(), kernel="auto").kernel == "torch"  # CPU: the torch path
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            PagedKVCache(model, CacheConfig(), kernel="triton")


def test_kv_compression_rows_record_the_triton_path(tmp_path):
    """The experiment runs a model through the Triton path and says so in every row."""
    from ryzlab.experiments import run_experiment

    tiny = dict(model="random", context=20, batch=2, decode_steps=2, warmup=0, eval_windows=0, block_size=8,
                codec="int8", kernel="triton", device=DEV.type)
    df = run_experiment("kv_compression", tiny, tmp_path)
    assert len(df) == 2 and (df.kernel == "triton").all()
    ref = run_experiment("kv_compression", {**tiny, "kernel": "torch"}, tmp_path / "torch")
    assert (ref.kernel == "torch").all() and ref.kv_bytes_per_token.iloc[0] == df.kv_bytes_per_token.iloc[0]



def _cp_rank(rank: int, world: int) -> float:
    """cp rank: a context-parallel Triton cache (each rank its own blocks, lse partials merged) and a
    one-rank torch cache get the same writes; returns the largest relative attention difference."""
    from ryzlab.config import ParallelConfig
    from ryzlab.parallel import init_parallel

    g = init_parallel(ParallelConfig(cp=world))
    model = ModelConfig(dim=4 * D, n_heads=4, n_kv_heads=2, n_layers=1, head_dim=D)
    cfg = CacheConfig(codec="int4", key_granularity="channel", symmetric=False, block_size=4, residual=3)
    cache = PagedKVCache(model, cfg, cp=g.cp, kernel="triton")
    ref = PagedKVCache(model, cfg, kernel="torch")
    gen = torch.Generator().manual_seed(0)  # the same draws on every rank
    for sid, n in ((0, 11), (1, 6)):
        cache.add_sequence(sid, n)
        ref.add_sequence(sid, n)
    errs = []
    for s in range(3):
        new = None if s == 0 else [1, 1]
        steps = [c.extend([0, 1], new) for c in (cache, ref)]
        n = steps[0].num_tokens
        k, v, q = (torch.randn(n, h, D, generator=gen) for h in (2, 2, 4))
        for c in (cache, ref):
            c.write(0, k, v)
        errs.append(rel_err(cache.attend(0, q), ref.attend(0, q)))
    return max(errs)


@pytest.mark.skipif(CUDA, reason="interpreter run on CPU ranks (gloo)")
def test_context_parallel_triton_cache_matches_one_torch_rank():
    from ryzlab.orchestrator import launch

    errs = launch(_cp_rank, 2, backend="gloo", timeout_s=300)
    assert len(errs) == 2 and max(errs) <= 1e-5

def _gpu_decode():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"
    spec = importlib.util.spec_from_file_location("gpu_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(CUDA, reason="checks the CPU behaviour")
def test_gpu_benchmark_says_no_gpu_and_its_body_runs_in_the_interpreter(capsys, tmp_path):
    bench = _gpu_decode()
    assert bench.main([]) == 0
    assert capsys.readouterr().out.startswith("no GPU")
    out = tmp_path / "rows.json"
    assert bench.main(["--interpreter", "--contexts", "40", "--batches", "2", "--heads", "4", "--kv-heads", "2",
                       "--head-dim", "16", "--iters", "2", "--warmup", "0", "--copy-mib", "1", "--codecs",
                       "none,int4_kivi", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())
    assert {(r["codec"], r["kernel"]) for r in rows} == {(c, k) for c in ("none", "int4_kivi")
                                                         for k in ("triton", "torch")}
    # bytes read: bf16 K+V of 3 pages x 2 sequences; int4 KIVI: half-bytes + per-token fp16 value scales +
    # per-channel fp16 key scales and zero points per page
    by = {r["codec"]: r["kv_bytes"] for r in rows}
    assert by["none"] == 2 * 3 * 16 * 2 * 16 * 2 * 2
    assert by["int4_kivi"] == 2 * 3 * (2 * 16 * 2 * 8 + 16 * 2 * 2 * 2 + 2 * 16 * 2 * 2)
    assert "not GPU figures" in rows[0]["device_name"]


_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ryzlab.kv.triton import decode, write

k_codec, v_codec, lowp = map(int, sys.argv[1:4])
target = GPUTarget("cuda", 90, 32)


def build(fn, ptrs, consts, floats=()):
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in floats else "i32") for a in fn.arg_names}
    assert triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target).asm["cubin"]


byte = {0: "*bf16", 1: "*u8", 2: "*u8", 3: "*i8", 4: "*u8"}
scale = {0: "*fp16", 1: "*u8", 2: "*u8", 3: "*fp16", 4: "*fp16"}
ptrs = {"Q": "*bf16", "O_PART": "*fp32", "L_PART": "*fp32", "KP": byte[k_codec], "KS": scale[k_codec], "KZ": "*fp16",
        "VP": byte[v_codec], "VS": scale[v_codec], "VZ": "*fp16", "TAIL_K": "*bf16", "TAIL_V": "*bf16",
        **{n: "*i32" for n in ("Q_ROW", "Q_POS", "TABLES", "KSTART", "PEND", "TAIL_PTR", "TAIL_ROW", "TAIL_POS")}}
build(decode._paged_attention_kernel, ptrs,
      dict(BS=16, G=4, G_PAD=16, D=128, D_PAD=128, BLOCK_N=64, LOWP=lowp, K_CODEC=k_codec,
           K_BITS=4 if k_codec == 4 else 0, K_GROUP=1 if k_codec == 4 else 128, K_ZERO=k_codec == 4,
           V_CODEC=v_codec, V_BITS=0, V_GROUP=128, V_ZERO=False), floats=("qk_scale",))
build(decode._merge_splits_kernel, {"O_PART": "*fp32", "L_PART": "*fp32", "OUT": "*bf16", "LSE": "*fp32"},
      dict(SPLITS=5, S_PAD=8, D=128, D_PAD=128))
build(write._write_slots_kernel, {"X": "*bf16", "SLOTS": "*i64", "P": byte[k_codec], "S": scale[k_codec], "Z": "*fp16"},
      dict(BLOCK_T=16, D=128, GS=32, NG=4, NG_PAD=4, GS_PAD=32, CODEC=k_codec, HAS_ZERO=k_codec == 4,
           QMAX=15.0, FMAX=448.0, EMIN=-6, MBITS=3))
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("k_codec,v_codec,lowp", [(4, 3, 2), (1, 2, 1)])
def test_kernels_compile_for_hopper_without_a_gpu(k_codec, v_codec, lowp, tmp_path):
    """The interpreter does not type-check like the compiler: build real sm_90 cubins (ptxas; no GPU
    needed), in a process without TRITON_INTERPRET (there the kernels are compiled JIT functions)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile
    res = subprocess.run([sys.executable, "-c", _COMPILE, str(k_codec), str(v_codec), str(lowp)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


def test_a_format_without_a_reader_falls_back_or_fails_clearly(monkeypatch):
    """A codec the kernels cannot read (say a new int2) is refused for kernel='triton' and runs the
    torch path under 'auto' (logged), instead of failing at the first attend."""
    monkeypatch.delitem(kv_triton.CODE, "int8")
    model = ModelConfig(dim=64, n_heads=2, n_kv_heads=1, n_layers=1)
    with pytest.raises(ValueError, match="codec 'int8' has no Triton reader"):
        PagedKVCache(model, CacheConfig(codec="int8"), device=DEV, kernel="triton")
    assert PagedKVCache(model, CacheConfig(codec="int4"), device=DEV, kernel="triton").kernel == "triton"
    if CUDA:
        assert PagedKVCache(model, CacheConfig(codec="int8"), device=DEV).kernel == "torch"


def test_rotation_mixed_layers_and_half_window_through_the_kernel():
    """The low-bit layouts (issue 15) on the Triton path: Hadamard-rotated K/V with random signs,
    one codec per layer (int8 / asymmetric int4 with KIVI keys), a float16 residual window; each
    layer's pages come from its own group. Pre-RoPE keys are refused (the kernel applies no RoPE)."""
    hq, hkv, n_layers = 4, 2, 2
    model = ModelConfig(dim=hq * D, n_heads=hq, n_kv_heads=hkv, n_layers=n_layers, head_dim=D)
    cfg = CacheConfig(codec="int4", layer_codecs=("int8", "int4"), symmetric=False, rotation="hadamard_signs",
                      residual=8, residual_dtype="float16", block_size=16)
    caches = [PagedKVCache(model, cfg, dtype=torch.float32, device=DEV, kernel=k) for k in ("torch", "triton")]
    assert caches[1].k.where(0)[0] is not caches[1].k.where(1)[0]  # two formats, two page groups
    gen = torch.Generator().manual_seed(3)
    for i, n in enumerate(LENS):
        for c in caches:
            c.add_sequence(i, n)
    ids = list(range(len(LENS)))
    for s in range(3):
        steps = [c.extend(ids, None if s == 0 else [1] * len(ids)) for c in caches]
        n = steps[0].num_tokens
        for layer in range(n_layers):
            k, v, q = (torch.randn(n, h, D, generator=gen).to(DEV) for h in (hkv, hkv, hq))
            for c in caches:
                c.write(layer, k, v)
            if s:
                ref, out = (c.attend(layer, q) for c in caches)
                assert rel_err(out, ref) <= 1e-5, (s, layer)
    from ryzlab.models.transformer import apply_rope, rope_cos_sin, rope_inv_freq

    rope = KeyRope(rope_inv_freq(model, DEV), rope_cos_sin, apply_rope)
    with pytest.raises(ValueError, match="kernel='triton' cannot run here: keys stored before RoPE"):
        PagedKVCache(model, CacheConfig(codec="int8", pre_rope_keys=True), dtype=torch.float32, device=DEV,
                     kernel="triton", rope=rope)
