"""
The benchmark instrument works: C{python -m bench --quick} runs both servers
and prints a table with numbers.  No speed threshold is asserted here (the
figures are printed, never tested).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_bench_prints_a_table_with_numbers() -> None:
    """`python -m bench --quick` exits 0 and prints a table with figures for both servers."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| measure" in out, out
    rows = [line for line in out.splitlines() if line.startswith("| fan-out") or line.startswith("| ingest")
            or line.startswith("| idle") or line.startswith("| resume")]
    assert rows, out
    # every scenario produced a figure for the baseline and for twisted_rt
    numbered = [r for r in rows if re.search(r"\|\s*[\d,.]+ / [\d,.]+\s*\|\s*[\d,.]+ / [\d,.]+\s*\|", r)]
    assert numbered, out
