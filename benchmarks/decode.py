"""Decode benchmark: every policy x EoTP x KV cache on held-out problems of each task, on one machine, one run.

For each configuration: accuracy, mean forward passes (NFE) per sample, tokens committed per forward pass,
generated tokens per second (response tokens before the first end-of-text, over the run's wall time), p50/p95
per-sample latency, speedups against the baseline (``fixed``, one token per step, no EoTP, no cache), and how
often a cached run's output equals the same policy's ``cache=none`` output.

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
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.loading import load_model
from l2pd_harness.tasks import TASKS, sample_problems

HERE = Path(__file__).resolve().parent
BASELINE = ("fixed", False, "none")
POLICY_KNOBS = {"fixed": "1 token/step", "threshold": "0.9", "factor": "1.0", "oracle": "baseline output"}
TABLE_START, TABLE_END = "<!-- decode-table:start -->", "<!-- decode-table:end -->"


def config_name(policy: str, eotp: bool, cache: str) -> str:
    return f"{policy}{'+eotp' if eotp else ''}/{cache}"


def grid(policies: list[str], caches: list[str]) -> list[tuple[str, bool, str]]:
    """The baseline first (the oracle's references and every ratio come from it), then cache=none before the
    cached runs of the same policy (their outputs are compared with it)."""
    runs = [(p, e, c) for p in policies for e in (False, True) for c in caches]
    return sorted(runs, key=lambda run: (run != BASELINE, policies.index(run[0]), run[1], caches.index(run[2])))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(text)
    os.replace(staging, path)


def decode_task(model, tokenizer, task: str, problems: list[dict], cfg: DecodeConfig, rows_path: Path,
                references: list[list[int]] | None) -> tuple[list[dict], float]:
    """Decode one task's problems; returns the rows (also written to ``rows_path``) and the wall time."""
    start = time.perf_counter()
    rows = list(iter_decoded(model, tokenizer, problems, cfg, references=references,
                             desc=f"{config_name(cfg.policy, cfg.eotp, cfg.cache)} {task}"))
    wall = time.perf_counter() - start
    write_atomic(rows_path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows, wall


def summarise(rows: list[dict], wall_s: float, same_policy_rows: list[dict] | None) -> dict:
    nfe = [row["nfe"] for row in rows]
    latency = sorted(row["latency_s"] for row in rows)
    summary = {
        "n": len(rows),
        "accuracy": sum(grade_rows(rows)) / len(rows),
        "mean_nfe": statistics.fmean(nfe),
        "tokens_per_forward": sum(sum(row["tokens_per_step"]) for row in rows) / sum(nfe),
        "positions_per_sample": statistics.fmean(sum(row["positions_per_step"]) for row in rows),
        "generated_tokens": sum(row["generated_tokens"] for row in rows),
        "wall_s": wall_s,
        "tokens_per_s": sum(row["generated_tokens"] for row in rows) / wall_s,
        "latency_p50_s": statistics.median(latency),
        "latency_p95_s": latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))],
    }
    if same_policy_rows is not None:
        same = sum(a["text"] == b["text"] for a, b in zip(rows, same_policy_rows, strict=True))
        summary["matches_cache_none"] = same / len(rows)
    return summary


def add_ratios(results: dict) -> None:
    """Speedups and accuracy change of every run against the baseline as it now stands (so a rerun baseline
    updates every ratio)."""
    baseline = results["runs"].get(config_name(*BASELINE))
    if baseline is None:
        return
    for run in results["runs"].values():
        for task, s in run["tasks"].items():
            base = baseline["tasks"].get(task)
            if base is not None:
                s["nfe_speedup"] = base["mean_nfe"] / s["mean_nfe"]
                s["time_speedup"] = base["wall_s"] / s["wall_s"]
                s["accuracy_delta"] = s["accuracy"] - base["accuracy"]


def markdown_table(results: dict) -> str:
    header = ("| task | policy | EoTP | cache | accuracy | mean NFE | tokens/forward | tokens/s | p50 latency (s) "
              "| p95 latency (s) | NFE speedup | time speedup | same output as cache=none |")
    lines = [header, "|" + "---|" * 13]
    tasks = sorted({task for run in results["runs"].values() for task in run["tasks"]})
    for task in tasks:
        for run in (run for run in results["runs"].values() if task in run["tasks"]):
            s = run["tasks"][task]
            match = f"{100 * s['matches_cache_none']:.1f}%" if "matches_cache_none" in s else "-"
            lines.append(
                f"| {task} | {run['policy']} ({POLICY_KNOBS[run['policy']]}) | {'yes' if run['eotp'] else 'no'} "
                f"| {run['cache']} | {100 * s['accuracy']:.1f}% | {s['mean_nfe']:.1f} | {s['tokens_per_forward']:.2f} "
                f"| {s['tokens_per_s']:.1f} | {s['latency_p50_s']:.2f} | {s['latency_p95_s']:.2f} "
                f"| {s.get('nfe_speedup', 1.0):.2f}x | {s.get('time_speedup', 1.0):.2f}x | {match} |")
    return "\n".join(lines)


def update_readme(readme: Path, results: dict) -> None:
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{readme} lacks the {TABLE_START} ... {TABLE_END} markers")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    setup = results["setup"]
    caption = (f"\n{setup['n']} held-out test problems per task (seed {setup['data_seed']}), gen_length "
               f"{setup['gen_length']}, block_length {setup['block_length']}, batch size {setup['batch_size']}, "
               f"{setup['dtype']}, greedy; {setup['machine']}, torch {setup['torch']}.\n\n")
    write_atomic(readme, head + TABLE_START + caption + markdown_table(results) + "\n" + TABLE_END + tail)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped tiny model)")
    p.add_argument("--tasks", default="arith,listops", help="comma-separated tasks (arith,listops)")
    p.add_argument("--n", type=int, default=200, help="held-out problems per task (200)")
    p.add_argument("--data-seed", type=int, default=123, help="problem sampling seed (123)")
    p.add_argument("--gen-length", type=int, default=256, help="canvas positions (256)")
    p.add_argument("--block-length", type=int, default=32, help="block length (32)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences in flight (32)")
    p.add_argument("--policies", default="fixed,threshold,factor,oracle", help="policies to run")
    p.add_argument("--caches", default="none,prefix,dual", help="caches to run")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "decode.json", help="results JSON")
    p.add_argument("--rows-dir", type=Path, default=HERE.parent / "runs" / "bench-decode",
                   help="per-sample rows of every run (git-ignored by default)")
    p.add_argument("--readme", default=str(HERE / "README.md"), help="README whose table to rewrite, or 'none'")
    p.add_argument("--redo", action="append", default=[], metavar="RUN",
                   help="measure this run (e.g. fixed/none) again for --tasks, replacing its figures; repeatable")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    tasks, policies, caches = args.tasks.split(","), args.policies.split(","), args.caches.split(",")
    for task in tasks:
        if task not in TASKS:
            raise SystemExit(f"--tasks: unknown task {task!r} (choose from {sorted(TASKS)})")
    model, tokenizer = load_model(args.model, device=args.device)
    setup = {"n": args.n, "data_seed": args.data_seed, "gen_length": args.gen_length,
             "block_length": args.block_length, "batch_size": args.batch_size, "dtype": "float32",
             "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores "
                        f"({args.device})".replace("  ", " "),
             "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"setup": setup, "runs": {}}
    if results["setup"] != setup:
        raise SystemExit(f"{args.out} holds results of another setup {results['setup']}; move it away first")
    problems = {task: sample_problems(task, "test", args.n, args.data_seed) for task in tasks}
    with torch.no_grad():  # warm-up, so the first timed run does not pay for lazy initialisation
        list(iter_decoded(model, tokenizer, problems[tasks[0]][:2], DecodeConfig(gen_length=args.gen_length,
                                                                                 block_length=args.block_length)))
    for name in args.redo:
        if name not in results["runs"]:
            raise SystemExit(f"--redo {name!r}: no such run in {args.out} (runs: {sorted(results['runs'])})")
        for task in tasks:
            results["runs"][name]["tasks"].pop(task, None)
    for policy, eotp, cache in grid(policies, caches):
        name = config_name(policy, eotp, cache)
        run = results["runs"].get(name, {"policy": policy, "eotp": eotp, "cache": cache, "tasks": {}})
        if all(task in run["tasks"] for task in tasks):
            continue
        cfg = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, policy=policy, eotp=eotp,
                           cache=cache, batch_size=args.batch_size)
        for task in [t for t in tasks if t not in run["tasks"]]:
            rows_dir = args.rows_dir / task
            baseline_rows = rows_dir / (config_name(*BASELINE).replace("/", "-") + ".jsonl")
            references = [row["canvas"] for row in read_rows(baseline_rows)] if policy == "oracle" else None
            rows, wall = decode_task(model, tokenizer, task, problems[task], cfg,
                                     rows_dir / (name.replace("/", "-") + ".jsonl"), references)
            uncached = rows_dir / (config_name(policy, eotp, "none").replace("/", "-") + ".jsonl")
            run["tasks"][task] = summarise(rows, wall, read_rows(uncached) if cache != "none" else None)
            results["runs"][name] = run
            add_ratios(results)
            write_atomic(args.out, json.dumps(results, indent=2) + "\n")
        print(json.dumps({name: {t: round(s["accuracy"], 3) for t, s in run["tasks"].items()}}), flush=True)
    if args.readme != "none":
        update_readme(Path(args.readme), results)


if __name__ == "__main__":
    main()
