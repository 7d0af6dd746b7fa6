"""ryzlab: a Jupyter-driven research and benchmarking workbench for distributed LLM inference."""
import logging

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())
