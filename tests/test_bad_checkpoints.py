"""Malformed model configs, filter checkpoints, trace directories and regression references: each is refused in one
line naming the file and the bad value, never with a traceback or a silently wrong result."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from l2pd_harness.cli import main
from l2pd_harness.filter.model import FilterCard, FilterConfig, FilterError, FilterNet, LearnedFilter, read_filter
from l2pd_harness.filter.traces import TraceError, TraceMeta, load_traces, read_meta, save_traces
from l2pd_harness.filter.train import read_trace_dirs, training_questions
from l2pd_harness.models.llada import ConfigError, LLaDAConfig

L, GEN, PROBLEMS, STEPS = 4, 8, 3, 5
BASE_CONFIG = dict(d_model=32, n_layers=1, n_heads=4, vocab_size=10, mask_token_id=9, eos_token_id=0)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("d_model", "abc", "d_model='abc' must be an integer"),
    ("n_layers", None, "n_layers=None must be an integer"),
    ("mask_token_id", "3", "mask_token_id='3' must be an integer"),
    ("d_model", 32.0, "d_model=32.0 must be an integer"),
    ("rope_theta", "abc", "rope_theta='abc' must be a number"),
    ("rope_theta", 0, "rope_theta=0 must be a positive number"),
    ("weight_tying", "no", "weight_tying='no' must be true or false"),
    ("n_kv_heads", [2], "n_kv_heads=[2] must be an integer or null"),
])
def test_config_values_of_the_wrong_json_type_are_named(key: str, value, expected: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        LLaDAConfig.from_dict({**BASE_CONFIG, key: value})


def test_config_numbers_and_nulls_of_the_right_type_are_accepted() -> None:
    cfg = LLaDAConfig.from_dict({**BASE_CONFIG, "rope_theta": 500000, "n_kv_heads": None, "weight_tying": True})
    assert (cfg.rope_theta, cfg.n_kv_heads, cfg.weight_tying) == (500000, 4, True)


def test_a_mistyped_model_config_is_one_line_from_the_command_line(random_checkpoint: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for item in random_checkpoint.iterdir():
        (ckpt / item.name).write_bytes(item.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "weight_tying": "no"}))
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", str(ckpt), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err == (f"l2pd generate: error: model config {str(ckpt / 'config.json')!r}: weight_tying='no' must be "
                   "true or false\n")


# Filter checkpoints.


@pytest.fixture
def filter_path(tmp_path: Path) -> Path:
    """A valid block-MLP filter checkpoint (block length 4) to damage."""
    cfg = FilterConfig("block_mlp", ("confidence",), block_length=L, hidden_size=8)
    torch.manual_seed(0)
    LearnedFilter(FilterNet(cfg), FilterCard(config=cfg, base_model="sha256:test", accept_threshold=0.7)).save(
        tmp_path / "f.safetensors")
    return tmp_path / "f"


def edit_card(path: Path, edit) -> None:
    card = json.loads(path.with_suffix(".json").read_text())
    edit(card)
    path.with_suffix(".json").write_text(json.dumps(card))


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: c.update(accept_threshold="high"), "accept_threshold='high' must be a number in (0, 1) or null"),
    (lambda c: c.update(accept_threshold=1.5), "accept_threshold=1.5 must be a number in (0, 1) or null"),
    (lambda c: c["config"].update(block_length="abc"), "block_length='abc' is not an integer"),
    (lambda c: c["config"].update(features="confidence"), "features='confidence' must be a list of names from"),
    (lambda c: c.update(training=[]), "training=[] must be a JSON object"),
])
def test_bad_card_values_are_named(filter_path: Path, edit, expected: str) -> None:
    edit_card(filter_path, edit)
    with pytest.raises(FilterError) as err:
        read_filter(filter_path)
    assert str(err.value).startswith(f"filter card {str(filter_path.with_suffix('.json'))!r}: {expected}"), err.value


def test_card_numbers_as_text_are_read_as_numbers(filter_path: Path) -> None:
    edit_card(filter_path, lambda c: c["config"].update(block_length=str(L)))
    assert read_filter(filter_path).card.config.block_length == L


def test_a_card_without_config_is_named(filter_path: Path) -> None:
    edit_card(filter_path, lambda c: c.pop("config"))
    with pytest.raises(FilterError, match=r"f.json' has no 'config' object \(architecture, features"):
        read_filter(filter_path)


def test_weights_of_another_network_are_one_line(filter_path: Path) -> None:
    weights = filter_path.with_suffix(".safetensors")
    tensors = load_file(str(weights))
    save_file({f"other.{name}": tensor for name, tensor in tensors.items()}, str(weights))
    with pytest.raises(FilterError) as err:
        read_filter(filter_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"filter weights {str(weights)!r} do not match the card's "
                                                      "block_mlp network: missing tensors ['mlp.0.bias', ")
    assert message.endswith("'mlp.2.weight'], unexpected tensors ['other.mlp.0.bias', 'other.mlp.0.weight', "
                            "'other.mlp.2.bias', 'other.mlp.2.weight']")


def test_weights_of_another_shape_are_one_line(filter_path: Path) -> None:
    edit_card(filter_path, lambda c: c["config"].update(hidden_size=16))
    with pytest.raises(FilterError, match=r"tensor mlp.0.weight has shape \[8, 4\], the card's network needs "
                                          r"\[16, 4\]$"):
        read_filter(filter_path)


def test_many_tensor_names_are_shortened(filter_path: Path) -> None:
    weights = filter_path.with_suffix(".safetensors")
    save_file({f"extra.{i}": torch.zeros(1) for i in range(10)}, str(weights))
    with pytest.raises(FilterError, match=r"unexpected tensors \['extra.0', 'extra.1', 'extra.2', 'extra.3'\] and "
                                          r"6 more$"):
        read_filter(filter_path)


# Trace directories.


def rows(**change) -> list[dict]:
    """The default problems with ``change`` applied to the second (a value ``...`` removes the field)."""
    problems = [{"task": "arith", "prompt": f"q{i}", "question": f"question {i}", "answer": "#### 1",
                 "reference_canvas": [1] * GEN, "reference_correct": True} for i in range(PROBLEMS)]
    problems[1] = {k: v for k, v in {**problems[1], **change}.items() if v is not ...}
    return problems


def write_traces(trace_dir: Path, meta: dict | None = None, problems: list[dict] | None = None,
                 steps: dict | None = None) -> Path:
    """A consistent synthetic trace directory (3 problems, 5 steps, block length 4, gen length 8), with
    ``meta``/``steps`` entries replaced and ``problems`` instead of the default rows."""
    gen = torch.Generator().manual_seed(0)
    default_steps = {"confidence": torch.rand(STEPS, L, generator=gen), "margin": torch.rand(STEPS, L, generator=gen),
                     "entropy": torch.rand(STEPS, L, generator=gen), "masked": torch.ones(STEPS, L, dtype=torch.bool),
                     "label": torch.rand(STEPS, L, generator=gen) > 0.5, "problem": torch.tensor([0, 1, 2, 0, 1]),
                     "block": torch.tensor([0, 0, 0, 1, 1]), "block_step": torch.zeros(STEPS, dtype=torch.long)}
    base = TraceMeta(base_model="sha256:test", trajectory="oracle", tasks=["arith"], gen_length=GEN, block_length=L,
                     cache="none", eotp=True, data_seed=0, problems=PROBLEMS, steps=STEPS)
    all_steps = {k: v for k, v in {**default_steps, **(steps or {})}.items() if v is not None}
    save_traces(trace_dir, all_steps, rows() if problems is None else problems, base)
    raw_meta = {k: v for k, v in {**asdict(base), **(meta or {})}.items() if v is not ...}
    (trace_dir / "meta.json").write_text(json.dumps(raw_meta))
    return trace_dir


def test_a_consistent_trace_directory_loads(tmp_path: Path) -> None:
    steps, problems, meta = load_traces(write_traces(tmp_path, meta={"block_length": str(L)}))
    assert meta.block_length == L and len(problems) == PROBLEMS and steps["label"].shape == (STEPS, L)


@pytest.mark.parametrize(("meta", "expected"), [
    ({"block_length": "abc"}, "block_length='abc' is not an integer"),
    ({"tasks": "arith"}, "tasks='arith' must be a JSON array"),
    ({"trajectory": "greedy"}, "trajectory='greedy' is not one of ['reference', 'oracle', 'learned', 'rollout']"),
    ({"cache": "paged"}, "cache='paged' is not one of"),
    ({"block_length": 3}, "gen_length"),
    ({"colour": 1}, "unknown settings ['colour']"),
])
def test_bad_meta_values_are_named(tmp_path: Path, meta: dict, expected: str) -> None:
    write_traces(tmp_path, meta=meta)
    with pytest.raises(TraceError) as err:
        read_meta(tmp_path)
    assert str(err.value).startswith(f"trace meta {str(tmp_path / 'meta.json')!r}: ") and expected in str(err.value)


def test_a_meta_without_a_field_is_named(tmp_path: Path) -> None:
    write_traces(tmp_path, meta={"gen_length": ...})
    with pytest.raises(TraceError, match="does not match the trace format .*'gen_length'"):
        read_meta(tmp_path)


@pytest.mark.parametrize(("meta", "problems", "steps", "expected"), [
    ({}, None, {"label": None}, "steps.safetensors lacks tensors ['label']"),
    ({}, None, {"confidence": torch.rand(STEPS, L + 1)}, "tensor 'confidence' has shape [5, 5], expected [5, 4]"),
    ({}, None, {"problem": torch.tensor([0, 1, 2, 0, 7])}, "tensor 'problem' must hold integers in [0, 3)"),
    ({}, None, {"block": torch.tensor([0, 0, 0, 1, 2])}, "tensor 'block' must hold integers in [0, 2)"),
    ({}, [], {}, "meta.json says 5 steps of 3 problems, the files hold 5 steps of 0 problems"),
    ({"problems": 2}, rows()[:2], {}, "tensor 'problem' must hold integers in [0, 2)"),
    ({"gen_length": 16}, None, {"block": torch.zeros(STEPS, dtype=torch.long)},
     "meta.json says gen_length=16, problems.jsonl has reference canvases of length [8]"),
    ({}, rows(question=...), {}, "problem 1 has question=None, expected a JSON str"),
    ({}, rows(question=5), {}, "problem 1 has question=5, expected a JSON str"),
])
def test_inconsistent_trace_directories_are_named(tmp_path: Path, meta: dict, problems, steps: dict,
                                                  expected: str) -> None:
    write_traces(tmp_path, meta, problems, steps)
    with pytest.raises(TraceError) as err:
        read_trace_dirs([tmp_path], ("confidence",), lambda p: False)
    assert str(tmp_path) in str(err.value) and expected in str(err.value), err.value


def test_bad_traces_are_one_line_from_the_command_line(filter_path: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    write_traces(tmp_path / "traces", meta={"block_length": "abc"})
    with pytest.raises(SystemExit) as exited:
        main(["choose-threshold", "--filter", str(filter_path), "--traces", str(tmp_path / "traces"), "--out",
              str(tmp_path / "g.safetensors")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.endswith("meta.json': block_length='abc' is not an integer\n")


@pytest.mark.parametrize(("training", "expected"), [
    ({"val_share": 0.2}, "training.trace_dirs=None is not a list of directories"),
    ({"trace_dirs": "traces/a", "val_share": 0.2}, "training.trace_dirs='traces/a' is not a list of directories"),
    ({"trace_dirs": [], "val_share": "0.2"}, "training.val_share='0.2' is not a number in (0, 1)"),
])
def test_a_card_without_its_training_trace_dirs_is_named(filter_path: Path, training: dict, expected: str) -> None:
    learned = read_filter(filter_path)
    learned.card.training = training
    with pytest.raises(FilterError) as err:
        training_questions(learned.card)
    assert str(err.value).endswith(expected), err.value
