"""Checkpoint loading: round trip, shards, dtype, and the errors a user sees for bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from l2pd_harness.loading import ModelLoadError, load_model, save_llada
from l2pd_harness.models.llada import ConfigError, LLaDAConfig
from tests.conftest import write_random_checkpoint


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


def test_sharded_checkpoint_loads_like_single_file(random_checkpoint: Path, tmp_path: Path) -> None:
    tensors = load_file(str(random_checkpoint / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / extra).write_bytes((random_checkpoint / extra).read_bytes())
    single, _ = load_model(random_checkpoint)
    sharded, _ = load_model(tmp_path)
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
