"""backend='hf': a checkpoint's own remote code, loaded through transformers from a local directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from l2pd_harness.loading import load_model

CONFIGURATION = '''
from transformers import PretrainedConfig


class WrappedConfig(PretrainedConfig):
    model_type = "wrapped-llada"

    def __init__(self, llada=None, mask_token_id=None, vocab_size=None, eos_token_id=None, **kwargs):
        self.llada, self.mask_token_id, self.vocab_size = llada or {}, mask_token_id, vocab_size
        super().__init__(eos_token_id=eos_token_id, **kwargs)
'''
MODELING = '''
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from l2pd_harness.models.llada import LLaDAConfig, LLaDAModel
from .configuration_wrapped import WrappedConfig


class WrappedModel(PreTrainedModel):
    config_class = WrappedConfig

    def __init__(self, config):
        super().__init__(config)
        self.net = LLaDAModel(LLaDAConfig(**config.llada))
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        return MaskedLMOutput(logits=self.net(input_ids, attention_mask))
'''


def test_remote_code_model_runs_through_the_hf_backend(random_checkpoint: Path, tmp_path: Path) -> None:
    native, tokenizer = load_model(random_checkpoint)
    raw = json.loads((random_checkpoint / "config.json").read_text())
    llada_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                  "mask_token_id", "eos_token_id", "max_sequence_length", "rope_theta")
    config = {"model_type": "wrapped-llada", "llada": {k: raw[k] for k in llada_keys},
              "mask_token_id": raw["mask_token_id"], "eos_token_id": raw["eos_token_id"],
              "vocab_size": raw["vocab_size"],
              "auto_map": {"AutoConfig": "configuration_wrapped.WrappedConfig",
                           "AutoModel": "modeling_wrapped.WrappedModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_wrapped.py").write_text(CONFIGURATION)
    (tmp_path / "modeling_wrapped.py").write_text(MODELING)
    tokenizer.save_pretrained(tmp_path)
    save_file({f"net.{k}": v.contiguous() for k, v in native.state_dict().items()},
              str(tmp_path / "model.safetensors"))

    remote, _ = load_model(tmp_path, backend="hf")
    ids = torch.arange(1, 10)[None]
    assert remote.config.mask_token_id == native.config.mask_token_id
    assert torch.allclose(remote(ids), native(ids), atol=1e-6)
