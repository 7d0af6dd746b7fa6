"""ryzlab bench: prefill and decode tokens/s on the reference model at tiny sizes; bad sizes fail before loading."""
from __future__ import annotations

import json
import statistics

import pytest

from ryzlab.cli import main
from ryzlab.serve.bench import BenchConfig, run_bench


def test_run_bench_times_every_repeat_and_reports_median_and_spread():
    seen = []
    cfg = BenchConfig(model="reference", prompt_tokens=12, output_tokens=3, batch=2, repeats=3, device="cpu")
    res = run_bench(cfg, on_repeat=seen.append)
    assert seen == [0, 1, 2]
    assert len(res.prefill_s) == len(res.decode_s) == 3 and min(res.prefill_s + res.decode_s) > 0
    assert res.tokens_per_s("prefill") == [2 * 12 / s for s in res.prefill_s]
    assert res.tokens_per_s("decode") == [2 * 3 / s for s in res.decode_s]
    assert res.model_name == "ryzlab-reference" and res.device == "cpu" and res.dtype == "float32"
    lines = res.lines()
    assert lines[0].startswith("model=ryzlab-reference") and "batch=2 repeats=3" in lines[0]
    for line, test in zip(lines[2:], ("prefill", "decode")):
        name, tokens, med, lo, hi = line.split()
        v = res.tokens_per_s(test)
        assert name == test and int(tokens) == (12 if test == "prefill" else 3)
        assert float(med) == pytest.approx(statistics.median(v), abs=0.06)
        assert float(lo) == pytest.approx(min(v), abs=0.06) and float(hi) == pytest.approx(max(v), abs=0.06)


def test_bench_cli_json_on_the_reference_model(capsys):
    assert main(["bench", "--model", "reference", "-p", "8", "-n", "2", "-r", "2", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "ryzlab-reference" and out["config"]["prompt_tokens"] == 8
    assert len(out["prefill_tok_s"]) == len(out["decode_tok_s"]) == 2
    assert out["decode_tok_s"] == [2 / s for s in out["decode_s"]]


@pytest.mark.parametrize("args,match", [
    (["-p", "4000", "-n", "200"], "= 4200 exceeds ryzlab-reference's context of 4096 tokens"),
    (["-p", "0"], "prompt_tokens must be >= 1, got 0"),
    (["-r", "0", "-b", "0"], "batch must be >= 1, got 0; repeats must be >= 1, got 0"),
    (["--model", "/no/such/model"], "no such file or folder"),
])
def test_bench_bad_sizes_fail_before_any_work(args, match, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and "%|" not in err  # no progress bar was started
