"""PagedKVCache: paged vs dense attention, stored values vs the codec, sharing, CoW, shortage, ledger."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.kv.cache import PagedKVCache
from ryzlab.kv.codecs import KVFormat
from ryzlab.kv.merge import merge_partials

MODEL = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)  # GQA 2:1, D=8
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Reference: SDPA over one sequence's full K/V ``[S, Hkv, D]``, causal by position."""
    mask = torch.arange(k.shape[0])[None, :] <= qpos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


class Driver:
    """Runs steps on a cache with random q/k/v and keeps the original K/V per sequence."""

    def __init__(self, cache: PagedKVCache, seed: int = 0):
        self.cache = cache
        self.gen = torch.Generator().manual_seed(seed)
        self.kv: dict[object, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer: [n, H, D]

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def step(self, step) -> list[torch.Tensor]:
        """Write + attend every layer; check attend == dense over what the cache stores."""
        outs = []
        for layer in range(MODEL.n_layers):
            n = step.num_tokens
            q, k, v = self.rand(n, HQ, D), self.rand(n, HKV, D), self.rand(n, HKV, D)
            self.cache.write(layer, k, v)
            out = self.cache.attend(layer, q)
            off = 0
            for sid, w, end in zip(step.seq_ids, step.query_lens, step.context_lens):
                ks, vs = self.kv.setdefault(sid, [(torch.zeros(0, HKV, D), torch.zeros(0, HKV, D))] * MODEL.n_layers)[layer]
                self.kv[sid][layer] = (torch.cat([ks, k[off:off + w]]), torch.cat([vs, v[off:off + w]]))
                kk, vv = self.cache.read_kv(sid, layer)
                assert kk.shape == (end, HKV, D)
                ref = dense(q[off:off + w], kk, vv, step.positions[off:off + w])
                torch.testing.assert_close(out[off:off + w], ref, atol=2e-5, rtol=1e-4)
                off += w
            outs.append(out)
        return outs

    def expected_kv(self, sid, layer: int, residual: int, unit: int, fmt_k: KVFormat, fmt_v: KVFormat,
                    bs: int, start: int = 0, rotation=None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache must store: codec round trip per token / per full block, tail exact
        (with a rotation: the round trip of the rotated vectors, rotated back)."""
        res = []
        for orig, fmt in zip(self.kv[sid][layer], (fmt_k, fmt_v)):
            if rotation is not None:
                orig = rotation.apply(orig)
            n = orig.shape[0]
            exp = orig.clone()
            n_t = min(max(n - residual, 0), n // unit * unit) if fmt.quantized else n
            if fmt.quantized:
                if unit == 1:
                    exp[:n_t] = fmt.decode(fmt.encode(orig[:n_t]))
                else:
                    full = orig[:n // bs * bs].view(-1, bs, HKV, D)
                    exp[:n // bs * bs] = fmt.decode(fmt.encode(full)).reshape(-1, HKV, D)
                    exp[n_t:] = orig[n_t:]
            res.append(exp if rotation is None else rotation.invert(exp))
        return res[0], res[1]


CONFIGS = [
    dict(codec="none", block_size=4),
    dict(codec="int8", block_size=4),
    dict(codec="int8", block_size=3, residual=5),
    dict(codec="int4", key_granularity="group", value_granularity="group", group_size=4, block_size=5),
    dict(codec="int4", key_granularity="channel", value_granularity="token_head", block_size=4, residual=2, symmetric=False),
    dict(codec="fp8_e4m3", key_granularity="head", value_granularity="tensor", block_size=2),
    dict(codec="fp8_e5m2", block_size=1, residual=3),
    dict(codec="int4", rotation="hadamard", block_size=4),
    dict(codec="int3", symmetric=False, rotation="hadamard_signs", rotation_seed=3, block_size=3, residual=2),
    dict(codec="int2", symmetric=False, key_granularity="channel", layer_codecs=("int8", "int2"), block_size=4,
         residual=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_paged_attention_equals_dense_prefill_then_decode(cfg):
    cache = PagedKVCache(MODEL, CacheConfig(**cfg))
    drv = Driver(cache)
    prompts = {"a": list(range(11)), "b": list(range(20, 27)), "c": [5]}
    for sid, toks in prompts.items():
        assert cache.add_sequence(sid, toks) == 0
    drv.step(cache.extend(list(prompts)))          # ragged prefill, 3 sequences at once
    for t in range(6):                             # decode; "c" joins late with a 2-token chunk
        ids = ["a", "b"] + (["c"] if t >= 2 else [])
        drv.step(cache.extend(ids, [[t]] * 2 + ([[1, 2]] if t >= 2 else [])))
    for sid in prompts:
        for layer in range(MODEL.n_layers):
            fk, fv = cache.key_formats[layer], cache.value_formats[layer]
            ek, ev = drv.expected_kv(sid, layer, cache.residual, cache.commit_unit, fk, fv, cache.block_size,
                                     rotation=cache.rotation)
            kk, vv = cache.read_kv(sid, layer)
            torch.testing.assert_close(kk, ek, atol=1e-6, rtol=0)
            torch.testing.assert_close(vv, ev, atol=1e-6, rtol=0)
    cache.pool.check_invariants()


def test_codec_none_stores_inputs_exactly_and_four_d_inputs():
    cache = PagedKVCache(MODEL, CacheConfig(block_size=4))
    for s in (0, 1):
        cache.add_sequence(s, 3)
    step = cache.extend([0, 1])
    k = torch.randn(2, 3, HKV, D)
    for layer in range(2):
        cache.write(layer, k, k)
        out = cache.attend(layer, torch.randn(2, 3, HQ, D))
        assert out.shape == (2, 3, HQ, D)
    assert torch.equal(cache.read_kv(1, 0)[0], k[1])
    kh, _ = cache.gather(1, heads_first=True)
    kb, _ = cache.gather(1)
    assert kh.shape == (2, HKV, 4, D) and kh.is_contiguous() and torch.equal(kh.transpose(1, 2), kb)
    assert torch.equal(kb[:, :3], k)
    assert step.slot_mapping.tolist() == [b * 4 + i for b in (cache.block_table(0)[0], cache.block_table(1)[0]) for i in range(3)]


def test_chunked_prefill_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(9, HQ, D, generator=g), torch.randn(9, HKV, D, generator=g), torch.randn(9, HKV, D, generator=g)
    results = []
    for chunks in ([9], [4, 3, 2]):
        cache = PagedKVCache(MODEL, CacheConfig(codec="int8", key_granularity="channel", block_size=4, residual=1))
        cache.add_sequence("s", list(range(9)))
        outs = []
        for c in chunks:
            a = cache.num_written("s")
            step = cache.extend(["s"], num_write=[c])
            assert step.positions.tolist() == list(range(a, a + c))
            for layer in range(MODEL.n_layers):
                cache.write(layer, k[a:a + c], v[a:a + c])
                outs.append(cache.attend(layer, q[a:a + c])) if layer == 1 else None
        assert cache.num_written("s") == 9
        results.append((torch.cat(outs), cache.read_kv("s")))
    torch.testing.assert_close(results[0][1][0], results[1][1][0], atol=0, rtol=0)
    torch.testing.assert_close(results[0][1][1], results[1][1][1], atol=0, rtol=0)
    # earlier chunks attend before later blocks are quantised (tail): equal up to codec error
    torch.testing.assert_close(results[0][0][4:], results[1][0][4:], atol=0.05, rtol=0)


def test_prefix_hit_skips_cached_tokens_and_reads_shared_blocks():
    cache = PagedKVCache(MODEL, CacheConfig(codec="int8", key_granularity="channel", block_size=4, residual=3))
    drv = Driver(cache)
    assert cache.add_sequence("a", list(range(10))) == 0
    drv.step(cache.extend(["a"]))
    cached = cache.add_sequence("b", list(range(8)) + [50, 51, 52])
    assert cached == 8 and cache.block_table("b")[:2] == cache.block_table("a")[:2]
    step = cache.extend(["b"])
    assert step.positions.tolist() == [8, 9, 10]
    drv.step(step)  # attention over the 8 shared tokens matches dense over what b reads
    ka, _ = cache.read_kv("a", 0)
    kb, _ = cache.read_kv("b", 0)
    # same quantised blocks; position 7 is in a's full-precision residual window but b only
    # has the quantised copy of it (b never wrote it)
    torch.testing.assert_close(kb[:7], ka[:7], atol=0, rtol=0)
    assert not torch.equal(kb[7], ka[7]) and torch.allclose(kb[7], ka[7], atol=0.05)
    assert cache.stats()["prefix_cache_hit_rate"] == pytest.approx(8 / 21)
    cache.free("a")
    cache.free("b")
    assert cache.add_sequence("c", list(range(9))) == 8  # freed blocks stay cached
    cache.pool.check_invariants()


def test_unwritten_blocks_are_not_prefix_hits():
    cache = PagedKVCache(MODEL, CacheConfig(block_size=2))
    cache.add_sequence("a", [1, 2, 3, 4])
    assert cache.add_sequence("b", [1, 2, 3, 4, 5]) == 0  # a has not written anything yet
    cache.extend(["a"], num_write=[2])
    assert cache.add_sequence("c", [1, 2, 3, 4, 5]) == 2


def test_fork_copy_on_write_keeps_both_histories():
    cache = PagedKVCache(MODEL, CacheConfig(codec="int4", key_granularity="channel", value_granularity="group",
                                            group_size=4, block_size=4, residual=2))
    drv = Driver(cache)
    cache.add_sequence("p", list(range(6)))
    drv.step(cache.extend(["p"]))
    cache.fork("p", "c")
    drv.kv["c"] = list(drv.kv["p"])
    shared_last = cache.block_table("p")[-1]
    drv.step(cache.extend(["p", "c"], [[1], [2]]))  # both append into the shared partial block
    assert cache.block_table("c")[-1] != cache.block_table("p")[-1]
    assert shared_last in (cache.block_table("p")[-1], cache.block_table("c")[-1]) or cache.pool.blocks[shared_last].ref_cnt == 0
    for _ in range(3):
        drv.step(cache.extend(["p", "c"], [[3], [4]]))
    for sid in ("p", "c"):
        ek, ev = drv.expected_kv(sid, 0, cache.residual, cache.commit_unit, cache.key_format, cache.value_format, 4)
        kk, vv = cache.read_kv(sid, 0)
        torch.testing.assert_close(kk, ek, atol=1e-6, rtol=0)
        torch.testing.assert_close(vv, ev, atol=1e-6, rtol=0)
    cache.pool.check_invariants()


def test_lse_merge_of_disjoint_key_sets_equals_full_attention():
    """What each cp rank computes (attention over its keys, with log-sum-exp) merges exactly."""
    from ryzlab.kv.attention import attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, HQ, D, generator=g), torch.randn(2, HKV, 20, D, generator=g), torch.randn(2, HKV, 20, D, generator=g)
    causal = torch.arange(20)[None, None, :] <= torch.tensor([[7, 12, 19]])[:, :, None]   # [1, 3, 20]
    causal = causal.expand(2, 3, 20)
    full, lse_all = attention_with_lse(q, k, v, causal, None)
    block = torch.arange(20) // 4
    parts = [attention_with_lse(q, k, v, causal & (block % 2 == r)[None, None, :], None) for r in (0, 1)]
    out, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse_all, atol=1e-6, rtol=1e-6)
    none = attention_with_lse(q, k, v, torch.zeros_like(causal), None)
    assert torch.isneginf(none[1]).all() and (none[0] == 0).all()


def test_capacity_exhaustion_returns_none_and_never_corrupts():
    cache = PagedKVCache(MODEL, CacheConfig(codec="int8", block_size=4, num_blocks=4, residual=2))
    drv = Driver(cache)
    assert cache.add_sequence("a", list(range(7))) == 0
    drv.step(cache.extend(["a"]))
    assert cache.add_sequence("b", list(range(100, 112))) is None  # needs 3 blocks, 2 free
    assert "b" not in cache
    assert cache.add_sequence("b", list(range(100, 105))) == 0
    drv.step(cache.extend(["b"]))
    before = (cache.read_kv("a"), cache.read_kv("b"), cache.ledger(), cache.stats())
    assert cache.extend(["a", "b"], [[1, 2], [3, 4, 5, 6]]) is None  # a fits, b does not: neither
    after = (cache.read_kv("a"), cache.read_kv("b"), cache.ledger(), cache.stats())
    for x, y in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(x, y)
    assert before[2:] == after[2:] and cache.num_tokens("a") == 7
    cache.free("b")
    drv.step(cache.extend(["a"], [[1, 2]]))
    cache.pool.check_invariants()


def test_unbounded_cache_grows_storage():
    cache = PagedKVCache(MODEL, CacheConfig(codec="int4", group_size=4, key_granularity="group", block_size=2))
    drv = Driver(cache)
    for s in range(5):
        cache.add_sequence(s, 9)
    drv.step(cache.extend(list(range(5))))
    assert cache.k.capacity >= len(cache.pool.blocks) == 25


@pytest.mark.parametrize("codec,kg,vg,limit", [
    ("fp8_e4m3", "token_head", "token_head", 0.51),
    ("fp8_e5m2", "head", "tensor", 0.51),
    ("int8", "token_head", "token_head", 0.52),
    ("int4", "group", "group", 0.27),
])
def test_ledger_meets_issue_ratios_at_head_dim_64(codec, kg, vg, limit):
    model = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1)  # head_dim 64
    cache = PagedKVCache(model, CacheConfig(codec=codec, key_granularity=kg, value_granularity=vg,
                                            group_size=64, block_size=16), dtype=torch.bfloat16)
    cache.add_sequence("s", 4096)  # the issue's context: block-scale staging amortised over it
    step = cache.extend(["s"])
    x = torch.randn(4096, 1, 64, dtype=torch.bfloat16)
    for layer in range(2):
        cache.write(layer, x, x)
    led = cache.ledger()
    parts = sum(led[k] for k in ("payload", "scales", "residual", "padding", "metadata"))
    assert led["total"] == pytest.approx(parts) and led["tokens"] == 4096
    assert led["ratio_vs_bf16"] <= limit, led
    # the ledger's payload + scales is what the storage tensors hold for the used blocks
    used = cache.block_table("s")
    held = sum(t[:, used].numel() * t.element_size() for p in (cache.k, cache.v) for t in p.tensors())
    assert led["payload"] + led["scales"] + led["padding"] == held
    assert step.num_tokens == 4096


def test_ledger_counts_padding_residual_and_sharing():
    cache = PagedKVCache(MODEL, CacheConfig(codec="int8", block_size=4, residual=3))
    cache.add_sequence("a", list(range(6)))
    led = cache.ledger()
    per_slot = 2 * 2 * (HKV * D + HKV * 2)  # layers * (K, V) * (payload + fp16 scale per head)
    assert led["payload"] == 6 * 2 * 2 * HKV * D and led["padding"] == 2 * per_slot
    assert led["residual"] == 3 * HKV * D * 4 * 2 * 2
    cache.fork("a", "b")  # shares both blocks: payload unchanged, one more tail and table
    led2 = cache.ledger()
    assert led2["payload"] == led["payload"] and led2["residual"] == 2 * led["residual"]
    assert led2["bytes_per_token"] < led["bytes_per_token"] * 1.5


@pytest.mark.parametrize("bad,match", [
    (dict(codec="int5"), "choose one of 'none', 'fp8_e4m3', 'fp8_e5m2', 'int8', 'int4', 'int3', 'int2'"),
    (dict(layer_codecs=("int4",)), "layer_codecs has 1 entries but the model has 2 layers"),
    (dict(codec="int3", rotation="hadamard", layer_codecs=("int4", "int9")), r"layer_codecs\[1\]='int9'"),
    (dict(codec="int4", key_granularity="group", group_size=3), r"valid group sizes: \[1, 2, 4, 8\]"),
    (dict(block_size=0), "block_size must be a positive"),
    (dict(key_granularity="rows"), "choose one of 'tensor', 'head', 'token_head', 'channel', 'group'"),
])
def test_invalid_configs_name_valid_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        PagedKVCache(MODEL, CacheConfig(**bad))


def test_misuse_raises_value_error():
    cache = PagedKVCache(MODEL, CacheConfig(block_size=4))
    with pytest.raises(ValueError, match="no step planned"):
        cache.attend(0, torch.zeros(1, HQ, D))
    cache.add_sequence("a", 3)
    with pytest.raises(ValueError, match="already exists"):
        cache.add_sequence("a", 3)
    with pytest.raises(ValueError, match="unknown sequence 'x'"):
        cache.extend(["x"])
    with pytest.raises(ValueError, match="num_write"):
        cache.extend(["a"], num_write=[5])
    cache.extend(["a"])
    with pytest.raises(ValueError, match=r"expected \[3, 2, 8\]"):
        cache.write(0, torch.zeros(2, HKV, D), torch.zeros(2, HKV, D))
    with pytest.raises(ValueError, match="layer=7"):
        cache.write(7, torch.zeros(3, HKV, D), torch.zeros(3, HKV, D))


# ----------------------------------------------------------------------------- random operations
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402


def _kv_of_prefix(prefix: tuple[int, ...], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in for a model: the K/V of the last token depend on the whole prefix,
    so two sequences sharing a prefix produce the same K/V (what makes prefix caching valid)."""
    g = torch.Generator().manual_seed(hash((prefix, layer)) & 0x7FFFFFFF)
    return torch.randn(HKV, D, generator=g), torch.randn(HKV, D, generator=g)


class CacheMachine(RuleBasedStateMachine):
    """Random add / step (ragged, chunked) / fork / free on a small bounded int8 cache with a
    residual window: every step, attention equals dense attention over what the cache returns,
    and what it returns equals the codec's round trip of the K/V (exact in the residual window)."""

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(MODEL, CacheConfig(codec="int8", block_size=2, num_blocks=24, residual=2))
        self.fmt = self.cache.key_format
        self.next_id = 0
        self.tail_start: dict[int, int] = {}

    @rule(toks=st.lists(st.integers(0, 2), min_size=1, max_size=7))
    def add(self, toks):
        sid = self.next_id
        self.next_id += 1
        cached = self.cache.add_sequence(sid, toks)
        if cached is not None:
            assert cached % 2 == 0 and cached < len(toks)
            self.tail_start[sid] = cached

    @precondition(lambda self: self.tail_start)
    @rule(data=st.data())
    def step(self, data):
        live = sorted(self.tail_start)
        ids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        new = [data.draw(st.lists(st.integers(0, 2), max_size=2)) for _ in ids]
        chunk = data.draw(st.booleans())
        num_write = None
        if chunk:
            pend = [self.cache.num_tokens(s) - self.cache.num_written(s) + len(t) for s, t in zip(ids, new)]
            num_write = [data.draw(st.integers(0, p)) for p in pend]
        before = {s: self.cache.num_written(s) for s in ids}
        step = self.cache.extend(ids, new, num_write=num_write)
        if step is None:
            assert all(self.cache.num_written(s) == before[s] for s in ids)
            return
        for layer in range(MODEL.n_layers):
            ks, vs = [], []
            for s, w, end in zip(step.seq_ids, step.query_lens, step.context_lens):
                toks = tuple(self.cache.pool.token_ids(s))
                for p in range(end - w, end):
                    k, v = _kv_of_prefix(toks[:p + 1], layer)
                    ks.append(k)
                    vs.append(v)
            k = torch.stack(ks) if ks else torch.zeros(0, HKV, D)
            v = torch.stack(vs) if vs else torch.zeros(0, HKV, D)
            q = torch.randn(step.num_tokens, HQ, D)
            self.cache.write(layer, k, v)
            out = self.cache.attend(layer, q)
            off = 0
            for s, w in zip(step.seq_ids, step.query_lens):
                kk, vv = self.cache.read_kv(s, layer)
                ref = dense(q[off:off + w], kk, vv, step.positions[off:off + w])
                torch.testing.assert_close(out[off:off + w], ref, atol=2e-5, rtol=1e-4)
                off += w

    @precondition(lambda self: self.tail_start)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tail_start)))
        child = self.next_id
        self.next_id += 1
        self.cache.fork(parent, child)
        self.tail_start[child] = self.tail_start[parent]

    @precondition(lambda self: self.tail_start)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tail_start)))
        self.cache.free(sid)
        del self.tail_start[sid]

    @invariant()
    def stored_values_are_the_codec_round_trip(self):
        self.cache.pool.check_invariants()
        for s, t0 in self.tail_start.items():
            n = self.cache.num_written(s)
            toks = tuple(self.cache.pool.token_ids(s))
            layer = 1
            kv = [_kv_of_prefix(toks[:p + 1], layer) for p in range(n)]
            if not kv:
                continue
            k = torch.stack([x[0] for x in kv])
            exp = self.fmt.decode(self.fmt.encode(k))
            lo = max(n - 2, t0)  # residual window: exact, except prefix hits (never written here)
            exp[lo:] = k[lo:]
            torch.testing.assert_close(self.cache.read_kv(s, layer)[0], exp, atol=1e-6, rtol=0)


CacheMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_cuda_matches_cpu(cfg):
    outs = {}
    for dev in ("cpu", "cuda"):
        cache = PagedKVCache(MODEL, CacheConfig(**cfg), device=dev)
        g = torch.Generator().manual_seed(0)
        cache.add_sequence("a", list(range(9)))
        cache.add_sequence("b", list(range(5)))
        res = []
        for new in (None, [[1], [2]], [[3], [4]]):
            step = cache.extend(["a", "b"], new)
            for layer in range(MODEL.n_layers):
                q, k, v = (torch.randn(step.num_tokens, h, D, generator=g).to(dev) for h in (HQ, HKV, HKV))
                cache.write(layer, k, v)
                res.append(cache.attend(layer, q).cpu())
        res += [x.cpu() for x in cache.read_kv("a")]
        outs[dev] = res
    for x, y in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_adding_sequences_between_extend_and_write_is_safe():
    """Storage may grow between planning and writing (an engine admits a request mid-step)."""
    cache = PagedKVCache(MODEL, CacheConfig(codec="int8", key_granularity="channel", block_size=4))
    drv = Driver(cache)
    cache.add_sequence("a", 3)
    drv.step(cache.extend(["a"]))
    step = cache.extend(["a"], [2])  # fills block 0 from the tail + 1 new token
    for s in range(8):               # tail slots and pages grow now
        cache.add_sequence(s, 9)
    drv.step(step)
    ek, _ = drv.expected_kv("a", 0, 0, 4, cache.key_format, cache.value_format, 4)
    torch.testing.assert_close(cache.read_kv("a", 0)[0], ek, atol=1e-6, rtol=0)


def _fill(cache: PagedKVCache, seq, ids: list[int], gen: torch.Generator) -> None:
    """Register ``ids`` and write random K/V for them in every layer."""
    cache.add_sequence(seq, ids)
    step = cache.extend([seq])
    for layer in range(MODEL.n_layers):
        cache.write(layer, torch.randn(step.num_tokens, HKV, D, generator=gen),
                    torch.randn(step.num_tokens, HKV, D, generator=gen))


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_restore_writes_back_what_read_kv_read(codec):
    """Swap-out / swap-in through the cache's own calls: read_kv, free, allocate_slots, restore.
    With prefix caching the first full blocks come back as hits and only the rest is rewritten;
    the next decode step then attends exactly as in a cache that never swapped."""
    cfg = CacheConfig(codec=codec, block_size=4, num_blocks=8)
    ids = list(range(10))
    caches = [PagedKVCache(MODEL, cfg), PagedKVCache(MODEL, cfg)]
    for c in caches:
        _fill(c, "a", ids, torch.Generator().manual_seed(0))
    swapped = caches[1]
    k, v = swapped.read_kv("a")  # [L, 10, Hkv, D]
    swapped.free("a")
    assert swapped.allocate_slots("a", ids) is not None
    assert swapped.num_cached_tokens("a") == 8 and swapped.num_written("a") == 8  # two full blocks hit
    with pytest.raises(ValueError, match="restore"):
        swapped.restore("a", k[:, :5], v[:, :5])
    step = swapped.restore("a", k, v)
    assert step.query_lens == (2,) and swapped.num_written("a") == 10
    for x, y in zip(swapped.read_kv("a"), caches[0].read_kv("a")):
        assert torch.equal(x, y)
    gen = torch.Generator().manual_seed(1)
    k1, v1 = torch.randn(1, HKV, D, generator=gen), torch.randn(1, HKV, D, generator=gen)
    q = torch.randn(1, HQ, D, generator=gen)
    outs = []
    for c in caches:
        c.extend(["a"], [[99]])
        c.write(0, k1, v1)
        outs.append(c.attend(0, q))
    assert torch.equal(outs[0], outs[1])


def test_evict_cached_forgets_the_prefix_cache_and_capacity_is_a_property():
    cache = PagedKVCache(MODEL, CacheConfig(block_size=4, num_blocks=6))
    assert (cache.num_blocks, cache.capacity_tokens) == (6, 24)
    assert PagedKVCache(MODEL, CacheConfig(block_size=4)).capacity_tokens is None  # unbounded
    gen = torch.Generator().manual_seed(0)
    _fill(cache, "a", list(range(12)), gen)
    cache.free("a")
    assert cache.add_sequence("b", list(range(12))) == 8  # a's first two blocks, still cached
    cache.free("b")
    assert cache.evict_cached(1) == 1  # LRU first: a/b's last block (freed first) goes
    assert cache.evict_cached() == 2 and cache.evict_cached() == 0
    assert cache.add_sequence("c", list(range(12))) == 0
    cache.pool.check_invariants()


def test_manager_holds_no_tensors_and_answers_none_on_shortage():
    from ryzlab.kv.manager import KVCacheManager

    m = KVCacheManager(4, 2)
    assert m.allocate_slots("a", list(range(6))) == ([0, 1, 2], [])
    assert m.allocate_slots("a", [7, 8, 9]) is None  # needs 2 blocks, 1 free: nothing changed
    assert m.num_tokens("a") == 6 and m.pending("a") == 6
    m.commit("a", 6)
    assert m.pending("a") == 0 and m.stats()["num_cached_blocks"] == 3
    assert not [n for n, x in vars(m).items() if isinstance(x, torch.Tensor)]
    with pytest.raises(ValueError, match="unknown sequence"):
        m.commit("zz", 1)


def test_decode_attention_without_lse_is_the_same_softmax():
    """need_lse=False (one rank's decode) takes one fused softmax: the output matches the
    log-sum-exp path within float rounding, and no log-sum-exp comes back."""
    from ryzlab.kv.attention import attention_with_lse

    g = torch.Generator().manual_seed(0)
    B, H, g_, D, S = 3, 2, 4, 16, 40
    q = torch.randn(B, 1, H * g_, D, generator=g)
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    mask = torch.arange(S)[None, None, :] < torch.tensor([5, 17, 40])[:, None, None]   # [B, 1, S]
    ref, lse = attention_with_lse(q, k, v, mask, None)
    out, none = attention_with_lse(q, k, v, mask, None, need_lse=False)
    assert none is None and lse is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_attend_decode_short_path_equals_write_then_attend(dtype):
    """write_attend's decode path (plain pages) stores the same K/V and returns what write + attend
    return, to the bit (greedy tokens must not move), over sequences of different lengths (several blocks, a block
    boundary, one token); a prefill step goes through write + attend unchanged."""
    def make(plain: bool) -> PagedKVCache:
        c = PagedKVCache(MODEL, CacheConfig(block_size=4, num_blocks=32), dtype=dtype)
        assert c._plain
        c._plain = plain
        return c

    fast, ref = make(True), make(False)
    gen = torch.Generator().manual_seed(3)
    lens = [9, 4, 1]
    for c in (fast, ref):
        for i, n in enumerate(lens):
            c.add_sequence(i, n)
    steps = [[list(range(3)), lens]] + [[list(range(3)), [1, 1, 1]]] * 3 + [[[0, 2], [1, 1]]]
    for seqs, writes in steps:
        if writes is not lens:
            for c in (fast, ref):
                for s in seqs:
                    c.allocate_slots(s, [1])
        n = sum(writes)
        sf, sr = fast.extend(seqs, None, num_write=writes), ref.extend(seqs, None, num_write=writes)
        assert sf.is_decode == (writes is not lens)
        for layer in range(MODEL.n_layers):
            q, k, v = (torch.randn(n, h, D, generator=gen).to(dtype) for h in (HQ, HKV, HKV))
            got = fast.write_attend(layer, q, k, v, step=sf)
            ref.write(layer, k, v, step=sr)
            want = ref.attend(layer, q, step=sr)
            assert got.dtype == want.dtype == dtype and got.shape == want.shape == (n, HQ, D)
            assert torch.equal(got, want)  # the same ops on the same layouts: the same bits
    for s in (0, 1, 2):
        for a, b in zip(fast.read_kv(s), ref.read_kv(s)):
            assert torch.equal(a, b)
    for s in (0, 2):
        fast.allocate_slots(s, [1])
    st_ = fast.extend([0, 2], None, num_write=[1, 1])
    wrong = torch.zeros(2, HKV, D, dtype=dtype)  # a query with the K/V heads' count
    with pytest.raises(ValueError, match="q has shape \\(2, 2, 8\\); expected \\[2, 4, 8\\]"):
        fast.write_attend(0, wrong, wrong, wrong, step=st_)


def test_write_attend_short_path_only_where_the_pages_are_plain():
    """Compressed pages, a rotation or context parallelism keep the general path."""
    assert PagedKVCache(MODEL, CacheConfig(block_size=4, num_blocks=8))._plain
    assert not PagedKVCache(MODEL, CacheConfig(block_size=4, num_blocks=8, codec="int8"))._plain
    assert not PagedKVCache(MODEL, CacheConfig(block_size=4, num_blocks=8, codec="fp8_e4m3"))._plain


@pytest.mark.parametrize("num_blocks", [32, None], ids=["bounded", "growing"])
def test_decode_pages_write_read_equals_write_gather(num_blocks):
    """decode_pages (what a compiled decode indexes inside its graph) writes the same slots and
    reads the same keys and values as write_gather, to the bit, also after the pages grew (an
    unbounded cache: the layer's first row moves with the capacity); a prefill step is refused."""
    def make() -> PagedKVCache:
        return PagedKVCache(MODEL, CacheConfig(block_size=4, num_blocks=num_blocks))

    tensors, gather = make(), make()
    gen = torch.Generator().manual_seed(5)
    lens = [9, 4, 1]
    for c in (tensors, gather):
        for i, n in enumerate(lens):
            c.add_sequence(i, n)
        st_ = c.extend([0, 1, 2], None, num_write=lens)
        with pytest.raises(ValueError, match="decode step over plain pages"):
            c.decode_pages(st_)
        kv = torch.randn(2, sum(lens), HKV, D, generator=torch.Generator().manual_seed(1))
        for layer in range(MODEL.n_layers):
            c.write(layer, kv[0], kv[1], step=st_)
    cap0 = tensors.k.capacity
    for i in range(6):
        seqs = [0, 1, 2] if i % 2 == 0 else [0, 2]
        for c in (tensors, gather):
            for s in seqs:
                c.allocate_slots(s, [1] * (40 if i == 3 and s == 2 else 1))   # seq 2 takes more pages
        st_t = tensors.extend(seqs, None, num_write=[1] * len(seqs))
        st_g = gather.extend(seqs, None, num_write=[1] * len(seqs))
        pages = tensors.decode_pages(st_t)
        for layer in range(MODEL.n_layers):
            k, v = (torch.randn(len(seqs), HKV, D, generator=gen) for _ in range(2))
            got = pages.write_read(layer, k, v)
            want = gather.write_gather(layer, k, v, step=st_g)                  # [B, Hkv, S, D]
            for a, b in zip(got, want):
                assert a.shape == b.transpose(1, 2).shape and torch.equal(a, b.transpose(1, 2))
    assert (tensors.k.capacity > cap0) == (num_blocks is None)   # the unbounded one grew mid-way
    for s in (0, 1, 2):
        for a, b in zip(tensors.read_kv(s), gather.read_kv(s)):
            assert torch.equal(a, b)
