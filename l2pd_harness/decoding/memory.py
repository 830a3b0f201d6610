"""Device memory a decode needs beyond the weights, worked out before any work so that a batch that cannot fit is
refused with the numbers instead of failing mid-decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.scheduler import DecodeError
from l2pd_harness.models.llada import LLaDAConfig

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a decode holds besides the weights."""

    kv_cache: int
    """Keys and values of every layer for every batch slot (0 without a cache)."""
    step: int
    """The largest tensors of one step: a full pass's activations, the block's logits and their statistics (float32
    exponentials, whose memory the runner keeps from step to step, and float64 distributions where a policy reads
    margin or entropy)."""

    @property
    def total(self) -> int:
        return self.kv_cache + self.step


def plan_memory(config: LLaDAConfig, cfg: DecodeConfig, slots: int, longest_prompt: int,
                dtype: torch.dtype) -> MemoryPlan:
    """What decoding ``slots`` sequences of up to ``longest_prompt + cfg.gen_length`` positions needs."""
    width = longest_prompt + cfg.gen_length
    item = torch.empty(0, dtype=dtype).element_size()
    kv_cache = 0
    if cfg.cache != "none":  # one spare column per slot (KVCache.reserve)
        kv_cache = 2 * config.n_layers * slots * config.n_kv_heads * (width + 1) * config.head_dim * item
    rows = slots * (2 if cfg.cfg_scale else 1)  # guidance runs a second pass per row
    activations = rows * width * (4 * config.d_model + 3 * config.mlp_hidden_size) * item
    logits = rows * cfg.block_length * config.vocab_size * (item + 4 + 2 * 8)
    return MemoryPlan(kv_cache, activations + logits)


def check_memory(plan: MemoryPlan, free: int, total: int, slots: int, width: int) -> None:
    """Refuse a plan that exceeds the device's ``free`` bytes, with the numbers."""
    if plan.total > free:
        raise DecodeError(f"{slots} sequences of up to {width} positions need about {plan.total / GIB:.1f} GiB "
                          f"(KV cache {plan.kv_cache / GIB:.1f}, one step {plan.step / GIB:.1f}) besides the weights, "
                          f"but the device has {free / GIB:.1f} of {total / GIB:.1f} GiB free: lower batch_size or "
                          "gen_length, or use cache none")
