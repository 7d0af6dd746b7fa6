"""The workbench: grid sweeps over notebooks, their results folders, reports and comparisons.

* :mod:`.spec` — sweep specs (strict YAML) expanded into points;
* :mod:`.point` — one point: its own process and Jupyter kernel (papermill), its run folder;
  :mod:`.reaper` — every process a point started ends with it, its temp files too;
* :mod:`.sweep` — ``run_sweep``: validate every point, hold the results folder, resume;
* :mod:`.executors` — how the points run: local processes or Ray tasks, over one small base;
* :mod:`.report` / :mod:`.report_page` — aggregate ok runs into an offline HTML report;
* :mod:`.compare` — ``ryzlab compare A B``: ratios with bootstrap intervals;
* :mod:`.explorer` — the ipywidgets explorer.

Nothing below this layer imports it: experiments return DataFrames, the workbench runs and stores them.
"""
