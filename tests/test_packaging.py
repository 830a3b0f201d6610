"""The package as users install it: its declared dependencies, the files of a regular wheel, the lm-eval tasks it
ships (run from an installed wheel, outside the checkout), and the one-line report of a missing ``$GSM8K_DIR``."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from l2pd_harness.lm_eval_tasks import TASKS_DIR, utils

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "l2pd_harness"
# Checkout contents a wheel never reads: history, results, caches and earlier build outputs (whose stale files a
# build in place would ship).
NOT_BUILD_INPUTS = shutil.ignore_patterns(".git", "results", "runs", "build", "dist", ".venv", "*.egg-info",
                                          "__pycache__", ".*_cache")
TASK_FILES = ["__init__.py", "utils.py", "arith.yaml", "listops.yaml", "gsm8k_local.yaml", "data/arith_test.jsonl",
              "data/listops_test.jsonl"]
NOT_SET = ("gsm8k_local reads GSM8K from $GSM8K_DIR, which is not set: export GSM8K_DIR=DIR, the directory holding "
           "GSM8K's train.jsonl and test.jsonl")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A regular (non-editable) wheel, built offline from a copy of the checkout."""
    source, out = tmp_path_factory.mktemp("source") / "l2pd-harness", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, source, ignore=NOT_BUILD_INPUTS)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out,
                 source])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


def third_party_imports(folder: Path) -> set[str]:
    """Top-level names of the absolute imports in ``folder``'s Python files, standard library and own package aside."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "l2pd_harness"}


def normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def required_distributions(wheel: Path) -> set[str]:
    """The (normalised) distributions the wheel's metadata requires, optional extras aside."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        requirements = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)(.*)$", archive.read(metadata).decode(), re.M)
    return {normalised(name) for name, rest in requirements if "extra ==" not in rest}


def test_every_direct_import_is_a_declared_dependency(wheel: Path) -> None:
    declared = required_distributions(wheel)
    providers = importlib.metadata.packages_distributions()
    imported = third_party_imports(PACKAGE) | third_party_imports(REPO / "analysis")
    assert {"torch", "lm_eval", "datasets", "yaml"} <= imported  # the scan sees the imports it should
    undeclared = {name: providers.get(name, []) for name in imported
                  if not declared & {normalised(distribution) for distribution in providers.get(name, [])}}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_wheel_ships_the_tasks_the_tiny_model_and_the_hook(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_data = {path.relative_to(REPO).as_posix() for folder in (PACKAGE / "assets", TASKS_DIR)
                    for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert {f"l2pd_harness/lm_eval_tasks/{name}" for name in TASK_FILES} <= shipped_data
    assert {"l2pd_harness/assets/tiny-llada/model.safetensors", "l2pd_harness/assets/tiny-llada/tokenizer.json",
            "l2pd_harness/assets/tiny-llada/learn2pd-filter.safetensors"} <= shipped_data
    missing = shipped_data - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    assert "l2pd_harness_lm_eval.pth" in names


@pytest.mark.slow
def test_installed_wheel_runs_lm_eval_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv, workdir = tmp_path / "venv", tmp_path / "elsewhere"
    workdir.mkdir()
    assert run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv]).returncode == 0
    python = venv / "bin" / "python"
    # --ignore-installed: the system site's editable install stays as it is; the venv's site-packages precede it
    installed = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel])
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "TOKENIZERS_PARALLELISM": "false"}
    located = run([python, "-c", "from l2pd_harness.lm_eval_tasks import TASKS_DIR; print(TASKS_DIR)"], cwd=workdir,
                  env=env)
    tasks_dir = Path(located.stdout.strip())
    assert tasks_dir.is_relative_to(venv), located.stdout + located.stderr

    result = run([python, "-m", "lm_eval", "--model", "l2pd", "--model_args",
                  "gen_length=32,block_length=32,policy=threshold,eotp=true", "--tasks", "arith", "--include_path",
                  tasks_dir, "--limit", "2", "--batch_size", "2"], cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Task: arith ({tasks_dir / 'arith.yaml'})" in result.stderr
    row = re.search(r"^\|arith\s*\|.*\|exact_match\s*\|\S*\s*\|\s*([0-9.]+)\s*\|", result.stdout, re.MULTILINE)
    assert row and 0 <= float(row.group(1)) <= 1, result.stdout


def test_gsm8k_dir_unset_or_missing_says_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GSM8K_DIR", raising=False)
    with pytest.raises(utils.TaskDataError, match=re.escape(NOT_SET)):
        utils.load_gsm8k()
    monkeypatch.setenv("GSM8K_DIR", str(tmp_path / "missing"))
    with pytest.raises(utils.TaskDataError, match=re.escape(f"GSM8K_DIR='{tmp_path / 'missing'}' is not a directory: "
                                                        "export GSM8K_DIR=DIR")):
        utils.load_gsm8k()


def test_gsm8k_files_are_read_with_line_numbers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    row = '{"question": "1 + 1?", "answer": "#### 2"}\n'
    (tmp_path / "train.jsonl").write_text(row * 2)
    (tmp_path / "test.jsonl").write_text(row)
    monkeypatch.setenv("GSM8K_DIR", str(tmp_path))
    dataset = utils.load_gsm8k()
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 2, "test": 1}
    (tmp_path / "test.jsonl").write_text(row + "{not json\n")
    with pytest.raises(utils.TaskDataError, match=r"gsm8k_local test split '.*test.jsonl' line 2 is not valid JSON"):
        utils.load_gsm8k()
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(utils.TaskDataError, match=r"gsm8k_local train split '.*train.jsonl' does not exist"):
        utils.load_gsm8k()


@pytest.mark.slow
def test_stock_lm_eval_cli_ends_with_the_gsm8k_dir_line() -> None:
    """lm-eval calls the task's dataset function itself; what it prints last is the line saying what to set."""
    env = {**{k: v for k, v in os.environ.items() if k != "GSM8K_DIR"}, "TOKENIZERS_PARALLELISM": "false"}
    result = run([sys.executable, "-m", "lm_eval", "--model", "l2pd", "--tasks", "gsm8k_local", "--include_path",
                  TASKS_DIR, "--limit", "1"], env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"lm_eval --tasks gsm8k_local: error: {NOT_SET}")
    assert "Traceback" not in result.stderr
