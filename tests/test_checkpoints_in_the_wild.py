"""Checkpoints as they are published or fine-tuned elsewhere: LLaDA's own config.json keys and its remote code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2pd_harness.loading import load_model
from l2pd_harness.models.llada import ConfigError, LLaDAConfig

# What transformers 4.46's PretrainedConfig.save_pretrained writes for LLaDA's own configuration class
# (configuration_llada.py: every ModelConfig field, use_cache and architectures from LLaDAConfig, and the
# save_pretrained provenance keys), with LLaDA-8B-Instruct's training values, plus train_max_sequence_length, which
# LLaDA training code built on that class adds. The architecture keys (d_model ...) come from the test checkpoint.
OFFICIAL_KEYS = {
    "_name_or_path": "GSAI-ML/LLaDA-8B-Instruct", "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "model_type": "llada", "multi_query_attention": None, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rope": True, "rope_full_precision": True, "scale_logits": False,
    "torch_dtype": "bfloat16", "train_max_sequence_length": 4096, "transformers_version": "4.46.3",
    "use_cache": False, "weight_tying": False,
}
# What transformers 5 writes instead of torch_dtype, and the output flags save_pretrained adds once a user set them.
LATER_TRANSFORMERS_KEYS = {"dtype": "bfloat16", "return_dict": False, "output_hidden_states": True,
                           "output_attentions": False, "tie_word_embeddings": False}
MARKER = "REMOTE_CODE_RAN"
# Remote code that leaves a marker file beside itself when it is imported.
REMOTE_CODE = f"import pathlib\npathlib.Path(__file__).with_name({MARKER!r}).write_text('ran')\n"


def copy_checkpoint(source: Path, target: Path, **config_updates) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_updates}))
    return target


def test_config_saved_by_lladas_own_class_loads(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(random_checkpoint, tmp_path / "fine-tune", **OFFICIAL_KEYS, **LATER_TRANSFORMERS_KEYS)
    model, _ = load_model(ckpt)
    reference, _ = load_model(random_checkpoint)
    ids = torch.arange(1, 12)[None]
    assert torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("activation_type", "swiglu", "activation_type='swiglu' is not supported; allowed: ['silu']"),
    ("block_type", "sequential", "block_type='sequential' is not supported; allowed: ['llama']"),
    ("layer_norm_type", "default", "layer_norm_type='default' is not supported; allowed: ['rms']"),
    ("block_group_size", 2, "block_group_size=2 is not supported; allowed: [1]"),
    ("include_qkv_bias", True, "include_qkv_bias=True is not supported; allowed: [False]"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True contradicts weight_tying=False"),
    ("attn_monitor_layer", 3, "unknown config.json keys ['attn_monitor_layer']"),
])
def test_official_keys_that_change_the_architecture_are_refused(key: str, value, message: str) -> None:
    architecture = dict(d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=10, mask_token_id=9,
                        eos_token_id=0, pad_token_id=0, embedding_size=10, mlp_hidden_size=64, mlp_ratio=4,
                        max_sequence_length=64, rms_norm_eps=1e-5, rope_theta=10000.0)
    LLaDAConfig.from_dict({**OFFICIAL_KEYS, **architecture})  # the same config with LLaDA's values loads
    with pytest.raises(ConfigError) as refused:
        LLaDAConfig.from_dict({**OFFICIAL_KEYS, **architecture, key: value})
    assert message in str(refused.value)


def write_remote_code_checkpoint(source: Path, target: Path, tokenizer_code: bool) -> Path:
    """A copy of ``source`` whose config.json (and, with ``tokenizer_code``, tokenizer) points at remote code."""
    ckpt = copy_checkpoint(source, target, auto_map=OFFICIAL_KEYS["auto_map"])
    (ckpt / "configuration_llada.py").write_text(REMOTE_CODE)
    (ckpt / "modeling_llada.py").write_text(REMOTE_CODE)
    if tokenizer_code:
        tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
        tokenizer_config.update(tokenizer_class="LLaDATokenizer",
                                auto_map={"AutoTokenizer": ["tokenization_llada.LLaDATokenizer", None]})
        (ckpt / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (ckpt / "tokenization_llada.py").write_text(REMOTE_CODE)
    return ckpt


@pytest.mark.slow
def test_remote_code_is_neither_run_nor_asked_about(random_checkpoint: Path, tmp_path: Path) -> None:
    # One subprocess with stdin closed loads both checkpoints: transformers' question "Do you wish to run the custom
    # code?" would wait for an answer on a terminal; here it would show in the output.
    config_code = write_remote_code_checkpoint(random_checkpoint, tmp_path / "config-code", tokenizer_code=False)
    tokenizer_code = write_remote_code_checkpoint(random_checkpoint, tmp_path / "tokenizer-code", tokenizer_code=True)
    script = ("import sys\nfrom l2pd_harness.loading import ModelLoadError, load_model\n"
              "for ckpt in sys.argv[1:]:\n    try:\n        load_model(ckpt)\n    except ModelLoadError as err:\n"
              "        print(f'ModelLoadError: {err}')\n    else:\n        print('loaded')\n")
    result = subprocess.run([sys.executable, "-c", script, str(config_code), str(tokenizer_code)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr and "custom code" not in result.stderr
    loaded, refused = result.stdout.strip().splitlines()
    assert loaded == "loaded"
    assert refused.startswith(f"ModelLoadError: tokenizer of {str(tokenizer_code)!r} cannot be loaded: The "
                              f"repository {tokenizer_code} contains custom code")
    assert not (config_code / MARKER).exists() and not (tokenizer_code / MARKER).exists()
