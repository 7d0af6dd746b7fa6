"""Sweep executors over one small base: :mod:`.base` (summary, provenance, threads), :mod:`.local`
(processes on this machine), :mod:`.ray` and :mod:`.ray_task` (one Ray task per point, driver and
worker side). :func:`ryzlab.workbench.sweep.run_sweep` picks one; none of them imports the sweep."""
