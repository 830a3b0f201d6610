"""The CI regression check: accuracy and forward passes of the main decode configurations against a committed
reference (``results/regression/reference.json``).

``l2pd regress`` decodes the same held-out test problems of each task with every configuration in :data:`CHECKS`
and fails when a task's accuracy falls below the reference by more than its tolerance, or its mean forward passes
(NFE) grow by more than :data:`NFE_GROWTH`. ``l2pd regress --update`` records a new reference on purpose.

Tolerance. Greedy decoding is deterministic, so unchanged code on the same software reproduces the reference
exactly; other numerics (another CPU, a GPU, another torch) flip a few borderline problems either way. A drop
fails when it exceeds two standard errors of the reference accuracy at the check's sample size,
``2 * sqrt(p * (1 - p) / n)`` with ``p = (correct + 1) / (n + 2)`` (smoothed, so a task at 100% still has a
tolerance: one flipped problem of 100 passes, two fail).
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field

import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.evaluation import iter_decoded, summarise_rows
from l2pd_harness.filter.model import DEFAULT_FILTER, filter_fingerprint
from l2pd_harness.loading import DEFAULT_MODEL_DIR, model_fingerprint
from l2pd_harness.settings import decode_setup, output_settings, setting_differences
from l2pd_harness.tasks import DEFAULT_TASKS, sample_problems

FORMAT = "l2pd-regression/1"
TASKS = DEFAULT_TASKS
DATA_SEED = 123
"""Held-out test problems are drawn with this seed (the benchmarks' seed)."""
NFE_GROWTH = 0.05
"""Largest allowed growth of a task's mean NFE over the reference (5%)."""
STANDARD_ERRORS = 2.0
"""Accuracy tolerance in standard errors of the reference accuracy."""


@dataclass(frozen=True)
class Check:
    """One decode configuration of the regression check."""

    name: str
    settings: dict = field(hash=False)
    """Decode settings (DecodeConfig fields; the rest keep their defaults)."""
    n: int = 100
    """Held-out problems per task; the one-token baseline (gen_length passes each) gets fewer, to keep CI short."""


CHECKS = (
    Check("fixed (1 token/step)", {"policy": "fixed"}, n=16),
    Check("threshold 0.9 + EoTP", {"policy": "threshold", "threshold": 0.9, "eotp": True}),
    Check("learned + EoTP", {"policy": "learned", "eotp": True}),
    Check("learned + EoTP + dual cache", {"policy": "learned", "eotp": True, "cache": "dual"}),
)


FIGURES = {"n": int, "correct": int, "accuracy": int | float, "mean_nfe": int | float}
"""What a reference records of each check on each task, and its JSON type."""


class RegressionError(ValueError):
    """A reference that cannot be compared with this checkout (missing, or recorded for something else)."""


def accuracy_tolerance(correct: int, n: int) -> float:
    """Largest accepted accuracy drop below a reference of ``correct`` out of ``n`` (see the module doc)."""
    p = (correct + 1) / (n + 2)
    return STANDARD_ERRORS * math.sqrt(p * (1 - p) / n)


def identity() -> dict:
    """What the reference was measured with: the shipped model and filter (their fingerprints), the software."""
    return {"model": model_fingerprint(DEFAULT_MODEL_DIR), "filter": filter_fingerprint(DEFAULT_FILTER),
            "tasks": list(TASKS), "data_seed": DATA_SEED, "torch": torch.__version__,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads"}


def config_record(check: Check, cfg: DecodeConfig) -> dict:
    """A check's settings as recorded: its sample size and ``cfg`` as decoded (the batch size does not change
    outputs, so it is left out)."""
    return {"n": check.n, **output_settings(cfg)}


def check_configs() -> dict[str, dict]:
    """Every check's record (the learned policy's accept threshold is the shipped filter's default)."""
    return {check.name: config_record(check, decode_setup(check.settings)[0]) for check in CHECKS}


def check_comparable(reference: dict) -> None:
    """Raise :class:`RegressionError` unless ``reference`` was recorded for this model, filter, tasks and checks."""
    if reference.get("format") != FORMAT:
        raise RegressionError(f"the reference has format {reference.get('format')!r}, expected {FORMAT!r}")
    check_shape(reference)
    now = identity()
    for key in ("model", "filter", "tasks", "data_seed"):
        if reference["identity"].get(key) != now[key]:
            raise RegressionError(f"the reference was recorded with {key} {reference['identity'].get(key)!r}, this "
                                  f"checkout has {now[key]!r}: record a new one on purpose (`l2pd regress --update`)")
    configs = check_configs()
    if sorted(reference["runs"]) != sorted(configs):
        raise RegressionError(f"the reference's checks {sorted(reference['runs'])} differ from this checkout's "
                              f"{sorted(configs)}: record a new reference (`l2pd regress --update`)")
    for name, config in configs.items():
        if sorted(reference["runs"][name]["tasks"]) != sorted(TASKS):
            raise RegressionError(f"the reference's check {name!r} has tasks {sorted(reference['runs'][name]['tasks'])}"
                                  f", this checkout checks {sorted(TASKS)}: record a new reference "
                                  "(`l2pd regress --update`)")
        differences = setting_differences(reference["runs"][name]["config"], config)
        if differences:
            raise RegressionError(f"the reference's check {name!r} was recorded with other settings than this "
                                  f"checkout's ({'; '.join(differences)}): record a new reference "
                                  "(`l2pd regress --update`)")


def check_shape(reference: dict) -> None:
    """Raise :class:`RegressionError` naming the first key a reference of this format lacks."""
    for key in ("identity", "runs"):
        if not isinstance(reference.get(key), dict):
            raise RegressionError(f"the reference has no {key!r} object: record one with `l2pd regress --update`")
    for name, run in reference["runs"].items():
        if not (isinstance(run, dict) and isinstance(run.get("tasks"), dict) and isinstance(run.get("config"), dict)):
            raise RegressionError(f"the reference's check {name!r} lacks its 'config' or 'tasks' object")
        for task, figures in run["tasks"].items():
            missing = set(FIGURES) - set(figures if isinstance(figures, dict) else {})
            if missing:
                raise RegressionError(f"the reference's check {name!r} / {task} lacks {sorted(missing)}")
            for key, kind in FIGURES.items():
                if isinstance(figures[key], bool) or not isinstance(figures[key], kind):
                    raise RegressionError(f"the reference's check {name!r} / {task} has {key}={figures[key]!r}, "
                                          f"expected {'an integer' if kind is int else 'a number'}")


def measure(model, tokenizer, batch_size: int) -> dict:
    """Run every check on every task: a reference-shaped record (accuracy, correct count, mean NFE)."""
    runs = {}
    for check in CHECKS:
        cfg, policy = decode_setup({**check.settings, "batch_size": batch_size})
        tasks = {}
        for task in TASKS:
            problems = sample_problems(task, "test", check.n, DATA_SEED)
            rows = list(iter_decoded(model, tokenizer, problems, cfg, policy=policy, desc=f"{check.name} / {task}"))
            summary = summarise_rows(rows)
            tasks[task] = {"n": summary.n, "correct": round(summary.accuracy * summary.n),
                           "accuracy": round(summary.accuracy, 4), "mean_nfe": round(summary.mean_nfe, 3)}
        runs[check.name] = {"config": config_record(check, cfg), "tasks": tasks}
    return {"format": FORMAT, "identity": identity(), "runs": runs}


@dataclass
class Verdict:
    """One check on one task, against the reference."""

    check: str
    task: str
    reference: dict
    measured: dict

    @property
    def tolerance(self) -> float:
        return accuracy_tolerance(self.reference["correct"], self.reference["n"])

    @property
    def nfe_limit(self) -> float:
        return self.reference["mean_nfe"] * (1 + NFE_GROWTH)

    def failures(self) -> list[str]:
        ref, now = self.reference, self.measured
        problems = []
        drop = ref["accuracy"] - now["accuracy"]
        if drop > self.tolerance + 1e-9:
            problems.append(f"{self.check} / {self.task}: accuracy {100 * now['accuracy']:.1f}% is "
                            f"{100 * drop:.1f} points below the reference {100 * ref['accuracy']:.1f}% (tolerance "
                            f"{100 * self.tolerance:.1f} points: {STANDARD_ERRORS:g} standard errors at n={ref['n']})")
        if now["mean_nfe"] > self.nfe_limit + 1e-9:
            problems.append(f"{self.check} / {self.task}: mean NFE {now['mean_nfe']:.2f} is "
                            f"{100 * (now['mean_nfe'] / ref['mean_nfe'] - 1):.1f}% above the reference "
                            f"{ref['mean_nfe']:.2f} (limit +{100 * NFE_GROWTH:.0f}%)")
        return problems


def compare(reference: dict, measured: dict) -> list[Verdict]:
    return [Verdict(name, task, run["tasks"][task], measured["runs"][name]["tasks"][task])
            for name, run in reference["runs"].items() for task in run["tasks"]]


def verdict_table(verdicts: list[Verdict]) -> str:
    lines = ["| check | task | n | accuracy: reference -> now (tolerance) | mean NFE: reference -> now (limit) | "
             "result |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        ref, now = v.reference, v.measured
        lines.append(f"| {v.check} | {v.task} | {ref['n']} | {100 * ref['accuracy']:.1f}% -> "
                     f"{100 * now['accuracy']:.1f}% (-{100 * v.tolerance:.1f}) | {ref['mean_nfe']:.2f} -> "
                     f"{now['mean_nfe']:.2f} ({v.nfe_limit:.2f}) | {'FAIL' if v.failures() else 'ok'} |")
    return "\n".join(lines)


def reference_table(reference: dict) -> str:
    """The reference's figures with the limits a check run is held to (README and ``--update`` print this)."""
    lines = ["| check | task | n | accuracy | fails below | mean NFE | fails above |", "|---|---|---|---|---|---|---|"]
    for name, run in reference["runs"].items():
        for task, figures in run["tasks"].items():
            floor = figures["accuracy"] - accuracy_tolerance(figures["correct"], figures["n"])
            lines.append(f"| {name} | {task} | {figures['n']} | {100 * figures['accuracy']:.1f}% | {100 * floor:.2f}% "
                         f"| {figures['mean_nfe']:.2f} | {figures['mean_nfe'] * (1 + NFE_GROWTH):.2f} |")
    return "\n".join(lines)
