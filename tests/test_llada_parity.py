"""Native LLaDA vs transformers' LlamaForCausalLM run with a full (bidirectional) attention mask."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from l2pd_harness.models.llada import LLaDAConfig, LLaDAModel


def llama_twin(model: LLaDAModel) -> LlamaForCausalLM:
    """An independent implementation holding the same weights under Llama's names."""
    cfg: LLaDAConfig = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_sequence_length,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)).eval()
    t = model.transformer
    state = {"model.embed_tokens.weight": t.wte.weight, "model.norm.weight": t.ln_f.weight,
             "lm_head.weight": t.ff_out.weight}
    for i, block in enumerate(t.blocks):
        ours = {"input_layernorm": block.attn_norm, "self_attn.q_proj": block.q_proj,
                "self_attn.k_proj": block.k_proj, "self_attn.v_proj": block.v_proj,
                "self_attn.o_proj": block.attn_out, "post_attention_layernorm": block.ff_norm,
                "mlp.gate_proj": block.ff_proj, "mlp.up_proj": block.up_proj, "mlp.down_proj": block.ff_out}
        state.update({f"model.layers.{i}.{name}.weight": module.weight for name, module in ours.items()})
    llama.load_state_dict(state, strict=True)
    return llama


def llama_logits(llama: LlamaForCausalLM, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Bidirectional: every query may see every real key; padding keys are hidden. Positions skip the padding.
    full_mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return llama(ids, attention_mask=full_mask, position_ids=positions).logits


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_llama_with_full_mask(n_kv_heads: int) -> None:
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, mlp_hidden_size=96, vocab_size=101,
                      mask_token_id=100, eos_token_id=0, rope_theta=500000.0, max_sequence_length=64)
    model = LLaDAModel(cfg).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    llama = llama_twin(model)
    ids = torch.randint(0, 101, (3, 17))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding of different widths
    attention_mask[2, :11] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask)
        theirs = llama_logits(llama, ids, attention_mask)
    real = attention_mask.bool()
    diff = (ours - theirs)[real].abs().max().item()
    print(f"max |logit diff| vs LlamaForCausalLM (n_kv_heads={n_kv_heads}, left padding): {diff:.2e}")
    assert diff < 1e-4


def test_left_padding_does_not_change_a_row() -> None:
    torch.manual_seed(1)
    cfg = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, mask_token_id=39,
                      eos_token_id=0, max_sequence_length=64)
    model = LLaDAModel(cfg).eval()
    ids = torch.randint(1, 39, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, with_pad = model(ids), model(padded, mask)[:, 4:]
    assert torch.allclose(alone, with_pad, atol=1e-5)
