"""Decode traces for filter training: per step, the current block's statistics and the oracle label.

``collect`` decodes training-split problems with the slow reference (``fixed``, one token per step, no cache, no
EoTP) to learn each problem's final output, then records a trajectory: every engine step's block confidences,
margins, entropies, which positions are still masked, and the label "current prediction equals the reference's
final token". The trajectory is the reference decode itself, the ``oracle`` decode (commit what already matches),
or a trained filter's own decode (``learned``), under any KV cache mode.

A trace directory holds ``steps.safetensors`` (one row per step and sequence, ``[N, block_length]`` tensors),
``problems.jsonl`` (the problems with the reference's text, canvas and correctness) and ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.policies import Policy
from l2pd_harness.decoding.scheduler import RunnerOutput, SchedulerOutput
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.files import read_json, read_jsonl, read_tensors, save_tensors_atomic, write_atomic
from l2pd_harness.filter.model import FilterError
from l2pd_harness.loading import model_fingerprint, resolve_checkpoint
from l2pd_harness.settings import SettingsError, coerce_fields, make_config

TRAJECTORIES = ("reference", "oracle", "learned", "rollout")
"""Whose decode a trace records; ``rollout`` labels the positions a threshold decode (or a filter beside one) leaves
by rollout (:mod:`l2pd_harness.filter.rollouts`)."""


class TraceError(FilterError):
    """A trace directory without the files ``collect-traces`` writes (reported by the CLI as a usage error)."""


@dataclass
class TraceMeta:
    """``meta.json`` of a trace directory."""

    base_model: str
    """Fingerprint of the decoding model (``loading.model_fingerprint``)."""
    trajectory: str
    tasks: list[str]
    gen_length: int
    block_length: int
    cache: str
    eotp: bool
    data_seed: int
    problems: int
    steps: int
    filter: str | None = None
    """``learned`` trajectory, or ``rollout`` beside a filter: the filter that chose the commits, and its accept
    threshold."""
    accept_threshold: float | None = None
    threshold: float | None = None
    """``rollout`` trajectory: the confidence threshold of its decodes (a filter trained on it serves beside it)."""
    rollouts_per_pass: int | None = None
    """``rollout`` trajectory: candidate positions labelled per pass."""
    rollout_min_confidence: float | None = None
    """``rollout`` trajectory: lowest confidence of a candidate position."""
    reference_accuracy: dict = field(default_factory=dict)
    """Per task: accuracy of the reference decode on these problems."""


class StepRecorder:
    """An engine step observer that keeps each step's block statistics (labels are added once the reference
    outputs are known)."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, torch.Tensor]] = []

    def __call__(self, scheduled: SchedulerOutput, output: RunnerOutput) -> None:
        state, rows = output.state, scheduled.requests
        margin, entropy = state.spread()
        block_offset = [r.block_start - r.prompt_length for r in rows]
        self.chunks.append({
            "confidence": state.confidence.float().cpu(), "margin": margin.float().cpu(),
            "entropy": entropy.float().cpu(), "masked": state.masked.cpu(),
            "prediction": state.prediction.cpu(), "problem": torch.tensor(output.request_ids),
            "offset": torch.tensor(block_offset), "block_step": state.block_step.cpu(),
            "commit": output.commit_mask.cpu()})

    def merged(self) -> dict[str, torch.Tensor]:
        """Every recorded step as ``[N, ...]`` tensors, in the order they were decoded."""
        return {key: torch.cat([chunk[key] for chunk in self.chunks]) for key in self.chunks[0]}

    def steps(self, references: torch.Tensor, block_length: int) -> dict[str, torch.Tensor]:
        """Every recorded step as ``[N, ...]`` tensors, labelled against ``references [problems, gen_length]``."""
        merged = self.merged()
        columns = merged["offset"][:, None] + torch.arange(block_length)  # [N, L]
        target = references[merged["problem"][:, None], columns]  # [N, L]
        return {"confidence": merged["confidence"], "margin": merged["margin"], "entropy": merged["entropy"],
                "masked": merged["masked"], "label": merged.pop("prediction") == target,
                "problem": merged["problem"], "block": merged["offset"] // block_length,
                "block_step": merged["block_step"]}


def is_validation(question: str, share: float) -> bool:
    """Problem-level split, stable across trace directories: a hash of the question text."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < share


def reference_config(gen_length: int, block_length: int, batch_size: int) -> DecodeConfig:
    """The slow reference whose final outputs are the labels: one token per step, no cache, no EoTP."""
    return make_config({"gen_length": gen_length, "block_length": block_length, "batch_size": batch_size})


def trace_meta(pretrained, cfg: DecodeConfig, trajectory: str, tasks: list[str], data_seed: int,
               steps: dict[str, torch.Tensor], problems: list[dict], rollout: dict | None = None) -> TraceMeta:
    """The ``meta.json`` of traces recorded with ``cfg`` on the model ``pretrained`` (``rollout``: the rollout
    fields, ``threshold`` included)."""
    accuracy = {task: round(sum(p["reference_correct"] for p in problems if p["task"] == task)
                            / sum(p["task"] == task for p in problems), 4) for task in tasks}
    return TraceMeta(base_model=model_fingerprint(resolve_checkpoint(pretrained)), trajectory=trajectory,
                     tasks=tasks, gen_length=cfg.gen_length, block_length=cfg.block_length, cache=cfg.cache,
                     eotp=cfg.eotp, data_seed=data_seed, problems=len(problems), steps=len(steps["label"]),
                     filter=cfg.filter, accept_threshold=cfg.accept_threshold, reference_accuracy=accuracy,
                     **(rollout or {}))


def check_base_model(trace_dir: Path, pretrained) -> TraceMeta:
    """The meta of ``trace_dir``, refused unless its traces come from the model ``pretrained``."""
    meta = read_meta(trace_dir)
    fingerprint = model_fingerprint(resolve_checkpoint(pretrained))
    if meta.base_model != fingerprint:
        raise TraceError(f"traces {str(trace_dir)!r} come from base model {meta.base_model}, the model given is "
                         f"{fingerprint}")
    return meta


def collect(model, tokenizer, problems: list[dict], trajectory_cfg: DecodeConfig, trajectory: str,
            reference_rows: list[dict] | None = None, policy: Policy | None = None
            ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Record ``trajectory`` on ``problems``; returns the step tensors and the problems with their reference
    decode (``reference_rows``, when given, is an earlier reference decode of the same problems)."""
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory={trajectory!r} is not one of {list(TRAJECTORIES)}")
    recorder = StepRecorder()
    if reference_rows is None:
        ref_cfg = reference_config(trajectory_cfg.gen_length, trajectory_cfg.block_length, trajectory_cfg.batch_size)
        reference_rows = list(iter_decoded(model, tokenizer, problems, ref_cfg, desc="reference decode",
                                           on_step=recorder if trajectory == "reference" else None))
    elif trajectory == "reference":
        raise ValueError("trajectory 'reference' records the reference decode itself; do not pass its rows")
    canvases = [row["canvas"] for row in reference_rows]
    if trajectory != "reference":
        list(iter_decoded(model, tokenizer, problems, trajectory_cfg, references=canvases, policy=policy,
                          desc=f"{trajectory} trajectory", on_step=recorder))
    steps = recorder.steps(torch.tensor(canvases), trajectory_cfg.block_length)
    correct = grade_rows([{**problem, "text": row["text"]} for problem, row in zip(problems, reference_rows,
                                                                                     strict=True)])
    problems_out = [{**problem, "reference_text": row["text"], "reference_canvas": row["canvas"],
                     "reference_correct": ok} for problem, row, ok in zip(problems, reference_rows, correct,
                                                                           strict=True)]
    return steps, problems_out


def save_traces(out_dir: Path, steps: dict[str, torch.Tensor], problems: list[dict], meta: TraceMeta) -> None:
    save_tensors_atomic(steps, out_dir / "steps.safetensors")
    write_atomic(out_dir / "problems.jsonl", "".join(json.dumps(p) + "\n" for p in problems))
    write_atomic(out_dir / "meta.json", json.dumps(asdict(meta), indent=2) + "\n")


def trace_file(trace_dir: Path, name: str) -> Path:
    if not (trace_dir / name).is_file():
        raise TraceError(f"trace directory {str(trace_dir)!r} has no {name} (write one with `l2pd collect-traces`)")
    return trace_dir / name


STEP_TENSORS = {"confidence": 2, "margin": 2, "entropy": 2, "masked": 2, "label": 2, "problem": 1, "block": 1}
"""The tensors of ``steps.safetensors`` that training reads, by number of dimensions: ``[N, block_length]``
or ``[N]``."""
OPTIONAL_STEP_TENSORS = {"labelled": 2}
"""Read when present: ``labelled``, the positions whose label trains a filter (rollout traces; otherwise every
masked position)."""
PROBLEM_FIELDS = {"question": str, "prompt": str, "answer": str, "task": str, "reference_correct": bool,
                  "reference_canvas": list}
"""What validation decodes read of each row of ``problems.jsonl``, and its JSON type."""


def read_meta(trace_dir: Path) -> TraceMeta:
    """The checked ``meta.json`` of ``trace_dir`` (numbers may come as text, like any setting)."""
    path = trace_file(trace_dir, "meta.json")
    raw = read_json(path, "trace meta")
    containers = {"tasks": list, "reference_accuracy": dict}
    try:
        for name, kind in containers.items():
            if name in raw and not isinstance(raw[name], kind):
                raise SettingsError(f"{name}={raw[name]!r} must be a JSON {'array' if kind is list else 'object'}")
        meta = TraceMeta(**coerce_fields(TraceMeta, {k: v for k, v in raw.items() if k not in containers}),
                         **{k: raw[k] for k in containers if k in raw})
        if meta.trajectory not in TRAJECTORIES:
            raise SettingsError(f"trajectory={meta.trajectory!r} is not one of {list(TRAJECTORIES)}")
        make_config({"gen_length": meta.gen_length, "block_length": meta.block_length, "cache": meta.cache,
                     "eotp": meta.eotp})  # the decode settings validation decodes will use
    except TypeError as err:  # a field the format needs is missing: the message names it
        raise TraceError(f"trace meta {str(path)!r} does not match the trace format ({err})") from None
    except SettingsError as err:
        raise TraceError(f"trace meta {str(path)!r}: {err}") from None
    return meta


def read_problems(trace_dir: Path) -> list[dict]:
    """The rows of ``problems.jsonl``, each with the fields of :data:`PROBLEM_FIELDS`."""
    path = trace_file(trace_dir, "problems.jsonl")
    problems = read_jsonl(path, "trace problems")
    for index, row in enumerate(problems):
        for name, kind in PROBLEM_FIELDS.items():
            if not isinstance(row.get(name), kind):
                raise TraceError(f"trace problems {str(path)!r}: problem {index} has {name}={row.get(name)!r}, "
                                 f"expected a JSON {kind.__name__}")
    return problems


def check_steps(trace_dir: Path, steps: dict[str, torch.Tensor], problems: list[dict], meta: TraceMeta) -> None:
    """Refuse step tensors that do not fit the meta and problems beside them (names, shapes, problem indices)."""
    where = f"traces {str(trace_dir)!r}"
    missing = sorted(set(STEP_TENSORS) - set(steps))
    if missing:
        raise TraceError(f"{where}: steps.safetensors lacks tensors {missing}")
    rows = len(steps["label"]) if steps["label"].dim() else 0
    for name, dims in {**STEP_TENSORS, **{k: v for k, v in OPTIONAL_STEP_TENSORS.items() if k in steps}}.items():
        expected = [rows, meta.block_length][:dims]
        if list(steps[name].shape) != expected:
            raise TraceError(f"{where}: steps.safetensors tensor {name!r} has shape {list(steps[name].shape)}, "
                             f"expected {expected} (steps, block_length={meta.block_length})")
    if (meta.steps, meta.problems) != (rows, len(problems)):
        raise TraceError(f"{where}: meta.json says {meta.steps} steps of {meta.problems} problems, the files hold "
                         f"{rows} steps of {len(problems)} problems")
    for name, limit in (("problem", len(problems)), ("block", meta.gen_length // meta.block_length)):
        if steps[name].is_floating_point() or not ((steps[name] >= 0) & (steps[name] < limit)).all():
            raise TraceError(f"{where}: steps.safetensors tensor {name!r} must hold integers in [0, {limit})")
    lengths = sorted({len(p["reference_canvas"]) for p in problems} - {meta.gen_length})
    if lengths:
        raise TraceError(f"{where}: meta.json says gen_length={meta.gen_length}, problems.jsonl has reference "
                         f"canvases of length {lengths}")


def load_traces(trace_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict], TraceMeta]:
    """Steps, problems and meta of ``trace_dir``, checked against each other."""
    meta = read_meta(trace_dir)
    steps = read_tensors(trace_file(trace_dir, "steps.safetensors"), "trace steps")
    problems = read_problems(trace_dir)
    check_steps(trace_dir, steps, problems, meta)
    return steps, problems, meta
