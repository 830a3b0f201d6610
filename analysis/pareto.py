"""Accuracy against speed from logged lm-eval runs: one table, Pareto frontiers, AUP and plots.

    python analysis/pareto.py results/sweep-tiny --out results/sweep-tiny/report

``RUNS_DIR`` holds one lm-eval output directory per configuration (as ``analysis/sweep.py`` writes them): the
``results_*.json`` of lm-eval (accuracy, its standard error, the l2pd settings from ``get_model_info``) and the
``steps_rank<r>_*.jsonl`` step logs of the l2pd model; a directory with more than one results file (a
configuration run twice) is refused. Output: ``runs.csv`` (one row per configuration and task), ``table.md``, and
per task ``<task>_pareto.png``.

Speed and accuracy are counted by the package's one rule, :func:`l2pd_harness.steplog.summarise` (the benchmark
uses the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from l2pd_harness.cli import OneLineParser  # noqa: E402
from l2pd_harness.decoding.config import CACHES, CHOICES  # noqa: E402
from l2pd_harness.decoding.policies import POLICIES  # noqa: E402
from l2pd_harness.files import FileFormatError, check_output_path, iter_jsonl, read_json  # noqa: E402
from l2pd_harness.steplog import StepLogRow, is_count, is_finite_number, summarise  # noqa: E402

AUP_DROP = 5.0  # accuracy points below a curve's first point past which its points no longer count
PREFERRED_FILTERS = ("strict-match", "none", "exact")
RULE_VARIANTS = {"learned_commit": "accepted", "eotp_mode": "fill"}
"""Settings that change a policy's rule, with their defaults: a run off the default is a family of its own."""
SETTINGS_COLUMNS = ("policy", "threshold", "factor", "eotp", "cache", "gen_length", "steps")
# What the table reads of a run's l2pd settings, and what each must hold (a results file may hold anything).
SETTINGS_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "policy": (lambda value: isinstance(value, str) and value in POLICIES, f"one of {list(POLICIES)}"),
    "threshold": (is_finite_number, "a number"),
    "factor": (is_finite_number, "a number"),
    "eotp": (lambda value: isinstance(value, bool), "a boolean"),
    "cache": (lambda value: isinstance(value, str) and value in CACHES, f"one of {list(CACHES)}"),
    "gen_length": (lambda value: is_count(value, minimum=1), "an integer >= 1"),
    "steps": (lambda value: is_count(value, minimum=1), "an integer >= 1"),
    "accept_threshold": (lambda value: value is None or is_finite_number(value), "a number or null"),
    **{key: (lambda value, key=key: value in CHOICES[key], f"one of {list(CHOICES[key])}") for key in RULE_VARIANTS},
}
REQUEST_FIELDS = ("task", "doc_id", "repeat")  # which request a step-log row belongs to


def family_of(settings: dict) -> str:
    """A policy family: the policy with its EoTP and cache options and any rule variant (a curve in the plots)."""
    name = settings["policy"] + ("+eotp" if settings["eotp"] else "")
    name += "".join(f"[{settings[key]}]" for key, default in RULE_VARIANTS.items()
                    if settings.get(key, default) != default)
    return name if settings["cache"] == "none" else f"{name}+{settings['cache']}"


def knob_of(settings: dict) -> str:
    """What moves a configuration along its family's curve (each policy's own label)."""
    return POLICIES[settings["policy"]].setting(settings)


def accuracy_of(task_result: dict, where: str) -> tuple[float, float]:
    """``(accuracy, stderr)`` from lm-eval's metrics of one task (``where``, for the error), preferring the strict
    filter. lm-eval writes the stderr as ``"N/A"`` when it cannot compute one (a single document)."""
    for name in PREFERRED_FILTERS:
        if f"exact_match,{name}" in task_result:
            accuracy, stderr = task_result[f"exact_match,{name}"], task_result.get(f"exact_match_stderr,{name}")
            if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
                raise FileFormatError(f"{where}: exact_match,{name} {accuracy!r} is not a number")
            return accuracy, stderr if isinstance(stderr, int | float) else math.nan
    raise FileFormatError(f"{where} has no exact_match metric among {sorted(task_result)}")


def read_results(path: Path) -> tuple[dict, dict[str, dict]]:
    """The l2pd settings and the per-task metrics of one lm-eval results file."""
    results = read_json(path, "lm-eval results")
    config = results.get("config")
    settings = config.get("l2pd_settings") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise FileFormatError(f"lm-eval results {str(path)!r} has no config.l2pd_settings mapping: not a run of "
                              "the l2pd model")
    settings = {**RULE_VARIANTS, **settings}  # runs from before these settings existed used the defaults
    missing = [name for name in SETTINGS_RULES if name not in settings]
    if missing:
        raise FileFormatError(f"lm-eval results {str(path)!r}: config.l2pd_settings lacks {missing}")
    for name, (is_valid, expected) in SETTINGS_RULES.items():
        if not is_valid(settings[name]):
            raise FileFormatError(f"lm-eval results {str(path)!r}: config.l2pd_settings {name} "
                                  f"{settings[name]!r} is not {expected}")
    tasks = results.get("results")
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(metrics, dict) for metrics in tasks.values()):
        raise FileFormatError(f"lm-eval results {str(path)!r} has no 'results' mapping of tasks to metrics")
    return settings, tasks


def results_files(runs_dir: Path) -> list[Path]:
    """The lm-eval results file of every configuration directory under ``runs_dir``."""
    by_run: dict[Path, list[Path]] = {}
    for path in sorted(runs_dir.glob("**/results_*.json")):
        by_run.setdefault(path.parent.parent, []).append(path)  # lm-eval writes into <output_path>/<model name>/
    if not by_run:
        raise FileFormatError(f"no lm-eval results_*.json under {str(runs_dir)!r}")
    for run_dir, paths in by_run.items():
        if len(paths) > 1:
            raise FileFormatError(
                f"configuration directory {str(run_dir)!r} holds {len(paths)} lm-eval results files "
                f"{[path.relative_to(run_dir).as_posix() for path in paths]}: it was run more than once and its step "
                "logs mix the runs; delete the directory and rerun analysis/sweep.py to redo it")
    return [paths[0] for paths in by_run.values()]


def step_rows(path: Path) -> Iterator[tuple[dict, StepLogRow]]:
    """The rows of one step log with their step logs, each checked for the fields that say which request it
    belongs to and for its step-log fields."""
    for number, row in enumerate(iter_jsonl(path, "step log"), start=1):
        where = f"step log {str(path)!r} row {number}"
        missing = [name for name in REQUEST_FIELDS if name not in row]
        if missing:
            raise FileFormatError(f"{where} lacks {missing}")
        yield row, StepLogRow.from_row(row, where)


def read_step_logs(run_dir: Path, task: str) -> list[StepLogRow]:
    """The step logs of ``task`` in a configuration directory, one per request (the last, if it was logged twice)."""
    by_request = {(row["doc_id"], row["repeat"]): log
                  for path in sorted(run_dir.glob("steps_rank*.jsonl")) for row, log in step_rows(path)
                  if row["task"] == task}
    if not by_request:
        raise FileFormatError(f"{str(run_dir)!r} has no step log rows of task {task!r} (steps_rank*.jsonl)")
    return list(by_request.values())


def speed_metrics(logs: list[StepLogRow]) -> dict:
    """The one counting rule (:func:`l2pd_harness.steplog.summarise`) as table columns."""
    summary = summarise(logs)
    return {"n_logged": summary.n, **{key: getattr(summary, key) for key in (
        "mean_nfe", "tokens_per_forward", "tokens_per_s", "wall_s", "latency_p50_s", "latency_p95_s")}}


def load_runs(runs_dir: Path) -> pd.DataFrame:
    """One row per configuration and task."""
    records = []
    for results_path in results_files(runs_dir):
        settings, tasks = read_results(results_path)
        run_dir = results_path.parent.parent
        for task, task_result in tasks.items():
            accuracy, stderr = accuracy_of(task_result, f"lm-eval results {str(results_path)!r} task {task!r}")
            records.append({"run": run_dir.name, "task": task, "family": family_of(settings),
                            "knob": knob_of(settings), **{k: settings[k] for k in SETTINGS_COLUMNS},
                            "accuracy": 100 * accuracy, "accuracy_stderr": 100 * stderr,
                            **speed_metrics(read_step_logs(run_dir, task))})
    return add_baseline_ratios(pd.DataFrame(records))


def add_baseline_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Speedups and accuracy change against the task's baseline: ``fixed`` at one token per step, no EoTP, no
    cache, at the same canvas length."""
    is_baseline = (frame["policy"] == "fixed") & (frame["steps"] == frame["gen_length"]) & ~frame["eotp"] & (
        frame["cache"] == "none")
    baseline = frame[is_baseline].set_index(["task", "gen_length"])
    keys = list(zip(frame["task"], frame["gen_length"], strict=True))
    missing = sorted({key for key in keys if key not in baseline.index})
    if missing:
        raise ValueError(f"no baseline run (fixed, steps = gen_length, no EoTP, no cache) for {missing}")
    base = baseline.loc[keys].reset_index(drop=True)
    frame = frame.copy()
    frame["nfe_speedup"] = base["mean_nfe"].to_numpy() / frame["mean_nfe"]
    frame["time_speedup"] = frame["tokens_per_s"] / base["tokens_per_s"].to_numpy()
    frame["accuracy_delta"] = frame["accuracy"] - base["accuracy"].to_numpy()
    return frame


def pareto_mask(x: pd.Series, y: pd.Series) -> pd.Series:
    """True for points no other point beats on both ``x`` and ``y`` (higher is better on both)."""
    beaten = [((x >= xi) & (y >= yi) & ((x > xi) | (y > yi))).any() for xi, yi in zip(x, y, strict=True)]
    return ~pd.Series(beaten, index=x.index)


def aup(rho: list[float], accuracy: list[float], y_max: float) -> float:
    """Accuracy under parallelism of one curve (d3LLM's definition; accuracy in points, ``y_max`` the best
    accuracy of any method on the task)."""
    points = sorted(zip(rho, accuracy, strict=True))
    kept = [p for p in points if p[1] >= points[0][1] - AUP_DROP]

    def weighted(y: float) -> float:
        return y * min(math.exp(-3 * (1 - y / y_max)), 1.0)

    area = kept[0][0] * kept[0][1]
    for (r0, y0), (r1, y1) in zip(kept, kept[1:], strict=False):
        area += 0.5 * (r1 - r0) * (weighted(y1) + weighted(y0))
    return area


def family_aup(frame: pd.DataFrame) -> pd.Series:
    """AUP of every (task, family) curve."""
    y_max = frame.groupby("task")["accuracy"].max()
    return frame.groupby(["task", "family"]).apply(
        lambda g: aup(g["tokens_per_forward"].tolist(), g["accuracy"].tolist(), y_max[g.name[0]]),
        include_groups=False).rename("aup")


def markdown_table(frame: pd.DataFrame) -> str:
    aups = family_aup(frame)
    lines = ["| task | family | setting | accuracy (%) | Δ vs baseline | mean NFE | tokens/forward | tokens/s "
             "| NFE speedup | time speedup | family AUP |", "|" + "---|" * 11]
    for row in frame.sort_values(["task", "family", "tokens_per_forward"]).itertuples():
        lines.append(f"| {row.task} | {row.family} | {row.knob} | {row.accuracy:.1f} ± {row.accuracy_stderr:.1f} "
                     f"| {row.accuracy_delta:+.1f} | {row.mean_nfe:.1f} | {row.tokens_per_forward:.2f} "
                     f"| {row.tokens_per_s:.1f} | {row.nfe_speedup:.2f}x | {row.time_speedup:.2f}x "
                     f"| {aups[(row.task, row.family)]:.1f} |")
    return "\n".join(lines) + "\n"


def plot_task(frame: pd.DataFrame, task: str, path: Path) -> None:
    """Accuracy against forward passes and against tokens/s: one line per family, frontier ringed."""
    rows = frame[frame["task"] == task]
    baseline = rows[(rows["nfe_speedup"] == 1.0) & (rows["family"] == "fixed")]["accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x, label, on_frontier in (
            (axes[0], "mean_nfe", "mean forward passes per sample (log scale, fewer is faster)",
             pareto_mask(-rows["mean_nfe"], rows["accuracy"])),
            (axes[1], "tokens_per_s", "generated tokens per second (log scale)",
             pareto_mask(rows["tokens_per_s"], rows["accuracy"]))):
        for family, curve in rows.sort_values(x).groupby("family"):
            ax.plot(curve[x], curve["accuracy"], marker="o", label=family)
        ax.scatter(rows[x][on_frontier], rows["accuracy"][on_frontier], s=160, facecolors="none",
                   edgecolors="black", label="Pareto frontier")
        if len(baseline):
            ax.axhline(baseline.iloc[0], color="grey", linestyle="--", linewidth=1, label="baseline accuracy")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{task}: accuracy against speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="directory of lm-eval runs (one per configuration)")
    parser.add_argument("--out", type=Path, required=True, help="directory for runs.csv, table.md and plots")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        parser.error(f"RUNS_DIR {str(args.runs_dir)!r} is not a directory")
    try:
        out = check_output_path(args.out, "--out", directory=True)
        frame = load_runs(args.runs_dir)
    except ValueError as err:  # a FileFormatError naming the file, or runs the table cannot be made of
        parser.error(str(err))
    write_report(frame, out)
    print(markdown_table(frame))


def write_report(frame: pd.DataFrame, out: Path) -> None:
    """``runs.csv``, ``table.md`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    (out / "table.md").write_text(markdown_table(frame))
    for task in sorted(frame["task"].unique()):
        plot_task(frame, task, out / f"{task}_pareto.png")


if __name__ == "__main__":
    main()
