"""The step log of a decoded request, and the one rule that turns step logs into speed and accuracy figures.

Every writer (``l2pd generate``/``evaluate``, the lm-eval model, the benchmark) stores a :class:`StepLogRow` per
request, and every reader (analysis, benchmark, regression check, ``l2pd grade``) summarises them with
:func:`summarise`:

- forward passes (NFE): mean over requests; tokens per forward: committed canvas positions / forward passes;
- tokens per second: generated tokens (before the first end-of-text) / wall time, the wall time spanning the first
  request's start (``finished_at - latency_s``) to the last one's end, over all ranks;
- latency percentiles: linear interpolation between the order statistics (numpy's and pandas' default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from l2pd_harness.decoding.scheduler import GenerationResult
from l2pd_harness.files import FileFormatError
from l2pd_harness.text import response_length


def is_count(value: object, minimum: int = 0) -> bool:
    """An integer (JSON's, not a boolean) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_count_list(value: object) -> bool:
    return isinstance(value, list) and all(is_count(item) for item in value)


def is_finite_number(value: object, minimum: float = -math.inf) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and value >= minimum)


@dataclass(frozen=True)
class StepLogRow:
    """What one decoded request cost."""

    nfe: int
    """Forward passes spent on it."""
    tokens_per_step: list[int]
    """Canvas positions each forward pass committed."""
    positions_per_step: list[int]
    """Positions each forward pass computed (fewer with a KV cache)."""
    latency_s: float
    """Wall time from its first forward pass until it was finished."""
    prompt_tokens: int
    """Tokens of its prompt as the model saw it."""
    generated_tokens: int
    """Response tokens before the first end-of-text."""
    finished_at: float
    """Unix time it finished (so a run's wall time can be spanned from its rows)."""

    @classmethod
    def of(cls, result: GenerationResult, prompt_tokens: int, stops: set[int]) -> StepLogRow:
        return cls(nfe=result.nfe, tokens_per_step=result.tokens_per_step,
                   positions_per_step=result.positions_per_step, latency_s=round(result.latency_s, 6),
                   prompt_tokens=prompt_tokens, generated_tokens=response_length(result.token_ids, stops),
                   finished_at=round(time.time(), 6))

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict, where: str) -> StepLogRow:
        """The step log in a result row (other keys ignored); ``where`` names the row in the error."""
        missing = [f.name for f in fields(cls) if f.name not in row]
        if missing:
            raise FileFormatError(f"{where} lacks the step-log fields {missing}")
        for name, (is_valid, expected) in FIELD_RULES.items():
            if not is_valid(row[name]):
                raise FileFormatError(f"{where}: step-log field {name} {row[name]!r} is not {expected}")
        return cls(**{f.name: row[f.name] for f in fields(cls)})


# What each step-log field must hold for the counting rule to apply (a row read back from a file may hold anything).
FIELD_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "nfe": (lambda value: is_count(value, minimum=1), "an integer >= 1"),
    "tokens_per_step": (is_count_list, "a list of integers >= 0"),
    "positions_per_step": (is_count_list, "a list of integers >= 0"),
    "latency_s": (lambda value: is_finite_number(value, minimum=0.0), "a finite number >= 0"),
    "prompt_tokens": (is_count, "an integer >= 0"),
    "generated_tokens": (is_count, "an integer >= 0"),
    "finished_at": (is_finite_number, "a finite number"),
}


@dataclass(frozen=True)
class Summary:
    """Accuracy and speed of a set of decoded requests (see the module docstring for the rule)."""

    n: int
    accuracy: float | None
    """Share of correct requests (``None`` when not graded)."""
    mean_nfe: float
    tokens_per_forward: float
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float

    def as_row(self) -> dict:
        return asdict(self)


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(logs: list[StepLogRow], correct: list[bool] | None = None) -> Summary:
    """The one counting rule over ``logs`` (and their grades, when given)."""
    if not logs:
        raise ValueError("no step logs to summarise")
    nfe = sum(log.nfe for log in logs)
    generated = sum(log.generated_tokens for log in logs)
    wall = max(log.finished_at for log in logs) - min(log.finished_at - log.latency_s for log in logs)
    latency = [log.latency_s for log in logs]
    return Summary(n=len(logs), accuracy=None if correct is None else sum(correct) / len(correct),
                   mean_nfe=nfe / len(logs), tokens_per_forward=sum(sum(log.tokens_per_step) for log in logs) / nfe,
                   generated_tokens=generated, wall_s=wall, tokens_per_s=generated / wall if wall > 0 else math.nan,
                   latency_p50_s=percentile(latency, 0.5), latency_p95_s=percentile(latency, 0.95))
