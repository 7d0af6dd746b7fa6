"""Report sections: ``ryzlab.plots.<experiment>.report(df)`` displays that experiment's figures
and tables in a notebook (the sweep report calls it with every ok row of the experiment)."""
from __future__ import annotations

import html
import importlib
import logging
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


def show_table(df: pd.DataFrame, caption: str | None = None, floatfmt: str = "{:.4g}") -> None:
    """Display a DataFrame as an escaped HTML table (values from results are never trusted)."""
    from IPython.display import HTML, display

    body = df.to_html(index=False, escape=True, float_format=floatfmt.format, border=0)
    cap = f"<p><b>{html.escape(caption)}</b></p>" if caption else ""
    display(HTML(cap + body))


def show_text(text: str, tag: str = "p") -> None:
    from IPython.display import HTML, display

    display(HTML(f"<{tag}>{html.escape(text)}</{tag}>"))


def report_section(experiment: str, df: pd.DataFrame) -> None:
    """Call ``ryzlab.plots.<experiment>.report(df)``; a generic table when there is none."""
    try:
        mod: Any = importlib.import_module(f"ryzlab.plots.{experiment}")
    except ModuleNotFoundError:
        log.info("no ryzlab.plots.%s: showing a generic summary", experiment)
        num = df.select_dtypes("number").columns.tolist()
        show_table(df.describe().T.reset_index().rename(columns={"index": "metric"}) if num else df.head(50))
        return
    mod.report(df)
