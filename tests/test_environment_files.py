"""requirements.txt, environment.yml and hpc_environment.yml name the same packages and versions; .ci/run works.

The YAML files are read with a small line-based parser (no PyYAML dependency): it knows only the shape these
files use — a top-level ``name:``, a ``dependencies:`` list, and a nested ``- pip:`` list.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = "python3 -m pytest -q -n auto --dist loadfile tests"
CONDA_ONLY = {"python", "pip"}
"""Packages an environment file names for conda itself, not as a requirement of the project."""


def _normalise(name: str) -> str:
    """A package name as PyPI compares them (case-insensitive, '-', '_' and '.' alike)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _strip_comment(line: str) -> str:
    """The line without a trailing '# comment' (these files hold no '#' inside values)."""
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()


def _split_spec(spec: str) -> tuple[str, str | None]:
    """('name', 'version') from 'name==1.2', 'name=1.2', 'name>=1.2' or 'name'; the version keeps its operator
    only when it is not an exact pin."""
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(==|=)\s*([^\s=<>!~,]+)|([<>!~]=?.*))?", spec.strip())
    if not match:
        raise ValueError(f"cannot parse package spec {spec!r}")
    name, _, exact, other = match.groups()
    return _normalise(name), exact if exact is not None else (other.strip() if other else None)


def read_requirements(path: Path) -> dict[str, str | None]:
    """Package -> pinned version from a requirements file (comments and blank lines skipped)."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = _strip_comment(line).strip()
        if line:
            name, version = _split_spec(line)
            packages[name] = version
    return packages


@dataclass
class CondaEnvironment:
    """What a conda environment file names: its name, conda packages, pip packages and pip options."""

    name: str | None = None
    conda: dict[str, str | None] = field(default_factory=dict)
    pip: dict[str, str | None] = field(default_factory=dict)
    pip_options: list[str] = field(default_factory=list)


def read_environment(path: Path) -> CondaEnvironment:
    """Parse the ``name``, ``dependencies`` and nested ``pip`` lists of a conda environment file."""
    environment = CondaEnvironment()
    section = None
    pip_indent: int | None = None
    for raw in path.read_text().splitlines():
        line = _strip_comment(raw)
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            key, _, value = text.partition(":")
            section = key
            pip_indent = None
            if key == "name":
                environment.name = value.strip()
            continue
        if section != "dependencies" or not text.startswith("- "):
            continue
        item = text[2:].strip()
        if pip_indent is not None and indent > pip_indent:
            if item.startswith("-"):
                environment.pip_options.append(item)
            else:
                name, version = _split_spec(item)
                environment.pip[name] = version
            continue
        pip_indent = None
        if item == "pip:":
            pip_indent = indent
            continue
        name, version = _split_spec(item)
        environment.conda[name] = version
    return environment


REQUIREMENTS = read_requirements(REPO_ROOT / "requirements.txt")
ENVIRONMENTS = {
    "environment.yml": ("sdm", set()),
    "hpc_environment.yml": ("sdm-hpc", {"mpi4py"}),
}


def test_requirements_are_pinned() -> None:
    assert REQUIREMENTS, "requirements.txt names no packages"
    unpinned = [name for name, version in REQUIREMENTS.items() if not version or not version[0].isdigit()]
    assert not unpinned, f"requirements.txt: pin these with ==: {unpinned}"


@pytest.mark.parametrize("filename", sorted(ENVIRONMENTS))
def test_environment_name_and_python(filename: str) -> None:
    environment = read_environment(REPO_ROOT / filename)
    assert environment.name == ENVIRONMENTS[filename][0]
    assert environment.conda.get("python") == "3.11"
    assert "pip" in environment.conda


@pytest.mark.parametrize("filename", sorted(ENVIRONMENTS))
def test_environment_pins_every_requirement(filename: str) -> None:
    environment = read_environment(REPO_ROOT / filename)
    named = {**environment.conda, **environment.pip}
    wrong = {
        name: (version, named.get(name, "missing"))
        for name, version in REQUIREMENTS.items()
        if named.get(name, "missing") != version
    }
    assert not wrong, f"{filename}: package -> (requirements.txt, {filename}): {wrong}"
    both = set(environment.conda) & set(environment.pip)
    assert not both, f"{filename}: named by conda and pip alike: {sorted(both)}"


@pytest.mark.parametrize("filename", sorted(ENVIRONMENTS))
def test_environment_has_no_unexpected_packages(filename: str) -> None:
    environment = read_environment(REPO_ROOT / filename)
    allowed = set(REQUIREMENTS) | CONDA_ONLY | ENVIRONMENTS[filename][1]
    extra = (set(environment.conda) | set(environment.pip)) - allowed
    assert not extra, f"{filename}: packages not in requirements.txt: {sorted(extra)}"


def test_parser_reads_nested_pip_section(tmp_path: Path) -> None:
    path = tmp_path / "env.yml"
    path.write_text(
        "name: demo  # comment\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - pip\n"
        "  - pip:\n      # a comment\n      - --extra-index-url https://example.invalid/simple\n"
        "      - Foo_Bar==1.2.3\n  - mpi4py>=4.0\n"
    )
    environment = read_environment(path)
    assert environment.name == "demo"
    assert environment.conda == {"python": "3.11", "pip": None, "mpi4py": ">=4.0"}
    assert environment.pip == {"foo-bar": "1.2.3"}
    assert environment.pip_options == ["--extra-index-url https://example.invalid/simple"]


# ---------------------------------------------------------------------------------------------------------------
# .ci/run
# ---------------------------------------------------------------------------------------------------------------


def test_ci_script_is_executable_strict_bash() -> None:
    script = REPO_ROOT / ".ci" / "run"
    assert script.stat().st_mode & stat.S_IXUSR, ".ci/run must be executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert TEST_COMMAND in text
    assert f"python3 -m pip install -q -r requirements.txt && {TEST_COMMAND}\n" in (REPO_ROOT / "README.md").read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize(("pytest_status", "expected"), [(0, 0), (1, 1), (5, 1)])
def test_ci_script_exit_status(tmp_path: Path, pytest_status: int, expected: int) -> None:
    """Run a copy of .ci/run with a stand-in python3 that records its arguments and fakes pytest's status."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "requirements.txt").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$PWD|$*" >> "{calls}"\n'
        f'case "$*" in *pytest*) exit {pytest_status};; esac\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(repo / ".ci" / "run")], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == expected, result.stderr
    assert calls.read_text().splitlines() == [
        f"{repo}|-m pip install -q -r requirements.txt",
        f"{repo}|{TEST_COMMAND.removeprefix('python3 ')}",
    ]
    if pytest_status == 5:
        assert "no tests collected" in result.stderr


def test_the_test_command_runs_each_file_on_one_worker_the_slurm_files_on_the_same_one_longest_first(
        tmp_path: Path) -> None:
    """The README's `-n auto --dist loadfile` with tests/conftest.py's scheduler, on stand-in files whose module
    fixture logs the worker that builds it: each file's fixture is built once (its tests stay on one worker), the
    two Slurm files share a worker (one local cluster at a time), and the longest unit, the Slurm files, starts
    first on its worker."""
    project_conftest = str(REPO_ROOT / "tests" / "conftest.py")
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {project_conftest!r})\n"
        "project = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(project)\n"
        "pytest_xdist_make_scheduler = project.pytest_xdist_make_scheduler\n")
    files = ["test_a.py", "test_b.py", "test_c.py", "test_slurm.py", "test_study_slurm.py"]
    for name in files:
        (tmp_path / name).write_text(
            "import os, pytest\n"
            "@pytest.fixture(scope='module')\n"
            "def built():\n"
            "    with open('built.log', 'a') as log:\n"
            f"        log.write('{name} ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
            + "".join(f"def test_{i}(built): pass\n" for i in range(4)))
    command = [sys.executable, *TEST_COMMAND.split()[1:-1], "-p", "no:cacheprovider", "."]
    command[command.index("auto")] = "2"  # two workers whatever the cores here
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    built = [line.split() for line in (tmp_path / "built.log").read_text().splitlines()]
    assert sorted(name for name, _ in built) == files, "each file's module fixture built exactly once"
    workers = dict(built)
    assert workers["test_slurm.py"] == workers["test_study_slurm.py"] and len(set(workers.values())) == 2
    first_on_its_worker = next(name for name, worker in built if worker == workers["test_slurm.py"])
    assert first_on_its_worker in ("test_slurm.py", "test_study_slurm.py")
