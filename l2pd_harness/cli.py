"""The ``l2pd`` command line: generate, data, grade, evaluate, train-base, collect-traces, train-filter,
choose-threshold, train-policy, import-filter, regress, tasks-dir (registered in :func:`build_parser`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.files import JsonlWriter, check_output_path, read_json, read_jsonl
from l2pd_harness.lm_eval_tasks import TASKS_DIR
from l2pd_harness.loading import DTYPES
from l2pd_harness.settings import add_config_options, argument_type, option_values


class UsageError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as a single ``prog: error: ...`` line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


positive_int = argument_type("value", int, positive=True)


MODEL_HELP = "checkpoint directory or hub id in the local HF cache (default: the shipped tiny model)"


def add_decode_options(p: argparse.ArgumentParser) -> None:
    """Options of the decode engine (every :class:`DecodeConfig` field) and the model, shared by ``generate`` and
    ``evaluate``."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_config_options(p, DecodeConfig, given_only=True)
    p.add_argument("--references", type=Path, default=None,
                   help="policy oracle: an earlier `l2pd generate` output over the same prompts (its 'canvas'; a "
                        "shorter canvas is followed by end-of-text, a longer one cut to --gen-length)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (cpu)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="feed prompts raw instead of as a user turn of the tokenizer's chat template")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="decode prompts with the LLaDA reference sampler",
        description="Decode prompts with LLaDA's semi-autoregressive sampler. Output: one JSON object per prompt "
                    "with the input fields plus text, nfe (forward passes), tokens_per_step, latency_s.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt; the result is printed as JSON")
    source.add_argument("--input", type=Path, help="JSONL file, one object per line with a 'prompt' field")
    p.add_argument("--output", help="JSONL file for the results (default: stdout)")
    add_decode_options(p)
    p.set_defaults(func=run_generate)


def read_input(path: Path) -> list[dict]:
    """The rows of ``--input``; a file without any is refused (a run over nothing is a mistake, not a result)."""
    rows = read_jsonl(path, "--input")
    if not rows:
        raise UsageError(f"--input {str(path)!r} holds no rows")
    return rows


def read_requests(args: argparse.Namespace) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    rows = read_input(args.input)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str):
            raise UsageError(f"--input {str(args.input)!r} row {number} has no string 'prompt' field")
    return rows


def read_references(args: argparse.Namespace, policy: str, count: int) -> list[list[int]] | None:
    """The oracle's targets: the ``canvas`` of each row of ``--references`` (required by, and only for, oracle);
    their token ids are checked against the model by :func:`check_canvases` once it is loaded."""
    if policy != "oracle":
        if args.references is not None:
            raise UsageError(f"--references is only used by --policy oracle (got --policy {policy})")
        return None
    if args.references is None:
        raise UsageError("--policy oracle needs --references FILE: an earlier `l2pd generate` output over the "
                         "same prompts")
    rows = read_jsonl(args.references, "--references")
    if len(rows) != count:
        raise UsageError(f"--references {str(args.references)!r} must hold {count} rows with a 'canvas' list "
                         f"(one per prompt, from `l2pd generate`), found {len(rows)} rows")
    return [row.get("canvas") for row in rows]


def check_canvases(canvases: list, source: Path, vocab_size: int, gen_length: int | None = None) -> None:
    """Refuse a reference canvas that is not a list of the model's token ids (of ``gen_length`` tokens if given)."""
    for number, canvas in enumerate(canvases, start=1):
        if not isinstance(canvas, list) or not all(
                isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocab_size for token in canvas):
            raise UsageError(f"--references {str(source)!r} row {number}: 'canvas' must be a list of token ids in "
                             f"[0, {vocab_size}) (the model's vocabulary)")
        if gen_length is not None and len(canvas) != gen_length:
            raise UsageError(f"--references {str(source)!r} row {number}: 'canvas' has {len(canvas)} tokens, "
                             f"--gen-length is {gen_length}")


def decoded_rows(args: argparse.Namespace, requests: list[dict], desc: str) -> tuple[DecodeConfig, Iterator[dict]]:
    """Check the settings, load the model, and return the config and the decoded ``requests`` as an iterator in
    input order (nothing is written before the settings are known to be good)."""
    from l2pd_harness.evaluation import iter_decoded
    from l2pd_harness.loading import load_model
    from l2pd_harness.settings import decode_setup

    cfg, policy = decode_setup(option_values(args, DecodeConfig), args.model, DecodeConfig)
    references = read_references(args, cfg.policy, len(requests))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if references is not None:
        check_canvases(references, args.references, model.config.vocab_size)
    return cfg, iter_decoded(model, tokenizer, requests, cfg, args.chat_template, references, desc=desc,
                             policy=policy)


def run_generate(args: argparse.Namespace) -> None:
    output = None if args.output is None else check_output_path(args.output, "--output")
    if args.input is not None and output is not None and output.resolve() == args.input.resolve():
        raise UsageError(f"--output {str(output)!r} is the --input file: it would be replaced; give another path")
    requests = read_requests(args)
    _, rows = decoded_rows(args, requests, "generate")
    with JsonlWriter(output) as out, contextlib.closing(rows):  # closing ends the progress bar first
        for row in rows:
            out.write(row)


def task_name(text: str) -> str:
    from l2pd_harness.tasks import TASKS

    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"invalid task {text!r} (choose from {', '.join(sorted(TASKS))})")
    return text


def positive_int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers."""
    return tuple(positive_int(item) for item in text.split(","))


def share_list(top: bool) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: comma-separated numbers in (0, 1] (``top``: 1 allowed) or (0, 1)."""
    bounds = "(0, 1]" if top else "(0, 1)"

    def convert(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(item) for item in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
        bad = [v for v in values if not (0 < v <= 1 if top else 0 < v < 1)]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]} is not in {bounds}")
        return values

    return convert


def task_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated task names."""
    return tuple(task_name(name) for name in text.split(","))


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="write problems of a synthetic task as JSONL",
        description="Write N distinct problems of a task split as JSONL (GSM8K's question/answer fields, plus "
                    "prompt and task). Train and test splits are disjoint by construction.")
    p.add_argument("name", type=task_name, help="task: arith, changeone, listops or pairsum")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split (test)")
    p.add_argument("--n", type=positive_int, default=500, help="number of problems (500)")
    p.add_argument("--seed", type=int, default=123, help="sampling seed (123)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.set_defaults(func=run_data)


def run_data(args: argparse.Namespace) -> None:
    from l2pd_harness.tasks import sample_problems

    with JsonlWriter(check_output_path(args.out, "--out")) as out:
        for row in sample_problems(args.name, args.split, args.n, args.seed):
            out.write(row)


def add_grade_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "grade", help="score generated JSONL against its reference answers",
        description="Grade the 'text' of each row of a `l2pd generate` output against its 'answer', with the "
                    "grader of its 'task' (arith: the number after ####; listops: exact match; pairsum: any valid "
                    "pair; changeone: any one digit changed to 0). Prints JSON.")
    p.add_argument("--input", type=Path, required=True, help="JSONL from `l2pd generate` on `l2pd data` output")
    p.set_defaults(func=run_grade)


def run_grade(args: argparse.Namespace) -> None:
    from l2pd_harness.evaluation import grade_rows, summarise_rows

    rows = read_input(args.input)
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("task", "text", "answer") if key not in row]
        if missing:
            raise UsageError(f"--input {str(args.input)!r} row {number} lacks {missing}")
        if not all(isinstance(row[key], str) for key in ("task", "text", "answer")):
            raise UsageError(f"--input {str(args.input)!r} row {number}: 'task', 'text' and 'answer' must be strings")
        try:
            task_name(row["task"])
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"--input {str(args.input)!r} row {number}: {err}") from None
    report = {}
    for task in sorted({row["task"] for row in rows}):
        mine = [row for row in rows if row["task"] == task]
        if all("nfe" in row for row in mine):  # `l2pd generate` output: accuracy and speed by the one rule
            report[task] = summarise_rows(mine).as_row()
        else:
            report[task] = {"n": len(mine), "accuracy": sum(grade_rows(mine)) / len(mine)}
    print(json.dumps(report, indent=2))


def add_train_base_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.training.base import BaseTrainConfig

    p = subparsers.add_parser(
        "train-base", help="train a tiny LLaDA on the task suite (LLaDA SFT objective)",
        description="Train a tiny LLaDA-architecture model on the synthetic tasks with LLaDA's SFT objective; "
                    "writes a Hugging Face-layout checkpoint (config.json, model.safetensors, tokenizer) that "
                    "load_model() reads. Checkpoints every --checkpoint-every steps; --resume continues.")
    tasks = ",".join(BaseTrainConfig().tasks)
    p.add_argument("--task", type=task_list, default=tasks, help=f"comma-separated tasks ({tasks})")
    p.add_argument("--task-weights", type=positive_int_list, default=(),
                   help="comma-separated problems of each --task per round of the mix (default: one each)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    add_config_options(p, BaseTrainConfig, ("steps", "warmup", "tokens_per_batch", "min_gen_length", "max_gen_length",
                                            "d_model", "n_layers", "n_heads", "mlp_hidden_size", "max_sequence_length",
                                            "checkpoint_every", "lr", "weight_decay", "long_share", "eps",
                                            "semi_ar_share", "block_length", "seed"))
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers building batches ahead (0)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's weights and tokenizer with a fresh optimiser and schedule")
    p.set_defaults(func=run_train_base)


def run_train_base(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from l2pd_harness.training.base import BaseTrainConfig, train_base

    settings = {f.name: getattr(args, f.name) for f in fields(BaseTrainConfig) if hasattr(args, f.name)}
    try:
        cfg = BaseTrainConfig(**settings, tasks=args.task)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.resume and args.init_from is not None:
        raise UsageError("--resume continues --out's own run; it cannot be combined with --init-from")
    out = check_output_path(args.out, "--out", directory=True)
    try:
        log = train_base(cfg, out, device=args.device, resume=args.resume, num_workers=args.num_workers,
                         init_from=args.init_from)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print(json.dumps({"steps": log["steps_done"], "wall_time_s": round(log["wall_time_s"], 1),
                      "final_loss": log["losses"][-1][1] if log["losses"] else None}))


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="decode held-out problems of a task and report accuracy and forward passes",
        description="Sample held-out problems (as `l2pd data`), decode them (as `l2pd generate`) and grade them "
                    "(as `l2pd grade`) in one go. Prints a JSON summary.")
    p.add_argument("--task", type=task_name, required=True,
                   help="a task of the suite (arith, changeone, listops, pairsum)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split (test)")
    p.add_argument("--n", type=positive_int, default=500, help="number of problems (500)")
    p.add_argument("--data-seed", type=int, default=123, help="problem sampling seed (123)")
    p.add_argument("--output", help="also write the decoded rows as JSONL")
    add_decode_options(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    from l2pd_harness.evaluation import summarise_rows
    from l2pd_harness.tasks import sample_problems

    output = None if args.output is None else check_output_path(args.output, "--output")
    problems = sample_problems(args.task, args.split, args.n, args.data_seed)
    rows = []
    cfg, decoded = decoded_rows(args, problems, f"evaluate {args.task}")
    with JsonlWriter(output) if output is not None else contextlib.nullcontext() as out, \
            contextlib.closing(decoded):
        for row in decoded:
            rows.append(row)
            if out is not None:
                out.write(row)  # as they come, so a crash keeps the finished rows
    print(json.dumps({"task": args.task, "gen_length": cfg.gen_length, **summarise_rows(rows).as_row(),
                      "settings": dataclasses.asdict(cfg)}))


def add_collect_traces_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.filter.traces import TRAJECTORIES

    p = subparsers.add_parser(
        "collect-traces", help="record decode traces (block confidences + oracle labels) for filter training",
        description="Decode training-split problems with the one-token-per-step reference to get each final "
                    "output, then record a trajectory: per step, the block's confidences, margins, entropies, "
                    "masked positions and the label 'current prediction equals the final output'. Writes "
                    "DIR/steps.safetensors, DIR/problems.jsonl, DIR/meta.json.")
    p.add_argument("--task", type=task_list, default="arith,listops", help="comma-separated tasks (arith,listops)")
    p.add_argument("--n", type=positive_int, default=128, help="training-split problems per task (128)")
    p.add_argument("--data-seed", type=int, default=11, help="problem sampling seed (11)")
    p.add_argument("--out", required=True, help="trace directory")
    p.add_argument("--trajectory", default="oracle", choices=TRAJECTORIES,
                   help="whose decode the steps come from: the reference itself, the oracle (commit what already "
                        "matches), a trained filter's (learned, needs --filter), or a --threshold decode whose "
                        "left-over positions are labelled by rollout: does committing one now keep the answer "
                        "correct (rollout; with --filter, a rollout-labelled filter's decode beside the threshold, "
                        "a DAgger round) (oracle)")
    p.add_argument("--rollouts-per-pass", type=positive_int, default=3,
                   help="rollout: candidate positions labelled per pass, the most confident ones left (3)")
    p.add_argument("--rollout-min-confidence", type=argument_type("rollout_min_confidence", float, unit=True),
                   default=0.2,
                   help="rollout: lowest confidence of a candidate position (0.2)")
    p.add_argument("--references", type=Path, action="append", default=None,
                   help="an earlier reference decode of the same problems (`l2pd generate --steps GEN_LENGTH` "
                        "output at this --gen-length, tasks in --task order; repeat per file), instead of decoding "
                        "them again")
    add_config_options(p, DecodeConfig, ("gen_length", "block_length", "batch_size", "cache", "eotp", "filter",
                                         "accept_threshold", "threshold"), defaults={"eotp": True, "batch_size": 32})
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.set_defaults(func=run_collect_traces)


def run_collect_traces(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.rollouts import collect_rollouts, follows_threshold
    from l2pd_harness.filter.traces import collect, save_traces, trace_meta
    from l2pd_harness.loading import load_model
    from l2pd_harness.settings import decode_setup
    from l2pd_harness.tasks import sample_problems

    tasks = list(args.task)
    out = check_output_path(args.out, "--out", directory=True)
    problems = [row for task in tasks for row in sample_problems(task, "train", args.n, args.data_seed)]
    if args.trajectory == "reference" and (args.cache != "none" or args.references):
        raise UsageError("--trajectory reference records the reference decode itself: no --cache, no --references")
    if args.trajectory == "rollout" and args.references:
        raise UsageError("--trajectory rollout labels by rollout, not against reference decodes: no --references")
    policy = {"reference": "fixed", "oracle": "oracle", "learned": "learned",
              "rollout": "learned" if args.filter else "threshold"}[args.trajectory]
    values = {**option_values(args, DecodeConfig), "policy": policy,
              "eotp": args.eotp and args.trajectory != "reference"}
    cfg, policy_fn = decode_setup(values, args.model)
    if args.trajectory == "rollout" and not follows_threshold(cfg):
        raise UsageError(f"--filter {args.filter}: a rollout trajectory follows a filter that decodes beside a "
                         f"threshold (learned_commit with_threshold, a rollout-labelled filter), not "
                         f"{cfg.learned_commit}")
    files = {path: read_jsonl(path, "--references") for path in args.references or ()}
    references = [row for rows in files.values() for row in rows] if files else None
    if references is not None and [r.get("prompt") for r in references] != [p["prompt"] for p in problems]:
        raise UsageError(f"--references {[str(p) for p in args.references]} do not hold the reference decodes "
                         f"of these {len(problems)} problems (tasks {tasks}, --n {args.n}, --data-seed "
                         f"{args.data_seed}) in order")
    model, tokenizer = load_model(args.model, device=args.device)
    for path, rows in files.items():
        check_canvases([row.get("canvas") for row in rows], path, model.config.vocab_size, cfg.gen_length)
    rollout = None
    if args.trajectory == "rollout":
        steps, rows = collect_rollouts(model, tokenizer, problems, cfg, policy_fn, args.rollouts_per_pass,
                                       args.rollout_min_confidence)
        rollout = {"threshold": cfg.threshold, "rollouts_per_pass": args.rollouts_per_pass,
                   "rollout_min_confidence": args.rollout_min_confidence}
    else:
        steps, rows = collect(model, tokenizer, problems, cfg, args.trajectory, references, policy_fn)
    meta = trace_meta(args.model, cfg, args.trajectory, tasks, args.data_seed, steps, rows, rollout)
    save_traces(out, steps, rows, meta)
    labelled = steps.get("labelled", steps["masked"])
    print(json.dumps({"out": str(out), "steps": meta.steps, "problems": meta.problems,
                      "labelled_positions": int(labelled.sum()),
                      "positive_share": round(float(steps["label"][labelled].float().mean()), 4),
                      "reference_accuracy": meta.reference_accuracy}))


def add_regress_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "regress", help="CI check: accuracy and forward passes of the main configurations against a reference",
        description="Decode fixed held-out test problems of each task with the shipped tiny model under the "
                    "regression configurations (fixed 1 token/step; threshold 0.9 + EoTP; learned + EoTP; learned "
                    "+ EoTP + dual cache) and compare with the committed reference: fails (exit 1) when a task's "
                    "accuracy drops by more than two standard errors of the reference accuracy at its sample size, "
                    "or its mean NFE grows by more than 5%. --update records a new reference instead.")
    p.add_argument("--reference", type=Path, default=Path("results/regression/reference.json"),
                   help="reference JSON (results/regression/reference.json, from the current directory)")
    p.add_argument("--update", action="store_true", help="measure and write a new reference instead of checking")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences in flight (32; outputs do not depend on it)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.set_defaults(func=run_regress)


def run_regress(args: argparse.Namespace) -> None:
    from l2pd_harness import regression
    from l2pd_harness.files import write_atomic
    from l2pd_harness.loading import load_model

    reference = None
    if args.update:
        check_output_path(args.reference, "--reference")
    else:
        if not args.reference.exists():
            raise UsageError(f"--reference {str(args.reference)!r} does not exist (record one with "
                             "`l2pd regress --update`)")
        reference = read_json(args.reference, "--reference")
        try:
            regression.check_comparable(reference)
        except regression.RegressionError as err:
            raise UsageError(f"--reference {str(args.reference)!r}: {err}") from None
    model, tokenizer = load_model(device=args.device)
    measured = regression.measure(model, tokenizer, args.batch_size)
    if reference is None:
        write_atomic(args.reference, json.dumps(measured, indent=1) + "\n")
        print(regression.reference_table(measured) + f"\n\nwrote {args.reference}")
        return
    verdicts = regression.compare(reference, measured)
    print(regression.verdict_table(verdicts))
    failures = [failure for verdict in verdicts for failure in verdict.failures()]
    if failures:
        print("\nregression check FAILED:\n" + "\n".join(f"- {failure}" for failure in failures))
        raise SystemExit(1)
    print(f"\nregression check passed ({len(verdicts)} checks against {args.reference})")


def add_train_filter_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.filter.model import ARCHITECTURES, FEATURES, POSITION_FEATURES
    from l2pd_harness.filter.train import FilterTrainConfig

    p = subparsers.add_parser(
        "train-filter", help="train a Learn2PD filter on decode traces",
        description="Train the filter (binary cross-entropy on masked positions, validation split by problem, "
                    "early stopping), choose its default accept threshold by decoding the validation problems, "
                    "and write FILE.safetensors + FILE.json. Prints precision/recall at that threshold.")
    p.add_argument("--traces", type=Path, nargs="+", required=True, help="trace directories from collect-traces")
    p.add_argument("--out", required=True, help="checkpoint path (NAME.safetensors; NAME.json beside)")
    p.add_argument("--architecture", default="block_mlp", choices=ARCHITECTURES,
                   help="block_mlp: the paper's (block confidences -> a logit per position); position_mlp: a "
                        "shared MLP on each position's --features (block_mlp)")
    p.add_argument("--features", default=None,
                   help=f"comma-separated, from {','.join(FEATURES)} (block_mlp: confidence; position_mlp: "
                        f"{','.join(POSITION_FEATURES)})")
    p.add_argument("--hidden-size", type=positive_int, default=32, help="hidden width (32)")
    add_config_options(p, FilterTrainConfig)
    add_validation_decode_options(p)
    p.set_defaults(func=run_train_filter)


def add_validation_decode_options(p: argparse.ArgumentParser) -> None:
    """How ``train-filter`` and ``choose-threshold`` decode the validation problems."""
    p.add_argument("--decode-batch-size", type=positive_int, default=32,
                   help="sequences in flight when decoding validation problems (32)")
    p.add_argument("--model", default=None, help="base model of the traces (default: the shipped tiny model)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")


def check_filter_out(path: str) -> Path:
    """``--out`` of a filter checkpoint, refused (before any training or decoding) where its files cannot go."""
    from l2pd_harness.filter.model import checkpoint_paths

    for part in (path, *checkpoint_paths(path)):
        check_output_path(part, "--out")
    return Path(path)


def run_train_filter(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.model import POSITION_FEATURES, FilterConfig
    from l2pd_harness.filter.traces import check_base_model
    from l2pd_harness.filter.train import FilterTrainConfig, train_filter
    from l2pd_harness.loading import load_model

    features = args.features.split(",") if args.features else (
        ["confidence"] if args.architecture == "block_mlp" else list(POSITION_FEATURES))
    out = check_filter_out(args.out)
    meta = check_base_model(args.traces[0], args.model)
    try:
        filter_cfg = FilterConfig(args.architecture, tuple(features), meta.block_length, args.hidden_size)
        train_cfg = FilterTrainConfig(**option_values(args, FilterTrainConfig))
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tokenizer = load_model(args.model, device=args.device)
    learned = train_filter(args.traces, filter_cfg, train_cfg, model, tokenizer, args.decode_batch_size)
    learned.save(out)
    card = learned.card
    print(json.dumps({"out": str(out), "architecture": filter_cfg.architecture, "features": features,
                      "accept_threshold": card.accept_threshold,
                      **{k: card.validation[k] for k in ("precision", "recall")},
                      **{k: card.training[k] for k in ("epochs", "best_val_loss", "parameters", "wall_time_s")}}))


def add_choose_threshold_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.filter.train import ACCEPT_THRESHOLDS, FilterTrainConfig

    p = subparsers.add_parser(
        "choose-threshold", help="choose a trained filter's default accept threshold again, on more problems",
        description="Decode every problem of the given trace directories that the filter was not fitted on "
                    "(its own validation problems, problems of newly collected traces) with `learned` + EoTP at "
                    "each candidate accept threshold, decoding as the filter's card says, and keep the lowest "
                    "from which every higher one stays within --max-accuracy-drop of the reference decode, as "
                    "train-filter does (with --thresholds, beside each threshold too). The weights are unchanged; "
                    "writes the filter with the new default and search to --out (which may be --filter).")
    p.add_argument("--filter", type=Path, required=True, help="filter checkpoint from `l2pd train-filter`")
    p.add_argument("--traces", type=Path, nargs="+", required=True,
                   help="trace directories from collect-traces (problems the filter was fitted on are left out)")
    p.add_argument("--out", required=True, help="checkpoint path to write (NAME.safetensors)")
    p.add_argument("--thresholds", type=share_list(top=True), default=(),
                   help="for a filter that decodes beside a threshold (rollout-labelled): make the choice beside "
                        "each of these comma-separated thresholds and keep, on the card, the one whose choice stays "
                        "within --max-accuracy-drop in the fewest passes (the card's threshold only)")
    p.add_argument("--accept-thresholds", type=share_list(top=False),
                   default=ACCEPT_THRESHOLDS, help="comma-separated candidate accept thresholds "
                                                   f"({','.join(map(str, ACCEPT_THRESHOLDS))})")
    add_config_options(p, FilterTrainConfig, ("max_accuracy_drop",))
    add_validation_decode_options(p)
    p.set_defaults(func=run_choose_threshold)


def run_choose_threshold(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.model import load_filter
    from l2pd_harness.filter.traces import read_meta
    from l2pd_harness.filter.train import FilterTrainConfig, rechoose_accept_threshold
    from l2pd_harness.loading import load_model

    out = check_filter_out(args.out)
    try:
        FilterTrainConfig(max_accuracy_drop=args.max_accuracy_drop)  # its checks of the setting
    except ValueError as err:
        raise UsageError(str(err)) from None
    learned = load_filter(args.filter, args.model, read_meta(args.traces[0]).block_length)
    model, tokenizer = load_model(args.model, device=args.device)
    chosen = rechoose_accept_threshold(learned, args.traces, model, tokenizer, args.max_accuracy_drop,
                                       args.decode_batch_size, args.thresholds, args.accept_thresholds)
    chosen.save(out)
    validation = chosen.card.validation
    print(json.dumps({"out": str(out), "accept_threshold": chosen.card.accept_threshold,
                      "decode_with": chosen.card.training.get("decode_with"), "replaces": validation["replaces"],
                      **{k: validation[k] for k in ("problems", "precision", "recall")}}))


def add_import_filter_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.filter.released import PAPER_ACCEPT_THRESHOLD

    p = subparsers.add_parser(
        "import-filter", help="convert the Learn2PD paper's released filter (.pth) into a filter checkpoint",
        description="Read the released Learn2PD filter (a torch state dict of linear1/linear2 weights and biases, "
                    "loaded without running any code in the file) and write it as a filter checkpoint "
                    "(NAME.safetensors + NAME.json) for the base model --base-model, whose fingerprint the card "
                    "records: `l2pd generate --model SAME --policy learned --filter NAME.safetensors` then uses it.")
    p.add_argument("released", type=Path, help="the released filter checkpoint (.pth)")
    p.add_argument("--base-model", required=True,
                   help="the checkpoint the filter was trained for (directory or hub id in the local HF cache), "
                        "e.g. GSAI-ML/LLaDA-8B-Instruct")
    p.add_argument("--out", required=True, help="checkpoint path (NAME.safetensors; NAME.json beside)")
    p.add_argument("--accept-threshold", type=argument_type("accept_threshold", float), default=PAPER_ACCEPT_THRESHOLD,
                   help=f"default accept threshold recorded in the card ({PAPER_ACCEPT_THRESHOLD}, the published one)")
    p.set_defaults(func=run_import_filter)


def run_import_filter(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.released import import_released

    out = check_filter_out(args.out)
    learned = import_released(args.released, args.base_model, args.accept_threshold)
    learned.save(out)
    print(json.dumps({"out": str(out), "base_model": learned.card.base_model,
                      "base_model_name": learned.card.training["base_model_name"],
                      "accept_threshold": learned.card.accept_threshold,
                      "block_length": learned.card.config.block_length}))


def add_train_policy_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.filter.model import FEATURES, NEIGHBOUR_FEATURES, POSITION_FEATURES
    from l2pd_harness.filter.reinforce import ReinforceConfig

    p = subparsers.add_parser(
        "train-policy", help="train a decode policy by reinforcement against the model (no traces, no labels)",
        description="Start a position_mlp filter as the confidence threshold --init-threshold, then per iteration "
                    "decode --problems training problems per task --rollouts times with commits sampled from the "
                    "filter's probabilities, reward correct decodes that take few forward passes (--speed-weight) "
                    "and take one policy-gradient step against each problem's mean reward. Writes FILE.safetensors "
                    "+ FILE.json for `--policy learned --filter FILE` (accept threshold 0.5) after every iteration, "
                    "the card holding each iteration's accuracy, forward passes and reward.")
    p.add_argument("--task", type=task_list, default="arith", help="comma-separated tasks (arith)")
    p.add_argument("--out", required=True, help="checkpoint path (NAME.safetensors; NAME.json beside)")
    p.add_argument("--features", default=",".join(POSITION_FEATURES + NEIGHBOUR_FEATURES),
                   help=f"comma-separated, from {','.join(FEATURES)}; must include confidence "
                        f"({','.join(POSITION_FEATURES + NEIGHBOUR_FEATURES)})")
    p.add_argument("--hidden-size", type=positive_int, default=32, help="hidden width (32)")
    add_config_options(p, ReinforceConfig)
    add_config_options(p, DecodeConfig, ("gen_length", "block_length", "batch_size", "cache", "eotp"),
                       defaults={"eotp": True, "batch_size": 64})
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.set_defaults(func=run_train_policy)


def run_train_policy(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.model import FilterConfig
    from l2pd_harness.filter.reinforce import ReinforceConfig, reinforce
    from l2pd_harness.loading import load_model, model_fingerprint, resolve_checkpoint
    from l2pd_harness.settings import make_config

    out = check_filter_out(args.out)
    decode_cfg = make_config({**option_values(args, DecodeConfig), "policy": "learned", "accept_threshold": 0.5})
    try:
        filter_cfg = FilterConfig("position_mlp", tuple(args.features.split(",")), decode_cfg.block_length,
                                  args.hidden_size)
        cfg = ReinforceConfig(**option_values(args, ReinforceConfig))
    except ValueError as err:
        raise UsageError(str(err)) from None
    model, tokenizer = load_model(args.model, device=args.device)
    learned = reinforce(model, tokenizer, list(args.task), decode_cfg, cfg, filter_cfg,
                        model_fingerprint(resolve_checkpoint(args.model)), on_iteration=lambda f: f.save(out))
    learned.save(out)
    last = learned.card.training["history"][-1:] or [{}]
    print(json.dumps({"out": str(out), "features": list(filter_cfg.features), **last[0],
                      "wall_time_s": learned.card.training["wall_time_s"]}))


def add_tasks_dir_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks-dir", help="print the folder of the lm-eval task YAMLs shipped with the package",
        description="Print the installed folder of the package's lm-eval tasks (arith, changeone, listops, pairsum, "
                    "gsm8k_local), for lm-eval's --include_path: "
                    "lm_eval --model l2pd --tasks arith --include_path \"$(l2pd tasks-dir)\"")
    p.set_defaults(func=lambda _: print(TASKS_DIR))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="l2pd", description="l2pd-harness: fast, measured decoding of diffusion LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (add_generate_parser, add_data_parser, add_grade_parser, add_evaluate_parser, add_train_base_parser,
                add_collect_traces_parser, add_train_filter_parser, add_choose_threshold_parser,
                add_train_policy_parser, add_import_filter_parser, add_regress_parser, add_tasks_dir_parser):
        add(subparsers)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that report bad input (settings, files, checkpoints, requests): one line and exit code 2."""
    from l2pd_harness.decoding.scheduler import DecodeError
    from l2pd_harness.files import FileFormatError
    from l2pd_harness.filter.model import FilterError
    from l2pd_harness.loading import ModelLoadError
    from l2pd_harness.models.llada import ConfigError
    from l2pd_harness.settings import SettingsError
    from l2pd_harness.tasks import TaskError

    return (UsageError, ModelLoadError, ConfigError, FilterError, FileFormatError, SettingsError, DecodeError,
            TaskError)


def script_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None]) -> None:
    """Parse the command line and ``run`` it, bad input reported in one line with exit code 2 (the benchmark
    scripts)."""
    args = parser.parse_args()
    try:
        run(args)
    except user_errors() as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def kept_rows(err: BaseException) -> str:
    """What an interrupted or failed run kept (:class:`JsonlWriter` notes it on the exception)."""
    kept = getattr(err, "kept_rows", None)
    return f"; {kept}" if kept else ""


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except user_errors() as err:
        parser.exit(2, f"l2pd {args.command}: error: {err}{kept_rows(err)}\n")
    except KeyboardInterrupt as err:
        parser.exit(130, f"l2pd {args.command}: interrupted{kept_rows(err)}\n")


if __name__ == "__main__":
    main()
