"""The lm-evaluation-harness model ``l2pd``: lm-eval's requests in, one engine call per request kind.

    lm_eval --model l2pd --model_args policy=threshold,eotp=true --tasks arith --include_path tasks

``model_args`` are the fields of :class:`ModelArgs` and :class:`DecodeConfig`. Each generation request's step log
(forward passes, tokens per step, latency, settings) goes to ``steps_rank<r>_<time>.jsonl`` in ``log_dir``, keyed
by ``task``, ``doc_id`` and ``prompt_hash`` (lm-eval's ``hash_string`` of the request context, its samples'
``arguments``) so analysis can join it to ``samples_*.jsonl``. lm-eval's ``--use_cache`` keys requests by their
text only, not by ``model_args``: use one cache path per configuration.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import lm_eval.models  # noqa: F401  (built-in models first: lm-eval loads them only into an empty registry)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import hash_string, simple_parse_args_string
from tqdm import tqdm

from l2pd_harness.decoding.config import CHOICES, DecodeConfig
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.evaluation import DecodeProgress
from l2pd_harness.files import JsonlWriter
from l2pd_harness.likelihood import monte_carlo_loglikelihood
from l2pd_harness.loading import DTYPES, available_devices, load_model
from l2pd_harness.settings import SettingsError, coerce, coerce_fields, decode_identity, decode_setup
from l2pd_harness.steplog import StepLogRow
from l2pd_harness.text import decode_response, encode_pair, encode_prompt, stop_token_ids

log = logging.getLogger(__name__)


class ModelArgsError(SystemExit):
    """A bad ``--model_args`` name or value, or a model that cannot be loaded from them. A ``SystemExit`` whose code
    is the message: the stock CLI, which lets model errors escape as tracebacks, then prints this one line and exits
    with status 1, as lm-eval does for its own usage errors."""


@dataclass
class ModelArgs:
    """The ``model_args`` that are not decode settings (those are the fields of :class:`DecodeConfig`)."""

    pretrained: str | None = None
    """Checkpoint directory or hub id in the local HF cache; ``None`` is the shipped tiny model."""
    mc_num: int = 64
    """Monte-Carlo samples per loglikelihood request."""
    dtype: str = "float32"
    """Weight dtype: float32, bfloat16 or float16."""
    device: str | None = None
    """Torch device; lm-eval's ``--device`` fills it; ``cuda`` without CUDA falls back to the CPU with a warning."""
    log_dir: str | None = None
    """Directory of the per-request step logs (``analysis/sweep.py`` sets it to each run's ``--output_path``);
    ``None`` writes none."""
    chat_template: bool = True
    """Wrap raw contexts in the tokenizer's chat template (lm-eval's ``--apply_chat_template`` does it instead when
    given)."""
    max_batch_size: int | None = None
    """Passed by lm-eval's CLI; unused (the batch is ``batch_size`` sequences in flight)."""

    def __post_init__(self) -> None:
        if self.mc_num <= 0:
            raise SettingsError(f"mc_num={self.mc_num} must be a positive integer")
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")


def split_model_args(model_args: dict, config_class: type[DecodeConfig] = DecodeConfig) -> tuple[ModelArgs, dict]:
    """``(model settings, decode settings)`` from lm-eval's ``model_args``; an unknown name lists the known ones."""
    model_names, decode_names = {f.name for f in fields(ModelArgs)}, {f.name for f in fields(config_class)}
    unknown = sorted(set(model_args) - model_names - decode_names)
    if unknown:
        raise SettingsError(f"unknown model_args {unknown} for l2pd; known: {sorted(model_names | decode_names)}")
    if model_args.get("policy") == "oracle":
        raise SettingsError("policy='oracle' decodes toward a reference output per request, which lm-eval does not "
                            f"give; use one of {[name for name in CHOICES['policy'] if name != 'oracle']}")
    batch_size = model_args.get("batch_size")
    if str(batch_size).startswith("auto"):
        raise SettingsError(f"batch_size={batch_size!r}: automatic batch sizes are not supported; give a number of "
                            "sequences in flight")
    own = ModelArgs(**coerce_fields(ModelArgs, {k: v for k, v in model_args.items() if k in model_names}))
    # lm-eval reads the text "none" as None; for a setting whose choices include "none" (cache) it meant the name.
    return own, {k: "none" if v is None and "none" in CHOICES.get(k, ()) else v
                 for k, v in model_args.items() if k in decode_names}


def decoded_with(model_args: dict, config_class: type[DecodeConfig] = DecodeConfig) -> dict:
    """What decides the outputs of :class:`L2PDLM` given ``model_args`` (:func:`decode_identity`), without loading a
    model; a one-line ``ValueError`` for ``model_args`` it would refuse (a learned policy's filter is read and
    checked against the checkpoint)."""
    own, decode = split_model_args(model_args, config_class)
    return decode_identity(decode, own.pretrained, config_class)


def pick_device(device: str | None) -> str:
    """lm-eval passes ``cuda:0`` even on machines without CUDA: fall back to the CPU there, with a warning."""
    device = device or "cpu"
    if device.startswith("cuda") and device not in available_devices():
        log.warning("device=%s requested but this machine has only %s; using cpu", device, available_devices())
        return "cpu"
    return device


@register_model("l2pd")
class L2PDLM(LM):
    """A diffusion LLM decoded by the l2pd engine.

    ``model_args``: the fields of :class:`ModelArgs` (pretrained, mc_num, dtype, device, log_dir, chat_template) and
    of :class:`DecodeConfig` (policy, threshold, eotp, cache, gen_length, ...: ``l2pd generate --help`` describes
    each; ``gen_length`` is the largest canvas, a request's ``max_gen_toks`` makes it shorter).
    """

    config_class: ClassVar[type[DecodeConfig]] = DecodeConfig
    """The decode settings this model accepts (a subclass adds knobs)."""

    def __init__(self, **model_args) -> None:
        super().__init__()
        own, decode = split_model_args(model_args, self.config_class)
        self.cfg, self.policy = decode_setup(decode, own.pretrained, self.config_class)
        self.mc_num, self.chat_template_default = own.mc_num, own.chat_template
        self.templated_by_lm_eval = False
        self.accelerator = None
        device = own.device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU ranks talk over gloo
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = self.accelerator.device.type if self.accelerator.device.type == "cpu" else str(
                self.accelerator.device)  # safetensors rejects "cpu:0"
        self.model, self.tokenizer = load_model(own.pretrained, dtype=own.dtype, device=pick_device(device))
        self._device = next(self.model.parameters()).device
        self.stops = stop_token_ids(self.tokenizer, self.model.config.eos_token_id)
        self.log_dir = None if own.log_dir is None else Path(own.log_dir)
        if self.log_dir is None:
            log.warning("model_args log_dir is not set: the per-request step logs (forward passes, latency) that "
                        "analysis/pareto.py reads are not written")
        self.settings = {"pretrained": own.pretrained or "tiny-llada (shipped)", "mc_num": self.mc_num,
                         **asdict(self.cfg)}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> L2PDLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> L2PDLM:
        """Like lm-eval's, but a setting both in ``model_args`` and among lm-eval's own options (``--device``,
        ``--batch_size``) takes the ``model_args`` value, as lm-eval's HF model does, rather than being passed twice;
        a bad setting or checkpoint is a :class:`ModelArgsError` (one line, exit status 1)."""
        from l2pd_harness.cli import user_errors

        given = {name: value for name, value in (additional_config or {}).items() if value is not None}
        try:
            return cls(**{**given, **arg_dict})
        except user_errors() as err:
            raise ModelArgsError(f"lm_eval --model l2pd: error: {err}") from None

    # ---- what lm-eval asks of a model -------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.templated_by_lm_eval = True
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model": "l2pd", "l2pd_settings": self.settings}

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # ---- requests ----------------------------------------------------------------------------------------------

    def encode_context(self, context: str) -> list[int]:
        """Token ids of a context, as a user turn unless lm-eval's --apply_chat_template already made it one."""
        return encode_prompt(self.tokenizer, context, self.wraps_contexts)

    @property
    def wraps_contexts(self) -> bool:
        """Whether this model wraps contexts in the chat template (not when lm-eval's --apply_chat_template did)."""
        return self.chat_template_default and not self.templated_by_lm_eval

    def fit(self, prompt: list[int], canvas: int) -> list[int]:
        """Keep the end of a prompt too long for the model's context next to the canvas (as lm-eval's HF model
        does), with a warning."""
        room = self.model.config.max_sequence_length - canvas
        if len(prompt) > room:
            log.warning("prompt of %d tokens cut to its last %d (max_sequence_length %d, canvas %d)", len(prompt),
                        room, self.model.config.max_sequence_length, canvas)
            return prompt[-room:]
        return prompt

    def canvas_length(self, max_gen_toks) -> int:
        """``max_gen_toks`` rounded up to whole blocks, at most ``gen_length``."""
        wanted = self.cfg.gen_length if max_gen_toks is None else coerce("max_gen_toks", max_gen_toks, int)
        blocks = max(1, math.ceil(wanted / self.cfg.block_length))
        return min(self.cfg.gen_length, blocks * self.cfg.block_length)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        by_canvas: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            by_canvas.setdefault(self.canvas_length(request.args[1].get("max_gen_toks")), []).append(i)
        texts: list[str] = [""] * len(requests)
        positions = sum(canvas * len(indices) for canvas, indices in by_canvas.items())
        with DecodeProgress(len(requests), positions, "l2pd generate_until", disable_tqdm or self.rank != 0
                            ) as progress, StepLog(self.log_dir, requests, self.rank) as step_log:
            for canvas, indices in by_canvas.items():
                engine = Engine(self.model, self.cfg.for_canvas(canvas), eot_ids=self.stops, policy=self.policy)
                prompts = [self.fit(self.encode_context(requests[i].args[0]), canvas) for i in indices]
                for local, result in engine.stream(prompts, on_progress=progress.committed):
                    index = indices[local]
                    text = decode_response(self.tokenizer, result.token_ids, self.stops)
                    texts[index] = cut_at_until(text, requests[index].args[1].get("until"))
                    step_log.write(index, StepLogRow.of(result, len(prompts[local]), self.stops), self.settings)
                    progress.finish_prompt()
        return texts

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        generator = torch.Generator(device=self._device).manual_seed(self.cfg.seed)
        results = []
        for request in tqdm(requests, desc="l2pd loglikelihood", disable=disable_tqdm or self.rank != 0):
            context, continuation = request.args
            prompt, target = encode_pair(self.tokenizer, context, continuation, self.wraps_contexts)
            results.append(monte_carlo_loglikelihood(self.model, prompt, target, self.mc_num, self.cfg.batch_size,
                                                     generator))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "loglikelihood_rolling (perplexity tasks such as wikitext) is not supported by l2pd: a masked diffusion "
            "model gives no left-to-right token probabilities to chain, only a Monte-Carlo bound on a whole "
            "continuation given a context; use generate_until or loglikelihood tasks")


def cut_at_until(text: str, until: list[str] | str | None) -> str:
    """``text`` up to the first of lm-eval's stop sequences."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class StepLog:
    """Per-request step logs as JSONL (crash-safe, see :class:`JsonlWriter`); nothing without a directory."""

    def __init__(self, directory: Path | None, requests: list[Instance], rank: int):
        self.requests, self.writer = requests, None
        if directory is not None:  # one file per call and rank; lm-eval sends every task's requests in one call
            self.writer = JsonlWriter(Path(directory) / f"steps_rank{rank}_{time.strftime('%Y%m%dT%H%M%S')}.jsonl")

    def __enter__(self) -> StepLog:
        if self.writer is not None:
            self.writer.__enter__()
        return self

    def write(self, index: int, log: StepLogRow, settings: dict) -> None:
        if self.writer is None:
            return
        request = self.requests[index]
        self.writer.write({"task": request.task_name, "doc_id": request.doc_id, "repeat": request.idx,
                           "prompt_hash": hash_string(request.args[0]), **log.to_row(), "settings": settings})

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)
