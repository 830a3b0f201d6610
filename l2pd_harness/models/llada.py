"""LLaDA: a Llama-style transformer with bidirectional attention (one model, one file).

Parameter names follow LLaDA's released checkpoints (``model.transformer.blocks.{i}.q_proj.weight`` ...), so a
``state_dict`` of :class:`LLaDAModel` is a LLaDA checkpoint and the reverse.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from l2pd_harness.files import read_json
from l2pd_harness.settings import field_kinds

if TYPE_CHECKING:
    from l2pd_harness.decoding.kv_cache import CachePass

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


class ConfigError(ValueError):
    """A config.json value this implementation cannot honour."""


_JSON_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def check_json_types(cls: type, values: dict[str, Any]) -> None:
    """Refuse a config.json value whose JSON type is not its field's. Strict, not converted: LLaDA's own code uses
    the values as they are, where text such as ``"no"`` would be a true ``weight_tying`` and ``"3"`` no token id."""
    kinds = field_kinds(cls)
    for name, value in values.items():
        kind, optional = kinds[name]
        if value is None and optional:
            continue
        number = isinstance(value, int | float if kind is float else kind) and not isinstance(value, bool)
        if not (isinstance(value, bool) if kind is bool else number):
            raise ConfigError(f"{name}={value!r} must be {_JSON_TYPE_NAMES[kind]}{' or null' if optional else ''}")


@dataclass
class LLaDAConfig:
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
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                     "max_sequence_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
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
        for name in ("mask_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LLaDAConfig:
        """Build from config.json content; unknown keys or unsupported variants raise :class:`ConfigError`."""
        for key, allowed in _REQUIRED_VALUES.items():  # first: another model_type also has keys unknown here
            if key in raw and raw[key] not in allowed:
                raise ConfigError(f"{key}={raw[key]!r} is not supported; allowed: {list(allowed)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - _IGNORED_KEYS - set(_REQUIRED_VALUES) - {_TIE_ALIAS})
        if unknown:
            allowed = sorted(known | set(_REQUIRED_VALUES))
            raise ConfigError(f"unknown config.json keys {unknown}; known keys: {allowed}")
        tied = raw.get("weight_tying", False)
        if raw.get(_TIE_ALIAS, tied) != tied:
            raise ConfigError(f"{_TIE_ALIAS}={raw[_TIE_ALIAS]!r} contradicts weight_tying={tied!r}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in raw)
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing}")
        values = {k: v for k, v in raw.items() if k in known}
        check_json_types(cls, values)
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> LLaDAConfig:
        """From a config.json file; what is wrong with it is reported with the file's name."""
        raw = read_json(path, "model config")
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"model config {str(path)!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """config.json content that LLaDA's own code reads too."""
        return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama",
                "activation_type": "silu", "layer_norm_type": "rms", "rope": True, **asdict(self)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as LLaDA does, so bf16 weights give the same statistics.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[batch, seq, head_dim]`` for integer ``positions [batch, seq]``, computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [batch, seq, head_dim]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by the half-split convention LLaDA and Llama share."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


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
        batch, seq, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        """Finish the block for residual ``x [B, T, d]`` given its queries and the keys/values it may see.

        ``key_mask [B, S]`` is true for keys that exist (false for left padding); no causal mask.
        """
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        x = x + self.attn_out(out.transpose(1, 2).reshape(x.shape))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class Transformer(nn.Module):
    """Holds the parameters under LLaDA's names (``wte``, ``blocks``, ``ln_f``, ``ff_out``)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class LLaDAModel(nn.Module):
    """Masked diffusion LM: ``forward(input_ids)`` -> logits ``[batch, seq, vocab_size]`` for every position."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.transformer = Transformer(cfg)

    @property
    def transformer(self) -> Transformer:
        return self.model.transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: CachePass | None = None, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` of ``input_ids [B, T]`` (or ``[B, K]`` at ``logits_index [B, K]`` only).

        ``attention_mask [B, T]``: 1 = token, 0 = padding, default all ones. Positions count real tokens only, so
        a padded row gets the same logits as the row alone. With ``kv_cache`` the rows are a slice of longer
        sequences: the cache pass supplies their positions, the key padding mask, and the other positions'
        keys/values (see :mod:`l2pd_harness.decoding.kv_cache`); ``attention_mask`` is then unused.
        """
        if input_ids.shape[1] > self.config.max_sequence_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_sequence_length="
                             f"{self.config.max_sequence_length}")
        if kv_cache is not None:
            positions, key_mask = kv_cache.positions, kv_cache.key_mask
        elif attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            key_mask = None
        else:
            key_mask = attention_mask.bool()  # [B, T]
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.transformer.wte(input_ids)  # [B, T, d_model]
        for layer, block in enumerate(self.transformer.blocks):
            q, k, v = block.qkv(x, cos, sin)
            if kv_cache is not None:
                k, v = kv_cache.update(layer, k, v)  # [B, kv_heads, S, head_dim]: every key the rows attend to
            x = block.attend(x, q, k, v, key_mask)
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, d_model]
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection of ``hidden [B, T, d]`` -> ``[B, T, vocab_size]``."""
        h = self.transformer.ln_f(hidden)
        weight = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(h, weight[: self.config.vocab_size])
