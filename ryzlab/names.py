"""ryzlab's parameter names, parsed in one place.

Every :class:`ryzlab.models.transformer.Transformer` parameter is either top-level
(``tok_embeddings.weight``, ``norm.weight``, ``output.weight``) or ``layers.{i}.{module}.{kind}``
with ``module`` such as ``attention.wq`` / ``feed_forward.w2`` / ``attention_norm`` and ``kind``
``weight`` or ``bias``. The checkpoint readers rename them (Hugging Face, GGUF) and tensor
parallelism picks what to shard by them: all three read the name through :func:`parse_param_name`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ParamName", "parse_param_name", "param_renamer"]

_LAYER_PARAM = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class ParamName:
    """``layers.3.attention.wq.bias`` -> ``ParamName(layer=3, module="attention.wq", kind="bias")``."""

    layer: int
    module: str
    kind: str

    @property
    def proj(self) -> str:
        """The last part of the module (``wq``, ``w2``, ``attention_norm``)."""
        return self.module.rpartition(".")[2]


def parse_param_name(name: str) -> ParamName | None:
    """The per-layer parts of ``name``, or None for a top-level parameter (or no ryzlab name)."""
    m = _LAYER_PARAM.search(name)
    return None if m is None else ParamName(int(m.group(1)), m.group(2), m.group(3))


def param_renamer(top: dict[str, str], layer: dict[str, str], layer_format: str, what: str) -> Callable[[str], str]:
    """A ryzlab-name -> file-name function from two tables.

    ``top`` maps whole top-level names; ``layer`` maps a layer's module (``attention.wq``) to the
    file's module name, placed into ``layer_format`` (``{layer}``, ``{module}``, ``{kind}``). A name
    the tables miss is a bug in the tables (an ``AssertionError`` that says so), not bad input.
    """

    def rename(name: str) -> str:
        if name in top:
            return top[name]
        p = parse_param_name(name)
        if p is None or p.module not in layer:
            raise AssertionError(f"no {what} name for ryzlab parameter {name!r} (mapping table incomplete)")
        return layer_format.format(layer=p.layer, module=layer[p.module], kind=p.kind)

    rename.__doc__ = f"ryzlab parameter name -> {what} name."
    return rename
