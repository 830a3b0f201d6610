"""The ``l2pd`` command line: ``l2pd generate`` (more subcommands register in :func:`build_parser`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

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


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="decode prompts with the LLaDA reference sampler",
        description="Decode prompts with LLaDA's semi-autoregressive sampler. Output: one JSON object per prompt "
                    "with the input fields plus text, nfe (forward passes), tokens_per_step, latency_s.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt; the result is printed as JSON")
    source.add_argument("--input", type=Path, help="JSONL file, one object per line with a 'prompt' field")
    p.add_argument("--output", type=Path, help="JSONL file for the results (default: stdout)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id in the local HF cache (default: the shipped tiny model)")
    p.add_argument("--gen-length", type=positive_int, default=256, help="canvas positions after the prompt (256)")
    p.add_argument("--block-length", type=positive_int, default=32,
                   help="positions per semi-autoregressive block; must divide --gen-length (32)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="forward passes in total, a multiple of the block count (default: --gen-length, "
                        "one token per step)")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                   help="which masked positions get each step's quota (low_confidence)")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel-noise temperature; 0 is greedy (0)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale; 0 is off (0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices (0)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together (8)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (cpu)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="feed prompts raw instead of as a user turn of the tokenizer's chat template")
    p.set_defaults(func=run_generate)


def read_requests(args: argparse.Namespace) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    if not args.input.is_file():
        raise UsageError(f"--input {str(args.input)!r} does not exist")
    rows = []
    for number, line in enumerate(args.input.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str):
            raise UsageError(f"--input {str(args.input)!r} line {number} has no string 'prompt' field")
        rows.append(row)
    return rows


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class JsonlWriter:
    """Appends result rows to ``PATH.partial`` as they come and renames it to ``PATH`` when complete,
    so a crash keeps every finished row and a complete file never looks half-written."""

    def __init__(self, path: Path | None):
        self.path = path
        self.partial = None if path is None else path.with_name(path.name + ".partial")
        self.handle = sys.stdout if path is None else None

    def __enter__(self) -> JsonlWriter:
        if self.partial is not None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.partial.open("w")
        return self

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.partial is not None:
            self.handle.close()
            if exc_type is None:
                os.replace(self.partial, self.path)


def run_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from l2pd_harness.decoding.reference import GenerationConfig, generate
    from l2pd_harness.loading import load_model
    from l2pd_harness.text import decode_response, encode_prompt, stop_token_ids

    try:
        cfg = GenerationConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                               remasking=args.remasking, temperature=args.temperature, cfg_scale=args.cfg_scale,
                               seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    requests = read_requests(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    stops = stop_token_ids(tokenizer, model.config.eos_token_id)
    with JsonlWriter(args.output) as out, tqdm(total=len(requests), desc="generate", unit="prompt",
                                               disable=args.output is None) as bar:
        for batch in batched(requests, args.batch_size):
            prompts = [encode_prompt(tokenizer, row["prompt"], args.chat_template) for row in batch]
            for row, prompt, result in zip(batch, prompts, generate(model, prompts, cfg), strict=True):
                out.write({**row, "text": decode_response(tokenizer, result.token_ids, stops), "nfe": result.nfe,
                           "tokens_per_step": result.tokens_per_step, "latency_s": round(result.latency_s, 6),
                           "prompt_tokens": len(prompt)})
            bar.update(len(batch))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="l2pd", description="l2pd-harness: fast, measured decoding of diffusion LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_generate_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    from l2pd_harness.loading import ModelLoadError
    from l2pd_harness.models.llada import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ModelLoadError, ConfigError) as err:
        parser.exit(2, f"l2pd {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
