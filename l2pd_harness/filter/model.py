"""The Learn2PD filter: a tiny MLP that predicts, per block position, whether its current prediction is final.

Two architectures share one feature function (used alike on traces and in the decode loop, so training and
serving see the same numbers):

- ``block_mlp``: the paper's filter: the block's ``block_length`` confidences -> ReLU MLP -> one logit per position
  (``raw_confidence``: the released filter's input, committed positions' own top-1 probabilities included).
- ``position_mlp``: a shared MLP over each position's own features (confidence, top-1/top-2 margin, entropy,
  relative position, share of the block already committed, whether its left neighbour is settled, its confidence
  rank among the block's masked positions; optionally its neighbours' confidences) -> one logit.

Positions that are not masked (committed, or committed as end-of-text by EoTP) read as settled: confidence and margin 1,
entropy 0, so the filter's input does not depend on what the model would say about a token it can no longer change.

A checkpoint is ``NAME.safetensors`` (the weights) plus ``NAME.json`` (:class:`FilterCard`: architecture,
features, block length, base model, cache mode, training data, validation metrics, default accept threshold).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from l2pd_harness.decoding.policies import StepState, shifted
from l2pd_harness.files import read_json, read_tensors, save_tensors_atomic, write_atomic
from l2pd_harness.loading import DEFAULT_MODEL_DIR, model_fingerprint, resolve_checkpoint
from l2pd_harness.settings import SettingsError, coerce

POSITION_FEATURES = ("confidence", "margin", "entropy", "position", "committed_share", "left_settled",
                     "confidence_rank")
"""What ``position_mlp`` reads unless told otherwise."""
NEIGHBOUR_FEATURES = ("left_confidence", "right_confidence", "right_settled")
"""What a position sees of its neighbours beyond ``left_settled``."""
FEATURES = (*POSITION_FEATURES, "raw_confidence", *NEIGHBOUR_FEATURES)
BLOCK_MLP_FEATURES = (("confidence",), ("raw_confidence",))
"""What ``block_mlp`` may read: the block's confidences, settled positions as 1 (ours) or as the model gives them
(the released filter's)."""
ARCHITECTURES = ("block_mlp", "position_mlp")
FORMAT = "l2pd-filter/1"
DEFAULT_FILTER = DEFAULT_MODEL_DIR / "learn2pd-filter.safetensors"
"""The filter trained for the shipped tiny model: what ``policy=learned`` uses on it when no filter is given."""


class FilterError(ValueError):
    """A filter checkpoint that cannot be used here (missing, malformed, or made for another setting)."""


@dataclass
class FilterConfig:
    """Shape of a filter network; checked on construction."""

    architecture: str = "block_mlp"
    """``block_mlp`` (the paper's: block confidences in, one logit per position out) or ``position_mlp``."""
    features: tuple[str, ...] = ("confidence",)
    """Per-position inputs, from :data:`FEATURES`; ``block_mlp`` reads confidence or raw_confidence only."""
    block_length: int = 32
    """Positions per block; the filter only serves decodes with this block length."""
    hidden_size: int = 32
    """Width of the hidden layer."""

    def __post_init__(self) -> None:
        if not isinstance(self.features, list | tuple):  # a single name given as text would split into letters
            raise FilterError(f"features={self.features!r} must be a list of names from {list(FEATURES)}")
        self.features = tuple(self.features)
        try:
            self.block_length, self.hidden_size = (coerce(name, getattr(self, name), int)
                                                   for name in ("block_length", "hidden_size"))
        except SettingsError as err:
            raise FilterError(str(err)) from None
        if self.architecture not in ARCHITECTURES:
            raise FilterError(f"architecture={self.architecture!r} is not one of {list(ARCHITECTURES)}")
        unknown = [name for name in self.features if name not in FEATURES]
        if unknown or not self.features:
            raise FilterError(f"features={list(self.features)} must be a non-empty subset of {list(FEATURES)}")
        if self.architecture == "block_mlp" and self.features not in BLOCK_MLP_FEATURES:
            raise FilterError(f"architecture 'block_mlp' reads one of {[list(f) for f in BLOCK_MLP_FEATURES]}, got "
                              f"features={list(self.features)}")
        for name in ("block_length", "hidden_size"):
            if getattr(self, name) <= 0:
                raise FilterError(f"{name}={getattr(self, name)} must be a positive integer")


def block_features(names: tuple[str, ...], confidence: torch.Tensor, margin: torch.Tensor | None,
                   entropy: torch.Tensor | None, masked: torch.Tensor) -> torch.Tensor:
    """``[B, L, F]`` float32 filter inputs from the block's ``[B, L]`` statistics (settled positions read as
    certain, except in ``raw_confidence``)."""
    settled = ~masked  # [B, L]
    length = masked.shape[-1]

    def certain_where_settled() -> torch.Tensor:
        return confidence.masked_fill(settled, 1.0)

    columns = {
        "confidence": certain_where_settled,
        "margin": lambda: margin.masked_fill(settled, 1.0),
        "entropy": lambda: entropy.masked_fill(settled, 0.0),
        "position": lambda: (torch.arange(length, device=masked.device) / length).expand(masked.shape),
        "committed_share": lambda: settled.double().mean(-1, keepdim=True).expand(masked.shape),
        # The block's first position follows the previous block, which is always fully committed.
        "left_settled": lambda: shifted(settled, 1, fill=True),
        "confidence_rank": lambda: confidence_rank(confidence, masked) / length,
        "raw_confidence": lambda: confidence,
        # Neighbours' confidences let a rule see two uncertain positions side by side (committing both in one pass
        # picks each one's token independently). Left of the block is committed (1); right of it is the next
        # block, not yet decoded (0).
        "left_confidence": lambda: shifted(certain_where_settled(), 1, fill=1.0),
        "right_confidence": lambda: shifted(certain_where_settled(), -1, fill=0.0),
        "right_settled": lambda: shifted(settled, -1, fill=False),
    }
    return torch.stack([columns[name]().float() for name in names], dim=-1)


def confidence_rank(confidence: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: how many masked positions of the block are more confident than this one (0 where settled)."""
    score = confidence.masked_fill(~masked, float("-inf"))  # [B, L]
    above = (score[:, None, :] > score[:, :, None]) & masked[:, :, None]  # [B, L, L]: j beats i
    return above.sum(-1).masked_fill(~masked, 0)


class FilterNet(nn.Module):
    """``[B, L, F]`` features -> ``[B, L]`` logits that the position's prediction is final."""

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.block_length if cfg.architecture == "block_mlp" else len(cfg.features)
        out = cfg.block_length if cfg.architecture == "block_mlp" else 1
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden_size), nn.ReLU(), nn.Linear(cfg.hidden_size, out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "block_mlp":
            return self.mlp(features[..., 0])  # the block's confidences [B, L] -> [B, L]
        return self.mlp(features).squeeze(-1)  # each position on its own: [B, L, F] -> [B, L]


def is_share(value: object) -> bool:
    """Whether a value read from JSON is a number strictly between 0 and 1."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1


@dataclass
class FilterCard:
    """The JSON half of a filter checkpoint."""

    config: FilterConfig
    base_model: str
    """Fingerprint of the model whose decodes the filter was trained on (:func:`model_fingerprint`)."""
    accept_threshold: float | None
    """Default probability a position must exceed to be committed, chosen on validation problems (``None`` only
    while ``train-filter`` searches for it)."""
    cache: str = "none"
    """KV cache mode of the traces it was trained on."""
    training: dict = field(default_factory=dict)
    """Trace directories, trajectories, tasks, sizes, seed, epochs, wall time."""
    validation: dict = field(default_factory=dict)
    """Validation loss, precision and recall at the accept threshold, the threshold search."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.accept_threshold is not None and not is_share(self.accept_threshold):
            raise FilterError(f"accept_threshold={self.accept_threshold!r} must be a number in (0, 1) or null")
        for name, kind in (("base_model", str), ("cache", str), ("training", dict), ("validation", dict)):
            if not isinstance(getattr(self, name), kind):
                raise FilterError(f"{name}={getattr(self, name)!r} must be a JSON "
                                  f"{'string' if kind is str else 'object'}")


class LearnedFilter:
    """A trained filter as the ``learned`` policy calls it: ``StepState -> [B, L]`` probabilities."""

    def __init__(self, net: FilterNet, card: FilterCard):
        self.net, self.card = net.eval(), card

    def __call__(self, state: StepState) -> torch.Tensor:
        features = self.features(state)  # [B, L, F]
        with torch.no_grad():
            return torch.sigmoid(self.net.to(features.device)(features))  # the net follows the model's device

    def features(self, state: StepState) -> torch.Tensor:
        """``[B, L, F]``: the filter's inputs at this step, made once per step (kept on ``state``); a
        ``position_mlp`` asked about ``state.judged`` positions only makes margin and entropy there (the other
        positions' outputs are not read) and keeps nothing."""
        names = self.card.config.features
        if names in state.filter_inputs:
            return state.filter_inputs[names]
        judged_only = state.judged is not None and self.card.config.architecture == "position_mlp"
        margin, entropy = None, None
        if {"margin", "entropy"} & set(names):
            margin, entropy = state.spread_judged() if judged_only else state.spread()
        features = block_features(names, state.confidence, margin, entropy, state.masked)
        if not judged_only:
            state.filter_inputs[names] = features
        return features

    def save(self, path: str | Path) -> None:
        """Write ``path`` (``.safetensors``) and the card beside it (``.json``)."""
        weights, card = checkpoint_paths(path)
        save_tensors_atomic(self.net.state_dict(), weights, metadata={"format": FORMAT})
        write_atomic(card, json.dumps(asdict(self.card), indent=2) + "\n")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, card)`` of a checkpoint named by either file or by the shared stem."""
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    # Appended, not with_suffix: a stem may hold dots of its own (rollout-b32-t0.95).
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def read_filter(path: str | Path) -> LearnedFilter:
    """Load a checkpoint written by :meth:`LearnedFilter.save` (no compatibility checks: see ``load_filter``)."""
    weights, card_path = checkpoint_paths(path)
    for part in (weights, card_path):
        if not part.is_file():
            raise FilterError(f"filter checkpoint {str(path)!r}: {str(part)!r} does not exist (a checkpoint is "
                              "NAME.safetensors + NAME.json, written by `l2pd train-filter`)")
    card = read_card(card_path)
    net = FilterNet(card.config)
    net.load_state_dict(checked_weights(weights, net))
    return LearnedFilter(net, card)


def read_card(path: Path) -> FilterCard:
    """The card in ``path``; what is wrong with it is reported with the file's name."""
    raw = read_json(path, "filter card")
    if raw.get("format") != FORMAT:
        raise FilterError(f"{str(path)!r} has format {raw.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(raw.get("config"), dict):
        raise FilterError(f"filter card {str(path)!r} has no 'config' object (architecture, features, block_length, "
                          "hidden_size)")
    try:
        return FilterCard(**{**raw, "config": FilterConfig(**raw["config"])})
    except TypeError as err:  # a key the format does not have, or lacks one it needs: the message names it
        raise FilterError(f"filter card {str(path)!r} does not match its format {FORMAT!r} ({err})") from None
    except FilterError as err:
        raise FilterError(f"filter card {str(path)!r}: {err}") from None


def checked_weights(path: Path, net: FilterNet) -> dict[str, torch.Tensor]:
    """The tensors in ``path``, refused in one line unless they are exactly ``net``'s names and shapes."""
    tensors, expected = read_tensors(path, "filter weights"), net.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FilterError(f"filter weights {str(path)!r} do not match the card's {net.cfg.architecture} network: "
                          f"missing tensors {shorten(missing)}, unexpected tensors {shorten(unexpected)}")
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise FilterError(f"filter weights {str(path)!r}: tensor {name} has shape {list(tensors[name].shape)}, "
                              f"the card's network needs {list(tensor.shape)}")
    return tensors


def shorten(names: list[str], most: int = 4) -> str:
    """``names`` as a list, the first ``most`` of them and how many more."""
    return str(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_compatible(card: FilterCard, path: str | Path, base_model: str, block_length: int) -> None:
    """Refuse a filter made for another base model or block length (a filter trained without a KV cache may
    run with one: the benchmark measures what that costs)."""
    if card.base_model != base_model:
        raise FilterError(f"filter {str(path)!r} was trained on base model {card.base_model}, not on the loaded "
                          f"model ({base_model}); collect traces and train a filter for this model")
    if card.config.block_length != block_length:
        raise FilterError(f"filter {str(path)!r} was trained for block_length={card.config.block_length}, the "
                          f"decode uses block_length={block_length}")


def load_filter(path: str | Path | None, pretrained: str | Path | None, block_length: int) -> LearnedFilter:
    """The filter at ``path`` (:func:`filter_path`), checked against the base model and block length it will
    serve."""
    path = filter_path(path, pretrained)
    learned = read_filter(path)
    check_compatible(learned.card, path, model_fingerprint(resolve_checkpoint(pretrained)), block_length)
    return learned


def filter_path(path: str | Path | None, pretrained: str | Path | None) -> Path:
    """The checkpoint a decode of the model ``pretrained`` reads for the filter setting ``path``: the one shipped
    with the tiny model when ``path`` is ``None`` (and ``pretrained`` is that model), else :func:`resolve_filter`."""
    ckpt = resolve_checkpoint(pretrained)
    if path is not None:
        return resolve_filter(path, ckpt)
    if ckpt.resolve() != DEFAULT_MODEL_DIR.resolve():
        raise FilterError(f"policy 'learned' on {str(pretrained)!r} needs a filter trained for it "
                          "(`l2pd collect-traces` then `l2pd train-filter`); only the shipped tiny model "
                          "comes with one")
    return DEFAULT_FILTER


def filter_fingerprint(path: str | Path) -> str:
    """A short identity of the filter checkpoint ``path``: SHA-256 of its weights file (a few kB)."""
    return "sha256:" + hashlib.sha256(checkpoint_paths(path)[0].read_bytes()).hexdigest()[:16]


def resolve_filter(path: str | Path, model_dir: Path) -> Path:
    """``path`` when a checkpoint is there or it names a folder; otherwise a bare name is the filter of that name
    shipped beside the model (``learned-b32``: ``MODEL/learned-b32.safetensors``), refused in one line with the
    names there when there is none."""
    given = Path(path)
    weights = checkpoint_paths(given)[0]
    if weights.is_file() or len(given.parts) > 1:
        return given
    beside = model_dir / given.name
    if checkpoint_paths(beside)[0].is_file():
        return beside
    raise FilterError(f"filter {str(path)!r}: no checkpoint {str(weights)!r} and no filter of that name beside the "
                      f"model (shipped there: {', '.join(shipped_filters(model_dir)) or 'none'})")


def shipped_filters(model_dir: Path) -> list[str]:
    """Names of the filter checkpoints in a model directory (weights with a card beside them)."""
    return sorted(weights.stem for weights in model_dir.glob("*.safetensors") if weights.with_suffix(".json").is_file())
