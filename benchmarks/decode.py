"""Decode benchmark: every policy x EoTP x KV cache on held-out problems of each task, on one machine, one run.

For each configuration: accuracy, mean forward passes (NFE) per sample, tokens committed per forward pass,
generated tokens per second, p50/p95 per-sample latency (all by the package's one counting rule,
:func:`l2pd_harness.steplog.summarise`, which analysis/pareto.py uses too), speedups against the baseline
(``fixed``, one token per step, no EoTP, no cache), and how often a cached run's output equals the same policy's
``cache=none`` output.

Results go to ``benchmarks/results/decode.json`` after every configuration and task (written atomically; a rerun
skips what is already there, so an interrupted run resumes; ``--redo RUN`` measures a run again) and the table to
``benchmarks/README.md``.
Per-sample rows go to ``--rows-dir`` (outputs are compared across runs; the oracle reads the baseline's).

    python benchmarks/decode.py                 # the full grid, 200 problems per task (CPU: about 1.5 hours)
    python benchmarks/decode.py --n 8 --out /tmp/b.json --readme none   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from l2pd_harness.cli import OneLineParser, UsageError, positive_int, script_main
from l2pd_harness.decoding.config import CACHES, EOTP_MODES, PRESETS, DecodeConfig
from l2pd_harness.decoding.policies import POLICIES, Policy, StepState
from l2pd_harness.evaluation import iter_decoded, summarise_rows
from l2pd_harness.files import (
    FileFormatError,
    around_markers,
    check_output_path,
    read_json,
    read_jsonl,
    replace_marked,
    write_atomic,
)
from l2pd_harness.filter.model import LearnedFilter, load_filter
from l2pd_harness.loading import load_model, model_fingerprint, resolve_checkpoint
from l2pd_harness.settings import coerce, decode_setup, make_config
from l2pd_harness.tasks import DEFAULT_TASKS, TASKS, sample_problems

HERE = Path(__file__).resolve().parent
KNOB_SETTINGS = {"threshold": "threshold", "isolated": "threshold", "factor": "factor", "learned": "accept_threshold"}
"""The setting each policy's knob (:attr:`Run.knob`) sets."""


@dataclass(frozen=True)
class Run:
    """One configuration of the grid."""

    policy: str
    eotp: bool
    cache: str
    knob: float | None = None
    """threshold (of threshold and isolated), factor, or the learned policy's accept threshold."""
    filter: str | None = None
    """learned: the filter's label (``--filters NAME=PATH``)."""
    preset: str | None = None
    """A named group of settings (``DecodeConfig.preset``) under the run's own."""
    eotp_mode: str | None = None
    """``DecodeConfig.eotp_mode`` set explicitly, over the preset's (``None``: the preset's, else the default)."""

    @property
    def name(self) -> str:
        variant = "".join(f"@{part}" for part in (self.filter, self.knob) if part is not None)
        eotp = f"+eotp{'-' + self.eotp_mode if self.eotp_mode else ''}" if self.eotp else ""
        preset = f"+{self.preset}" if self.preset else ""
        return f"{self.policy}{variant}{eotp}{preset}/{self.cache}"

    def uncached(self) -> Run:
        return replace(self, cache="none")

    def label(self) -> str:
        detail = {"fixed": "1 token/step", "oracle": "baseline output",
                  "learned": f"{self.filter}, accept {self.knob}"}.get(self.policy, str(self.knob))
        return f"{self.policy} ({detail}{', ' + self.preset + ' rules' if self.preset else ''})"


BASELINE = Run("fixed", False, "none")


def grid(policies: list[str], caches: list[str], eotps: list[bool], knobs: dict[str, list[float]],
         filters: dict[str, str], presets: tuple[str | None, ...] = (None,),
         eotp_modes: tuple[str | None, ...] = (None,)) -> list[Run]:
    """The baseline first (the oracle's references and every ratio come from it), then each variant's
    cache=none run before its cached runs (their outputs are compared with it)."""
    variants = []
    for policy in policies:
        if policy == "learned":
            variants += [(policy, knob, name) for name in filters for knob in knobs[name]]
        else:
            variants += [(policy, knob, None) for knob in knobs.get(policy, [None])]
    runs = [Run(policy, eotp, cache, knob, name, preset, mode) for policy, knob, name in variants
            for preset in presets for mode in eotp_modes for eotp in eotps for cache in caches]
    return sorted(runs, key=lambda run: (run != BASELINE, variants.index((run.policy, run.knob, run.filter)),
                                         presets.index(run.preset), eotp_modes.index(run.eotp_mode),
                                         eotps.index(run.eotp), caches.index(run.cache)))


class ForwardTimer:
    """Wall time spent inside the model's forward passes (hooks), to set the filter's cost against."""

    def __init__(self, model: torch.nn.Module):
        self.seconds, self._started = 0.0, 0.0
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)

    def _start(self, *_) -> None:
        self._started = time.perf_counter()

    def _stop(self, *_) -> None:
        self.seconds += time.perf_counter() - self._started


class TimedFilter:
    """A learned filter that adds up the wall time of its calls."""

    def __init__(self, learned: LearnedFilter):
        self.learned, self.seconds = learned, 0.0

    def __call__(self, state: StepState) -> torch.Tensor:
        started = time.perf_counter()
        probability = self.learned(state)
        self.seconds += time.perf_counter() - started
        return probability


def decode_task(model, tokenizer, problems: list[dict], cfg: DecodeConfig, rows_path: Path,
                references: list[list[int]] | None, policy: Policy | None, desc: str) -> list[dict]:
    """Decode one task's problems; returns the rows (with their step logs), also written to ``rows_path``."""
    rows = list(iter_decoded(model, tokenizer, problems, cfg, references=references, desc=desc, policy=policy))
    write_atomic(rows_path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def summarise(rows: list[dict], same_policy_rows: list[dict] | None) -> dict:
    """The one counting rule over the rows' step logs, plus what only the benchmark reports: positions computed
    per sample and how often a cached run's text equals the same policy's uncached text."""
    summary = {**summarise_rows(rows).as_row(),
               "positions_per_sample": statistics.fmean(sum(row["positions_per_step"]) for row in rows)}
    if same_policy_rows is not None:
        same = sum(a["text"] == b["text"] for a, b in zip(rows, same_policy_rows, strict=True))
        summary["matches_cache_none"] = same / len(rows)
    return summary


def add_ratios(results: dict) -> None:
    """Speedups and accuracy change of every run against the baseline as it now stands (so a rerun baseline
    updates every ratio). Without a measured baseline, the NFE speedup is against its exact count, gen_length
    passes (one token per step); time and accuracy need the measured run."""
    baseline = results["runs"].get(BASELINE.name, {"tasks": {}})
    for run in results["runs"].values():
        for task, s in run["tasks"].items():
            base = baseline["tasks"].get(task)
            s["nfe_speedup"] = (base["mean_nfe"] if base else results["setup"]["gen_length"]) / s["mean_nfe"]
            if base is not None:
                s["time_speedup"] = base["wall_s"] / s["wall_s"]
                s["accuracy_delta"] = s["accuracy"] - base["accuracy"]


def markdown_table(results: dict) -> str:
    header = ("| task | policy | EoTP | cache | accuracy | mean NFE | tokens/forward | tokens/s | p50 latency (s) "
              "| p95 latency (s) | NFE speedup | time speedup | same output as cache=none | filter / forward time |")
    lines = [header, "|" + "---|" * 14]
    tasks = sorted({task for run in results["runs"].values() for task in run["tasks"]})
    for task in tasks:
        for record in (r for r in results["runs"].values() if task in r["tasks"]):
            run, s = run_of(record), record["tasks"][task]
            match = f"{100 * s['matches_cache_none']:.1f}%" if "matches_cache_none" in s else "-"
            overhead = f"{100 * s['filter_s'] / s['forward_s']:.2f}%" if "filter_s" in s else "-"
            ratio = {key: f"{s[key]:.2f}x" if key in s else "-" for key in ("nfe_speedup", "time_speedup")}
            lines.append(
                f"| {task} | {run.label()} | {eotp_column(run)} | {run.cache} "
                f"| {100 * s['accuracy']:.1f}% | {s['mean_nfe']:.1f} | {s['tokens_per_forward']:.2f} "
                f"| {s['tokens_per_s']:.1f} | {s['latency_p50_s']:.2f} | {s['latency_p95_s']:.2f} "
                f"| {ratio['nfe_speedup']} | {ratio['time_speedup']} | {match} | {overhead} |")
    return "\n".join(lines)


def eotp_column(run: Run) -> str:
    return ("yes" + (f" ({run.eotp_mode})" if run.eotp_mode else "")) if run.eotp else "no"


def run_of(record: dict) -> Run:
    return Run(record["policy"], record["eotp"], record["cache"], record.get("knob"), record.get("filter"),
               record.get("preset"), record.get("eotp_mode"))


def update_readme(readme: Path, results: dict, table: str) -> None:
    setup = results["setup"]
    caption = (f"\n{setup['n']} held-out test problems per task (seed {setup['data_seed']}), model {setup['model']}, "
               f"gen_length {setup['gen_length']}, block_length {setup['block_length']}, batch size "
               f"{setup['batch_size']}, {setup['dtype']}, greedy; {setup['machine']}, torch {setup['torch']}.\n\n")
    replace_marked(readme, table, "--readme", caption + markdown_table(results) + "\n")


def float_list(text: str) -> list[float]:
    try:
        values = [float(value) for value in text.split(",") if value]
    except ValueError:
        values = []
    if not values or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of finite numbers")
    return values


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped tiny model)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks ({','.join(DEFAULT_TASKS)})")
    p.add_argument("--n", type=positive_int, default=200, help="held-out problems per task (200)")
    p.add_argument("--data-seed", type=int, default=123, help="problem sampling seed (123)")
    p.add_argument("--gen-length", type=int, default=256, help="canvas positions (256)")
    p.add_argument("--block-length", type=int, default=32, help="block length (32)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences in flight (32)")
    p.add_argument("--policies", default="fixed,threshold,factor,oracle", help="policies to run")
    p.add_argument("--caches", default="none,prefix,dual", help="caches to run")
    p.add_argument("--eotp", default="no,yes", help="End-of-Text Prediction settings to run (no,yes)")
    p.add_argument("--thresholds", type=float_list, default=[0.9], help="threshold values (0.9)")
    p.add_argument("--factors", type=float_list, default=[1.0], help="factor values (1.0)")
    p.add_argument("--filters", default="shipped",
                   help="learned: comma-separated NAME=PATH filter checkpoints; 'shipped' is the tiny model's")
    p.add_argument("--accept-thresholds", type=float_list, default=[],
                   help="learned: accept thresholds (default: each filter's own)")
    p.add_argument("--presets", default="none",
                   help=f"comma-separated presets to run each configuration under: none or {','.join(PRESETS)} "
                        "(none)")
    p.add_argument("--eotp-modes", default="default",
                   help="comma-separated End-of-Text Prediction modes to run the EoTP configurations under: default "
                        f"(the preset's, else fill) or {','.join(EOTP_MODES)}; set with --eotp yes (default)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "decode.json", help="results JSON")
    p.add_argument("--rows-dir", type=Path, default=HERE.parent / "runs" / "bench-decode",
                   help="per-sample rows of every run (git-ignored by default)")
    p.add_argument("--readme", default=str(HERE / "README.md"), help="README whose table to rewrite, or 'none'")
    p.add_argument("--table", default="decode-table", help="name of the README's table markers (decode-table)")
    p.add_argument("--redo", action="append", default=[], metavar="RUN",
                   help="measure this run (e.g. fixed/none) again for --tasks, replacing its figures; repeatable")
    return p


def names(option: str, text: str, known: Collection[str]) -> list[str]:
    """The comma-separated names of ``option``, each one of ``known``."""
    values = text.split(",")
    unknown = [value for value in values if value not in known]
    if unknown:
        raise UsageError(f"{option}: unknown {unknown} (choose from {sorted(known)})")
    return values


def filter_paths(spec: str) -> dict[str, str | None]:
    """``NAME=PATH`` checkpoints (``shipped``: the tiny model's own, path ``None``)."""
    paths: dict[str, str | None] = {}
    for item in filter(None, spec.split(",")):
        name, separator, path = item.partition("=")
        if item != "shipped" and not (name and separator and path):
            raise UsageError(f"--filters {item!r} is not NAME=PATH (or 'shipped', the tiny model's own filter)")
        paths[name] = path or None
    if not paths:
        raise UsageError("--filters names no filter, which policy 'learned' needs")
    return paths


def run_settings(args: argparse.Namespace, run: Run, filters: dict[str, str | None]) -> dict:
    """The decode settings of ``run``."""
    knob = KNOB_SETTINGS.get(run.policy)
    return {"gen_length": args.gen_length, "block_length": args.block_length, "policy": run.policy, "eotp": run.eotp,
            "cache": run.cache, "batch_size": args.batch_size, **({knob: run.knob} if knob else {}),
            **({"filter": filters[run.filter]} if run.policy == "learned" else {}),
            **({"preset": run.preset} if run.preset else {}),
            **({"eotp_mode": run.eotp_mode} if run.eotp_mode else {})}


def setup_of(args: argparse.Namespace) -> dict:
    """What the figures depend on besides the configuration: a results file holds runs of one setup. The model's
    fingerprint is part of it, so a retrained model's runs are not skipped as if its predecessor's were its own."""
    return {"model": model_fingerprint(resolve_checkpoint(args.model)), "n": args.n, "data_seed": args.data_seed,
            "gen_length": args.gen_length, "block_length": args.block_length, "batch_size": args.batch_size,
            "dtype": "float32",
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores "
                       f"({args.device})".replace("  ", " "),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def read_results(path: Path, setup: dict) -> dict:
    """The results of earlier runs in ``path`` (none if it does not exist), which must be of the same setup."""
    if not path.exists():
        return {"setup": setup, "runs": {}}
    results = read_json(path, "--out results")
    if not isinstance(results.get("setup"), dict) or not isinstance(results.get("runs"), dict):
        raise FileFormatError(f"--out results {str(path)!r} has no 'setup' and 'runs' mappings: not results of "
                              "this benchmark")
    if results["setup"] != setup:
        raise UsageError(f"--out {str(path)!r} holds results of another setup {results['setup']}; move it away "
                         "first")
    return results


def main() -> None:
    script_main(build_parser(), benchmark)


def plan(args: argparse.Namespace) -> tuple[list[str], list[Run], dict[str, str | None]]:
    """The tasks, the runs of the grid and the learned policy's filter paths, every setting of every run checked
    (so a bad value is reported before the model is loaded)."""
    tasks, policies = names("--tasks", args.tasks, TASKS), names("--policies", args.policies, POLICIES)
    caches = names("--caches", args.caches, CACHES)
    eotps = [coerce("--eotp", value, bool) for value in args.eotp.split(",")]
    filters = filter_paths(args.filters) if "learned" in policies else {}
    cards = {name: load_filter(path, args.model, args.block_length).card for name, path in filters.items()}
    knobs = {"threshold": args.thresholds, "isolated": args.thresholds, "factor": args.factors,
             **{name: args.accept_thresholds or [card.accept_threshold] for name, card in cards.items()}}
    presets = tuple(None if name == "none" else name for name in names("--presets", args.presets,
                                                                        ("none", *PRESETS)))
    eotp_modes = tuple(None if name == "default" else name for name in names("--eotp-modes", args.eotp_modes,
                                                                             ("default", *EOTP_MODES)))
    runs = grid(policies, caches, eotps, knobs, filters, presets, eotp_modes)
    for run in runs:
        make_config(run_settings(args, run, filters))
    return tasks, runs, filters


def check_outputs(args: argparse.Namespace) -> None:
    """The results file, the rows directory and the README (with its table markers) can be written."""
    check_output_path(args.out, "--out")
    check_output_path(args.rows_dir, "--rows-dir", directory=True)
    if args.readme != "none":
        around_markers(check_output_path(args.readme, "--readme"), args.table, "--readme")


def benchmark(args: argparse.Namespace) -> None:
    """Every input checked (settings, filters, result and README files), then the grid decoded."""
    tasks, runs, filters = plan(args)
    check_outputs(args)
    results = read_results(args.out, setup_of(args))
    for name in args.redo:
        if name not in results["runs"]:
            raise UsageError(f"--redo {name!r}: no such run in {str(args.out)!r} (runs: {sorted(results['runs'])})")
        for task in tasks:
            results["runs"][name]["tasks"].pop(task, None)
    model, tokenizer = load_model(args.model, device=args.device)
    problems = {task: sample_problems(task, "test", args.n, args.data_seed) for task in tasks}
    timer = ForwardTimer(model)
    with torch.no_grad():  # warm-up (a few passes), so the first timed run does not pay for lazy initialisation
        list(iter_decoded(model, tokenizer, problems[tasks[0]][:2], make_config(
            {"gen_length": args.gen_length, "block_length": args.block_length, "policy": "threshold", "eotp": True})))
    for run in runs:
        record = results["runs"].get(run.name, {**asdict(run), "tasks": {}})
        if all(task in record["tasks"] for task in tasks):
            continue
        cfg, policy = decode_setup(run_settings(args, run, filters), args.model)
        for task in [t for t in tasks if t not in record["tasks"]]:
            rows_dir = args.rows_dir / task
            baseline_rows = rows_dir / (BASELINE.name.replace("/", "-") + ".jsonl")
            references = ([row["canvas"] for row in read_jsonl(baseline_rows, "baseline rows")]
                          if run.policy == "oracle" else None)
            timed = TimedFilter(policy.filter) if run.policy == "learned" else None
            task_policy = policy if timed is None else replace(policy, filter=timed)
            forward_before = timer.seconds
            rows = decode_task(model, tokenizer, problems[task], cfg, rows_dir / (run.name.replace("/", "-")
                               + ".jsonl"), references, task_policy, desc=f"{run.name} {task}")
            uncached = rows_dir / (run.uncached().name.replace("/", "-") + ".jsonl")
            compare = run.cache != "none" and uncached.is_file()  # the same variant without a cache, if measured
            record["tasks"][task] = summarise(rows, read_jsonl(uncached, "uncached rows") if compare else None)
            if timed is not None:
                record["tasks"][task].update(filter_s=timed.seconds, forward_s=timer.seconds - forward_before)
            results["runs"][run.name] = record
            add_ratios(results)
            write_atomic(args.out, json.dumps(results, indent=2) + "\n")
        print(json.dumps({run.name: {t: round(s["accuracy"], 3) for t, s in record["tasks"].items()}}), flush=True)
    if args.readme != "none":
        update_readme(Path(args.readme), results, args.table)


if __name__ == "__main__":
    main()
