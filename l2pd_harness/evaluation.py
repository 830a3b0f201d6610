"""Decode task problems, grade them, and summarise accuracy and forward passes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import Engine, StepObserver
from l2pd_harness.decoding.policies import Policy
from l2pd_harness.decoding.scheduler import GenerationResult
from l2pd_harness.tasks import get_task
from l2pd_harness.text import decode_response, encode_prompt, response_length, stop_token_ids


@dataclass
class EvalSummary:
    task: str
    n: int
    accuracy: float
    mean_nfe: float
    gen_length: int
    tokens_per_step: float

    def as_row(self) -> dict:
        return {"task": self.task, "n": self.n, "accuracy": round(self.accuracy, 4), "mean_nfe": self.mean_nfe,
                "gen_length": self.gen_length, "tokens_per_step": self.tokens_per_step}


def step_log(result: GenerationResult, prompt_tokens: int, stops: set[int]) -> dict:
    """The step log every result row carries, whichever command wrote it (``finished_at``: Unix time, so
    analysis can span a run's wall time from its rows)."""
    return {"nfe": result.nfe, "tokens_per_step": result.tokens_per_step,
            "positions_per_step": result.positions_per_step, "latency_s": round(result.latency_s, 6),
            "prompt_tokens": prompt_tokens, "generated_tokens": response_length(result.token_ids, stops),
            "finished_at": round(time.time(), 6)}


def iter_decoded(model, tokenizer, rows: list[dict], cfg: DecodeConfig, chat_template: bool = True,
                 references: list[list[int]] | None = None, desc: str = "decode", policy: Policy | None = None,
                 on_step: StepObserver | None = None) -> Iterator[dict]:
    """Each row (with a ``prompt``) plus its text and step log (``nfe``, ``tokens_per_step``,
    ``positions_per_step``, ``latency_s``, ``prompt_tokens``, ``generated_tokens``), in input order, each as soon
    as it and every row before it are finished, so a caller can write results as they come. ``policy``
    overrides ``cfg.policy`` (a learned filter's); ``on_step`` observes every engine step."""
    stops = stop_token_ids(tokenizer, model.config.eos_token_id)
    prompts = [encode_prompt(tokenizer, row["prompt"], chat_template) for row in rows]
    engine = Engine(model, cfg, eot_ids=stops, policy=policy)
    done: dict[int, dict] = {}
    next_index = 0
    with tqdm(total=len(rows), desc=desc, unit="prompt") as bar:
        for index, result in engine.stream(prompts, references, on_step):
            done[index] = {**rows[index], "text": decode_response(tokenizer, result.token_ids, stops),
                           **step_log(result, len(prompts[index]), stops), "canvas": result.token_ids}
            bar.update(1)
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1


def grade_rows(rows: list[dict]) -> list[bool]:
    """Correctness of each decoded row against its reference ``answer``, by its task's grader."""
    return [get_task(row["task"]).grade(row["text"], row["answer"]) for row in rows]


def summarise(task: str, rows: list[dict], cfg: DecodeConfig) -> EvalSummary:
    correct = grade_rows(rows)
    nfe = sum(r["nfe"] for r in rows)
    return EvalSummary(task=task, n=len(rows), accuracy=sum(correct) / len(rows), mean_nfe=nfe / len(rows),
                       gen_length=cfg.gen_length, tokens_per_step=sum(sum(r["tokens_per_step"]) for r in rows) / nfe)
