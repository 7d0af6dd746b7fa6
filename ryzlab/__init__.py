"""ryzlab: a Jupyter-driven research and benchmarking workbench for distributed LLM inference."""
import logging

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())


def explore(results_dir="results", **kwargs):
    """Interactive explorer of sweep results (ipywidgets): see :func:`ryzlab.workbench.explorer.explore`."""
    from ryzlab.workbench.explorer import explore as _explore

    return _explore(results_dir, **kwargs)
