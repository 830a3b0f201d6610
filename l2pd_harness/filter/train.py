"""Train a Learn2PD filter on decode traces, then choose its default accept threshold on validation problems.

Problems, never steps, are split into train and validation (a hash of the question text, so several trace
directories of the same problems split alike). Loss: binary cross-entropy on the still-masked positions, the
positive class weighted by negatives/positives when ``class_weight`` is on (off by default: the accept threshold
is chosen afterwards, and weighting only shifts the probabilities); early stopping on validation loss. The accept
threshold is the lowest candidate from which on every decode of the validation problems (``learned`` + EoTP, the
traces' cache mode) keeps every task's accuracy within ``max_accuracy_drop`` of the reference decode;
:func:`rechoose_accept_threshold` makes that choice again for a trained filter on more problems it was not fitted
on (``l2pd choose-threshold``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from l2pd_harness.decoding.policies import build_policy
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.filter.model import (
    FilterCard,
    FilterConfig,
    FilterError,
    FilterNet,
    LearnedFilter,
    block_features,
    is_share,
)
from l2pd_harness.filter.traces import TraceMeta, is_validation, load_traces, read_problems
from l2pd_harness.settings import make_config

ACCEPT_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)


@dataclass
class FilterTrainConfig:
    """Optimisation and selection knobs of ``l2pd train-filter``."""

    lr: float = 3e-3
    """Adam learning rate."""
    batch_size: int = 64
    """Trace rows (steps) per optimiser step."""
    max_epochs: int = 200
    """Upper bound on passes over the training rows."""
    patience: int = 15
    """Stop after this many epochs without a lower validation loss (the best weights are kept)."""
    val_share: float = 0.2
    """Share of problems held out for validation."""
    class_weight: bool = False
    """Weight positive labels by negatives/positives among masked training positions (for traces whose labels
    are mostly negative; the accept threshold is chosen afterwards either way)."""
    max_accuracy_drop: float = 0.01
    """Accept-threshold search: largest accuracy loss against the reference on the validation problems."""
    seed: int = 0
    """Seed of initialisation and shuffling."""

    def __post_init__(self) -> None:
        if not 0 < self.val_share < 1:
            raise ValueError(f"val_share={self.val_share} must be in (0, 1)")
        for name in ("batch_size", "max_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if not 0 < self.lr < math.inf or not 0 <= self.max_accuracy_drop < math.inf:
            raise ValueError(f"lr={self.lr} must be > 0 and max_accuracy_drop={self.max_accuracy_drop} >= 0")


@dataclass
class TraceData:
    """Every trace row of one or more directories, with its split."""

    features: torch.Tensor  # [N, L, F]
    label: torch.Tensor  # [N, L] float
    masked: torch.Tensor  # [N, L] bool: positions still masked (the features read the others as settled)
    labelled: torch.Tensor  # [N, L] bool: only these positions' labels count (the masked ones, or a rollout's)
    validation: torch.Tensor  # [N] bool
    meta: list[TraceMeta]
    val_problems: list[dict]


def read_trace_dirs(dirs: list[Path], features: tuple[str, ...], held_out: Callable[[dict], bool]) -> TraceData:
    """Load and featurise ``dirs`` (same base model, block length, gen length and cache), split by problem: the
    problems ``held_out`` picks are the validation problems."""
    parts, metas, val_problems = [], [], {}
    for trace_dir in dirs:
        steps, problems, meta = load_traces(trace_dir)
        held_out_rows = torch.tensor([held_out(p) for p in problems])  # [problems]
        masked = steps["masked"].bool()
        parts.append((block_features(features, steps["confidence"], steps["margin"], steps["entropy"], masked),
                      steps["label"].float(), masked, steps.get("labelled", masked).bool(),
                      held_out_rows[steps["problem"].long()]))
        metas.append(meta)
        val_problems.update({p["question"]: p for p, out in zip(problems, held_out_rows, strict=True) if out})
    for key in ("base_model", "block_length", "gen_length", "cache", "threshold"):
        values = {getattr(m, key) for m in metas}
        if len(values) > 1:
            raise FilterError(f"trace directories disagree on {key}: {sorted(map(str, values))}")
    return TraceData(*(torch.cat(column) for column in zip(*parts, strict=True)), metas, list(val_problems.values()))


def masked_bce(net: FilterNet, data: TraceData, rows: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    logits = net(data.features[rows])  # [R, L]
    loss = nn.functional.binary_cross_entropy_with_logits(logits, data.label[rows], pos_weight=pos_weight,
                                                          reduction="none")
    weight = data.labelled[rows].float()
    return (loss * weight).sum() / weight.sum().clamp(min=1)


def fit(net: FilterNet, data: TraceData, cfg: FilterTrainConfig) -> dict:
    """Train ``net`` in place (best validation weights kept); returns the training log."""
    started, generator = time.perf_counter(), torch.Generator().manual_seed(cfg.seed)
    train_rows, val_rows = (~data.validation).nonzero().squeeze(1), data.validation.nonzero().squeeze(1)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise FilterError(f"{len(train_rows)} training and {len(val_rows)} validation rows: collect traces on more "
                          "problems")
    train_labels = data.label[train_rows][data.labelled[train_rows]]
    positives = train_labels.sum()
    pos_weight = ((len(train_labels) - positives) / positives.clamp(min=1)) if cfg.class_weight else torch.tensor(1.0)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    best, best_state, stale, history = float("inf"), copy.deepcopy(net.state_dict()), 0, []
    with tqdm(range(cfg.max_epochs), desc="train filter", unit="epoch") as bar:
        for _ in bar:
            net.train()
            for batch in train_rows[torch.randperm(len(train_rows), generator=generator)].split(cfg.batch_size):
                optimiser.zero_grad()
                masked_bce(net, data, batch, pos_weight).backward()
                optimiser.step()
            net.eval()
            with torch.no_grad():
                val_loss = float(masked_bce(net, data, val_rows, pos_weight))
            history.append(round(val_loss, 5))
            bar.set_postfix(val_loss=f"{val_loss:.4f}")
            if val_loss < best - 1e-5:
                best, best_state, stale = val_loss, copy.deepcopy(net.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    net.load_state_dict(best_state)
    return {"epochs": len(history), "val_loss": history, "best_val_loss": round(best, 5),
            "pos_weight": round(float(pos_weight), 4), "train_rows": len(train_rows), "val_rows": len(val_rows),
            "positive_share": round(float(positives / max(len(train_labels), 1)), 4),
            "fit_time_s": round(time.perf_counter() - started, 1)}


def precision_recall(net: FilterNet, data: TraceData, threshold: float) -> dict:
    """On validation rows' labelled positions: of the positions the filter would accept, the share labelled
    positive (precision: final, or safe to commit), and the share of positive ones it accepts (recall)."""
    rows = data.validation.nonzero().squeeze(1)
    with torch.no_grad():
        accept = torch.sigmoid(net(data.features[rows])) > threshold  # [R, L]
    labelled, label = data.labelled[rows], data.label[rows].bool()
    accepted, final = accept & labelled, label & labelled
    hits = (accepted & final).sum()
    return {"threshold": threshold, "precision": round(float(hits / accepted.sum().clamp(min=1)), 4),
            "recall": round(float(hits / final.sum().clamp(min=1)), 4)}


def serving_settings(meta: TraceMeta) -> dict:
    """How a filter trained on traces like ``meta``'s decodes: a rollout-labelled one beside the threshold its traces
    followed, judging one left-over position per pass (the question its labels answer); any other on its own."""
    if meta.threshold is None:
        return {}
    return {"learned_commit": "with_threshold", "threshold": meta.threshold, "learned_candidates": 1}


def choose_accept_threshold(model, tokenizer, learned: LearnedFilter, problems: list[dict], meta: TraceMeta,
                            serving: dict, max_drop: float, batch_size: int,
                            candidates: tuple[float, ...] = ACCEPT_THRESHOLDS) -> tuple[float, list[dict]]:
    """Lowest of ``candidates`` whose ``learned`` + EoTP decode of ``problems`` keeps every task within ``max_drop``
    of the reference's accuracy on them, as does every higher one; the whole search is returned for the card; the
    decodes use ``serving``, the way the filter decodes (:func:`serving_settings`, or its card's
    ``training.decode_with``)."""
    search = []
    for threshold in sorted(candidates):
        cfg = make_config({"gen_length": meta.gen_length, "block_length": meta.block_length, "policy": "learned",
                           "accept_threshold": threshold, "eotp": True, "cache": meta.cache,
                           "batch_size": batch_size, **serving})
        rows = list(iter_decoded(model, tokenizer, problems, cfg, policy=build_policy(cfg, learned),
                                 desc=f"accept threshold {threshold}"))
        point = {"accept_threshold": threshold}
        correct = grade_rows(rows)
        for task in sorted({p["task"] for p in problems}):
            mine = [i for i, p in enumerate(problems) if p["task"] == task]
            point[task] = {"accuracy": round(sum(correct[i] for i in mine) / len(mine), 4),
                           "reference_accuracy": round(sum(problems[i]["reference_correct"] for i in mine)
                                                       / len(mine), 4),
                           "mean_nfe": round(sum(rows[i]["nfe"] for i in mine) / len(mine), 2)}
        point["within_drop"] = all(point[t]["accuracy"] >= point[t]["reference_accuracy"] - max_drop - 1e-9
                                   for t in point if isinstance(point[t], dict))
        search.append(point)
    # The lowest threshold from which every higher candidate passes too: one lucky pass below a failing candidate
    # is noise on a few dozen problems, not a safe default.
    chosen = max(candidates)
    for point in reversed(search):
        if not point["within_drop"]:
            break
        chosen = point["accept_threshold"]
    return chosen, search


def train_filter(trace_dirs: list[Path], filter_cfg: FilterConfig, cfg: FilterTrainConfig, model, tokenizer,
                 batch_size: int = 32) -> LearnedFilter:
    """The whole ``train-filter`` job: load traces, fit, choose the accept threshold, fill the card."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = read_trace_dirs(trace_dirs, filter_cfg.features, lambda p: is_validation(p["question"], cfg.val_share))
    meta = data.meta[0]
    if meta.block_length != filter_cfg.block_length:
        raise FilterError(f"traces have block_length={meta.block_length}, the filter config says "
                          f"{filter_cfg.block_length}")
    net = FilterNet(filter_cfg)
    log = fit(net, data, cfg)
    learned = LearnedFilter(net, FilterCard(config=filter_cfg, base_model=meta.base_model, accept_threshold=None,
                                            cache=meta.cache))
    threshold, search = choose_accept_threshold(model, tokenizer, learned, data.val_problems, meta,
                                                serving_settings(meta), cfg.max_accuracy_drop, batch_size)
    learned.card.accept_threshold = threshold
    learned.card.training = {"trace_dirs": [str(d) for d in trace_dirs],
                             "trajectories": sorted({m.trajectory for m in data.meta}),
                             "tasks": sorted({t for m in data.meta for t in m.tasks}),
                             "gen_length": meta.gen_length, "decode_with": serving_settings(meta),
                             "parameters": sum(p.numel() for p in net.parameters()),
                             **asdict(cfg), **log, "wall_time_s": round(time.perf_counter() - started, 1)}
    learned.card.validation = {"problems": len(data.val_problems), **precision_recall(net, data, threshold),
                               "threshold_search": search}
    return learned


def training_questions(card: FilterCard) -> set[str]:
    """The questions of the problems a filter was fitted on: the training split of the trace directories on its
    card (paths as ``train-filter`` was given them)."""
    trace_dirs, val_share = card.training.get("trace_dirs"), card.training.get("val_share")
    if not isinstance(trace_dirs, list) or not all(isinstance(d, str) for d in trace_dirs):
        raise FilterError(f"cannot tell which problems the filter was trained on: its card's training.trace_dirs="
                          f"{trace_dirs!r} is not a list of directories")
    if not is_share(val_share):
        raise FilterError(f"cannot tell which problems the filter was trained on: its card's training.val_share="
                          f"{val_share!r} is not a number in (0, 1)")
    questions = set()
    for trace_dir in map(Path, trace_dirs):
        if not trace_dir.is_dir():
            raise FilterError(f"cannot tell which problems the filter was trained on: its trace directory "
                              f"{str(trace_dir)!r} is not here (run from where `train-filter` ran)")
        questions |= {p["question"] for p in read_problems(trace_dir)
                      if not is_validation(p["question"], val_share)}
    return questions


def rechoose_accept_threshold(learned: LearnedFilter, trace_dirs: list[Path], model, tokenizer, max_drop: float,
                              batch_size: int = 32, thresholds: tuple[float, ...] = (),
                              accept_candidates: tuple[float, ...] = ACCEPT_THRESHOLDS) -> LearnedFilter:
    """``learned`` with its default accept threshold chosen again, as ``train-filter`` chooses it, on every problem
    of ``trace_dirs`` it was not fitted on (e.g. its own validation problems plus newly collected ones), decoding as
    its card says (``training.decode_with``). With ``thresholds`` (a filter that decodes beside a threshold) the
    choice is made beside each, and the card keeps the threshold whose choice stays within ``max_drop`` in the
    fewest passes. The weights are unchanged; the card records the searches and the choice it replaces."""
    trained_on = training_questions(learned.card)
    data = read_trace_dirs(trace_dirs, learned.card.config.features, lambda p: p["question"] not in trained_on)
    meta = data.meta[0]
    if (meta.base_model, meta.block_length, meta.cache) != (learned.card.base_model,
                                                             learned.card.config.block_length, learned.card.cache):
        raise FilterError(f"traces are of base model {meta.base_model}, block_length={meta.block_length}, cache="
                          f"{meta.cache!r}; the filter serves {learned.card.base_model}, block_length="
                          f"{learned.card.config.block_length}, cache={learned.card.cache!r}")
    if not data.val_problems:
        raise FilterError("every problem of these trace directories was used to fit the filter: collect traces on "
                          "other problems (another --data-seed)")
    serving = learned.card.training.get("decode_with") or {}
    if thresholds and serving.get("learned_commit") != "with_threshold":
        raise FilterError(f"thresholds {list(thresholds)}: this filter does not decode beside a threshold (its "
                          f"card's training.decode_with is {serving})")
    tried = []
    for setting in [{**serving, "threshold": t} for t in thresholds] or [serving]:
        accept, search = choose_accept_threshold(model, tokenizer, learned, data.val_problems, meta, setting,
                                                 max_drop, batch_size, accept_candidates)
        tried.append({"decode_with": setting, "accept_threshold": accept, "threshold_search": search})
    best = min(tried, key=serving_rank)
    previous = {"accept_threshold": learned.card.accept_threshold, "decode_with": serving,
                "problems": learned.card.validation.get("problems")}
    validation = {"problems": len(data.val_problems), "trace_dirs": [str(d) for d in trace_dirs],
                  "max_accuracy_drop": max_drop, **precision_recall(learned.net, data, best["accept_threshold"]),
                  "threshold_search": best["threshold_search"], "replaces": previous}
    card = replace(learned.card, accept_threshold=best["accept_threshold"], validation=validation)
    if thresholds:
        validation["serving_search"] = tried
        card.training = {**card.training, "decode_with": best["decode_with"]}
    return LearnedFilter(learned.net, card)


def serving_rank(tried: dict) -> tuple:
    """Order of the ways to serve tried by :func:`rechoose_accept_threshold`: those whose chosen accept threshold
    stays within the drop first, by fewest passes (mean over tasks); then the others, by highest accuracy."""
    point = next(p for p in tried["threshold_search"] if p["accept_threshold"] == tried["accept_threshold"])
    tasks = [v for v in point.values() if isinstance(v, dict)]
    passes = sum(t["mean_nfe"] for t in tasks) / len(tasks)
    accuracy = sum(t["accuracy"] for t in tasks) / len(tasks)
    return (0, passes) if point["within_drop"] else (1, -accuracy)
