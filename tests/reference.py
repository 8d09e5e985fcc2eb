"""Where the authors' reference fixtures come from, for every test that checks against them (PSS, ToE, Tri-Level).

Lookup order, first hit wins:

1. the environment variable the test names (e.g. ``PSS_REFERENCE``): it must name an existing file, otherwise the
   test FAILS (a mistyped path must not quietly fall back to another file);
2. the full fixture beside the repository, ``<repo>/../shared/fixtures/<name>``;
3. the small copy shipped in ``tests/fixtures/<name>`` (a few cases per kind, made by ``tests/fixtures/make_small.py``),
   so the checks run on a fresh clone too. Nothing is ever skipped.

The file used is printed (pytest shows it with the output of a failing test) and recorded in :data:`USED`, which
``tests/conftest.py`` lists in the terminal summary of every run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "fixtures"
SMALL = REPO / "tests" / "fixtures"
USED: Dict[str, str] = {}


def reference_path(name: str, env_var: str) -> Path:
    """The fixture file to use for ``name`` (see the module docstring for the order)."""
    if env_var in os.environ:
        path = Path(os.environ[env_var])
        if not path.is_file():
            pytest.fail(f"{env_var}={os.environ[env_var]!r} names no file (unset it to use the shared or the "
                        "small fixture)", pytrace=False)
        return path
    for path in (SHARED / name, SMALL / name):
        if path.is_file():
            return path
    pytest.fail(f"reference fixture {name} not found: set {env_var}, or provide {SHARED / name} or {SMALL / name} "
                "(tests/fixtures/make_small.py writes the small copy)", pytrace=False)


def load_reference(name: str, env_var: str) -> Any:
    """Load fixture ``name`` (``torch.load(..., weights_only=True)``), reporting which file was used."""
    path = reference_path(name, env_var)
    USED[name] = str(path)
    print(f"reference fixture {name}: {path}")
    return torch.load(path, weights_only=True)
