"""Settings of one decode run: canvas, decode policy, End-of-Text Prediction, KV cache and batching."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from l2pd_harness.decoding.policies import POLICIES

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")
LEARNED_COMMITS = ("accepted", "with_schedule", "with_threshold")
EOTP_MODES = ("fill", "truncate")
PRESETS = {
    "learn2pd-paper": {"policy": "learned", "learned_commit": "with_schedule", "eotp": True, "eotp_mode": "truncate",
                       "block_length": 32},
}
"""Named groups of settings. ``learn2pd-paper`` is the Learn2PD paper's decoding: its filter's accepted positions
together with the fixed schedule's, and its End-of-Text Prediction that shortens the canvas."""
CHOICES = {"policy": tuple(POLICIES), "remasking": REMASKING, "cache": CACHES, "learned_commit": LEARNED_COMMITS,
           "eotp_mode": EOTP_MODES, "preset": tuple(PRESETS)}
"""The allowed values of the fields that take a name (the command line offers them as choices)."""
OPEN_CHOICES = ("learned_commit", "preset")
"""The named fields that may also be ``None`` (left to the filter's card, or no preset)."""
DEFAULT_THRESHOLD = 0.9
"""``threshold`` when neither the user nor a filter card names one (Fast-dLLM's default)."""
REAL_FIELDS = ("threshold", "isolated_threshold", "factor", "temperature", "cfg_scale", "accept_threshold")
"""The fields that take a real number; nan passes every range comparison unrefused and inf wrecks the arithmetic
mid-decode, so each must be finite."""


@dataclass
class DecodeConfig:
    """Every knob of the engine; checked on construction, each error names the bad value and what is allowed."""

    gen_length: int = 256
    """Canvas positions after the prompt."""
    block_length: int = 32
    """Positions per semi-autoregressive block; must divide ``gen_length``."""
    policy: str = "fixed"
    """Which masked positions of the block a forward pass commits: fixed (LLaDA's quota per step), threshold and
    factor (Fast-dLLM's rules), isolated (threshold with a lower bar where both neighbours are settled), oracle
    (what already equals a reference output), learned (a Learn2PD filter)."""
    steps: int | None = None
    """``fixed`` only: forward passes in total, spread evenly over the blocks; ``None`` means ``gen_length``
    (one token per step)."""
    remasking: str = "low_confidence"
    """``fixed`` only: which masked positions get a step's quota: the most confident, or random ones."""
    threshold: float | None = None
    """``threshold``: commit every masked position whose confidence exceeds this (at least one per step); also
    ``isolated``, and ``learned`` with learned_commit with_threshold. ``None`` is 0.9, except for ``learned`` with
    learned_commit left to the filter's card: then the threshold the card names (``training.decode_with``), else
    0.9."""
    isolated_threshold: float = 0.3
    """``isolated``: also commit every masked position whose two neighbours are settled (committed, or the prompt
    or a finished block on the left) and whose confidence is at least this."""
    factor: float = 1.0
    """``factor``: commit the n most confident positions while (n + 1) * (1 - c_n) < factor (at least one)."""
    filter: str | None = None
    """``learned``: filter checkpoint from `l2pd train-filter`, or the name of one shipped beside the model (the tiny
    model's: learned-b32, learned-b128, learned-b32-dual and learned-b128-dual, issue 21's rollout-labelled
    filters for block 32 and 128, without a cache and with the dual cache; learn2pd-filter, the default;
    learn2pd-block-mlp, the paper's architecture); ``None`` is learn2pd-filter (usable on the tiny model only)."""
    accept_threshold: float | None = None
    """``learned``: commit the masked positions whose filter probability exceeds this (at least one); ``None`` is
    the filter's own default, chosen on validation problems."""
    learned_commit: str | None = None
    """``learned``: what a pass commits: accepted (the positions the filter accepts, or the most confident one if
    none), with_schedule (the Learn2PD paper's: the accepted positions together with the k most confident masked
    ones, k = block_length / (steps per block) as in ``fixed``, so 1 when steps = gen_length) or with_threshold
    (the accepted positions together with every masked one whose confidence exceeds ``threshold``, at least one);
    ``None`` is the way the filter's card says it decodes (``training.decode_with``: with_threshold and one
    candidate for a filter trained on rollout labels), else accepted."""
    learned_candidates: int | None = None
    """``learned`` with learned_commit with_threshold: the filter judges only this many masked positions per pass,
    the most confident ones the threshold leaves (1 for a filter trained on rollout labels: the question they
    answer); ``None`` is the filter card's number when learned_commit is left to the card, else every masked
    position."""
    eotp: bool = False
    """End-of-Text Prediction: once end-of-text is committed, no pass decodes the canvas after it (eotp_mode says
    how)."""
    eotp_mode: str = "fill"
    """With eotp: fill (commit every position after the first committed end-of-text as end-of-text; they stay in
    the model's input) or truncate (the Learn2PD paper's: cut the canvas right after the most confident end-of-text
    a pass commits, so later passes are shorter; the output reads end-of-text there)."""
    cache: str = "none"
    """KV cache: none; prefix (reuse keys/values before the block); dual (reuse before and after it)."""
    temperature: float = 0.0
    """Gumbel-noise temperature of the token choice; 0 is greedy."""
    cfg_scale: float = 0.0
    """Classifier-free guidance strength (a second pass with the prompt masked); 0 disables it; cache none only."""
    seed: int = 0
    """Seed of the random choices (temperature noise, random remasking)."""
    batch_size: int = 16
    """Sequences in flight at once; a finished one hands its slot to the next waiting request."""
    preset: str | None = None
    """A named group of settings, applied to every setting not given explicitly: learn2pd-paper (policy learned,
    learned_commit with_schedule, eotp with eotp_mode truncate, block_length 32: the paper's rules)."""

    def __post_init__(self) -> None:
        if self.gen_length <= 0:
            raise ValueError(f"gen_length={self.gen_length} must be a positive integer")
        if self.block_length <= 0 or self.gen_length % self.block_length:
            raise ValueError(f"block_length={self.block_length} must be a positive divisor of "
                             f"gen_length={self.gen_length}")
        self.steps = self.gen_length if self.steps is None else self.steps
        if self.steps <= 0 or self.steps % self.num_blocks or self.steps > self.gen_length:
            raise ValueError(f"steps={self.steps} must be a multiple of the number of blocks ({self.num_blocks}) "
                             f"between {self.num_blocks} and gen_length={self.gen_length}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed and not (name in OPEN_CHOICES and getattr(self, name) is None):
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for name in REAL_FIELDS:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}={value} must be a finite number")
        if self.threshold is None and not (self.policy == "learned" and self.learned_commit is None):
            self.threshold = DEFAULT_THRESHOLD  # no filter card to leave it to
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if not 0 < self.isolated_threshold <= 1:
            raise ValueError(f"isolated_threshold={self.isolated_threshold} must be in (0, 1]")
        if self.accept_threshold is not None and not 0 < self.accept_threshold < 1:
            raise ValueError(f"accept_threshold={self.accept_threshold} must be in (0, 1)")
        if not POLICIES[self.policy].needs_filter and (self.filter is not None or self.accept_threshold is not None):
            raise ValueError(f"filter and accept_threshold are only used by policy 'learned' (got policy "
                             f"{self.policy!r}, filter={self.filter!r}, accept_threshold={self.accept_threshold!r})")
        if self.learned_commit is None and self.policy != "learned":
            self.learned_commit = "accepted"  # no filter card to leave it to: the value every such run records
        if self.policy != "learned" and self.learned_commit != "accepted":
            raise ValueError(f"learned_commit={self.learned_commit!r} is only used by policy 'learned' (got policy "
                             f"{self.policy!r})")
        if self.learned_candidates is not None and (self.learned_candidates <= 0
                                                    or self.learned_commit not in (None, "with_threshold")):
            raise ValueError(f"learned_candidates={self.learned_candidates} must be a positive integer, used with "
                             f"policy 'learned' and learned_commit 'with_threshold' (got learned_commit="
                             f"{self.learned_commit!r})")
        if not self.eotp and self.eotp_mode != "fill":
            raise ValueError(f"eotp_mode={self.eotp_mode!r} needs eotp=true")
        if self.factor <= 0:
            raise ValueError(f"factor={self.factor} must be > 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0")
        if self.cfg_scale > 0 and self.cache != "none":
            raise ValueError(f"cfg_scale={self.cfg_scale} needs cache='none' (got cache={self.cache!r}): the "
                             "guidance pass changes the prompt, so cached keys/values would not apply")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be a positive integer")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def for_canvas(self, gen_length: int) -> DecodeConfig:
        """The same settings on a canvas of ``gen_length`` positions (whole blocks), with the same passes per
        block."""
        return replace(self, gen_length=gen_length, steps=self.steps_per_block * (gen_length // self.block_length))
