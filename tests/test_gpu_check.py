"""benchmarks/gpu_check.sh keeps working: its --tiny run (the tiny config on CPU, gloo, no compile) writes the one
table with every row, a result in each row that can run on CPU, and the reason in each that cannot."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER = "| check | setting | result | peak MiB | note |"


def run_check(tmp_path: Path, *options: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", "--out", str(out), *options], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout, env=env)
    return result, out


def table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines.count(HEADER) == 1, text
    start = lines.index(HEADER)
    assert lines[start + 1] == "|---|---|---|---|---|"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    assert all(len(row) == 5 for row in rows), rows
    return rows


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    result, out = run_check(tmp_path_factory.mktemp("gpu_check"))
    return result, out


def test_the_tiny_check_writes_one_table_to_stdout_and_the_file(tiny_check):
    result, out = tiny_check
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text(encoding="utf-8") == result.stdout
    assert Path(str(out) + ".log").is_file()
    assert len(table_rows(result.stdout)) == 11  # 2 parity, 4 train, 3 sample, 2 torchrun


def test_every_row_that_can_run_on_cpu_has_a_result(tiny_check):
    result, _ = tiny_check
    rows = {(check, setting): (value, peak, note) for check, setting, value, peak, note in table_rows(result.stdout)}
    parity = [v for (check, _), v in rows.items() if check == "parity"]
    assert len(parity) == 2 and all(value.startswith("max abs ") for value, _, _ in parity)
    fp32_error = float(parity[0][0].split()[2])
    assert fp32_error < 1e-4  # the fixture's tolerance (tests/test_parity.py)
    train = [(setting, v) for (check, setting), v in rows.items() if check == "train"]
    assert len(train) == 4
    for setting, (value, peak, note) in train:
        if "torch.compile" in setting:
            assert value == "" and note == "not run: --tiny runs no torch.compile"
        else:
            assert value.endswith(" img/s") and float(value.split()[0]) > 0 and float(peak) > 0
    sample = [(setting, v[0]) for (check, setting), v in rows.items() if check == "sample"]
    assert [s.split(", ")[1:] for s, _ in sample] == [["ancestral 300 steps", "guided s=1.5"],
                                                      ["dpm++2m 20 steps", "guided s=1.5"],
                                                      ["dpm++2m 20 steps", "guided s=1.5 at t/T 0.08-0.58"]]
    assert all(re.fullmatch(r"~?\d+\.\d{3} s/image", value) for _, value in sample)
    launched = [v for (check, _), v in rows.items() if check == "torchrun"]
    assert len(launched) == 2 and all(value.startswith("ok: ") for value, _, _ in launched)
    assert "latest.pt" in launched[0][2] and "backend gloo" in launched[1][2]


def test_rows_that_cannot_run_are_empty_with_the_reason_and_fail_the_check(tmp_path):
    result, out = run_check(tmp_path, "--budget", "1", "--fixture", str(tmp_path / "missing.pt"), timeout=120)
    assert result.returncode == 1
    rows = table_rows(out.read_text(encoding="utf-8"))
    assert len(rows) == 11 and all(value == "" for _, _, value, _, _ in rows)
    assert all(note.startswith("fixture not found") for check, _, _, _, note in rows if check == "parity")
    assert any(note == "not run: the check's 1 s budget was spent" for _, _, _, _, note in rows)
    assert "row(s) without a result" in result.stderr
