"""Checkpoint loading: round trip, shards, dtype, and the errors a user sees for bad checkpoints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from l2pd_harness.cli import main
from l2pd_harness.files import FileFormatError
from l2pd_harness.loading import ModelLoadError, load_model, save_llada
from l2pd_harness.models.llada import ConfigError, LLaDAConfig
from tests.conftest import write_random_checkpoint

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def test_save_load_round_trip_keeps_state_dict(random_checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(random_checkpoint)
    save_llada(model, tmp_path)
    reloaded = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(random_checkpoint / "model.safetensors"))
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)
    assert tokenizer.mask_token_id == model.config.mask_token_id


def test_tensor_names_are_lladas(random_checkpoint: Path) -> None:
    names = set(load_file(str(random_checkpoint / "model.safetensors")))
    assert "model.transformer.wte.weight" in names
    assert "model.transformer.blocks.1.q_proj.weight" in names
    assert {"model.transformer.ln_f.weight", "model.transformer.ff_out.weight"} <= names


def write_sharded_copy(random_checkpoint: Path, directory: Path) -> Path:
    """``random_checkpoint`` with its tensors split over two shard files and an index."""
    tensors = load_file(str(random_checkpoint / "model.safetensors"))
    names = sorted(tensors)
    shards = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (directory / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / extra).write_bytes((random_checkpoint / extra).read_bytes())
    return directory


def test_sharded_checkpoint_loads_like_single_file(random_checkpoint: Path, tmp_path: Path) -> None:
    single, _ = load_model(random_checkpoint)
    sharded, _ = load_model(write_sharded_copy(random_checkpoint, tmp_path))
    ids = torch.arange(1, 12)[None]
    assert torch.equal(single(ids), sharded(ids))


def test_bfloat16_load(random_checkpoint: Path) -> None:
    model, _ = load_model(random_checkpoint, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model(torch.arange(1, 8)[None]).dtype == torch.bfloat16


def test_missing_and_unexpected_tensors_are_listed(random_checkpoint: Path, tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.transformer.blocks.0.k_proj.weight"]
    tensors["model.transformer.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensors \['model.transformer.blocks.0.k_proj.weight'\], "
                                             r"unexpected tensors \['model.transformer.extra.weight'\]"):
        load_model(tmp_path)


def test_config_errors_name_the_value() -> None:
    base = dict(d_model=32, n_layers=1, n_heads=4, vocab_size=10, mask_token_id=9, eos_token_id=0)
    with pytest.raises(ConfigError, match=r"unknown config.json keys \['hidden_sizes'\]"):
        LLaDAConfig.from_dict({**base, "hidden_sizes": 3})
    with pytest.raises(ConfigError, match=r"block_type='sequential' is not supported; allowed: \['llama'\]"):
        LLaDAConfig.from_dict({**base, "block_type": "sequential"})
    with pytest.raises(ConfigError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        LLaDAConfig.from_dict({**base, "n_kv_heads": 3})
    with pytest.raises(ConfigError, match=r"lacks required keys \['mask_token_id'\]"):
        LLaDAConfig.from_dict({k: v for k, v in base.items() if k != "mask_token_id"})


def test_lladas_own_config_keys_are_accepted() -> None:
    # The keys of GSAI-ML/LLaDA-8B-Instruct's config.json, with its values.
    raw = {"activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
           "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
           "auto_map": {}, "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
           "d_model": 4096, "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
           "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
           "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
           "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 126336,
           "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada",
           "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081,
           "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
           "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
           "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464, "weight_tying": False}
    cfg = LLaDAConfig.from_dict(raw)
    assert (cfg.head_dim, cfg.mlp_hidden_size, cfg.n_kv_heads) == (128, 12288, 32)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)


def test_uncached_hub_id_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*hf download GSAI-ML/LLaDA"):
        load_model("GSAI-ML/LLaDA-8B-Instruct")


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="LLaDA remote code loads on 4.x")
def test_hf_backend_explains_lladas_remote_code(random_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="backend='native'"):
        load_model(random_checkpoint, backend="hf")


def test_bad_dtype_and_backend(random_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"dtype 'fp8' is not one of \["):
        load_model(random_checkpoint, dtype="fp8")
    with pytest.raises(ModelLoadError, match=r"backend 'vllm' is not one of \['native', 'hf'\]"):
        load_model(random_checkpoint, backend="vllm")


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The message ``l2pd`` prints for ``argv``, checked to be one line with exit code 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("model", ["./missing", "/nonexistent-l2pd-model", "~/missing", "runs/a/ckpt", "missing/",
                                   "C:\\models\\llada", "C:/models/llada"])
def test_missing_directory_is_named_not_taken_for_a_hub_id(model: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"^model directory {re.escape(repr(model))} does not exist$"):
        load_model(model)


def test_missing_directory_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["generate", "--model", "./missing", "--prompt", "hi"], capsys)
    assert err == "l2pd generate: error: model directory './missing' does not exist\n"
    with pytest.raises(ModelLoadError, match=f"^model directory {re.escape(repr(str(tmp_path / 'gone')))} does not"):
        load_model(tmp_path / "gone")  # a Path is a directory, whatever its name


def test_missing_directory_in_lm_eval_model_args() -> None:
    from l2pd_harness.lm_eval_model import decoded_with

    with pytest.raises(ModelLoadError, match="^model directory '/nonexistent' does not exist$"):
        decoded_with({"pretrained": "/nonexistent"})


@pytest.mark.parametrize("model", ["owner/na me", "owner/-name", "own--er/name"])
def test_malformed_hub_id_is_named(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"^model {re.escape(repr(model))} is neither an existing checkpoint "
                                             r"directory nor a valid hub id \(owner/name"):
        load_model(model)


def test_file_given_as_model_directory(random_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a file; expected a Hugging Face checkpoint directory"):
        load_model(random_checkpoint / "config.json")


@pytest.mark.parametrize("keep", [0, 5, 40, -64], ids=["empty", "cut-in-header-size", "cut-in-header", "cut-in-data"])
def test_truncated_weight_file_is_named(random_checkpoint: Path, tmp_path: Path, keep: int) -> None:
    ckpt = shutil.copytree(random_checkpoint, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(FileFormatError, match=f"^weight file {re.escape(repr(str(weights)))} is not a readable "
                                              "safetensors file"):
        load_model(ckpt)


def test_truncated_or_missing_shard_is_named(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = write_sharded_copy(random_checkpoint, tmp_path)
    shard = ckpt / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(FileFormatError, match=f"^weight file {re.escape(repr(str(shard)))} is not a readable"):
        load_model(ckpt)
    shard.unlink()
    with pytest.raises(FileFormatError, match=f"^weight file {re.escape(repr(str(shard)))} does not exist$"):
        load_model(ckpt)


@pytest.mark.parametrize(("index", "problem"), [
    ('{"weight_map": {"a": ', "is not valid JSON"),
    ("[]", "holds a JSON list, expected a JSON dict"),
    ('{"metadata": {}}', 'has no "weight_map" object of tensor name -> file name'),
    ('{"weight_map": {"a": 3}}', 'has no "weight_map" object of tensor name -> file name'),
])
def test_malformed_shard_index_is_named(random_checkpoint: Path, tmp_path: Path, index: str, problem: str) -> None:
    ckpt = write_sharded_copy(random_checkpoint, tmp_path)
    (ckpt / INDEX).write_text(index)
    with pytest.raises(FileFormatError, match=f"^shard index {re.escape(repr(str(ckpt / INDEX)))} "
                                              f"{re.escape(problem)}"):
        load_model(ckpt)


@pytest.mark.parametrize(("config", "problem"), [
    ("", "is not valid JSON"), ('{"d_model": 32, "n_lay', "is not valid JSON"), ("\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, expected a JSON dict"),
])
def test_unreadable_config_is_named(random_checkpoint: Path, tmp_path: Path, config: str, problem: str) -> None:
    ckpt = shutil.copytree(random_checkpoint, tmp_path / "ckpt")
    (ckpt / "config.json").write_bytes(config.encode("latin-1"))
    with pytest.raises(FileFormatError, match=f"^model config {re.escape(repr(str(ckpt / 'config.json')))} "
                                              f"{re.escape(problem)}"):
        load_model(ckpt)


@pytest.mark.parametrize("model_type", ["llama", "LLaDA", "dream"])
def test_other_model_type_is_refused_even_with_lladas_keys(random_checkpoint: Path, tmp_path: Path,
                                                           model_type: str) -> None:
    ckpt = shutil.copytree(random_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    expected = f"model config {str(ckpt / 'config.json')!r}: model_type={model_type!r} is not one of " \
               "['Dream', 'llada']"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        load_model(ckpt)


def test_dream_type_with_lladas_keys_names_the_keys(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(random_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "Dream"}))
    with pytest.raises(ConfigError, match=r"^model config .*: unknown config.json keys \['activation_type', "):
        load_model(ckpt)


def test_damaged_tokenizer_is_named(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(random_checkpoint, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text()[:100])
    with pytest.raises(ModelLoadError, match=f"^tokenizer of {re.escape(repr(str(ckpt)))} cannot be loaded: "):
        load_model(ckpt)


def test_damaged_checkpoint_from_the_command_line(random_checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    ckpt = shutil.copytree(random_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"")
    err = one_line_error(["generate", "--model", str(ckpt), "--prompt", "hi"], capsys)
    assert err.startswith(f"l2pd generate: error: weight file {str(ckpt / 'model.safetensors')!r} is not a readable")
    (ckpt / "config.json").write_text("{")
    err = one_line_error(["generate", "--model", str(ckpt), "--prompt", "hi"], capsys)
    assert err.startswith(f"l2pd generate: error: model config {str(ckpt / 'config.json')!r} is not valid JSON")


def test_tied_weights_are_implemented_and_checked(tmp_path: Path) -> None:
    tied = write_random_checkpoint(tmp_path / "tied", weight_tying=True)
    assert "model.transformer.ff_out.weight" not in load_file(str(tied / "model.safetensors"))
    model, _ = load_model(tied)
    hidden = torch.randn(1, 3, model.config.d_model)
    expected = torch.nn.functional.linear(model.transformer.ln_f(hidden), model.transformer.wte.weight)
    assert torch.equal(model.logits(hidden), expected[..., : model.config.vocab_size])
    untied = write_random_checkpoint(tmp_path / "untied")
    (untied / "config.json").write_bytes((tied / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"unexpected tensors \['model.transformer.ff_out.weight'\]"):
        load_model(untied)
