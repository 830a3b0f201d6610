"""Dream (Dream-v0-Instruct-7B, Dream-v0-Base-7B): a Qwen2.5-style transformer run with bidirectional attention.

Parameter names follow Dream's released checkpoints (``model.layers.{i}.self_attn.q_proj.weight`` ...
``lm_head.weight``, biases on the query/key/value projections only), so a ``state_dict`` of :class:`DreamModel` is a
Dream checkpoint and the reverse. Dream was initialised from an autoregressive model and kept its shift: the hidden
state at position ``i - 1`` predicts the token at ``i`` (``logit_shift = 1``; :meth:`BidirectionalLM.forward` undoes
it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from l2pd_harness.models.common import (
    BidirectionalLM,
    ConfigError,
    JsonConfig,
    RMSNorm,
    apply_rotary,
    bidirectional_attention,
    config_values,
    require_in_vocabulary,
    require_positive,
    split_heads,
    swiglu,
)

MODEL_TYPE = "Dream"
# config.json keys read and ignored: none can change what this implementation computes.
_IGNORED_KEYS = frozenset({
    # Training only.
    "attention_dropout", "initializer_range",
    # Sliding-window settings, inert while use_sliding_window is false (required below).
    "sliding_window", "max_window_layers",
    # The flag of transformers' autoregressive generate(); no begin-of-text id enters a forward pass here.
    "use_cache", "bos_token_id",
    # Written by transformers' save_pretrained: provenance, class names, remote-code pointers (never run by the
    # native loader), the storage dtype (weights are cast to the dtype asked for).
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
})
# Keys that select a family or a variant: only Dream's published values are implemented.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "model_type": (MODEL_TYPE,),
    "hidden_act": ("silu",),
    "use_sliding_window": (False,),
    "rope_scaling": (None,),
    "use_mrope": (False,),
}


@dataclass
class DreamConfig(JsonConfig):
    """Architecture of a Dream checkpoint, read from its ``config.json`` (Dream's own key names). The properties
    give the engine the names it reads on every family (``n_layers``, ``n_kv_heads``, ``head_dim`` ...)."""

    layers_field: ClassVar[str] = "num_hidden_layers"

    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Inner width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of transformer blocks."""
    num_attention_heads: int
    """Query heads per attention layer; ``hidden_size`` must divide evenly among them."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    vocab_size: int
    """Rows of the embedding and output matrices; logits are returned for all of them."""
    mask_token_id: int
    """Id of the mask token that marks positions still to be decoded."""
    eos_token_id: int
    """Id of end-of-text, which also pads a response up to the canvas length."""
    pad_token_id: int | None = None
    """Padding id of the tokenizer, if the checkpoint names one (informational)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies (Dream-v0-7B: 1e6)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    max_position_embeddings: int = 32768
    """Longest prompt + canvas accepted (checked at forward time)."""
    tie_word_embeddings: bool = False
    """When true the output projection reuses the embedding matrix (no ``lm_head`` tensor)."""

    def __post_init__(self) -> None:
        require_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "max_position_embeddings"))
        if not 0 < self.rope_theta < float("inf"):
            raise ConfigError(f"rope_theta={self.rope_theta} must be a positive number")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim hidden_size/num_attention_heads={self.head_dim} must be even for RoPE")
        require_in_vocabulary(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DreamConfig:
        """Build from config.json content; unknown keys or unsupported variants raise :class:`ConfigError`."""
        return cls(**config_values(cls, raw, _REQUIRED_VALUES, _IGNORED_KEYS))


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=True)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)


class DreamBlock(nn.Module):
    """RMSNorm -> bidirectional GQA attention (biased q/k/v) -> residual; RMSNorm -> SwiGLU -> residual."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated queries ``[B, heads, T, hd]`` and keys/values ``[B, kv_heads, T, hd]`` of the input rows."""
        h, attn = self.input_layernorm(x), self.self_attn
        q = split_heads(attn.q_proj(h), self.n_heads, self.head_dim)
        k = split_heads(attn.k_proj(h), self.n_kv_heads, self.head_dim)
        v = split_heads(attn.v_proj(h), self.n_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        """Finish the block for residual ``x [B, T, d]`` given its queries and the keys/values it may see."""
        x = x + self.self_attn.o_proj(bidirectional_attention(q, k, v, key_mask))
        mlp = self.mlp
        return x + swiglu(self.post_attention_layernorm(x), mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class DreamModel(BidirectionalLM):
    """Dream: ``forward(input_ids)`` -> logits ``[batch, seq, vocab_size]``, shifted so position ``i`` holds the
    prediction for the token at ``i``."""

    logit_shift = 1

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.model.layers = nn.ModuleList(DreamBlock(cfg) for _ in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(self.model.norm(hidden), weight)
