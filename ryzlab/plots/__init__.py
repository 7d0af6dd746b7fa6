"""Report sections: ``ryzlab.plots.<experiment>.report(df)`` displays that experiment's figures
and tables in a notebook (the sweep report calls it with every ok row of the experiment).

Shared here so every section looks the same: human number formats (3 significant figures,
bytes in KiB/MiB), tables that scroll sideways instead of being cut off, figures embedded as
``<img>`` with alt text written from their titles and axis labels, one-point series drawn as a
labelled marker instead of a line, and one style for measured and one for simulated data.
"""
from __future__ import annotations

import base64
import html
import importlib
import io
import logging
import math
import re
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

MEASURED = {"ls": "-", "marker": "o"}
SIMULATED = {"ls": "--", "marker": "s", "mfc": "none"}
"""Line styles: simulated series are dashed with hollow squares and say "(simulated)" in the legend."""


# ----------------------------------------------------------------------------- numbers
def sig3(x: float) -> str:
    """3 significant figures without scientific notation between 1e-3 and 1e6 (80925.3 -> 80,900)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    mag = math.floor(math.log10(abs(x)))
    if mag >= 6 or mag < -3:
        return f"{x:.3g}"
    digits = max(0, 2 - mag)
    r = round(x, digits if mag < 2 else 2 - mag)
    out = f"{r:,.{digits}f}"
    return out.rstrip("0").rstrip(".") if "." in out else out  # 0.500 -> 0.5, 6.00 -> 6


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; 3 significant figures, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{sig3(n)} {unit}" if unit != "B" or n != int(n) else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def human(value: Any, column: str = "") -> str:
    """One cell as a reader wants it: bytes columns in KiB/MiB, floats to 3 s.f., NaN as '–'."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "bytes" in column:
            return human_bytes(float(value))
        if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
            return f"{int(value):,}" if abs(value) >= 10000 else str(int(value))
        return sig3(float(value))
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.generic):
            return human(value.item(), column)
    except ImportError:
        pass
    return str(value)


def format_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell formatted by :func:`human` (a copy; strings)."""
    out = df.copy()
    for i, c in enumerate(df.columns):
        out.isetitem(i, [human(v, str(c)) for v in df.iloc[:, i]])
    return out


# ----------------------------------------------------------------------------- HTML
def table_html(df: pd.DataFrame, caption: str | None = None, *, left: bool = False) -> str:
    """Escaped HTML table in a sideways-scrolling box; ``left`` aligns every column left (text)."""
    body = format_frame(df).to_html(index=False, escape=True, border=0,
                                    classes="ryz-table ryz-left" if left else "ryz-table")
    cap = f"<p class='ryz-caption'><b>{html.escape(caption)}</b></p>" if caption else ""
    return f"{cap}<div class='ryz-scroll' style='overflow-x:auto;max-width:100%'>{body}</div>"


def show_html(markup: str) -> None:
    from IPython.display import HTML, display

    display(HTML(markup))


def show_table(df: pd.DataFrame, caption: str | None = None) -> None:
    """Display a DataFrame as an escaped HTML table (values from results are never trusted)."""
    show_html(table_html(df, caption))


def show_text(text: str, tag: str = "p") -> None:
    show_html(f"<{tag}>{html.escape(text)}</{tag}>")


def figure_alt(fig: Any) -> str:
    """Alt text from what the figure says about itself: suptitle, each panel's title and axes."""
    parts = []
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        parts.append(sup.get_text())
    for ax in fig.axes:
        if not ax.has_data():
            continue
        what = ax.get_title() or "panel"
        axes = f"{ax.get_ylabel() or 'y'} against {ax.get_xlabel() or 'x'}"
        _, labels = ax.get_legend_handles_labels()
        series = f"; series: {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}" if labels else ""
        parts.append(f"{what}: {axes}{series}")
    return ". ".join(parts) or "figure"


def figure_html(fig: Any, alt: str | None = None) -> str:
    """``fig`` as an embedded PNG ``<img>`` with escaped alt text (default :func:`figure_alt`); closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    alt = html.escape(alt or figure_alt(fig), quote=True)
    return f'<img src="data:image/png;base64,{data}" alt="{alt}" style="max-width:100%">'


def show_figure(fig: Any, alt: str | None = None) -> None:
    """Display ``fig`` as a PNG ``<img>`` with alt text (default :func:`figure_alt`) and close it."""
    show_html(figure_html(fig, alt))


# ----------------------------------------------------------------------------- plotting
def plot_series(ax: Any, x: Any, y: Any, label: str, *, simulated: bool = False, value_fmt=sig3,
                note_dy: float = 5, **kw: Any) -> None:
    """A line with markers; a single point is a marker labelled with its value (a line through one
    point reads as a trend), ``note_dy`` points above it (stagger it where single points share an x).
    Simulated series are dashed, hollow, and say so in the legend."""
    xs, ys = list(x), list(y)
    style = {**(SIMULATED if simulated else MEASURED), **kw}
    label = f"{label} (simulated)" if simulated and "simulated" not in label else label
    if len(xs) == 1:
        style.pop("ls", None)
        ax.plot(xs, ys, ls="none", label=label, **style)
        if ys[0] is not None and not (isinstance(ys[0], float) and math.isnan(ys[0])):
            ax.annotate(value_fmt(float(ys[0])), (xs[0], ys[0]), xytext=(5, note_dy), textcoords="offset points",
                        fontsize=8)
    else:
        ax.plot(xs, ys, label=label, **style)


def from_zero(ax: Any) -> None:
    """Ratio and throughput axes start at zero so a flat result looks flat."""
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)  # headroom for value labels and the legend


def binary_ticks(vmin: float, vmax: float, most: int = 8) -> list[float]:
    """Tick values a power of two bytes apart (0, 8 KiB, 16 KiB): decimal steps read as 4.88 KiB."""
    step = 2.0 ** math.ceil(math.log2(max(vmax - vmin, 1.0) / most))
    first = math.ceil(vmin / step) * step
    return [first + i * step for i in range(int((vmax - first) // step) + 1)]


def bytes_axis(ax: Any, axis: str = "y") -> None:
    """Tick labels in B/KiB/MiB instead of raw byte counts, at power-of-two steps (linear axes)."""
    from matplotlib.ticker import FuncFormatter, Locator

    class BinaryLocator(Locator):
        def __call__(self) -> list[float]:
            return binary_ticks(*sorted(self.axis.get_view_interval()))

    target = getattr(ax, f"{axis}axis")
    if target.get_scale() == "linear":
        target.set_major_locator(BinaryLocator())
    target.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))


def wide_range(values: Any, factor: float = 20.0) -> bool:
    """Log axes only when the data spans ``factor`` or more (else the ticks lie about the range)."""
    v = [float(a) for a in values if a is not None and float(a) > 0]
    return len(v) > 1 and max(v) / min(v) >= factor


def section_id(experiment: str) -> str:
    """HTML id of an experiment's report section (summary rows and the contents link to it)."""
    return "exp-" + re.sub(r"[^A-Za-z0-9_-]", "-", str(experiment))


def report_section(experiment: str, df: pd.DataFrame) -> None:
    """Call ``ryzlab.plots.<experiment>.report(df)``; a generic table when there is none."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(experiment)):
        mod: Any = None
    else:
        try:
            mod = importlib.import_module(f"ryzlab.plots.{experiment}")
        except ModuleNotFoundError:
            mod = None
    if mod is None or not hasattr(mod, "report"):
        log.info("no ryzlab.plots.%s: showing a generic summary", experiment)
        num = df.select_dtypes("number").columns.tolist()
        show_table(df.describe().T.reset_index().rename(columns={"index": "metric"}) if num else df.head(50))
        return
    mod.report(df)
