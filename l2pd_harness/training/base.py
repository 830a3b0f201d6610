"""``l2pd train-base``: train a tiny LLaDA on the task suite with LLaDA's supervised fine-tuning objective.

Each sample is a chat-formatted prompt (never masked) followed by the response and end-of-text padding up to a
canvas length drawn per batch (short canvases mostly, a share up to ``max_gen_length``), so the model answers on
any canvas it will be decoded on. A masking ratio ``t ~ U(eps, 1)`` per sample masks response positions; the loss is
the cross-entropy of masked positions weighted by ``1/t``, divided by the canvas length (LLaDA's SFT loss).

A share of samples can instead be masked the way a block-wise (semi-autoregressive) decode sees its canvas: the
blocks before a drawn block clean, that block masked at ratio ``t``, everything after it masked; their loss is the
same weighted cross-entropy over that block, divided by the block length. Uniform masking almost never shows the
model a clean prefix followed by a wholly masked rest, which is what every block after the first starts from.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from l2pd_harness.files import FileFormatError, read_json
from l2pd_harness.loading import load_native, load_tokenizer, parse_device, resolve_checkpoint, save_llada
from l2pd_harness.models.llada import LLaDAConfig, LLaDAModel
from l2pd_harness.settings import SettingsError
from l2pd_harness.tasks import get_task, iter_problems, vocabulary_corpus
from l2pd_harness.text import encode_prompt
from l2pd_harness.tokenizer import build_tokenizer

TRAINER_STATE = "trainer_state.pt"
TRAINING_LOG = "training_log.json"
PROMPT_ROOM = 96
"""Positions a batch reserves for the chat-formatted question, more than any task's question takes."""
ARCHITECTURE = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "max_sequence_length")
"""The :class:`BaseTrainConfig` fields a checkpoint's config.json fixes (named as in :class:`LLaDAConfig`)."""


@dataclass
class BaseTrainConfig:
    """Hyper-parameters of ``l2pd train-base``; saved beside the checkpoint."""

    tasks: tuple[str, ...] = ("arith", "listops")
    """Tasks mixed into every batch."""
    task_weights: tuple[int, ...] = ()
    """Problems of each task per round of the mix, in ``tasks`` order (empty: one each, equal shares)."""
    steps: int = 20000
    """Optimiser steps."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to a tenth)."""
    warmup: int = 500
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    tokens_per_batch: int = 32768
    """Prompt + canvas positions per batch; the batch size follows from the canvas length drawn."""
    min_gen_length: int = 64
    """Shortest canvas drawn."""
    max_gen_length: int = 1024
    """Longest canvas drawn."""
    long_share: float = 0.3
    """Share of batches whose canvas is drawn from (256, max_gen_length] rather than [min_gen_length, 256]."""
    eps: float = 1e-3
    """Smallest masking ratio."""
    semi_ar_share: float = 0.0
    """Share of samples masked as a block-wise decode sees them (earlier blocks clean, later ones masked)."""
    block_length: int = 32
    """Block length of those samples (the decode's ``block_length``)."""
    d_model: int = 192
    """Model width."""
    n_layers: int = 6
    """Transformer blocks."""
    n_heads: int = 6
    """Attention heads."""
    mlp_hidden_size: int = 512
    """SwiGLU inner width."""
    max_sequence_length: int = 1280
    """Longest prompt + canvas the model accepts."""
    seed: int = 0
    """Seed of initialisation, data and masks."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (model + optimiser, for ``--resume``)."""

    def __post_init__(self) -> None:
        for name in self.tasks:
            get_task(name)
        if self.task_weights and (len(self.task_weights) != len(self.tasks) or min(self.task_weights) < 1):
            raise ValueError(f"task_weights={list(self.task_weights)} must give a positive integer for each of the "
                             f"tasks {list(self.tasks)}")
        if not 0 < self.min_gen_length <= 256 < self.max_gen_length:
            raise ValueError(f"need 0 < min_gen_length ({self.min_gen_length}) <= 256 < max_gen_length "
                             f"({self.max_gen_length})")
        for name in ("long_share", "semi_ar_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("steps", "warmup", "tokens_per_batch", "checkpoint_every", "block_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        # SettingsError (a ValueError) from here on: train_base re-checks a config given a checkpoint's architecture.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"lr={self.lr} must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingsError(f"weight_decay={self.weight_decay} must be a finite number >= 0")
        if not 0 < self.eps < 1:
            raise SettingsError(f"eps={self.eps} must be in (0, 1)")
        if self.max_sequence_length < self.max_gen_length + PROMPT_ROOM:
            raise SettingsError(f"max_sequence_length={self.max_sequence_length} must be at least max_gen_length "
                                f"({self.max_gen_length}) + {PROMPT_ROOM} prompt positions = "
                                f"{self.max_gen_length + PROMPT_ROOM}")


def task_corpus(tasks: tuple[str, ...]) -> list[str]:
    return [text for name in tasks for text in vocabulary_corpus(name)]


def learning_rate(cfg: BaseTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def draw_gen_length(cfg: BaseTrainConfig, rng: random.Random) -> int:
    if rng.random() < cfg.long_share:
        return rng.randrange(256 + 8, cfg.max_gen_length + 1, 8)
    return rng.randrange(cfg.min_gen_length, 256 + 1, 8)


def mixed(streams: list[Iterator[dict[str, str]]], weights: tuple[int, ...]) -> Iterator[dict[str, str]]:
    """Rounds of ``weights[i]`` problems from each endless stream ``i``, in stream order."""
    while True:
        for stream, weight in zip(streams, weights, strict=True):
            yield from itertools.islice(stream, weight)


def make_batch(cfg: BaseTrainConfig, tokenizer, step: int) -> dict[str, torch.Tensor]:
    """Prompt + padded response ids for ``step`` (deterministic in ``(seed, step)``, so resume is exact)."""
    rng = random.Random(f"{cfg.seed}:{step}")
    gen_length = draw_gen_length(cfg, rng)
    streams = [iter_problems(name, "train", cfg.seed * 10_000_000 + step) for name in cfg.tasks]
    batch_size = max(1, cfg.tokens_per_batch // (gen_length + PROMPT_ROOM))
    problems = list(itertools.islice(mixed(streams, cfg.task_weights or (1,) * len(streams)), batch_size))
    prompts = [encode_prompt(tokenizer, p["question"]) for p in problems]
    answers = [tokenizer(p["answer"], add_special_tokens=False)["input_ids"] for p in problems]
    gen_length = max(gen_length, max(len(a) for a in answers) + 1)
    width = max(len(p) for p in prompts)
    eos = tokenizer.eos_token_id
    ids = torch.full((len(problems), width + gen_length), eos, dtype=torch.long)
    attention = torch.ones_like(ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids[row, width - len(prompt):width] = torch.tensor(prompt)
        attention[row, : width - len(prompt)] = 0
        ids[row, width:width + len(answer)] = torch.tensor(answer)
    return {"ids": ids, "attention": attention, "prompt_width": torch.tensor(width)}


class StepBatches(Dataset):
    """Batch ``i`` is :func:`make_batch` for step ``i``, so DataLoader workers can build batches ahead."""

    def __init__(self, cfg: BaseTrainConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return make_batch(self.cfg, self.tokenizer, step)


def semi_ar_masks(target: torch.Tensor, t: torch.Tensor, block_length: int, eos_id: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked, scored)``, each ``[B, G]``: per row a block drawn among those up to the one holding the answer's
    first end-of-text; positions before it clean, in it masked with probability ``t [B]``, after it all masked.
    ``scored`` is the drawn block's masked positions."""
    columns = torch.arange(target.shape[1], device=target.device)  # [G]
    answer_end = (target == eos_id).long().argmax(-1)  # [B]: a batch's canvas always ends in padding
    blocks = answer_end // block_length + 1  # [B]
    draw = torch.rand(blocks.shape, device=target.device, generator=generator)
    start = ((draw * blocks).long() * block_length)[:, None]  # [B, 1]
    in_block = (columns >= start) & (columns < start + block_length)  # [B, G]
    scored = in_block & (torch.rand(target.shape, device=target.device, generator=generator) < t[:, None])
    return scored | (columns >= start + block_length), scored


def diffusion_loss(model: LLaDAModel, batch: dict[str, torch.Tensor], cfg: BaseTrainConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """LLaDA SFT loss: masked-token cross-entropy weighted by 1/t, over the canvas length, averaged over samples
    (over the block length for semi-autoregressive samples, whose loss is their block's)."""
    ids, width = batch["ids"], int(batch["prompt_width"])
    target = ids[:, width:]  # [B, G]
    device = ids.device
    t = cfg.eps + (1 - cfg.eps) * torch.rand(ids.shape[0], device=device, generator=generator)  # [B]
    masked = torch.rand(target.shape, device=device, generator=generator) < t[:, None]  # [B, G]
    scored, span = masked, torch.full_like(t, target.shape[1])  # [B, G], [B]
    if cfg.semi_ar_share > 0:  # no extra draws otherwise: earlier runs' masks stay as they were
        semi = torch.rand(t.shape, device=device, generator=generator) < cfg.semi_ar_share  # [B]
        semi_masked, semi_scored = semi_ar_masks(target, t, cfg.block_length, model.config.eos_token_id, generator)
        masked = torch.where(semi[:, None], semi_masked, masked)
        scored = torch.where(semi[:, None], semi_scored, scored)
        span = torch.where(semi, float(cfg.block_length), span)
    noisy = ids.clone()
    noisy[:, width:] = target.masked_fill(masked, model.config.mask_token_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(noisy, batch["attention"])[:, width:]  # [B, G, V]
    ce = F.cross_entropy(logits[scored].float(), target[scored], reduction="none")  # [n_scored]
    weight = (1 / (t * span))[:, None].expand_as(scored)[scored]  # [n_scored]
    return (ce * weight).sum() / target.shape[0]


def build_model(cfg: BaseTrainConfig, tokenizer) -> LLaDAModel:
    torch.manual_seed(cfg.seed)
    model = LLaDAModel(LLaDAConfig(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, mlp_hidden_size=cfg.mlp_hidden_size,
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_sequence_length=cfg.max_sequence_length))
    for name, param in model.named_parameters():
        if param.dim() == 2:
            torch.nn.init.normal_(param, std=0.02 if "ff_out" not in name and "attn_out" not in name
                                  else 0.02 / math.sqrt(2 * cfg.n_layers))
    return model


def grow_vocabulary(model: LLaDAModel, vocab_size: int, seed: int) -> LLaDAModel:
    """``model`` with room for ``vocab_size`` tokens: the rows it had keep their weights, new embedding and output
    rows start as :func:`build_model` initialises them (a task that brings new words to a trained checkpoint)."""
    if vocab_size <= model.config.embedding_size:
        model.config.vocab_size = max(vocab_size, model.config.vocab_size)
        return model
    grown = LLaDAModel(replace(model.config, vocab_size=vocab_size, embedding_size=vocab_size))
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for name in [n for n in state if n.endswith(("transformer.wte.weight", "transformer.ff_out.weight"))]:
        old = state[name]  # [embedding_size, d_model]
        new = torch.randn(vocab_size - old.shape[0], old.shape[1], generator=generator, dtype=old.dtype) * 0.02
        state[name] = torch.cat([old, new.to(old.device)])
    grown.load_state_dict(state)
    return grown.to(next(model.parameters()).device)


def save_checkpoint(out: Path, model: LLaDAModel, tokenizer, optimizer, step: int, log: dict) -> None:
    """Model files (a loadable checkpoint at every save) and the optimiser state, each replaced atomically."""
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_llada(model, staging)
    tokenizer.save_pretrained(staging)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, staging / TRAINER_STATE)
    (staging / TRAINING_LOG).write_text(json.dumps(log, indent=2) + "\n")
    for file in staging.iterdir():
        file.replace(out / file.name)
    staging.rmdir()


def _checkpoint_to_start_from(out: Path, resume: bool, init_from: Path | None) -> Path | None:
    """The checkpoint directory whose weights the run starts from (``out`` itself when resuming), or ``None`` for a
    fresh model; an ``out`` that already holds a checkpoint is never overwritten by a new run."""
    if resume:
        if not (out / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"--resume: {str(out)!r} holds no {TRAINER_STATE} to resume from")
        return out
    if (out / TRAINER_STATE).exists() or (out / "config.json").exists():
        raise SettingsError(f"--out {str(out)!r} already holds a checkpoint: continue it with --resume or give "
                            "another --out")
    return None if init_from is None else resolve_checkpoint(init_from)


def _with_architecture_of(cfg: BaseTrainConfig, ckpt: Path) -> BaseTrainConfig:
    """``cfg`` with the architecture of the checkpoint in ``ckpt``. An architecture option set to another value than
    the checkpoint's is refused; one left at its default (indistinguishable from not given) takes the checkpoint's."""
    saved = LLaDAConfig.from_json(ckpt / "config.json")
    defaults = {f.name: f.default for f in fields(BaseTrainConfig)}
    conflicts = [f"{name}={getattr(cfg, name)} (checkpoint: {getattr(saved, name)})" for name in ARCHITECTURE
                 if getattr(cfg, name) not in (defaults[name], getattr(saved, name))]
    if conflicts:
        raise SettingsError(f"architecture options differ from checkpoint {str(ckpt)!r}, whose config.json fixes "
                            f"them: {', '.join(conflicts)}")
    return replace(cfg, **{name: getattr(saved, name) for name in ARCHITECTURE})


def _read_trainer_state(path: Path, dev: torch.device) -> dict:
    """The optimiser state and step saved by :func:`save_checkpoint`."""
    try:
        state = torch.load(path, map_location=dev)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        reason = (str(err) or type(err).__name__).splitlines()[0]
        raise FileFormatError(f"trainer state {str(path)!r} is not readable ({reason}); it may be truncated: "
                              "resume from a complete checkpoint or train into another --out") from None
    if not isinstance(state, dict) or not {"optimizer", "step"} <= state.keys():
        raise FileFormatError(f"trainer state {str(path)!r} lacks the 'optimizer' and 'step' entries")
    return state


def _starting_point(cfg: BaseTrainConfig, out: Path, dev: torch.device, resume: bool, ckpt: Path | None):
    """``(model, tokenizer, trainer state, log)`` to start from: ``out``'s checkpoint when resuming, else a fresh
    model or checkpoint ``ckpt``'s weights with a new optimiser and schedule."""
    if resume:
        state = _read_trainer_state(out / TRAINER_STATE, dev)
        log = read_json(out / TRAINING_LOG, "training log")
        return load_native(out, device=dev).train(), load_tokenizer(out), state, log
    if ckpt is None:
        tokenizer = build_tokenizer(task_corpus(cfg.tasks))
        model, earlier = build_model(cfg, tokenizer).to(dev).train(), []
    else:
        tokenizer = build_tokenizer(task_corpus(cfg.tasks), base=load_tokenizer(ckpt))
        model = grow_vocabulary(load_native(ckpt, device=dev), len(tokenizer), cfg.seed).train()
        earlier = [read_json(ckpt / TRAINING_LOG, "training log")]
    log = {"config": asdict(cfg), "device": str(dev), "wall_time_s": 0.0, "losses": [], "earlier_runs": earlier}
    return model, tokenizer, {"step": 0}, log


def train_base(cfg: BaseTrainConfig, out: Path, device: str = "cpu", resume: bool = False,
               num_workers: int = 0, init_from: Path | None = None) -> dict:
    """Train into ``out`` (from scratch, from ``init_from``'s weights, or resuming ``out``); returns the log.
    Every setting and input checkpoint is checked before ``out`` is created."""
    dev = parse_device(device)
    if num_workers < 0:
        raise SettingsError(f"num_workers={num_workers} must be >= 0 (0 builds the batches in the main process)")
    ckpt = _checkpoint_to_start_from(out, resume, init_from)
    if ckpt is not None:
        cfg = _with_architecture_of(cfg, ckpt)
    model, tokenizer, state, log = _starting_point(cfg, out, dev, resume, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    start_step, started, window = state["step"], time.perf_counter(), []
    batches = DataLoader(StepBatches(cfg, tokenizer), sampler=range(start_step, cfg.steps), batch_size=None,
                         num_workers=num_workers, prefetch_factor=8 if num_workers else None)
    bar = tqdm(zip(range(start_step, cfg.steps), batches, strict=False), initial=start_step, total=cfg.steps,
               desc="train-base", unit="step")
    for step, batch in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        generator = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + step)
        batch = {k: v if k == "prompt_width" else v.to(dev, non_blocking=True) for k, v in batch.items()}
        loss = diffusion_loss(model, batch, cfg, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.detach())
        if (step + 1) % 50 == 0:
            log["losses"].append([step + 1, torch.stack(window).mean().item()])
            bar.set_postfix(loss=f"{log['losses'][-1][1]:.4f}")
            window = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            log["wall_time_s"] += time.perf_counter() - started
            started = time.perf_counter()
            log["steps_done"] = step + 1
            save_checkpoint(out, model, tokenizer, optimizer, step + 1, log)
    return log
