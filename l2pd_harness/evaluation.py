"""Decode task problems, grade them, and summarise accuracy and forward passes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from l2pd_harness.decoding.reference import GenerationConfig, generate
from l2pd_harness.tasks import get_task
from l2pd_harness.text import decode_response, encode_prompt, stop_token_ids


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


def iter_decoded(model, tokenizer, rows: list[dict], cfg: GenerationConfig, batch_size: int,
                 chat_template: bool = True, desc: str = "decode") -> Iterator[dict]:
    """Each row (with a ``prompt``) plus ``text``, ``nfe``, ``tokens_per_step``, ``latency_s``, ``prompt_tokens``,
    yielded batch by batch so a caller can write results as they come."""
    stops = stop_token_ids(tokenizer, model.config.eos_token_id)
    with tqdm(total=len(rows), desc=desc, unit="prompt") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            prompts = [encode_prompt(tokenizer, row["prompt"], chat_template) for row in batch]
            for row, prompt, result in zip(batch, prompts, generate(model, prompts, cfg), strict=True):
                yield {**row, "text": decode_response(tokenizer, result.token_ids, stops), "nfe": result.nfe,
                       "tokens_per_step": result.tokens_per_step, "latency_s": round(result.latency_s, 6),
                       "prompt_tokens": len(prompt)}
            bar.update(len(batch))


def grade_rows(rows: list[dict]) -> list[bool]:
    """Correctness of each decoded row against its reference ``answer``, by its task's grader."""
    return [get_task(row["task"]).grade(row["text"], row["answer"]) for row in rows]


def summarise(task: str, rows: list[dict], cfg: GenerationConfig) -> EvalSummary:
    correct = grade_rows(rows)
    return EvalSummary(task=task, n=len(rows), accuracy=sum(correct) / len(rows),
                       mean_nfe=sum(r["nfe"] for r in rows) / len(rows), gen_length=cfg.gen_length,
                       tokens_per_step=cfg.gen_length / cfg.steps)
