"""The lm-evaluation-harness model ``l2pd``: lm-eval's requests in, one engine call per request kind.

    lm_eval --model l2pd --model_args policy=threshold,eotp=true --tasks arith --include_path tasks

``model_args`` are the keywords of :class:`L2PDLM`. Each generation request's step log (forward passes, tokens
per step, latency, settings) goes to ``steps_rank<r>_<time>.jsonl`` in ``log_dir`` (default: the
``--output_path`` of the lm-eval command), keyed by ``task``, ``doc_id`` and ``prompt_hash`` (lm-eval's
``hash_string`` of the request context, its samples' ``arguments``) so analysis can join it to
``samples_*.jsonl``. lm-eval's ``--use_cache`` keys requests by their text only, not by ``model_args``: use one
cache path per configuration.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import time
from pathlib import Path

import lm_eval.models  # noqa: F401  (built-in models first: lm-eval loads them only into an empty registry)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import hash_string, simple_parse_args_string
from tqdm import tqdm

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.evaluation import step_log as step_log_fields
from l2pd_harness.filter.model import decode_policy
from l2pd_harness.jsonl import JsonlWriter
from l2pd_harness.likelihood import monte_carlo_loglikelihood
from l2pd_harness.loading import load_model
from l2pd_harness.text import decode_response, encode_prompt, stop_token_ids

log = logging.getLogger(__name__)

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ModelArgsError(ValueError):
    """A bad ``--model_args`` value; the stock CLI reports it as one line (see ``lm_eval_hook``)."""


def as_int(name: str, value) -> int | None:
    """lm-eval hands integers over as int, float (``64.0``) or string."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={value!r} is not an integer") from None
    if not number.is_integer():
        raise ValueError(f"model_args {name}={value!r} is not an integer")
    return int(number)


def as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={value!r} is not a number") from None


def as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in TRUE + FALSE:
        return str(value).lower() in TRUE
    raise ValueError(f"model_args {name}={value!r} is not a boolean (use one of {list(TRUE + FALSE)})")


def pick_device(device: str | None) -> str:
    """lm-eval passes ``cuda:0`` even on machines without CUDA: fall back to the CPU there, with a warning."""
    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s requested but CUDA is not available; using cpu", device)
        return "cpu"
    return device


def output_path_from_argv() -> Path | None:
    """The ``--output_path`` (or ``-o``) of the running lm-eval command, where its results land."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and i + 1 < len(argv):
            path = Path(argv[i + 1])
            return path.parent if path.suffix == ".json" else path
        if arg.startswith("--output_path="):
            return Path(arg.split("=", 1)[1])
    return None


@register_model("l2pd")
class L2PDLM(LM):
    """A diffusion LLM decoded by the l2pd engine.

    pretrained: checkpoint directory or hub id in the local HF cache (default: the shipped tiny model).
    policy, threshold, factor, eotp, cache, gen_length, block_length, steps, temperature: the engine's
    :class:`DecodeConfig` (``gen_length`` is the largest canvas; a request's ``max_gen_toks`` makes it shorter).
    filter, accept_threshold: the learned policy's filter checkpoint (default: the one shipped with the tiny model)
    and the probability it must exceed (default: the filter's own).
    mc_num: Monte-Carlo samples per loglikelihood request. chat_template: wrap raw contexts in the tokenizer's
    chat template (lm-eval's ``--apply_chat_template`` does it instead when given). log_dir: step-log directory.
    """

    def __init__(self, pretrained: str | None = None, policy: str = "fixed", threshold: float = 0.9,
                 factor: float = 1.0, filter: str | None = None, accept_threshold: float | None = None,
                 eotp: bool = False, cache: str = "none", gen_length: int = 256, block_length: int = 32,
                 steps: int | None = None, temperature: float = 0.0, cfg_scale: float = 0.0, mc_num: int = 64,
                 batch_size: int | str = 16, max_batch_size: int | None = None, dtype: str = "float32",
                 device: str | None = None, log_dir: str | None = None, chat_template: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError(f"model_args batch_size={batch_size!r}: automatic batch sizes are not supported; "
                             "give a number of sequences in flight")
        self.cfg = DecodeConfig(
            gen_length=as_int("gen_length", gen_length), block_length=as_int("block_length", block_length),
            policy=policy, steps=as_int("steps", steps), threshold=as_float("threshold", threshold),
            factor=as_float("factor", factor), eotp=as_bool("eotp", eotp), cache=cache,
            temperature=as_float("temperature", temperature), cfg_scale=as_float("cfg_scale", cfg_scale),
            seed=as_int("seed", seed), batch_size=as_int("batch_size", batch_size))
        given = None if accept_threshold is None else as_float("accept_threshold", accept_threshold)
        self.cfg, self.policy = decode_policy(self.cfg, filter, pretrained, given)
        self.mc_num, self.chat_template_default = as_int("mc_num", mc_num), as_bool("chat_template", chat_template)
        self.templated_by_lm_eval = False
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU ranks talk over gloo
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = self.accelerator.device.type if self.accelerator.device.type == "cpu" else str(
                self.accelerator.device)  # safetensors rejects "cpu:0"
        self.model, self.tokenizer = load_model(pretrained, dtype=dtype, device=pick_device(device))
        self._device = next(self.model.parameters()).device
        self.stops = stop_token_ids(self.tokenizer, self.model.config.eos_token_id)
        self.log_dir = Path(log_dir) if log_dir is not None else output_path_from_argv()
        self.settings = {"pretrained": pretrained or "tiny-llada (shipped)", "filter": filter, "mc_num": self.mc_num,
                         **vars(self.cfg)}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> L2PDLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> L2PDLM:
        """Like lm-eval's, but an unknown model_arg is an error that lists the known ones."""
        known = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(arg_dict) - set(known))
        if unknown:
            raise ModelArgsError(f"unknown model_args {unknown} for l2pd; known: {known}")
        try:
            return super().create_from_arg_obj(arg_dict, additional_config)
        except ValueError as err:
            raise ModelArgsError(str(err)) from None

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
        return encode_prompt(self.tokenizer, context, self.chat_template_default and not self.templated_by_lm_eval)

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
        wanted = self.cfg.gen_length if max_gen_toks is None else as_int("max_gen_toks", max_gen_toks)
        blocks = max(1, math.ceil(wanted / self.cfg.block_length))
        return min(self.cfg.gen_length, blocks * self.cfg.block_length)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        by_canvas: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            by_canvas.setdefault(self.canvas_length(request.args[1].get("max_gen_toks")), []).append(i)
        texts: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="l2pd generate_until", disable=disable_tqdm or self.rank != 0) as bar, \
                StepLog(self.log_dir, requests, self.rank) as step_log:
            for canvas, indices in by_canvas.items():
                engine = Engine(self.model, self.cfg.for_canvas(canvas), eot_ids=self.stops, policy=self.policy)
                prompts = [self.fit(self.encode_context(requests[i].args[0]), canvas) for i in indices]
                for local, result in engine.stream(prompts):
                    index = indices[local]
                    text = decode_response(self.tokenizer, result.token_ids, self.stops)
                    texts[index] = cut_at_until(text, requests[index].args[1].get("until"))
                    step_log.write(index, step_log_fields(result, len(prompts[local]), self.stops), self.settings)
                    bar.update(1)
        return texts

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        generator = torch.Generator(device=self._device).manual_seed(self.cfg.seed)
        results = []
        for request in tqdm(requests, desc="l2pd loglikelihood", disable=disable_tqdm or self.rank != 0):
            context, continuation = request.args
            prompt = self.encode_context(context) if context else []
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
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

    def write(self, index: int, fields: dict, settings: dict) -> None:
        if self.writer is None:
            return
        request = self.requests[index]
        self.writer.write({"task": request.task_name, "doc_id": request.doc_id, "repeat": request.idx,
                           "prompt_hash": hash_string(request.args[0]), **fields, "settings": settings})

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)
