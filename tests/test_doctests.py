"""Every docstring example of the library runs as written (``doctest`` on each module)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("pnc.adapters", "pnc.surgery", "pnc.zoo")
MODULES = sorted(
    name
    for package in PACKAGES
    for name in [package]
    + [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")]
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run with -s to see)"


def test_public_api_has_examples():
    import pnc.surgery

    missing = [
        n
        for n in pnc.surgery.__all__
        if ">>>" not in (getattr(pnc.surgery, n).__doc__ or "")
        and ">>>" not in (importlib.import_module(pnc.surgery._EXPORTS[n]).__doc__ or "")
    ]
    assert not missing, f"public names without a runnable example: {missing}"
