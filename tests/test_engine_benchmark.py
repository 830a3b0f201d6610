"""benchmarks/engine.py and the memory plan: the engine at a real model's shape with random weights, on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from l2pd_harness.decoding.memory import GIB, MemoryPlan, check_memory, plan_memory
from l2pd_harness.decoding.scheduler import DecodeError
from l2pd_harness.loading import config_from_file, model_class
from l2pd_harness.models.llada import LLaDAConfig
from l2pd_harness.settings import make_config

REPO = Path(__file__).resolve().parents[1]
LLADA_8B = REPO / "benchmarks" / "configs" / "llada-8b-instruct.json"
DREAM_7B = REPO / "benchmarks" / "configs" / "dream-v0-instruct-7b.json"


def load_engine_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_engine", REPO / "benchmarks" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


engine_benchmark = load_engine_benchmark()


def run_benchmark(monkeypatch: pytest.MonkeyPatch, *options: str) -> None:
    monkeypatch.setattr(sys, "argv", ["engine.py", *options])
    engine_benchmark.main()


def test_the_8b_config_is_llada_8b_instruct() -> None:
    config = LLaDAConfig.from_json(LLADA_8B)
    with torch.device("meta"):
        model = model_class(config)(config)
    assert engine_benchmark.parameter_count(model) == 8_015_581_184
    assert (config.vocab_size, config.mask_token_id, config.eos_token_id) == (126464, 126336, 126081)


def test_the_dream_config_is_dream_v0_instruct_7b(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = config_from_file(DREAM_7B)
    with torch.device("meta"):
        model = model_class(config)(config)
    assert engine_benchmark.parameter_count(model) == 7_615_616_512  # Qwen2.5-7B's count: the same shape
    out = tmp_path / "dream.json"
    run_benchmark(monkeypatch, "--config", str(DREAM_7B), "--layers", "1", "--batch-sizes", "1", "--gen-lengths",
                  "32", "--caches", "dual", "--tokens-per-step", "8", "--out", str(out))
    (row,) = json.loads(out.read_text())["runs"]
    assert row["passes"] == 4 and row["whole_decode"]


def test_batch_32_at_1024_with_the_dual_cache_fits_an_80_gb_gpu() -> None:
    config = LLaDAConfig.from_json(LLADA_8B)
    cfg = make_config({"gen_length": 1024, "cache": "dual", "batch_size": 32})
    plan = plan_memory(config, cfg, slots=32, longest_prompt=256, dtype=torch.bfloat16)
    weights = 8_015_581_184 * 2
    assert plan.kv_cache == 2 * 32 * 32 * 32 * (256 + 1024 + 1) * 128 * 2  # layers, slots, heads, columns, dim, bf16
    assert weights + plan.total < 80e9


def test_a_batch_that_cannot_fit_is_refused_with_the_numbers() -> None:
    plan = MemoryPlan(kv_cache=30 * GIB, step=5 * GIB)
    check_memory(plan, free=40 * GIB, total=80 * GIB, slots=32, width=1280)
    with pytest.raises(DecodeError, match=r"32 sequences of up to 1280 positions need about 35.0 GiB \(KV cache "
                                          r"30.0, one step 5.0\) besides the weights, but the device has 20.0 of "
                                          r"80.0 GiB free"):
        check_memory(plan, free=20 * GIB, total=80 * GIB, slots=32, width=1280)


def test_engine_benchmark_smoke_at_a_tiny_shape(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                random_checkpoint: Path) -> None:
    out = tmp_path / "engine.json"
    options = ["--config", str(random_checkpoint / "config.json"), "--batch-sizes", "1,3", "--gen-lengths", "64",
               "--tokens-per-step", "8", "--out", str(out)]
    run_benchmark(monkeypatch, *options)
    results = json.loads(out.read_text())
    assert results["setup"]["n_layers"] == 2 and len(results["runs"]) == 6  # 2 batch sizes x 3 caches
    for row in results["runs"]:
        assert row["passes"] == 64 // 8 and row["whole_decode"]
        assert 0 < row["forward_s"] <= row["engine_s"] and 0 <= row["overhead_share"] < 1
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * 64 / row["engine_s"], rel=0.01)  # rounded
    readme = tmp_path / "README.md"
    readme.write_text("# numbers\n<!-- engine-table:start -->\nold\n<!-- engine-table:end -->\nafter\n")
    run_benchmark(monkeypatch, *options, "--readme", str(readme))  # every configuration measured: the table only
    assert len(json.loads(out.read_text())["runs"]) == 6
    table = readme.read_text()
    assert "old" not in table and table.endswith("<!-- engine-table:end -->\nafter\n")
    assert table.count("| 64 | dual | 8 | 8 |") == 2  # batch 1 and 3, 8 passes each
    run_benchmark(monkeypatch, *options, "--passes", "3", "--caches", "dual")  # the first 3 passes only
    partial = [row for row in json.loads(out.read_text())["runs"] if not row["whole_decode"]]
    assert [(row["batch_size"], row["passes"]) for row in partial] == [(1, 3), (3, 3)]


@pytest.mark.slow
def test_engine_benchmark_at_llada_8b_instruct_shape(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real 8B shape (4096 wide, 126k vocabulary) with one layer: one dual-cache pass per decode."""
    out = tmp_path / "engine-8b.json"
    run_benchmark(monkeypatch, "--config", str(LLADA_8B), "--layers", "1", "--batch-sizes", "1",
                  "--gen-lengths", "32", "--tokens-per-step", "32", "--prompt-length", "16", "--caches", "dual",
                  "--out", str(out))
    results = json.loads(out.read_text())
    assert results["setup"]["parameters"] == 8_015_581_184 - 31 * 218_112_000  # 218,112,000 per layer
    assert [row["passes"] for row in results["runs"]] == [1]


@pytest.mark.parametrize("options, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes '1,x' is not a comma-separated list of integers"),
    (["--caches", "ring"], "--caches: 'ring' is not one of ['none', 'prefix', 'dual']"),
    (["--gen-lengths", "48"], "block_length=32 must be a positive divisor of gen_length=48"),
])
def test_bad_options_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path, options: list[str],
                                  message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_benchmark(monkeypatch, "--config", str(LLADA_8B), "--out", str(tmp_path / "e.json"), *options)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
