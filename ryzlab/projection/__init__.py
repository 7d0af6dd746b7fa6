"""Projections of ryzlab's own graph to named hardware: a catalog, a cost model, calibrations, a
serving projection on the real scheduler and a deployment planner. Every figure is *projected*.

Nothing is imported here (the CLI lists devices without torch); import the submodules.
"""
