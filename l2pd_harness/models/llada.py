"""LLaDA: a Llama-style transformer with bidirectional attention (one model, one file).

Parameter names follow LLaDA's released checkpoints (``model.transformer.blocks.{i}.q_proj.weight`` ...), so a
``state_dict`` of :class:`LLaDAModel` is a LLaDA checkpoint and the reverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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

# config.json keys read and ignored, grouped by why none can change what this implementation computes. Every key
# LLaDA's own configuration class (configuration_llada.py: ModelConfig, LLaDAConfig) writes is a field of LLaDAConfig,
# validated in _REQUIRED_VALUES, or here.
_IGNORED_KEYS = frozenset({
    # Training only: dropout, initialisation, the attention kernel and mixed precision it was trained with, and the
    # training length that LLaDA training code built on the official class adds (max_sequence_length is the limit).
    "attention_dropout", "embedding_dropout", "residual_dropout", "init_cutoff_factor", "init_device", "init_fn",
    "init_std", "flash_attention", "precision", "train_max_sequence_length",
    # Settings of variants that _REQUIRED_VALUES refuses (ALiBi, query/key layer norm): inert while those are off.
    "alibi_bias_max", "attention_layer_norm_with_affine",
    # RoPE is always computed in fp32 here, LLaDA's published setting; false would only round it to the input dtype.
    "rope_full_precision",
    # Unused by a bidirectional denoiser: no begin-of-text id enters the forward pass, and use_cache is the flag of
    # transformers' autoregressive generate().
    "bos_token_id", "use_cache",
    # Written by transformers' PretrainedConfig.save_pretrained: provenance, class names and the remote-code pointers
    # (the native loader never runs that code), the storage dtype (weights are cast to the dtype asked for), and
    # output flags of transformers' forward (this model returns logits only).
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "return_dict",
    "output_attentions", "output_hidden_states",
})
# config.json keys that select a model family or an architecture variant: only LLaDA's Llama-style values are
# implemented.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "model_type": ("llada",),
    "activation_type": ("silu",),
    "alibi": (False,),
    "attention_layer_norm": (False,),
    "bias_for_layer_norm": (False, None),
    "block_group_size": (1,),  # LLaDA's code names the tensors of grouped blocks differently
    "block_type": ("llama",),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "input_emb_norm": (False,),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "multi_query_attention": (None, False),
    "rope": (True,),
    "scale_logits": (False,),
}
# transformers' name for weight tying. LLaDA's own code ties by weight_tying alone, so the key is accepted only when it
# says the same: a config where the two disagree does not say which model it is.
_TIE_ALIAS = "tie_word_embeddings"


@dataclass
class LLaDAConfig(JsonConfig):
    """Architecture of a LLaDA checkpoint, read from its ``config.json`` (LLaDA's own key names)."""

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads per attention layer; ``d_model`` must divide evenly among them."""
    vocab_size: int
    """Number of real tokens; logits are returned for these ids only."""
    mask_token_id: int
    """Id of the ``[MASK]`` token that marks positions still to be decoded."""
    eos_token_id: int
    """Id of end-of-text, which also pads a response up to the canvas length."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention when fewer than ``n_heads``); ``None`` means ``n_heads``."""
    mlp_hidden_size: int | None = None
    """Inner width of the SwiGLU MLP; ``None`` means ``mlp_ratio * d_model``."""
    mlp_ratio: int = 4
    """Used only when ``mlp_hidden_size`` is not given."""
    embedding_size: int | None = None
    """Rows of the embedding table (``vocab_size`` padded up); ``None`` means ``vocab_size``."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    max_sequence_length: int = 4096
    """Longest prompt + canvas the model was trained for (checked at forward time)."""
    pad_token_id: int | None = None
    """Padding id of the tokenizer, if the checkpoint names one (informational)."""
    weight_tying: bool = False
    """When true the output projection reuses the embedding matrix (no ``ff_out`` tensor)."""

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.mlp_hidden_size = self.mlp_hidden_size or self.mlp_ratio * self.d_model
        self.embedding_size = self.embedding_size or self.vocab_size
        require_positive(self, ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                     "max_sequence_length"))
        if not 0 < self.rope_theta < float("inf"):
            raise ConfigError(f"rope_theta={self.rope_theta} must be a positive number")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(f"embedding_size={self.embedding_size} is smaller than vocab_size={self.vocab_size}")
        require_in_vocabulary(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LLaDAConfig:
        """Build from config.json content; unknown keys or unsupported variants raise :class:`ConfigError`."""
        values = config_values(cls, raw, _REQUIRED_VALUES, _IGNORED_KEYS, frozenset({_TIE_ALIAS}))
        tied = raw.get("weight_tying", False)
        if raw.get(_TIE_ALIAS, tied) != tied:
            raise ConfigError(f"{_TIE_ALIAS}={raw[_TIE_ALIAS]!r} contradicts weight_tying={tied!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """config.json content that LLaDA's own code reads too."""
        return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama",
                "activation_type": "silu", "layer_norm_type": "rms", "rope": True, **asdict(self)}


class LLaDABlock(nn.Module):
    """RMSNorm -> bidirectional GQA attention -> residual; RMSNorm -> SwiGLU -> residual."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)  # gate (SiLU applied)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated queries ``[B, heads, T, hd]`` and keys/values ``[B, kv_heads, T, hd]`` of the input rows.

        Kept apart from :meth:`attend` so a KV cache can store ``k, v`` and hand back the full key set.
        """
        h = self.attn_norm(x)
        q = split_heads(self.q_proj(h), self.n_heads, self.head_dim)
        k = split_heads(self.k_proj(h), self.n_kv_heads, self.head_dim)
        v = split_heads(self.v_proj(h), self.n_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        """Finish the block for residual ``x [B, T, d]`` given its queries and the keys/values it may see."""
        x = x + self.attn_out(bidirectional_attention(q, k, v, key_mask))
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class Transformer(nn.Module):
    """Holds the parameters under LLaDA's names (``wte``, ``blocks``, ``ln_f``, ``ff_out``)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class LLaDAModel(BidirectionalLM):
    """LLaDA: ``forward(input_ids)`` -> logits ``[batch, seq, vocab_size]`` for every position (no shift)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.transformer = Transformer(cfg)

    @property
    def transformer(self) -> Transformer:
        return self.model.transformer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.transformer.ln_f(hidden)
        weight = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(h, weight[: self.config.vocab_size])
