"""The ``l2pd`` command line: generate, data, grade, evaluate, train-base, collect-traces, train-filter,
choose-threshold, regress (registered in :func:`build_parser`)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from l2pd_harness.jsonl import JsonlWriter
from l2pd_harness.loading import DTYPES


class UsageError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as a single ``prog: error: ...`` line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_field_options(p: argparse.ArgumentParser, config_cls: type, names: tuple[str, ...], kind) -> None:
    """One ``--option`` per dataclass field in ``names``, typed by ``kind``, its help the field's docstring."""
    defaults, docs = config_cls(), field_docs(config_cls)
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                       help=f"{docs[name]} ({getattr(defaults, name)})")


def add_decode_options(p: argparse.ArgumentParser) -> None:
    """Options of the decode engine and the model, shared by ``generate`` and ``evaluate``."""
    from l2pd_harness.decoding.config import CACHES, POLICIES, REMASKING, DecodeConfig

    defaults, docs = DecodeConfig(), field_docs(DecodeConfig)
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id in the local HF cache (default: the shipped tiny model)")
    p.add_argument("--policy", default=defaults.policy, choices=POLICIES, help=f"{docs['policy']} (fixed)")
    add_field_options(p, DecodeConfig, ("gen_length", "block_length", "batch_size"), positive_int)
    p.add_argument("--steps", type=positive_int, default=None, help=docs["steps"])
    p.add_argument("--remasking", default=defaults.remasking, choices=REMASKING,
                   help=f"{docs['remasking']} ({defaults.remasking})")
    add_field_options(p, DecodeConfig, ("threshold", "factor", "temperature"), float)
    p.add_argument("--eotp", action=argparse.BooleanOptionalAction, default=defaults.eotp,
                   help=f"{docs['eotp']} (off)")
    p.add_argument("--cache", default=defaults.cache, choices=CACHES, help=f"{docs['cache']} ({defaults.cache})")
    p.add_argument("--references", type=Path, default=None,
                   help="policy oracle: an earlier `l2pd generate` output over the same prompts (its 'canvas')")
    add_filter_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices (0)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (cpu)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="feed prompts raw instead of as a user turn of the tokenizer's chat template")


def add_filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", type=Path, default=None,
                   help="policy learned: filter checkpoint from `l2pd train-filter` (default: the filter shipped "
                        "with the tiny model, when decoding that model)")
    p.add_argument("--accept-threshold", type=float, default=None,
                   help="policy learned: commit masked positions whose filter probability exceeds this "
                        "(default: the filter's own, chosen on validation problems)")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="decode prompts with the LLaDA reference sampler",
        description="Decode prompts with LLaDA's semi-autoregressive sampler. Output: one JSON object per prompt "
                    "with the input fields plus text, nfe (forward passes), tokens_per_step, latency_s.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt; the result is printed as JSON")
    source.add_argument("--input", type=Path, help="JSONL file, one object per line with a 'prompt' field")
    p.add_argument("--output", type=Path, help="JSONL file for the results (default: stdout)")
    add_decode_options(p)
    p.set_defaults(func=run_generate)


def read_requests(args: argparse.Namespace) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    rows = read_jsonl(args.input, "--input")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str):
            raise UsageError(f"--input {str(args.input)!r} row {number} has no string 'prompt' field")
    return rows


def read_jsonl(path: Path, option: str) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"{option} {str(path)!r} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def decode_config(args: argparse.Namespace):
    from l2pd_harness.decoding.config import DecodeConfig

    try:
        cfg = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, policy=args.policy,
                           steps=args.steps, remasking=args.remasking, threshold=args.threshold,
                           factor=args.factor, eotp=args.eotp, cache=args.cache, temperature=args.temperature,
                           seed=args.seed, batch_size=args.batch_size)
        return cfg if args.accept_threshold is None else replace(cfg, accept_threshold=args.accept_threshold)
    except ValueError as err:
        raise UsageError(str(err)) from None


def read_references(args: argparse.Namespace, count: int) -> list[list[int]] | None:
    """The oracle's targets: the ``canvas`` of each row of ``--references`` (required by, and only for, oracle)."""
    if args.policy != "oracle":
        if args.references is not None:
            raise UsageError(f"--references is only used by --policy oracle (got --policy {args.policy})")
        return None
    if args.references is None:
        raise UsageError("--policy oracle needs --references FILE: an earlier `l2pd generate` output over the "
                         "same prompts")
    rows = read_jsonl(args.references, "--references")
    if len(rows) != count or any(not isinstance(row.get("canvas"), list) for row in rows):
        raise UsageError(f"--references {str(args.references)!r} must hold {count} rows with a 'canvas' list "
                         f"(one per prompt, from `l2pd generate`), found {len(rows)} rows")
    return [row["canvas"] for row in rows]


def decoded_rows(args: argparse.Namespace, requests: list[dict], desc: str) -> Iterator[dict]:
    """Check the settings, load the model, and return the decoded ``requests`` as an iterator in input order
    (nothing is written before the settings are known to be good)."""
    from l2pd_harness.evaluation import iter_decoded
    from l2pd_harness.filter.model import decode_policy
    from l2pd_harness.loading import load_model

    cfg, policy = decode_policy(decode_config(args), args.filter, args.model, args.accept_threshold)
    references = read_references(args, len(requests))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    return iter_decoded(model, tokenizer, requests, cfg, args.chat_template, references, desc=desc, policy=policy)


def run_generate(args: argparse.Namespace) -> None:
    requests = read_requests(args)
    with JsonlWriter(args.output) as out:
        for row in decoded_rows(args, requests, "generate"):
            out.write(row)


def task_name(text: str) -> str:
    from l2pd_harness.tasks import TASKS

    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"invalid task {text!r} (choose from {', '.join(sorted(TASKS))})")
    return text


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="write problems of a synthetic task as JSONL",
        description="Write N distinct problems of a task split as JSONL (GSM8K's question/answer fields, plus "
                    "prompt and task). Train and test splits are disjoint by construction.")
    p.add_argument("name", type=task_name, help="task: arith or listops")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split (test)")
    p.add_argument("--n", type=positive_int, default=500, help="number of problems (500)")
    p.add_argument("--seed", type=int, default=123, help="sampling seed (123)")
    p.add_argument("--out", type=Path, required=True, help="output JSONL file")
    p.set_defaults(func=run_data)


def run_data(args: argparse.Namespace) -> None:
    from l2pd_harness.tasks import sample_problems

    with JsonlWriter(args.out) as out:
        for row in sample_problems(args.name, args.split, args.n, args.seed):
            out.write(row)


def add_grade_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "grade", help="score generated JSONL against its reference answers",
        description="Grade the 'text' of each row of a `l2pd generate` output against its 'answer', with the "
                    "grader of its 'task' (arith: the number after ####; listops: exact match). Prints JSON.")
    p.add_argument("--input", type=Path, required=True, help="JSONL from `l2pd generate` on `l2pd data` output")
    p.set_defaults(func=run_grade)


def run_grade(args: argparse.Namespace) -> None:
    from l2pd_harness.evaluation import grade_rows

    rows = read_jsonl(args.input, "--input")
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("task", "text", "answer") if key not in row]
        if missing:
            raise UsageError(f"--input {str(args.input)!r} row {number} lacks {missing}")
        task_name(row["task"])
    correct = grade_rows(rows)
    report = {}
    for task in sorted({row["task"] for row in rows}):
        marks = [c for row, c in zip(rows, correct, strict=True) if row["task"] == task]
        nfe = [row["nfe"] for row in rows if row["task"] == task and "nfe" in row]
        report[task] = {"n": len(marks), "accuracy": round(sum(marks) / len(marks), 4),
                        "mean_nfe": sum(nfe) / len(nfe) if nfe else None}
    print(json.dumps(report, indent=2))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (one description, used as --help)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(after.value.value.split())
            for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)}


def add_train_base_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.training.base import BaseTrainConfig

    p = subparsers.add_parser(
        "train-base", help="train a tiny LLaDA on the task suite (LLaDA SFT objective)",
        description="Train a tiny LLaDA-architecture model on the synthetic tasks with LLaDA's SFT objective; "
                    "writes a Hugging Face-layout checkpoint (config.json, model.safetensors, tokenizer) that "
                    "load_model() reads. Checkpoints every --checkpoint-every steps; --resume continues.")
    defaults, docs = BaseTrainConfig(), field_docs(BaseTrainConfig)
    p.add_argument("--task", default=",".join(defaults.tasks), help="comma-separated tasks (arith,listops)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    add_field_options(p, BaseTrainConfig, ("steps", "warmup", "tokens_per_batch", "min_gen_length", "max_gen_length",
                                           "d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                           "max_sequence_length", "checkpoint_every"), positive_int)
    add_field_options(p, BaseTrainConfig, ("lr", "weight_decay", "long_share", "eps"), float)
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"{docs['seed']} ({defaults.seed})")
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
        cfg = BaseTrainConfig(**settings, tasks=tuple(task_name(t) for t in args.task.split(",")))
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise UsageError(str(err)) from None
    if args.resume and args.init_from is not None:
        raise UsageError("--resume continues --out's own run; it cannot be combined with --init-from")
    try:
        log = train_base(cfg, args.out, device=args.device, resume=args.resume, num_workers=args.num_workers,
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
    p.add_argument("--task", type=task_name, required=True, help="arith or listops")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split (test)")
    p.add_argument("--n", type=positive_int, default=500, help="number of problems (500)")
    p.add_argument("--data-seed", type=int, default=123, help="problem sampling seed (123)")
    p.add_argument("--output", type=Path, help="also write the decoded rows as JSONL")
    add_decode_options(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    from l2pd_harness.evaluation import summarise
    from l2pd_harness.tasks import sample_problems

    problems = sample_problems(args.task, args.split, args.n, args.data_seed)
    rows = []
    with JsonlWriter(args.output) if args.output is not None else contextlib.nullcontext() as out:
        for row in decoded_rows(args, problems, f"evaluate {args.task}"):
            rows.append(row)
            if out is not None:
                out.write(row)  # as they come, so a crash keeps the finished rows
    print(json.dumps(summarise(args.task, rows, decode_config(args)).as_row()))


def add_collect_traces_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.decoding.config import CACHES
    from l2pd_harness.filter.traces import TRAJECTORIES

    p = subparsers.add_parser(
        "collect-traces", help="record decode traces (block confidences + oracle labels) for filter training",
        description="Decode training-split problems with the one-token-per-step reference to get each final "
                    "output, then record a trajectory: per step, the block's confidences, margins, entropies, "
                    "masked positions and the label 'current prediction equals the final output'. Writes "
                    "DIR/steps.safetensors, DIR/problems.jsonl, DIR/meta.json.")
    p.add_argument("--task", default="arith,listops", help="comma-separated tasks (arith,listops)")
    p.add_argument("--n", type=positive_int, default=128, help="training-split problems per task (128)")
    p.add_argument("--data-seed", type=int, default=11, help="problem sampling seed (11)")
    p.add_argument("--out", type=Path, required=True, help="trace directory")
    p.add_argument("--trajectory", default="oracle", choices=TRAJECTORIES,
                   help="whose decode the steps come from: the reference itself, the oracle (commit what already "
                        "matches), or a trained filter's (learned, needs --filter) (oracle)")
    p.add_argument("--references", type=Path, action="append", default=None,
                   help="an earlier reference decode of the same problems (`l2pd generate --steps GEN_LENGTH` "
                        "output, tasks in --task order; repeat per file), instead of decoding them again")
    p.add_argument("--cache", default="none", choices=CACHES, help="KV cache of the trajectory decode (none)")
    p.add_argument("--eotp", action=argparse.BooleanOptionalAction, default=True,
                   help="End-of-Text Prediction in the trajectory decode (on)")
    add_filter_options(p)
    for name, default in (("gen_length", 256), ("block_length", 32), ("batch_size", 32)):
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, default=default, help=f"({default})")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped tiny model)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.set_defaults(func=run_collect_traces)


def run_collect_traces(args: argparse.Namespace) -> None:
    from l2pd_harness.decoding.config import DecodeConfig
    from l2pd_harness.filter.model import decode_policy
    from l2pd_harness.filter.traces import TraceMeta, collect, save_traces
    from l2pd_harness.loading import load_model, model_fingerprint, resolve_checkpoint
    from l2pd_harness.tasks import sample_problems

    tasks = [task_name(t) for t in args.task.split(",")]
    problems = [row for task in tasks for row in sample_problems(task, "train", args.n, args.data_seed)]
    policy = {"reference": "fixed", "oracle": "oracle", "learned": "learned"}[args.trajectory]
    try:
        cfg = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, policy=policy,
                           eotp=args.eotp and args.trajectory != "reference",
                           cache=args.cache, batch_size=args.batch_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.trajectory == "reference" and (args.cache != "none" or args.references):
        raise UsageError("--trajectory reference records the reference decode itself: no --cache, no --references")
    cfg, policy_fn = decode_policy(cfg, args.filter, args.model, args.accept_threshold)
    references = None
    if args.references:
        references = [row for path in args.references for row in read_jsonl(path, "--references")]
        if [r.get("prompt") for r in references] != [p["prompt"] for p in problems]:
            raise UsageError(f"--references {[str(p) for p in args.references]} do not hold the reference decodes "
                             f"of these {len(problems)} problems (tasks {tasks}, --n {args.n}, --data-seed "
                             f"{args.data_seed}) in order")
    model, tokenizer = load_model(args.model, device=args.device)
    steps, rows = collect(model, tokenizer, problems, cfg, args.trajectory, references, policy_fn)
    meta = TraceMeta(base_model=model_fingerprint(resolve_checkpoint(args.model)), trajectory=args.trajectory,
                     tasks=tasks, gen_length=cfg.gen_length, block_length=cfg.block_length, cache=cfg.cache,
                     eotp=cfg.eotp, data_seed=args.data_seed, problems=len(rows), steps=len(steps["label"]),
                     filter=None if args.filter is None else str(args.filter),
                     accept_threshold=cfg.accept_threshold if args.trajectory == "learned" else None,
                     reference_accuracy={t: round(sum(r["reference_correct"] for r in rows if r["task"] == t)
                                                  / sum(r["task"] == t for r in rows), 4) for t in tasks})
    save_traces(args.out, steps, rows, meta)
    print(json.dumps({"out": str(args.out), "steps": meta.steps, "problems": meta.problems,
                      "masked_positions": int(steps["masked"].sum()),
                      "final_share": round(float(steps["label"][steps["masked"]].float().mean()), 4),
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
    from l2pd_harness.jsonl import write_atomic
    from l2pd_harness.loading import load_model

    reference = None
    if not args.update:
        if not args.reference.is_file():
            raise UsageError(f"--reference {str(args.reference)!r} does not exist (record one with "
                             "`l2pd regress --update`)")
        reference = json.loads(args.reference.read_text())
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
    from l2pd_harness.filter.model import ARCHITECTURES, FEATURES
    from l2pd_harness.filter.train import FilterTrainConfig

    p = subparsers.add_parser(
        "train-filter", help="train a Learn2PD filter on decode traces",
        description="Train the filter (binary cross-entropy on masked positions, validation split by problem, "
                    "early stopping), choose its default accept threshold by decoding the validation problems, "
                    "and write FILE.safetensors + FILE.json. Prints precision/recall at that threshold.")
    p.add_argument("--traces", type=Path, nargs="+", required=True, help="trace directories from collect-traces")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path (NAME.safetensors; NAME.json beside)")
    p.add_argument("--architecture", default="block_mlp", choices=ARCHITECTURES,
                   help="block_mlp: the paper's (block confidences -> a logit per position); position_mlp: a "
                        "shared MLP on each position's --features (block_mlp)")
    p.add_argument("--features", default=None,
                   help=f"comma-separated, from {','.join(FEATURES)} (block_mlp: confidence; position_mlp: all)")
    p.add_argument("--hidden-size", type=positive_int, default=32, help="hidden width (32)")
    add_field_options(p, FilterTrainConfig, ("batch_size", "max_epochs", "patience"), positive_int)
    add_field_options(p, FilterTrainConfig, ("lr", "val_share", "max_accuracy_drop"), float)
    docs = field_docs(FilterTrainConfig)
    p.add_argument("--class-weight", action="store_true", help=docs["class_weight"])
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    add_validation_decode_options(p)
    p.set_defaults(func=run_train_filter)


def add_validation_decode_options(p: argparse.ArgumentParser) -> None:
    """How ``train-filter`` and ``choose-threshold`` decode the validation problems."""
    p.add_argument("--decode-batch-size", type=positive_int, default=32,
                   help="sequences in flight when decoding validation problems (32)")
    p.add_argument("--model", default=None, help="base model of the traces (default: the shipped tiny model)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")


def run_train_filter(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.model import FEATURES, FilterConfig, FilterError
    from l2pd_harness.filter.traces import read_meta
    from l2pd_harness.filter.train import FilterTrainConfig, train_filter
    from l2pd_harness.loading import load_model, model_fingerprint, resolve_checkpoint

    features = args.features.split(",") if args.features else (
        ["confidence"] if args.architecture == "block_mlp" else list(FEATURES))
    try:
        meta = read_meta(args.traces[0])
        filter_cfg = FilterConfig(args.architecture, tuple(features), meta.block_length, args.hidden_size)
        train_cfg = FilterTrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs,
                                      patience=args.patience, val_share=args.val_share,
                                      class_weight=args.class_weight, max_accuracy_drop=args.max_accuracy_drop,
                                      seed=args.seed)
    except ValueError as err:  # a bad setting, or a trace directory without its files (TraceError)
        raise UsageError(str(err)) from None
    fingerprint = model_fingerprint(resolve_checkpoint(args.model))
    if meta.base_model != fingerprint:
        raise FilterError(f"traces {str(args.traces[0])!r} come from base model {meta.base_model}, --model is "
                          f"{fingerprint}")
    model, tokenizer = load_model(args.model, device=args.device)
    learned = train_filter(args.traces, filter_cfg, train_cfg, model, tokenizer, args.decode_batch_size)
    learned.save(args.out)
    card = learned.card
    print(json.dumps({"out": str(args.out), "architecture": filter_cfg.architecture, "features": features,
                      "accept_threshold": card.accept_threshold,
                      **{k: card.validation[k] for k in ("precision", "recall")},
                      **{k: card.training[k] for k in ("epochs", "best_val_loss", "parameters", "wall_time_s")}}))


def add_choose_threshold_parser(subparsers: argparse._SubParsersAction) -> None:
    from l2pd_harness.filter.train import FilterTrainConfig

    p = subparsers.add_parser(
        "choose-threshold", help="choose a trained filter's default accept threshold again, on more problems",
        description="Decode every problem of the given trace directories that the filter was not fitted on "
                    "(its own validation problems, problems of newly collected traces) with `learned` + EoTP at "
                    "each candidate accept threshold, and keep the lowest from which every higher one stays within "
                    "--max-accuracy-drop of the reference decode, as train-filter does. The weights are unchanged; "
                    "writes the filter with the new default and search to --out (which may be --filter).")
    p.add_argument("--filter", type=Path, required=True, help="filter checkpoint from `l2pd train-filter`")
    p.add_argument("--traces", type=Path, nargs="+", required=True,
                   help="trace directories from collect-traces (problems the filter was fitted on are left out)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path to write (NAME.safetensors)")
    add_field_options(p, FilterTrainConfig, ("max_accuracy_drop",), float)
    add_validation_decode_options(p)
    p.set_defaults(func=run_choose_threshold)


def run_choose_threshold(args: argparse.Namespace) -> None:
    from l2pd_harness.filter.model import load_filter
    from l2pd_harness.filter.traces import read_meta
    from l2pd_harness.filter.train import rechoose_accept_threshold
    from l2pd_harness.loading import load_model

    learned = load_filter(args.filter, args.model, read_meta(args.traces[0]).block_length)
    model, tokenizer = load_model(args.model, device=args.device)
    chosen = rechoose_accept_threshold(learned, args.traces, model, tokenizer, args.max_accuracy_drop,
                                       args.decode_batch_size)
    chosen.save(args.out)
    validation = chosen.card.validation
    print(json.dumps({"out": str(args.out), "accept_threshold": chosen.card.accept_threshold,
                      "replaces": validation["replaces"],
                      **{k: validation[k] for k in ("problems", "precision", "recall")}}))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="l2pd", description="l2pd-harness: fast, measured decoding of diffusion LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (add_generate_parser, add_data_parser, add_grade_parser, add_evaluate_parser, add_train_base_parser,
                add_collect_traces_parser, add_train_filter_parser, add_choose_threshold_parser, add_regress_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    from l2pd_harness.filter.model import FilterError
    from l2pd_harness.loading import ModelLoadError
    from l2pd_harness.models.llada import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ModelLoadError, ConfigError, FilterError) as err:
        parser.exit(2, f"l2pd {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
