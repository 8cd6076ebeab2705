"""Shared test helpers: fixture modules under tests/fixtures/ are loaded by path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_fixture_module(relative: str, name: str):
    """Import ``tests/fixtures/<relative>`` (tests/ is not a package) once, as ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURES / relative)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
