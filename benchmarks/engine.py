"""Engine benchmark at a real model's shape: a model of any supported family built from its ``config.json`` with random
weights (LLaDA-8B-Instruct and Dream-v0-Instruct-7B in ``benchmarks/configs/``), decoding a
fixed number of tokens per pass (so the forward passes are known without a trained model).

For each batch size x canvas length x KV cache it reports the time inside the model's forward passes alone, the
engine's wall time, the engine's overhead share (everything that is not the forward: scheduling, token choice,
policy, commits), committed tokens per second, mean time per forward pass and per engine step, and peak device
memory, over the whole decode or its first ``--passes`` passes. The weights are
created directly on the target device in the target dtype (no download, no float32 copy in host memory).

    python benchmarks/engine.py --config benchmarks/configs/llada-8b-instruct.json --device cuda --dtype bfloat16
    python benchmarks/engine.py --config benchmarks/configs/llada-100m.json --batch-sizes 8,16 --gen-lengths 256
    python benchmarks/engine.py --config benchmarks/configs/llada-8b-instruct.json --layers 2 --gen-lengths 64 \\
        --batch-sizes 1 --out /tmp/e.json        # the 8B shape with two layers: a smoke test

Results go to ``--out`` (JSON, written after every configuration; a rerun skips what is there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from l2pd_harness.cli import OneLineParser, UsageError, script_main
from l2pd_harness.decoding.config import CACHES
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.files import around_markers, check_output_path, read_json, replace_marked, write_atomic
from l2pd_harness.loading import DTYPES, config_from_file, model_class, parse_device, parse_dtype
from l2pd_harness.models.common import BidirectionalLM
from l2pd_harness.settings import argument_type, decode_setup

HERE = Path(__file__).resolve().parent
positive_int = argument_type("value", int, positive=True)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BidirectionalLM:
    """A model of ``config``'s family and shape with random weights, allocated once on ``device`` in ``dtype``."""
    with torch.device("meta"), default_dtype(dtype):
        model = model_class(config)(config)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "ln_f.weight")):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


class ForwardClock:
    """Wall time inside the model's forward passes; on CUDA each pass is synchronised at both ends, so use it on a
    separate run from the one whose wall time is reported."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.seconds, self.passes, self._started, self.device = 0.0, 0, 0.0, device
        self._handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._stop)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _stop(self, *_) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started
        self.passes += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def random_prompts(config, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids (never the mask or end-of-text id)."""
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor([config.mask_token_id, config.eos_token_id])
    ids = torch.randint(0, config.vocab_size, (count, length), generator=generator)
    return torch.where(torch.isin(ids, special), (ids + 1) % config.vocab_size, ids).tolist()


class Enough(Exception):
    """Stops a decode after the passes a measurement needs."""


def timed_decode(engine: Engine, prompts: list[list[int]], device: torch.device, passes: int | None) -> float:
    """Wall time of decoding ``prompts`` (all admitted at once, so each step is one pass of every row), or of its
    first ``passes`` steps."""
    steps = 0

    def count(_committed: int) -> None:
        nonlocal steps
        steps += 1
        if steps == passes:
            raise Enough

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.no_grad(), contextlib.suppress(Enough):
        for _ in engine.stream(prompts, on_progress=count):
            pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(model: BidirectionalLM, batch_size: int, gen_length: int, cache: str, args: argparse.Namespace) -> dict:
    """One configuration: a warm-up, a timed decode, then the same decode with the forward passes clocked (their
    share of its wall time, applied to the timed one)."""
    device = next(model.parameters()).device
    settings = {"gen_length": gen_length, "block_length": args.block_length, "policy": "fixed",
                "steps": gen_length // args.tokens_per_step, "cache": cache, "batch_size": batch_size}
    cfg, policy = decode_setup(settings)  # fixed: no filter, so no checkpoint is read
    engine = Engine(model, cfg, policy=policy)
    prompts = random_prompts(model.config, batch_size, args.prompt_length, seed=batch_size)
    passes = min(args.passes or cfg.steps, cfg.steps)
    timed_decode(engine, prompts, device, passes=min(passes, cfg.steps_per_block + 1))  # warm-up: a refresh, a reuse
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall = timed_decode(engine, prompts, device, passes)
    clock = ForwardClock(model, device)
    clocked_wall = timed_decode(engine, prompts, device, passes)
    clock.remove()
    forward_share = clock.seconds / clocked_wall
    if clock.passes != passes:
        raise RuntimeError(f"{clock.passes} forward passes where {passes} were expected")
    return {"batch_size": batch_size, "gen_length": gen_length, "cache": cache,
            "tokens_per_step": args.tokens_per_step, "prompt_length": args.prompt_length, "passes": passes,
            "whole_decode": passes == cfg.steps, "engine_s": round(wall, 4),
            "forward_s": round(forward_share * wall, 4), "overhead_share": round(1 - forward_share, 4),
            "pass_ms": round(1000 * forward_share * wall / passes, 3),
            "step_ms": round(1000 * wall / passes, 3),
            "tokens_per_s": round(batch_size * args.tokens_per_step * passes / wall, 2),
            "peak_memory_gb": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                               if device.type == "cuda" else None)}


def markdown_table(results: dict) -> str:
    setup = results["setup"]
    lines = [f"\n`{setup['config']}` ({setup['n_layers']} layers, {setup['parameters'] / 1e6:,.1f}M parameters), "
             f"{setup['dtype']}, {setup['device']}, torch {setup['torch']}; random weights, fixed policy.\n",
             "| batch | gen_length | cache | k/pass | passes | forward ms/pass | engine ms/step | overhead | tokens/s "
             "| peak GiB |", "|" + "---|" * 10]
    for r in results["runs"]:
        passes = r["passes"] if r["whole_decode"] else f"first {r['passes']}"
        peak = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        lines.append(f"| {r['batch_size']} | {r['gen_length']} | {r['cache']} | {r['tokens_per_step']} | {passes} "
                     f"| {r['pass_ms']:.1f} | {r['step_ms']:.1f} | {100 * r['overhead_share']:.1f}% "
                     f"| {r['tokens_per_s']:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="benchmarks/engine.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True,
                   help="a model config.json of any supported family (benchmarks/configs/)")
    p.add_argument("--layers", type=positive_int, default=None, help="override n_layers (a quick look at the shape)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (float32)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (1,8,32)")
    p.add_argument("--gen-lengths", default="256,1024", help="comma-separated canvas lengths (256,1024)")
    p.add_argument("--caches", default="none,prefix,dual", help=f"comma-separated, from {','.join(CACHES)}")
    p.add_argument("--tokens-per-step", type=positive_int, default=4,
                   help="positions each pass commits (fixed policy), so passes = gen_length / k (4)")
    p.add_argument("--block-length", type=positive_int, default=32, help="block length (32)")
    p.add_argument("--prompt-length", type=positive_int, default=64, help="random prompt tokens per request (64)")
    p.add_argument("--passes", type=positive_int, default=None,
                   help="measure the first P passes of each decode (they include every block's refresh pass in "
                        "its share; later blocks' prefix passes are shorter) (the whole decode)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (torch's default)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "engine.json", help="results JSON")
    p.add_argument("--readme", default="none", help="a README whose --table section to rewrite, or none (none)")
    p.add_argument("--table", default="engine-table", help="name of the README's table markers (engine-table)")
    return p


def int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a comma-separated list of integers") from None
    if any(value <= 0 for value in values):
        raise UsageError(f"{option} {text!r}: every value must be positive")
    return values


def setup_of(args: argparse.Namespace, config, model: BidirectionalLM, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".replace("  ", " "))
    return {"config": args.config.name, "n_layers": config.n_layers, "parameters": parameter_count(model),
            "dtype": args.dtype, "device": name, "torch": torch.__version__}


def run(args: argparse.Namespace) -> None:
    batch_sizes, gen_lengths = int_list("--batch-sizes", args.batch_sizes), int_list("--gen-lengths", args.gen_lengths)
    caches = args.caches.split(",")
    for cache in caches:
        if cache not in CACHES:
            raise UsageError(f"--caches: {cache!r} is not one of {list(CACHES)}")
    config = config_from_file(args.config)
    if args.layers is not None:
        config = replace(config, **{config.layers_field: args.layers})
    for gen_length in gen_lengths:  # every setting checked before anything is built
        decode_setup({"gen_length": gen_length, "block_length": args.block_length, "policy": "fixed",
                      "steps": gen_length // args.tokens_per_step if gen_length % args.tokens_per_step == 0 else -1})
    check_output_path(args.out, "--out")
    if args.readme != "none":
        around_markers(check_output_path(args.readme, "--readme"), args.table, "--readme")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    model = random_model(config, device, parse_dtype(args.dtype))
    setup = setup_of(args, config, model, device)
    results = read_json(args.out, "--out results") if args.out.exists() else {"setup": setup, "runs": []}
    if results.get("setup") != setup:
        raise UsageError(f"--out {str(args.out)!r} holds results of another setup {results.get('setup')}; move it away")
    done = {(r["batch_size"], r["gen_length"], r["cache"], r["tokens_per_step"], r["passes"]) for r in results["runs"]}
    for gen_length in gen_lengths:
        for batch_size in batch_sizes:
            for cache in caches:
                passes = min(args.passes or gen_length, gen_length // args.tokens_per_step)
                if (batch_size, gen_length, cache, args.tokens_per_step, passes) in done:
                    continue
                row = measure(model, batch_size, gen_length, cache, args)
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
                write_atomic(args.out, json.dumps(results, indent=1) + "\n")
    if args.readme != "none":
        replace_marked(args.readme, args.table, "--readme", markdown_table(results))


def main() -> None:
    script_main(build_parser(), run)


if __name__ == "__main__":
    main()
