"""Fast-dLLM's block-wise approximate KV cache, one slot per in-flight sequence.

At the first pass of a block the whole sequence is computed and every position's keys/values are stored
(:meth:`KVCache.refresh`). The block's later passes compute only a slice of the sequence, the queries, write the
slice's fresh keys/values into the store and take every other position's from it (:meth:`KVCache.reuse`):
``prefix`` recomputes the block and everything after it, ``dual`` the block alone. Stale by design: the stored
values of positions outside the slice were computed before this block's commits.

Sequences are left-aligned in their slot, so a column is a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from l2pd_harness.models.llada import LLaDAConfig


@dataclass
class CachePass:
    """One forward pass's view of the cache, handed to the model as ``kv_cache``."""

    store: KVCache
    slots: torch.Tensor
    """``[B]`` slot of each row."""
    positions: torch.Tensor
    """``[B, Q]`` position of each query column."""
    key_mask: torch.Tensor
    """``[B, S]`` true for key columns that exist."""
    write: bool
    """True on a refresh pass: the queries are whole sequences and their keys/values are stored."""
    query_valid: torch.Tensor | None = None
    """``[B, Q]`` on a reuse pass: query columns that are real (rows with shorter slices are padded)."""
    slot_range: slice | None = None
    """On a reuse pass whose rows sit in consecutive slots in order: those slots, so reads are views."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, kv_heads, S, hd]`` the queries attend to, given the queries' own ``k, v``."""
        if self.write:
            self.store.write(layer, self.slots, k, v)
            return k, v
        self.store.write_queries(layer, self.slots, self.positions, self.query_valid, k, v,
                                 spare=self.key_mask.shape[1] - 1)
        return self.store.read(layer, self.slots, self.slot_range, width=self.key_mask.shape[1])


class KVCache:
    """Per layer, keys and values ``[slots, kv_heads, width, head_dim]``; ``width`` grows with the longest
    sequence stored, plus one spare column that absorbs writes of padded query columns."""

    def __init__(self, config: LLaDAConfig, slots: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.slots = config.n_layers, slots
        self.shape = (slots, config.n_kv_heads, 0, config.head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def width(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, width: int) -> None:
        """Make room for sequences of ``width`` positions (existing entries are kept)."""
        if width + 1 <= self.width:
            return
        slots, heads, _, head_dim = self.shape
        grown = [torch.zeros(slots, heads, width + 1, head_dim, dtype=self.dtype, device=self.device)
                 for _ in range(2 * self.num_layers)]
        for old, new in zip(self.keys + self.values, grown, strict=False):
            new[:, :, : old.shape[2]] = old
        self.keys, self.values = grown[: self.num_layers], grown[self.num_layers:]

    def refresh(self, slots: torch.Tensor, lengths: torch.Tensor, width: int) -> CachePass:
        """A full pass over sequences ``[B, S]`` of ``lengths [B]`` (right-padded to ``S = width``, the longest)
        that stores their keys/values."""
        self.reserve(width)
        columns = torch.arange(width, device=lengths.device)
        return CachePass(self, slots, columns.expand(len(slots), width), columns < lengths[:, None], write=True)

    def reuse(self, slots: torch.Tensor, host_slots: list[int], query_positions: torch.Tensor,
              lengths: torch.Tensor, width: int) -> CachePass:
        """A pass whose queries are ``query_positions [B, Q]`` of sequences of ``lengths [B]`` (the longest
        ``width``) in ``slots`` (``host_slots`` as the host knows them); the rest of each sequence comes from the
        store."""
        valid = query_positions < lengths[:, None]  # [B, Q]
        key_mask = torch.arange(width + 1, device=lengths.device) < lengths[:, None]  # [B, S + 1], spare masked
        first = host_slots[0]
        consecutive = host_slots == list(range(first, first + len(host_slots)))
        return CachePass(self, slots, query_positions, key_mask, write=False, query_valid=valid,
                         slot_range=slice(first, first + len(host_slots)) if consecutive else None)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        width = k.shape[2]
        self.keys[layer][slots, :, :width] = k
        self.values[layer][slots, :, :width] = v

    def write_queries(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, spare: int) -> None:
        """Store the queries' fresh ``k, v [B, kv_heads, Q, hd]`` at their ``positions [B, Q]``; padded query
        columns go to the ``spare`` column, which the key mask hides. A row's query slice is the same on every pass
        of its block and is recomputed on each, so what the store held there is never read again before the next
        refresh: writing in place gives the same attention as writing into a copy, without the copy."""
        target = positions.masked_fill(~valid, spare)  # [B, Q]
        # Advanced indices on dims 0 and 2 around a slice: the indexed view is [B, Q, kv_heads, hd].
        self.keys[layer][slots[:, None], :, target] = k.transpose(1, 2)
        self.values[layer][slots[:, None], :, target] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, slot_range: slice | None,
             width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, kv_heads, width, hd]`` of ``slots``: views of the store when the rows sit in
        ``slot_range``, a gathered copy otherwise."""
        rows = slots if slot_range is None else slot_range
        return self.keys[layer][rows, :, :width], self.values[layer][rows, :, :width]
