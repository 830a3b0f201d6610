"""Run lm-eval once per configuration of a small YAML grid, one output directory each, resuming after a crash.

    python analysis/sweep.py analysis/sweeps/quick.yaml --out runs/sweep-quick

The grid file::

    tasks: [arith, changeone, pairsum]
    limit: 32            # documents per task (null: all)
    batch_size: 32
    model_args: {gen_length: 256, block_length: 32}      # shared by every configuration
    grid:                # each entry expands to the product of its list values
      - {policy: fixed, steps: [256, 64]}
      - {policy: threshold, threshold: [0.7, 0.9], eotp: [false, true], cache: [none, dual]}

Every configuration's model_args are checked before the first lm-eval launch. Each configuration's directory
gets ``decoded_with.json``: what decides its outputs (the model's and the filter's fingerprints, the decode settings
with the filter card's defaults filled in). A configuration whose directory already holds lm-eval's
``results_*.json`` decoded with the same is skipped, so rerunning the command after a crash or a stop redoes only
what is missing; results decoded with anything else (a retrained model, a new filter, changed defaults), or older
than ``decoded_with.json``, stop the sweep before its first launch, naming what differs. While a configuration
runs, its directory holds ``sweep.lock`` (naming the sweep's PID), which keeps a second sweep from running it at the
same time, and ``lm_eval.log``, the output of its lm-eval run.
Ctrl-C or a SIGTERM stops the running lm-eval before the sweep exits.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from tqdm import tqdm

from l2pd_harness.cli import OneLineParser
from l2pd_harness.files import FileFormatError, check_output_path, read_json, require_file, write_atomic
from l2pd_harness.lm_eval_tasks import TASKS_DIR, known_tasks

REPO = Path(__file__).resolve().parents[1]
LOCK_NAME = "sweep.lock"
LOG_NAME = "lm_eval.log"
DECODED_WITH_NAME = "decoded_with.json"
REQUIRED_KEYS = ("tasks", "grid")
GRID_KEYS = (*REQUIRED_KEYS, "limit", "batch_size", "model_args")
SCALARS = (str, int, float, type(None))  # what a model_args value can be on lm-eval's command line
LOG_DIR_ARG = "log_dir"  # the model_arg the sweep sets itself: the step logs go into each configuration's directory
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CHILD_GRACE_S = 10.0  # how long a terminated lm-eval may take to exit before it is killed


class SweepError(Exception):
    """The sweep cannot go on; reported as one line, the sweep exiting with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """A stop signal (Ctrl-C, SIGTERM, a closed terminal) reached the sweep."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---- the grid ----------------------------------------------------------------------------------------------------


def expand(entry: dict) -> list[dict]:
    """``{a: [1, 2], b: x}`` -> ``[{a: 1, b: x}, {a: 2, b: x}]``."""
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def run_name(model_args: dict) -> str:
    return "_".join(f"{key}-{value}" for key, value in model_args.items())


def configurations(spec: dict) -> list[dict]:
    base = spec.get("model_args", {})
    runs = [{**base, **point} for entry in spec["grid"] for point in expand(entry)]
    return list({run_name(run): run for run in runs}.values())  # duplicates run once


def model_args_text(model_args: dict) -> str:
    """``--model_args`` of lm-eval: ``key=value,key=value``."""
    return ",".join(f"{k}={v}" for k, v in model_args.items())


def read_grid(path: Path) -> dict:
    """The grid file's mapping, its shape checked (see the module docstring)."""
    path = require_file(path, "grid")
    try:
        spec = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as err:
        raise FileFormatError(f"grid {str(path)!r} is not a text file ({err})") from None
    except yaml.YAMLError as err:
        raise FileFormatError(f"grid {str(path)!r} is not valid YAML: {yaml_problem(err)}") from None
    check_grid(spec, f"grid {str(path)!r}")
    return spec


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line out of PyYAML's multi-line message: what is wrong, and where."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    context = f" ({err.context})" if err.context else ""
    return f"{err.problem}{context} at line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}"


def check_grid(spec: object, where: str) -> None:
    """Refuse a grid whose shape the sweep cannot use (the model_args values themselves are checked by
    :func:`check_model_args_of`)."""
    if not isinstance(spec, dict):
        raise FileFormatError(f"{where} holds a YAML {type(spec).__name__}, expected a mapping with keys "
                              f"{list(GRID_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise FileFormatError(f"{where} lacks the keys {missing} (keys: {list(GRID_KEYS)})")
    unknown = sorted(map(str, set(spec) - set(GRID_KEYS)))
    if unknown:
        raise FileFormatError(f"{where} has unknown keys {unknown} (keys: {list(GRID_KEYS)})")
    tasks = spec["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise FileFormatError(f"{where}: tasks {tasks!r} is not a list of task names")
    known = known_tasks()
    unknown_tasks = [task for task in tasks if task not in known]
    if unknown_tasks:
        raise FileFormatError(f"{where}: unknown tasks {unknown_tasks} (tasks and tags of {str(TASKS_DIR)!r}: "
                              f"{sorted(known)})")
    check_positive(spec.get("limit"), f"{where}: limit")
    check_positive(spec.get("batch_size"), f"{where}: batch_size")
    check_arguments(spec.get("model_args", {}), f"{where} model_args")
    entries = spec["grid"]
    if not isinstance(entries, list) or not entries:
        raise FileFormatError(f"{where}: grid {entries!r} is not a list of mappings")
    for number, entry in enumerate(entries, start=1):
        check_arguments(entry, f"{where} grid entry {number}", lists=True)


def check_positive(value: object, what: str) -> None:
    """``value``, unless absent (``None``), must be a positive integer (a limit is a count of documents: lm-eval
    would read a fraction as a share of them, and the sweep's limits are counts)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise FileFormatError(f"{what} {value!r} is not a positive integer")


def check_arguments(arguments: object, where: str, lists: bool = False) -> None:
    """``arguments``: model_args names to values lm-eval's command line can carry (to non-empty lists of them when
    ``lists``, which the grid expands)."""
    if not isinstance(arguments, dict):
        raise FileFormatError(f"{where} is a YAML {type(arguments).__name__} ({arguments!r}), expected a mapping of "
                              "model_args names to values")
    for name, value in arguments.items():
        if name == LOG_DIR_ARG:
            raise FileFormatError(f"{where}: {name} is set by the sweep (each configuration's directory)")
        values = value if lists and isinstance(value, list) else [value]
        if not values:
            raise FileFormatError(f"{where}: {name} is an empty list, which would drop the entry")
        for one in values:
            if not isinstance(one, SCALARS) or any(sep in str(one) for sep in ",="):
                raise FileFormatError(f"{where}: {name} {one!r} is not a value lm-eval's --model_args can carry (a "
                                      "number, a boolean or a string without ',' and '='" +
                                      (", or a list of them" if lists else "") + ")")


def decoders_of(runs: list[dict], where: str) -> list[dict]:
    """What decides each configuration's outputs (``l2pd_harness.lm_eval_model.decoded_with``), from its model_args
    as the l2pd model will receive them: checked before anything is launched."""
    from lm_eval.utils import simple_parse_args_string

    from l2pd_harness.lm_eval_model import decoded_with  # loads torch and lm-eval: only once the grid is read

    decoders = []
    for model_args in runs:
        try:
            decoders.append(decoded_with(simple_parse_args_string(model_args_text(model_args))))
        except ValueError as err:
            raise FileFormatError(f"{where}, configuration {run_name(model_args)}: {err}") from None
    return decoders


# ---- running one configuration -----------------------------------------------------------------------------------


def lm_eval_command(spec: dict, model_args: dict, out_dir: Path) -> list[str]:
    launched = {**model_args, LOG_DIR_ARG: out_dir}
    command = [sys.executable, "-m", "lm_eval", "--model", "l2pd", "--model_args", model_args_text(launched),
               "--tasks", ",".join(spec["tasks"]), "--include_path", str(TASKS_DIR),
               "--batch_size", str(spec.get("batch_size", 16)), "--output_path", str(out_dir), "--log_samples"]
    if spec.get("limit") is not None:
        command += ["--limit", str(spec["limit"])]
    return command


def has_results(out_dir: Path) -> bool:
    return any(out_dir.glob("*/results_*.json"))


def check_decoded_with(out_dir: Path, decoder: dict) -> None:
    """Raise :class:`SweepError` unless the results in ``out_dir`` were decoded with ``decoder``."""
    path = out_dir / DECODED_WITH_NAME
    move_away = f"use another --out, or move {str(out_dir)!r} away to decode it again"
    if not path.is_file():
        raise SweepError(f"configuration {out_dir.name!r} holds results but no {DECODED_WITH_NAME} (written by sweeps "
                         f"since 2026-12-07), so what decoded them is unknown: {move_away}", 1)
    try:
        recorded = read_json(path, DECODED_WITH_NAME)
    except FileFormatError as err:
        raise SweepError(f"{err}: {move_away}", 1) from None
    from l2pd_harness.settings import setting_differences

    identities = [{key: value for key, value in record.items() if key != "settings"} for record in (recorded, decoder)]
    differences = [*setting_differences(*identities),
                   *(f"setting {difference}" for difference in setting_differences(recorded.get("settings", {}),
                                                                                 decoder["settings"]))]
    if differences:
        raise SweepError(f"configuration {out_dir.name!r} holds results decoded with something else (there -> now: "
                         f"{'; '.join(differences)}): {move_away}", 1)


@contextmanager
def configuration_lock(out_dir: Path) -> Iterator[int]:
    """Hold ``out_dir/sweep.lock`` while its configuration runs, so that no second sweep runs it at the same time.

    The lock is an ``flock``, which the kernel drops when its holders exit, so the lock of a dead sweep is stale by
    construction and simply taken over; the file names the holder's PID for the refusal message. Yields the lock's
    file descriptor: the lm-eval child inherits it, which keeps the configuration locked even if the sweep is
    killed without a chance to stop its child.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SweepError(f"configuration {out_dir.name!r} is being run by another sweep (PID {holder}, or its "
                             f"lm-eval child): {str(path)!r} is locked; wait for it to finish or stop it",
                             1) from None
        if names_open_file(path, fd):
            break
        os.close(fd)  # the previous holder finished and removed the file between our open and flock: lock anew
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        path.unlink(missing_ok=True)  # while still locked, so a sweep that opened this file meanwhile sees it is gone
        os.close(fd)


def names_open_file(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def clear_attempt(out_dir: Path) -> None:
    """Remove what an earlier attempt that never finished left in a configuration directory without results: its
    step logs and their staging files, lm-eval's partial output, its log."""
    for entry in out_dir.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_lm_eval(command: list[str], env: dict[str, str], log_path: Path, lock_fd: int) -> int:
    """lm-eval's exit status; its output goes to ``log_path``. When the sweep is stopped (:class:`Interrupted`) or
    fails, the child is stopped before the exception leaves."""
    with log_path.open("w") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock_fd,))
        try:
            return child.wait()
        finally:
            stop(child)


def stop(child: subprocess.Popen) -> None:
    """Terminate ``child`` if it still runs, and kill it if it does not exit within :data:`CHILD_GRACE_S`."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=CHILD_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def exit_description(status: int) -> str:
    return f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with code {status}"


def last_line(path: Path) -> str:
    """The last thing ``path`` says (progress bars redraw a line with carriage returns: their last state)."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def run_configuration(spec: dict, model_args: dict, decoder: dict, out_dir: Path, env: dict[str, str]) -> None:
    """One lm-eval run into ``out_dir``, unless it holds results of ``decoder`` already."""
    with configuration_lock(out_dir) as lock_fd:
        if has_results(out_dir):  # checked under the lock: another sweep may have just finished it
            check_decoded_with(out_dir, decoder)
            return
        clear_attempt(out_dir)
        write_atomic(out_dir / DECODED_WITH_NAME, json.dumps(decoder, indent=2) + "\n")
        log_path = out_dir / LOG_NAME
        status = run_lm_eval(lm_eval_command(spec, model_args, out_dir), env, log_path, lock_fd)
    if status != 0:
        raise SweepError(f"configuration {out_dir.name!r}: lm-eval {exit_description(status)} (last line: "
                         f"{last_line(log_path)!r}); its log: {str(log_path)!r}", 1)


# ---- the sweep ---------------------------------------------------------------------------------------------------


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Make a stop signal raise :class:`Interrupted`, so the lm-eval child is stopped before the sweep exits (by
    default SIGTERM would end the sweep alone and leave its child running). A signal already ignored (``nohup``)
    stays ignored."""

    def interrupt(signum: int, frame) -> None:
        for other in handled:  # a second signal must not cut short the stopping of the child
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    handled = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, interrupt) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def sweep(spec: dict, runs: list[dict], decoders: list[dict], out: Path) -> None:
    """Run every configuration of ``runs`` (decoded with ``decoders``) that ``out`` holds no results of."""
    for model_args, decoder in zip(runs, decoders, strict=True):  # stale results stop the sweep before any launch
        if has_results(out / run_name(model_args)):
            check_decoded_with(out / run_name(model_args), decoder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    current = None
    try:
        with stop_signals_raise():
            for model_args, decoder in tqdm(list(zip(runs, decoders, strict=True)), desc="sweep", unit="config",
                                            disable=None):
                current = run_name(model_args)
                run_configuration(spec, model_args, decoder, out / current, env)
                current = None
    except Interrupted as stopped:
        where = ("between configurations; rerunning the same command goes on with the rest" if current is None else
                 f"during configuration {current!r}, which has no results: rerunning the same command redoes it")
        raise SweepError(f"stopped by {stopped} {where}", 128 + stopped.signum) from None


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path, help="YAML grid file")
    parser.add_argument("--out", type=Path, required=True, help="directory for one lm-eval run per configuration")
    args = parser.parse_args(argv)
    if any(separator in str(args.out) for separator in ",="):
        parser.error(f"--out {str(args.out)!r} contains ',' or '=', which lm-eval's --model_args cannot carry")
    try:
        check_output_path(args.out, "--out", directory=True)
        spec = read_grid(args.grid)
        runs = configurations(spec)
        decoders = decoders_of(runs, f"grid {str(args.grid)!r}")
        sweep(spec, runs, decoders, args.out)
    except FileFormatError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except SweepError as err:
        parser.exit(err.status, f"{parser.prog}: error: {err}\n")
    print(f"{len(runs)} configurations in {args.out}; next: python analysis/pareto.py {args.out} --out "
          f"{args.out / 'report'}")


if __name__ == "__main__":
    main()
