"""The speed benchmark runs end to end on CPU at CI size and prints its table (figures are not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_prints_the_table_and_the_naive_comparison():
    command = [sys.executable, "benchmarks/speed.py", "--batch-size", "1", "--train-steps", "1",
               "--samplers", "dpm++2m:3,ancestral:300", "--max-sample-steps", "2", "--compare-naive"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("| config | device | path | dtype | batch | train img/s") for line in lines)
    rows = [line for line in lines if line.startswith("| tiny | cpu |")]
    assert len(rows) == 5  # ours: train, dpm++2m, ancestral; naive: train, ancestral
    assert any("| dpm++2m | 3 |" in row for row in rows) and any("~" in row for row in rows)  # 300 timed over 2
    assert "sampling dpm++2m 3 steps:" in result.stdout
