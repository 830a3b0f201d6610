"""Decode task problems, grade them, and summarise accuracy and forward passes."""

from __future__ import annotations

from collections.abc import Iterator

from tqdm import tqdm

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import Engine, StepObserver
from l2pd_harness.decoding.policies import Policy
from l2pd_harness.steplog import StepLogRow, Summary, summarise
from l2pd_harness.tasks import get_task
from l2pd_harness.text import decode_response, encode_prompt, stop_token_ids


class DecodeProgress:
    """A progress bar over the canvas positions of a decode (``positions`` in all), so its rate and ETA are honest
    while many sequences are in flight; the finished prompts show beside it."""

    def __init__(self, prompts: int, positions: int, desc: str, disable: bool = False):
        self.prompts, self.finished = prompts, 0
        self.bar = tqdm(total=positions, desc=desc, unit="pos", unit_scale=True, disable=disable)
        self.bar.set_postfix_str(f"0/{prompts} prompts")

    def committed(self, positions: int) -> None:
        """A step committed ``positions`` canvas positions (an engine ``on_progress`` observer)."""
        self.bar.update(positions)

    def finish_prompt(self) -> None:
        self.finished += 1
        self.bar.set_postfix_str(f"{self.finished}/{self.prompts} prompts", refresh=False)

    def __enter__(self) -> DecodeProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()


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
    # The engine refuses bad requests on this call, before the progress bar appears.
    results = engine.stream(prompts, references, on_step, lambda count: progress.committed(count))
    with DecodeProgress(len(rows), len(rows) * cfg.gen_length, desc) as progress:
        for index, result in results:
            done[index] = {**rows[index], "text": decode_response(tokenizer, result.token_ids, stops),
                           **StepLogRow.of(result, len(prompts[index]), stops).to_row(), "canvas": result.token_ids}
            progress.finish_prompt()
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1


def grade_rows(rows: list[dict]) -> list[bool]:
    """Correctness of each decoded row against its reference ``answer``, by its task's grader."""
    return [get_task(row["task"]).grade(row["text"], row) for row in rows]


def summarise_rows(rows: list[dict]) -> Summary:
    """Accuracy and speed of decoded task rows, by the one counting rule (:func:`l2pd_harness.steplog.summarise`)."""
    logs = [StepLogRow.from_row(row, f"decoded row {number}") for number, row in enumerate(rows, start=1)]
    return summarise(logs, grade_rows(rows))
