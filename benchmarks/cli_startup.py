"""How long `ryzlab --help`, `--version`, every `ryzlab COMMAND --help` and an argument error take.

Each invocation is a fresh process (``python -m ryzlab ...``), timed --repeats times; printed:
median and [min, max] in ms, beside a bare ``python -c pass`` in the same run (the interpreter's
own start-up, the floor on this machine) and the heavy modules the invocation imported (torch,
pandas, transformers, papermill: none is needed to print help). The goal is under 1 s each.

    python benchmarks/cli_startup.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "pandas", "transformers", "papermill")
# prints the heavy modules an invocation imported, after the CLI is done (help and errors exit via SystemExit)
PROBE = ("import sys\nfrom ryzlab.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")


def commands() -> list[str]:
    from ryzlab.cli import build_parser

    return sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def time_it(argv: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, timeout=120)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def heavy_imports(args: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY ")), "HEAVY ['?']")
    return eval(line[6:], {})  # noqa: S307 - a list literal this script printed itself


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="processes per invocation (default 7)")
    a = p.parse_args()
    cases = [["--help"], ["--version"], *[[c, "--help"] for c in commands()], ["kv-plan"], ["serve", "--codec", "x"]]
    print(f"{'invocation':<28} {'median ms':>10} {'min':>8} {'max':>8}  heavy imports")
    base = time_it([sys.executable, "-c", "pass"], a.repeats)
    print(f"{'python -c pass (floor)':<28} {statistics.median(base):>10.0f} {min(base):>8.0f} {max(base):>8.0f}")
    slow = []
    for args in cases:
        ms = time_it([sys.executable, "-m", "ryzlab", *args], a.repeats)
        med = statistics.median(ms)
        heavy = heavy_imports(args)
        print(f"{'ryzlab ' + ' '.join(args):<28} {med:>10.0f} {min(ms):>8.0f} {max(ms):>8.0f}  "
              f"{', '.join(heavy) or '-'}")
        if med >= 1000 or heavy:
            slow.append(" ".join(args))
    print(f"{len(cases)} invocations x {a.repeats} repeats; " +
          (f"over 1 s or importing heavy modules: {', '.join(slow)}" if slow else "all under 1 s, none imports "
                                                                                   + "/".join(HEAVY)))
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
