"""The one counting rule on a small fixed step log, against figures computed by hand."""

from __future__ import annotations

from dataclasses import fields

import pytest

from l2pd_harness.files import FileFormatError
from l2pd_harness.steplog import FIELD_RULES, StepLogRow, percentile, summarise

# Three requests: started at 100.0, 100.5 and 101.0 s; finished at 102.0, 101.5 and 104.0 s.
LOGS = [
    StepLogRow(nfe=4, tokens_per_step=[8, 8, 8, 8], positions_per_step=[40] * 4, latency_s=2.0, prompt_tokens=8,
               generated_tokens=20, finished_at=102.0),
    StepLogRow(nfe=2, tokens_per_step=[16, 16], positions_per_step=[40] * 2, latency_s=1.0, prompt_tokens=8,
               generated_tokens=10, finished_at=101.5),
    StepLogRow(nfe=6, tokens_per_step=[2, 2, 4, 8, 8, 8], positions_per_step=[40] * 6, latency_s=3.0,
               prompt_tokens=8, generated_tokens=30, finished_at=104.0),
]


def test_the_counting_rule_by_hand() -> None:
    summary = summarise(LOGS, [True, False, True])
    assert summary.n == 3 and summary.accuracy == pytest.approx(2 / 3)
    assert summary.mean_nfe == 4.0  # (4 + 2 + 6) / 3
    assert summary.tokens_per_forward == pytest.approx(96 / 12)  # committed positions / forward passes
    assert summary.wall_s == 4.0  # first start 100.0 to last finish 104.0
    assert summary.tokens_per_s == 15.0  # (20 + 10 + 30) generated tokens / 4 s
    assert summary.latency_p50_s == 2.0
    assert summary.latency_p95_s == pytest.approx(2.9)  # 2.0 + 0.9 * (3.0 - 2.0): linear between order statistics


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0]
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 5.0
    assert percentile(values, 0.5) == 3.0 and percentile(values, 0.95) == pytest.approx(4.85)
    assert percentile([7.0], 0.95) == 7.0


def test_rows_round_trip_and_missing_fields_are_named() -> None:
    row = {"task": "arith", **LOGS[0].to_row()}
    assert StepLogRow.from_row(row, "row 1") == LOGS[0]
    del row["finished_at"]
    with pytest.raises(FileFormatError, match=r"row 1 lacks the step-log fields \['finished_at'\]"):
        StepLogRow.from_row(row, "row 1")


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("nfe", "4", "an integer >= 1"),
    ("nfe", None, "an integer >= 1"),
    ("nfe", 0, "an integer >= 1"),
    ("nfe", True, "an integer >= 1"),
    ("tokens_per_step", 5, "a list of integers >= 0"),
    ("positions_per_step", [40, "40"], "a list of integers >= 0"),
    ("latency_s", "x", "a finite number >= 0"),
    ("latency_s", -1.0, "a finite number >= 0"),
    ("prompt_tokens", 8.5, "an integer >= 0"),
    ("generated_tokens", -1, "an integer >= 0"),
    ("finished_at", None, "a finite number"),
    ("finished_at", float("nan"), "a finite number"),
])
def test_a_field_of_the_wrong_type_is_named(field: str, value: object, expected: str) -> None:
    row = {**LOGS[0].to_row(), field: value}
    with pytest.raises(FileFormatError) as error:
        StepLogRow.from_row(row, "row 3")
    assert str(error.value) == f"row 3: step-log field {field} {value!r} is not {expected}"


def test_every_field_has_a_rule() -> None:
    assert list(FIELD_RULES) == [f.name for f in fields(StepLogRow)]
