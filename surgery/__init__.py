"""pnc.surgery: graph-level model surgery and partial network cloning, the core of pnc.

The public API, in the order a clone is made::

    from pnc.surgery import trace, cut_points, split, clone, ClonedNetwork
    from pnc.surgery import save_patch, load_patch, export_onnx, detach_onnx

- :func:`trace` (B, C, H, W) example -> :class:`~pnc.surgery.tracing.TracedModel`
  (fx graph + networkx data-flow graph);
- :func:`cut_points` -> the nodes every input-to-output path goes through, verified;
- :func:`split` at a cut -> (prefix, suffix) with ``suffix(prefix(x)) == model(x)``;
- :func:`clone` grafts classes of a source into a target -> :class:`ClonedNetwork`;
- :func:`save_patch` / :func:`load_patch`: the clone as a small ``.pnc`` file {M, R, A, F_c};
- :func:`export_onnx` / :func:`detach_onnx`: ONNX with detachable branches.

Names are imported on first use, so ``import pnc.surgery`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    "trace": "pnc.surgery.tracing",
    "cut_points": "pnc.surgery.cuts",
    "split": "pnc.surgery.splitting",
    "clone": "pnc.surgery.cloning",
    "ClonedNetwork": "pnc.surgery.cloned",
    "save_patch": "pnc.surgery.patch",
    "load_patch": "pnc.surgery.patch",
    "export_onnx": "pnc.surgery.onnx_export",
    "detach_onnx": "pnc.surgery.onnx_detach",
}

__all__ = [
    "trace",
    "cut_points",
    "split",
    "clone",
    "ClonedNetwork",
    "save_patch",
    "load_patch",
    "export_onnx",
    "detach_onnx",
]

if TYPE_CHECKING:
    from pnc.surgery.cloned import ClonedNetwork
    from pnc.surgery.cloning import clone
    from pnc.surgery.cuts import cut_points
    from pnc.surgery.onnx_detach import detach_onnx
    from pnc.surgery.onnx_export import export_onnx
    from pnc.surgery.patch import load_patch, save_patch
    from pnc.surgery.splitting import split
    from pnc.surgery.tracing import trace


def __getattr__(name: str) -> Any:  # PEP 562: import on first use
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pnc.surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
