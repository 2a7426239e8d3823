"""What a fresh interpreter has imported after some code: for the promises that heavy modules load lazily."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable


def assert_loads_none_of(modules: Iterable[str], code: str) -> None:
    """Run `code` in a new interpreter; fail naming any of `modules` it imported (or its error)."""
    check = f"\nimport sys; sys.exit(' '.join(m for m in {tuple(modules)!r} if m in sys.modules) or None)"
    done = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
