"""Continuous-batching engine: batch output equals one-at-a-time greedy generation,
preemption (recompute and swap) resumes to the same tokens, prefix caching reuses blocks."""
import pytest
import torch

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.serve.engine import EngineConfig, SamplingParams
from ryzlab.serve.replica import ReplicaSpec, build_engine

MC = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MC.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _engine(num_blocks=200, codec="none", **kw):
    cfg = dict(prefill_chunk=8, max_model_len=128)
    cfg.update(kw)
    return build_engine(ReplicaSpec(model="random", model_config=MC,
                                    cache=CacheConfig(codec=codec, block_size=4, num_blocks=num_blocks),
                                    engine=EngineConfig(**cfg)))


def test_batch_equals_one_request_at_a_time_greedy():
    prompts = _prompts([5, 13, 3, 20, 1, 9])
    eng = _engine()
    batched = eng.generate(prompts, SamplingParams(max_tokens=12))
    # ground truth: the model's own dense-cache greedy decoding, one prompt at a time
    ref = [eng.model.generate(torch.tensor([p]), 12)[0].tolist() for p in prompts]
    assert batched == ref
    single = [eng.generate([p], SamplingParams(max_tokens=12))[0] for p in prompts]
    assert single == ref
    assert eng.counters["batch_size_sum"] > eng.counters["steps"]  # really batched
    assert eng.stats()["kv_cache_usage_perc"] == 0.0  # every block back


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("codec", ["none", "int8"])
def test_preemption_and_resume_give_the_same_tokens(preemption, codec):
    prompts = _prompts([5, 13, 3, 20, 9, 7], seed=1)
    ref = _engine(codec=codec).generate(prompts, SamplingParams(max_tokens=16))
    small = _engine(num_blocks=14, codec=codec, preemption=preemption, enable_prefix_caching=False)
    out = small.generate(prompts, SamplingParams(max_tokens=16))
    assert small.counters["preemptions"] > 0, "the cache was meant to be too small for everybody"
    assert out == ref
    small.cache.pool.check_invariants()
    assert small.cache.pool.num_free_blocks == 14


def test_prefix_cache_reuse_between_requests():
    eng = _engine()
    system = _prompts([16], seed=2)[0]
    a = eng.generate([system + [1, 2, 3]], SamplingParams(max_tokens=4))
    b = eng.generate([system + [4, 5]], SamplingParams(max_tokens=4))
    assert eng.counters["prefix_hit_tokens"] == 16
    assert eng.stats()["prefix_cache_hit_rate"] > 0
    ref = [eng.model.generate(torch.tensor([p]), 4)[0].tolist() for p in (system + [1, 2, 3], system + [4, 5])]
    assert a + b == ref


@pytest.mark.parametrize("split", [False, True])
def test_chunked_prefill_interleaves_with_decode(split):
    """Mixed steps (split_prefill=False): a token for "short" every step while "long" prefills.
    Split steps (the default): decode and prefill steps alternate, and no step holds both."""
    eng = _engine(prefill_chunk=4, max_num_batched_tokens=8, max_num_seqs=4, split_prefill=split)
    eng.add_request("short", [1, 2], SamplingParams(max_tokens=6))
    eng.step()  # "short" prefilled and decoding
    eng.add_request("long", list(range(40)), SamplingParams(max_tokens=2))
    got_short, kinds = 0, []
    for _ in range(5):  # while "long" prefills in chunks of 4, "short" keeps getting tokens
        before = eng.counters["prefill_tokens"], eng.counters["decode_tokens"]
        got_short += sum(len(o.new_tokens) for o in eng.step() if o.request_id == "short")
        kinds.append((eng.counters["prefill_tokens"] > before[0], eng.counters["decode_tokens"] > before[1]))
    if split:
        assert got_short == 3 and kinds == [(False, True), (True, False)] * 2 + [(False, True)]
    else:
        assert got_short == 5 and all(k == (True, True) for k in kinds)


def test_split_steps_give_the_same_tokens_as_mixed_steps():
    prompts = _prompts([5, 13, 3, 20, 1, 9], seed=3)
    mixed = _engine(split_prefill=False)
    split = _engine(split_prefill=True)
    mixed_out = mixed.generate(prompts, SamplingParams(max_tokens=10))
    assert split.generate(prompts, SamplingParams(max_tokens=10)) == mixed_out
    assert split.counters["steps"] > mixed.counters["steps"]  # really split


def test_split_prefill_default_follows_the_attention_path():
    """Split steps only where attention pads a step to its longest query (the torch path); the
    Triton kernel does not pad, so there (as on a GPU) steps mix; projections drive a bare
    scheduler, which mixes."""
    from ryzlab.serve.scheduler import Scheduler

    assert _engine().config.split_prefill is True  # torch attention on this CPU
    eng = _engine()
    eng.cache.kernel = "triton"  # what a cache built with the Triton backend reports
    from ryzlab.serve.engine import Engine

    again = Engine(eng.model, eng.cache, EngineConfig(prefill_chunk=8, max_model_len=128))
    assert again.config.split_prefill is False and again.scheduler.config.split_prefill is False
    assert not Scheduler(eng.cache, EngineConfig()).config.split_prefill


def test_bad_requests_raise_before_any_work():
    eng = _engine(num_blocks=8)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("a", [1] * 120, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="never fit"):
        eng.add_request("b", [1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        eng.add_request("c", [99], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="recompute"):
        EngineConfig(preemption="drop")
    assert not eng.has_work()


def test_abort_frees_blocks():
    eng = _engine(num_blocks=32)
    eng.add_request("x", list(range(20)), SamplingParams(max_tokens=50))
    eng.step()
    assert eng.cache.pool.num_free_blocks < 32
    assert eng.abort("x")
    assert eng.cache.pool.num_free_blocks == 32 and not eng.has_work()


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 1e300])
def test_extreme_temperatures_sample_without_failing(temperature):
    """A tiny temperature is greedy (a one-hot, never NaN); a huge one is uniform but valid."""
    eng = _engine()
    prompts = _prompts([5, 9], seed=3)
    out = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=temperature, seed=1))
    assert [len(o) for o in out] == [6, 6]
    if temperature < 1:
        assert out == eng.generate(prompts, SamplingParams(max_tokens=6))


def test_top_k_one_and_tiny_top_p_are_greedy_and_sampling_is_seeded():
    eng = _engine()
    prompts = _prompts([5, 9], seed=4)
    greedy = eng.generate(prompts, SamplingParams(max_tokens=6))
    assert eng.generate(prompts, SamplingParams(max_tokens=6, temperature=1.0, top_k=1, seed=3)) == greedy
    assert eng.generate(prompts, SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, seed=3)) == greedy
    a = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=1.5, seed=7))
    assert a == eng.generate(prompts, SamplingParams(max_tokens=6, temperature=1.5, seed=7))
    assert a != greedy  # a random model at temperature 1.5 does not follow its argmax for 12 tokens


def test_logprobs_are_the_models_log_softmax():
    eng = _engine()
    prompt = _prompts([7], seed=5)[0]
    eng.add_request("r", prompt, SamplingParams(max_tokens=3, logprobs=4))
    chunks = []
    while eng.has_work():
        chunks += [o.new_tokens for o in eng.step() if o.new_tokens]
    toks = [c[0] for c in chunks]
    with torch.no_grad():
        ref = torch.log_softmax(eng.model(torch.tensor([prompt + toks]))[0].float(), -1)  # [T, V]
    for i, c in enumerate(chunks):
        lp, top = c.logprobs[0]
        row = ref[len(prompt) - 1 + i]
        assert lp == pytest.approx(float(row[toks[i]]), abs=1e-4)
        assert [t for t, _ in top] == row.topk(4).indices.tolist()
        assert top[0][0] == toks[i]  # greedy picks the most likely token


@pytest.mark.parametrize("params,needle", [
    (SamplingParams(seed=2 ** 63), "64-bit"), (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_k=65), "top_k"), (SamplingParams(logprobs=21), "logprobs"),
    (SamplingParams(temperature=float("nan")), "temperature"), (SamplingParams(stop_token_ids=(64,)), "stop_token_ids"),
])
def test_bad_sampling_params_raise_before_queueing(params, needle):
    eng = _engine()
    with pytest.raises(ValueError, match=needle):
        eng.add_request("x", [1, 2], params)
    assert not eng.has_work()


def test_a_failing_sequence_fails_alone():
    """A forward that fails whenever one poisoned request is in the batch: the engine reruns the
    batch's sequences one at a time, fails the culprit alone and the others finish unchanged."""
    prompts = _prompts([5, 13, 3, 20], seed=6)
    ref = _engine().generate(prompts, SamplingParams(max_tokens=8))
    eng = _engine()
    poison = 63
    real = eng.execute

    def forward(seq_ids, inputs):
        if any(poison in x for x in inputs):
            raise RuntimeError("injected failure")
        return real(seq_ids, inputs)

    eng.execute = forward
    for i, p in enumerate(prompts):
        eng.add_request(f"ok{i}", p, SamplingParams(max_tokens=8))
    eng.add_request("bad", [1, 2, poison], SamplingParams(max_tokens=8))
    out, errors = {f"ok{i}": [] for i in range(4)}, {}
    while eng.has_work():
        for o in eng.step():
            if o.error:
                errors[o.request_id] = o.error
            else:
                out[o.request_id] += o.new_tokens
    assert list(errors) == ["bad"] and "injected failure" in errors["bad"]
    assert [out[f"ok{i}"] for i in range(4)] == ref
    assert eng.counters["isolated"] == 5 and eng.counters["failed"] == 1
    assert eng.cache.pool.num_free_blocks == 200


def test_a_failing_sampler_fails_its_request_alone():
    eng = _engine()
    prompts = _prompts([5, 9], seed=8)
    ref = eng.generate(prompts, SamplingParams(max_tokens=4))
    real = eng._sample

    def sample(seq, logits):
        if seq.request_id == "bad":
            raise RuntimeError("probability tensor contains nan")
        return real(seq, logits)

    eng._sample = sample
    eng.add_request("a", prompts[0], SamplingParams(max_tokens=4))
    eng.add_request("bad", prompts[1], SamplingParams(max_tokens=4, temperature=1.0))
    eng.add_request("b", prompts[1], SamplingParams(max_tokens=4))
    out, errors = {"a": [], "b": []}, []
    while eng.has_work():
        for o in eng.step():
            if o.error:
                errors.append(o.request_id)
            else:
                out[o.request_id] += o.new_tokens
    assert errors == ["bad"] and [out["a"], out["b"]] == ref


def test_step_outputs_carry_the_finish_reason():
    """Every output but the last of a request has no reason; the last one (and its TokenChunk)
    says ``stop`` for a stop token -- also when it is the max_tokens-th token -- else ``length``."""
    prompt = _prompts([7], seed=3)[0]
    ids = _engine().generate([prompt], SamplingParams(max_tokens=8))[0]
    k = next(k for k in range(len(ids), 0, -1) if ids[k - 1] not in ids[:k - 1])
    for stop, want in (((ids[k - 1],), "stop"), ((), "length")):
        eng = _engine()
        eng.add_request("r", prompt, SamplingParams(max_tokens=k, stop_token_ids=stop))
        outs = [o for _ in range(100) if eng.has_work() for o in eng.step()]
        assert [t for o in outs for t in o.new_tokens] == ids[:k]
        assert [o.finish_reason for o in outs] == [None] * (k - 1) + [want]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert [o.new_tokens.finish_reason for o in outs][-1] == want



def test_replica_spec_is_validated_once_with_every_problem_and_the_valid_choices():
    import dataclasses
    from types import SimpleNamespace

    from ryzlab.config import ParallelConfig

    with pytest.raises(ValueError) as e:
        ReplicaSpec(model="random", model_config=MC, device="tpu", dtype="float64")
    msg = str(e.value)
    assert "2 problem(s)" in msg and "'cuda:N'" in msg and "'bfloat16'" in msg
    with pytest.raises(ValueError, match="MODEL_CHOICES|reference"):
        ReplicaSpec(model="no/such/model")
    with pytest.raises(ValueError, match="random"):  # a shape for a checkpoint that has its own
        ReplicaSpec(model="reference", model_config=MC)
    with pytest.raises(ValueError, match="tp"):  # 3 ranks cannot split 4 heads
        ReplicaSpec(model="random", model_config=MC, parallel=ParallelConfig(tp=3))
    spec = ReplicaSpec(model="random", model_config=MC, parallel=ParallelConfig(tp=2))
    assert spec.shape == MC and spec.world_size == 2
    with pytest.raises(ValueError, match="process groups"):  # a tp=2 replica needs its groups
        build_engine(spec)
    one = SimpleNamespace(world_size=1)
    with pytest.raises(ValueError, match="tp=1 x cp=1 but the spec says tp=2"):  # tp given twice must agree
        build_engine(spec, groups=SimpleNamespace(tp=one, cp=one, control=one, device="cpu"))
    with pytest.raises(TypeError, match="ReplicaSpec"):
        build_engine(dataclasses.asdict(spec))


# ------------------------------------------------------------------ issue 20: the batched step
def test_batched_step_logits_equal_each_sequence_alone():
    """One ragged forward over many sequences (prefill chunks and decodes mixed) gives each
    sequence the logits it gets alone in its own cache, within float rounding, and the same tokens."""
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.serve.engine import ragged_forward

    eng = _engine()
    model = eng.model
    prompts = _prompts([5, 13, 1, 9], seed=11)

    def fresh():
        return PagedKVCache(MC, CacheConfig(block_size=4, num_blocks=None))

    with torch.inference_mode():
        batch = fresh()
        for i, p in enumerate(prompts):
            batch.allocate_slots(i, p)
        # step 1: every prompt in one ragged forward; steps 2..4: decodes of every sequence
        logits = ragged_forward(model, batch, range(len(prompts)), prompts)
        alone_caches = [fresh() for _ in prompts]
        for c, p in zip(alone_caches, prompts):
            c.allocate_slots(0, p)
        alone = torch.cat([ragged_forward(model, c, [0], [p]) for c, p in zip(alone_caches, prompts)])
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
        for _ in range(3):
            nxt = logits.argmax(-1).tolist()
            assert nxt == alone.argmax(-1).tolist()
            for i, t in enumerate(nxt):
                batch.allocate_slots(i, [t])
                alone_caches[i].allocate_slots(0, [t])
            logits = ragged_forward(model, batch, range(len(prompts)), [[t] for t in nxt])
            alone = torch.cat([ragged_forward(model, c, [0], [[t]]) for c, t in zip(alone_caches, nxt)])
            torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


def test_fused_greedy_sampling_equals_per_row_sampling():
    from ryzlab.serve.sampling import fused_greedy, sample

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: both pick the first maximum
    params = [SamplingParams(), SamplingParams(logprobs=2), SamplingParams(), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(), SamplingParams(top_k=3)]
    fused = fused_greedy(logits, params)
    assert sorted(fused) == [0, 2, 4, 5]  # greedy rows without logprobs only
    assert fused[2] == 7
    for i, tok in fused.items():
        assert tok == sample(logits[i], params[i], None)[0]
    assert fused_greedy(logits[:0], []) == {}


def test_engine_mixed_greedy_and_sampled_requests_match_each_alone():
    """A batch mixing greedy, logprobs and seeded sampling gives every request what it gets alone."""
    prompts = _prompts([6, 3, 9], seed=12)
    kinds = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=5, logprobs=1),
             SamplingParams(max_tokens=5, temperature=0.9, seed=4)]
    alone = []
    for p, sp in zip(prompts, kinds):
        e = _engine()
        e.add_request("x", p, sp)
        got = []
        while e.has_work():
            for o in e.step():
                got.append((list(o.new_tokens), o.new_tokens.logprobs))
        alone.append(got)
    eng = _engine()
    for i, (p, sp) in enumerate(zip(prompts, kinds)):
        eng.add_request(f"r{i}", p, sp)
    together = {f"r{i}": [] for i in range(3)}
    while eng.has_work():
        for o in eng.step():
            together[o.request_id].append((list(o.new_tokens), o.new_tokens.logprobs))
    for i in range(3):
        got, want = together[f"r{i}"], alone[i]
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                assert a[0][0] == pytest.approx(b[0][0], abs=1e-4)


@pytest.mark.slow  # torch.compile's first compile: ~35 s on the loaded 2-core machine
def test_compile_flag_gives_the_same_greedy_tokens():
    """EngineConfig.compile runs the forward through torch.compile (attention over pages eager):
    the same greedy tokens as eager, batched."""
    pytest.importorskip("torch._inductor")
    mc = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)

    def run(compile_):
        eng = build_engine(ReplicaSpec(model="random", model_config=mc,
                                       cache=CacheConfig(block_size=4, num_blocks=64),
                                       engine=EngineConfig(prefill_chunk=8, max_model_len=32, compile=compile_)))
        assert (eng.net is not eng.model) == compile_
        return eng.generate(_prompts([5, 3], seed=13), SamplingParams(max_tokens=6))

    assert run(True) == run(False)


def test_default_max_num_seqs_derives_from_the_kv_capacity():
    from ryzlab.serve.scheduler import max_num_seqs_for

    assert max_num_seqs_for(1024) == 256          # the step's token budget binds
    assert max_num_seqs_for(64) == 64             # the blocks bind: each running sequence holds one at least
    assert max_num_seqs_for(None, 128) == 128     # unbounded cache: the token budget
    with pytest.raises(ValueError, match="num_blocks"):
        max_num_seqs_for(0)


def test_token_range_is_a_slice_of_prompt_plus_output():
    from ryzlab.serve.scheduler import EngineSequence

    s = EngineSequence("r", 0, [1, 2, 3, 4], SamplingParams(), 0.0, output=[5, 6, 7])
    for a in range(8):
        for b in range(a, 9):
            assert s.token_range(a, b) == s.tokens[a:b], (a, b)


def test_compiled_forward_is_one_graph_with_the_paged_attention_operator():
    """Under torch.compile a prefill's paged attention is one opaque operator per layer and a plain
    decode writes and gathers the pages inside the graph (no graph break either way:
    ``fullgraph=True`` refuses any); a prefill then decodes give eager's logits, and the in-graph
    writes land in the cache (its K/V read back equal to eager's). Dynamo's capture with the
    eager backend: the graph inductor would compile, without compiling it."""
    from ryzlab.kv.cache import PagedKVCache
    from ryzlab.models.transformer import Transformer
    from ryzlab.serve.engine import ragged_forward

    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(mc).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    caches = [PagedKVCache(mc, CacheConfig(block_size=4, num_blocks=32)) for _ in range(2)]
    prompts = {0: [5, 7, 9, 11, 13], 1: [3, 2]}
    for c in caches:
        for s, p in prompts.items():
            c.add_sequence(s, len(p))
    with torch.inference_mode():
        inputs = [prompts[0], prompts[1]]
        for _ in range(4):
            want = ragged_forward(model, caches[0], [0, 1], inputs)
            got = ragged_forward(compiled, caches[1], [0, 1], inputs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            inputs = [[int(t)] for t in want.argmax(-1)]
            for c in caches:
                for s, x in zip((0, 1), inputs):
                    c.allocate_slots(s, x)
        for s in prompts:
            for a, b in zip(caches[0].read_kv(s), caches[1].read_kv(s)):
                assert torch.equal(a, b)


def test_compile_warm_up_leaves_nothing_behind_and_serving_compiles_nothing_new():
    """Engine.warm_up runs every graph a serving step needs (prefills of one and of several
    sequences, below and above the packed weights' dense-GEMM row count; decodes of one and of
    several) on scratch sequences: afterwards the cache is empty, the counters untouched, and a
    mixed workload (a lone decode, batched decodes, long and short prefill chunks side by side)
    makes Dynamo build no new graph. Dynamo with the eager backend: the graphs, not their compile."""
    import torch._dynamo

    from ryzlab.models.quant.linear import DENSE_ROWS
    from ryzlab.serve.engine import compile_forward

    mc = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128, max_seq_len=512)
    eng = build_engine(ReplicaSpec(model="random", model_config=mc, weights="int4-g32",
                                   cache=CacheConfig(block_size=16, num_blocks=64),
                                   engine=EngineConfig(prefill_chunk=DENSE_ROWS + 8, max_model_len=400,
                                                       max_num_batched_tokens=2 * DENSE_ROWS)))
    want = eng.generate(_prompts([150, 3, 40, 1], seed=2), SamplingParams(max_tokens=5))
    torch._dynamo.reset()
    eng.net = compile_forward(eng.model, backend="aot_eager")
    free, counters = eng.cache.stats()["num_free_blocks"], dict(eng.counters)
    assert eng.warm_up() > 0
    assert eng.cache.seq_ids() == [] and eng.cache.stats()["num_free_blocks"] == free
    assert dict(eng.counters) == counters
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 5
    got = eng.generate(_prompts([150, 3, 40, 1], seed=2), SamplingParams(max_tokens=5))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert got == want


def test_compiled_models_in_one_process_each_run_their_own_graph():
    """compile_forward skips the module guards (their cost per step), so each model gets a forward
    code object of its own: an int4, a float32 and a bf16 model of one class, compiled in one
    process, each give their own eager logits (with a shared cache, the second ran the first's
    graph and failed on a missing packed buffer)."""
    from ryzlab.models.quant.linear import quantize_weights
    from ryzlab.models.transformer import Transformer
    from ryzlab.serve.engine import compile_forward

    mc = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128)
    torch.manual_seed(0)
    models = [quantize_weights(Transformer(mc).eval(), "int4-g32"), Transformer(mc).eval(),
              Transformer(mc).eval().to(torch.bfloat16)]
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = [m(x) for m in models]
        compiled = [compile_forward(m, backend="aot_eager") for m in models]
        for _ in range(2):
            for c, w in zip(compiled, want):
                torch.testing.assert_close(c(x), w, rtol=0, atol=0)
