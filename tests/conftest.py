"""Shared test helpers: fixture modules under tests/fixtures/ are loaded by path."""
from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# A shell that starts pytest in the background (``cmd &``) makes SIGINT ignored, and every
# child inherits that: the Ctrl-C tests' processes would never see their SIGINT. Children of
# a process with a Python handler get the default disposition back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def load_fixture_module(relative: str, name: str):
    """Import ``tests/fixtures/<relative>`` (tests/ is not a package) once, as ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURES / relative)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
