"""Run lm-eval once per configuration of a small YAML grid, one output directory each, resuming after a crash.

    python analysis/sweep.py analysis/sweeps/tiny-quick.yaml --out results/sweep-quick

The grid file::

    tasks: [arith, listops]
    limit: 32            # documents per task (null: all)
    batch_size: 32
    model_args: {gen_length: 256, block_length: 32}      # shared by every configuration
    grid:                # each entry expands to the product of its list values
      - {policy: fixed, steps: [256, 64]}
      - {policy: threshold, threshold: [0.7, 0.9], eotp: [false, true], cache: [none, dual]}

A configuration whose directory already holds lm-eval's ``results_*.json`` is skipped, so rerunning the command
after a crash redoes only what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]


def expand(entry: dict) -> list[dict]:
    """``{a: [1, 2], b: x}`` -> ``[{a: 1, b: x}, {a: 2, b: x}]``."""
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def run_name(model_args: dict) -> str:
    return "_".join(f"{key}-{value}" for key, value in model_args.items())


def configurations(spec: dict) -> list[dict]:
    base = spec.get("model_args", {})
    runs = [{**base, **point} for entry in spec["grid"] for point in expand(entry)]
    return list({run_name(run): run for run in runs}.values())  # duplicates run once


def lm_eval_command(spec: dict, model_args: dict, out_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "lm_eval", "--model", "l2pd",
               "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
               "--tasks", ",".join(spec["tasks"]), "--include_path", str(REPO / "tasks"),
               "--batch_size", str(spec.get("batch_size", 16)), "--output_path", str(out_dir), "--log_samples"]
    if spec.get("limit") is not None:
        command += ["--limit", str(spec["limit"])]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path, help="YAML grid file")
    parser.add_argument("--out", type=Path, required=True, help="directory for one lm-eval run per configuration")
    args = parser.parse_args()
    spec = yaml.safe_load(args.grid.read_text())
    missing = {"tasks", "grid"} - set(spec)
    if missing:
        parser.error(f"{args.grid}: missing keys {sorted(missing)}")
    runs = configurations(spec)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for model_args in tqdm(runs, desc="sweep", unit="config"):
        out_dir = args.out / run_name(model_args)
        if any(out_dir.glob("*/results_*.json")):
            continue
        for stale in out_dir.glob("steps_*.jsonl*"):  # the step logs of an attempt that crashed
            stale.unlink()
        subprocess.run(lm_eval_command(spec, model_args, out_dir), check=True, env=env,
                       stdout=subprocess.DEVNULL)
    print(f"{len(runs)} configurations in {args.out}; next: python analysis/pareto.py {args.out} --out "
          f"{args.out / 'report'}")


if __name__ == "__main__":
    main()
