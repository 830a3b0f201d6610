"""What the bidirectional model families share: config checks, RMSNorm, RoPE, attention and the forward loop.

A family (:mod:`~l2pd_harness.models.llada`, :mod:`~l2pd_harness.models.dream`) supplies its config, its
parameter names and a block with ``qkv`` and ``attend``; :class:`BidirectionalLM` runs the blocks with or without a
KV cache pass, so the engine, policies, caches and filter see one contract for every family.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from l2pd_harness.files import read_json
from l2pd_harness.settings import field_kinds

if TYPE_CHECKING:
    from l2pd_harness.decoding.kv_cache import CachePass


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


def config_values(cls: type, raw: dict[str, Any], required: dict[str, tuple[Any, ...]], ignored: frozenset[str],
                  aliases: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The values of config.json content ``raw`` that are fields of dataclass ``cls``, after refusing a variant
    ``required`` does not allow, an unknown key (neither a field, ``required``, ``ignored`` nor one of ``aliases``,
    which the family checks itself), a missing required field and a value of the wrong JSON type."""
    for key, allowed in required.items():  # first: another model_type also has keys unknown here
        if key in raw and raw[key] not in allowed:
            raise ConfigError(f"{key}={raw[key]!r} is not supported; allowed: {list(allowed)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known - ignored - set(required) - aliases)
    if unknown:
        raise ConfigError(f"unknown config.json keys {unknown}; known keys: {sorted(known | set(required))}")
    missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in raw)
    if missing:
        raise ConfigError(f"config.json lacks required keys {missing}")
    values = {k: v for k, v in raw.items() if k in known}
    check_json_types(cls, values)
    return values


def require_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name}={getattr(config, name)} must be a positive integer")


def require_in_vocabulary(config: Any, names: tuple[str, ...] = ("mask_token_id", "eos_token_id")) -> None:
    for name in names:
        if not 0 <= getattr(config, name) < config.vocab_size:
            raise ConfigError(f"{name}={getattr(config, name)} is outside the vocabulary [0, {config.vocab_size})")


class JsonConfig:
    """A family's config dataclass: :meth:`from_json` reads a config.json through the family's ``from_dict``."""

    layers_field: ClassVar[str] = "n_layers"
    """The field holding the number of transformer blocks (the family's own key)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JsonConfig:
        raise NotImplementedError

    @classmethod
    def from_json(cls, path: str | Path) -> Any:
        """From a config.json file; what is wrong with it is reported with the file's name."""
        try:
            return cls.from_dict(read_json(path, "model config"))
        except ConfigError as err:
            raise ConfigError(f"model config {str(path)!r}: {err}") from None


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


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``[B, T, heads * head_dim]`` -> ``[B, heads, T, head_dim]``."""
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of queries ``[B, heads, T, hd]`` over keys/values ``[B, kv_heads, S, hd]`` with no causal mask;
    ``key_mask [B, S]`` is true for keys that exist (false for padding). Returns ``[B, T, heads * hd]``."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(2)


def swiglu(h: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(F.silu(gate(h)) * up(h))


def align_predictions(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a model whose position ``i - shift`` predicts ``i``, moved to the position they
    predict; the first ``shift`` positions keep their own (nothing predicts the first token)."""
    return torch.cat([logits[:, :shift], logits[:, : logits.shape[1] - shift]], dim=1) if shift else logits


class BidirectionalLM(nn.Module):
    """Masked diffusion LM: ``forward(input_ids)`` -> logits ``[B, T, vocab_size]``, the logits at position ``i``
    being the model's prediction for the token at ``i``.

    A family sets :attr:`config` (with ``head_dim``, ``rope_theta``, ``max_sequence_length``, ``vocab_size``) and
    implements :meth:`embed`, :meth:`blocks` and :meth:`logits`.
    """

    logit_shift = 0
    """How far before a position its prediction is read: 0 for a model trained as a denoiser (LLaDA), 1 for one
    initialised from an autoregressive model that kept its shift (Dream: the hidden state at ``i - 1`` predicts
    ``i``). :meth:`forward` undoes it; a KV-cache pass must include the ``logit_shift`` positions before its slice."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection of ``hidden [B, T, d]`` -> ``[B, T, vocab_size]``."""
        raise NotImplementedError

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
        x = self.embed(input_ids)  # [B, T, d_model]
        for layer, block in enumerate(self.blocks()):
            q, k, v = block.qkv(x, cos, sin)
            if kv_cache is not None:
                k, v = kv_cache.update(layer, k, v)  # [B, kv_heads, S, head_dim]: every key the rows attend to
            x = block.attend(x, q, k, v, key_mask)
        if logits_index is not None:
            source = (logits_index - self.logit_shift).clamp(min=0)  # [B, K]: where each prediction is read
            return self.logits(x.gather(1, source[..., None].expand(-1, -1, x.shape[-1])))  # [B, K, V]
        return align_predictions(self.logits(x), self.logit_shift)
