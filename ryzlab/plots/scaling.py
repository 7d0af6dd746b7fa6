"""Report section for the scaling experiment: the model split over tp x cp ranks (device named)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ryzlab.experiments.scaling import scaling_efficiency
from ryzlab.plots import bytes_axis, from_zero, human_bytes, plot_series, show_figure, show_table, show_text, sig3


def layout_labels(s: pd.DataFrame) -> pd.Series:
    """``tp1xcp1`` per point, with ``, N threads`` added where one layout ran at more than one thread
    count per rank (the demo's 1-rank point at 1 and 2 threads) and ``, shm`` where shared memory
    carried its collectives (``cpu_comm``): two bars must not share one label."""
    varies = s.groupby("layout")["threads_per_rank"].transform("nunique") > 1
    words = [f"{lay}, {int(t)} thr" if v and t == t else lay
             for lay, t, v in zip(s["layout"], s["threads_per_rank"], varies)]
    if "comm_transport" in s.columns:   # a layout run through shared memory beside gloo
        words = [f"{w}, shm" if c == "shm" else w for w, c in zip(words, s["comm_transport"])]
    return pd.Series(words, index=s.index)


def report(df: pd.DataFrame) -> None:
    """Decode step and prefill per layout, largest context per layout, communication measured vs
    formula, and one table row per point."""
    s = scaling_efficiency(df)
    devices = ", ".join(sorted(map(str, df["device"].unique()))) if "device" in df.columns else "unknown"
    cpu = "cpu" in devices
    show_text(f"Every figure measured on device={devices}. " + (
        "On a CPU machine the ranks are processes sharing its cores: tensor parallelism cannot speed "
        "anything up there (every rank still waits for two all-reduces per layer, and ranks beyond the "
        "core count oversubscribe it), so the step times below are not a projection of GPU scaling; "
        "memory per rank, communication bytes and exactness are device-independent." if cpu else
        "Speedup and efficiency are against the world size 1 point of the same sweep.")
        + (" Threads per rank: " + ", ".join(map(str, sorted(df["threads"].dropna().astype(int).unique())))
           + "; a world size N point with T threads per rank uses N x T threads, so speedup and efficiency are "
             "only computed against a 1-rank point with N x T threads (empty otherwise, the note says why): "
             "against fewer threads they would mix the added cores with the layout." if "threads" in df.columns
           else ""))
    s = s.sort_values(["world_size", "tp", "threads_per_rank", "context"])
    s["layout"] = layout_labels(s)
    layouts = list(dict.fromkeys(s["layout"]))
    series = list(s.groupby(["codec", "context", "batch"]))
    width = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for k, ((codec, context, batch), g) in enumerate(series):
        g = g.set_index("layout").reindex(layouts)
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(layouts))]
        label = f"{codec}, context {int(context)}, batch {int(batch)}"
        b0 = axes[0].bar(xs, g["step_ms"], width, label=label)
        b1 = axes[1].bar(xs, g["largest_context"], width, label=label)
        axes[0].bar_label(b0, labels=[sig3(v) for v in g["step_ms"]], fontsize=7)
        axes[1].bar_label(b1, labels=[sig3(v) for v in g["largest_context"]], fontsize=7)
    for ax in axes[:2]:
        ax.set_xticks(range(len(layouts)), layouts)
    axes[0].set(xlabel="layout (tp x cp)", ylabel="decode step, median (ms)", title=f"Decode step ({devices}, measured)")
    axes[1].set(xlabel="layout (tp x cp)", ylabel="tokens",
                title="Largest context in the per-rank KV budget (allocated and run)")
    sharded = s[s["world_size"] > 1]
    if sharded["context"].nunique() > 1:  # bytes per step against context: flat is the claim
        for (layout, batch), g in sharded.groupby(["layout", "batch"]):
            g = g.sort_values("context")
            # measured thick and solid, formula thin and dotted on top: both stay visible when equal
            plot_series(axes[2], g["context"], g["comm_bytes_per_step"], f"{layout}, batch {batch}: measured",
                        lw=4, alpha=0.5, value_fmt=human_bytes)
            plot_series(axes[2], g["context"], g["comm_formula_per_step"], f"{layout}, batch {batch}: formula",
                        ls=":", marker="x", color="black", value_fmt=human_bytes)
        axes[2].set_xscale("log", base=2)
        axes[2].set(xlabel="context (tokens)")
    else:
        g = sharded.groupby("layout")[["comm_bytes_per_step", "comm_formula_per_step"]].median().reindex(
            [x for x in layouts if x in set(sharded["layout"])])
        xs = range(len(g))
        bm = axes[2].bar([x - 0.2 for x in xs], g["comm_bytes_per_step"], 0.4, label="measured at the call sites")
        bf = axes[2].bar([x + 0.2 for x in xs], g["comm_formula_per_step"], 0.4, label="formula (computed)",
                         color="none", edgecolor="black", hatch="..")
        axes[2].bar_label(bm, labels=[human_bytes(v) for v in g["comm_bytes_per_step"]], fontsize=7)
        axes[2].bar_label(bf, labels=[human_bytes(v) for v in g["comm_formula_per_step"]], fontsize=7)
        axes[2].set_xticks(list(xs), list(g.index))
        axes[2].set(xlabel="layout (tp x cp)")
    for ax in axes:  # from zero, with headroom: the value labels on the tallest bars met the legend and title
        from_zero(ax)
    bytes_axis(axes[2])
    axes[2].set(ylabel="bytes sent per decode step per rank", title=f"Communication per decode step ({devices})")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left" if ax is axes[2] else "best")  # comm: the tall bars are right
    fig.tight_layout()
    show_figure(fig)
    cols = [c for c in ("device", "model", "layout", "codec", "context", "batch", "step_ms", "tokens_per_s",
                        "threads_per_rank", "speedup", "scaling_efficiency", "prefill_ms",
                        "weight_bytes_per_rank", "kv_bytes_per_rank",
                        "comm_bytes_per_step", "comm_formula_per_step", "largest_context", "context_gain",
                        "logits_rel_err_vs_ws1", "speedup_note") if c in s.columns]
    show_table(s[cols], "Per point: medians over timed decode steps (slowest rank); speedup and efficiency against "
                        "the world size 1 point with the same total threads, context gain against the world size 1 "
                        "point (empty without one)")
