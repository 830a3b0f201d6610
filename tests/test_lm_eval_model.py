"""The lm-eval model ``l2pd``: argument handling, requests, Monte-Carlo likelihood, and the stock CLI end to end
(one process, and two processes through accelerate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.likelihood import mask_counts
from l2pd_harness.lm_eval_model import L2PDLM, ModelArgsError
from l2pd_harness.lm_eval_tasks import TASKS_DIR
from l2pd_harness.tasks import sample_problems
from l2pd_harness.text import decode_response

REPO = Path(__file__).resolve().parents[1]


def instance(kind: str, args: tuple, doc_id: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("unit", doc_id, 1))


@pytest.fixture(scope="module")
def lm(random_checkpoint: Path) -> L2PDLM:
    return L2PDLM.create_from_arg_string(f"pretrained={random_checkpoint},gen_length=32,block_length=8,"
                                         "batch_size=3,mc_num=8", {"device": "cuda:0"})


def test_lm_eval_values_are_coerced(random_checkpoint: Path) -> None:
    lm = L2PDLM.create_from_arg_obj({"pretrained": str(random_checkpoint), "gen_length": 64.0, "steps": "None",
                                     "eotp": "True", "threshold": "0.7", "policy": "threshold", "mc_num": "4",
                                     "chat_template": "false"})
    assert (lm.cfg.gen_length, lm.cfg.steps, lm.cfg.eotp, lm.cfg.threshold) == (64, 64, True, 0.7)
    assert lm.mc_num == 4 and lm.chat_template_default is False


@pytest.mark.parametrize("arg_string, message", [
    ("policy=foo", r"policy='foo' is not one of \['fixed', 'threshold', 'factor', 'isolated', 'oracle', 'learned'\]"),
    ("threshold=abc", "threshold='abc' is not a number"),
    ("gen_length=64.5", "gen_length=64.5 is not an integer"),
    ("eotp=maybe", r"eotp='maybe' is not a boolean \(use one of"),
    ("dtype=int8", r"dtype='int8' is not one of \["),
    ("policy=learned,filter=/missing", "filter checkpoint '/missing': '/missing.safetensors' does not exist"),
    ("policy=learned", "policy 'learned' on .* needs a filter trained for it"),
    ("filter=/missing", r"only used by policy 'learned' \(got policy 'fixed', filter='/missing'"),
    ("cache=ring", r"cache='ring' is not one of \['none', 'prefix', 'dual'\]"),
    ("colour=red", r"unknown model_args \['colour'\] for l2pd; known: \['accept_threshold', 'batch_size'"),
    ("batch_size=auto", "automatic batch sizes are not supported"),
    ("policy=oracle", r"policy='oracle' decodes toward a reference output .* use one of \['fixed', 'threshold', "
                      r"'factor', 'isolated', 'learned'\]"),
    ("device=foo", r"device 'foo' is not one of \['cpu'"),
])
def test_bad_model_args_name_the_value(random_checkpoint: Path, arg_string: str, message: str) -> None:
    with pytest.raises(ModelArgsError, match=message) as raised:
        L2PDLM.create_from_arg_string(f"pretrained={random_checkpoint},{arg_string}")
    assert raised.value.code.startswith("lm_eval --model l2pd: error: ") and "\n" not in raised.value.code


def test_model_args_win_over_lm_evals_own_options(random_checkpoint: Path) -> None:
    lm = L2PDLM.create_from_arg_string(f"pretrained={random_checkpoint},device=cpu,batch_size=2,gen_length=8,"
                                       "block_length=8", {"device": "foo", "batch_size": 64, "max_batch_size": None})
    assert (lm.cfg.batch_size, lm._device.type) == (2, "cpu")


def test_a_huge_lm_eval_batch_size_decodes(random_checkpoint: Path) -> None:
    lm = L2PDLM.create_from_arg_string(f"pretrained={random_checkpoint},gen_length=8,block_length=8",
                                       {"device": "cpu", "batch_size": 1_000_000_000})
    texts = lm.generate_until([instance("generate_until", ("1 + 1", {"until": []}), i) for i in range(2)])
    assert lm.cfg.batch_size == 1_000_000_000 and len(texts) == 2


def test_cache_none_survives_lm_evals_none_parsing(random_checkpoint: Path) -> None:
    lm = L2PDLM.create_from_arg_string(f"pretrained={random_checkpoint},cache=none,steps=None")  # both arrive as None
    assert lm.cfg.cache == "none" and lm.cfg.steps == lm.cfg.gen_length


def test_learned_policy_defaults_to_the_shipped_filter() -> None:
    from l2pd_harness.filter.model import load_filter

    shipped = load_filter(None, None, 32)
    lm = L2PDLM.create_from_arg_string("policy=learned,eotp=true,gen_length=64")
    assert lm.cfg.accept_threshold == shipped.card.accept_threshold
    assert L2PDLM.create_from_arg_string("policy=learned,accept_threshold=0.42").cfg.accept_threshold == 0.42


def test_generate_until_matches_the_engine_and_applies_until(lm: L2PDLM) -> None:
    contexts = ["Tom has 12", "apples", "12 + 7 = 19"]
    requests = [instance("generate_until", (c, {"until": [], "max_gen_toks": 20}), i) for i, c in enumerate(contexts)]
    texts = lm.generate_until(requests)
    engine = Engine(lm.model, DecodeConfig(gen_length=24, block_length=8), eot_ids=lm.stops)  # 20 -> 3 blocks
    results = engine.generate([lm.encode_context(c) for c in contexts])
    assert texts == [decode_response(lm.tokenizer, r.token_ids, lm.stops) for r in results]
    assert texts[0].split(), "the random model writes words here, which the until check needs"
    word = texts[0].split()[-1]
    cut = lm.generate_until([instance("generate_until", (contexts[0], {"until": [word], "max_gen_toks": 20}))])
    assert cut == [texts[0].split(word, 1)[0]]


def test_loglikelihood_is_seeded(lm: L2PDLM) -> None:
    requests = [instance("loglikelihood", ("Tom has 12", " apples")), instance("loglikelihood", ("Tom has", " 12"))]
    first, again = lm.loglikelihood(requests), lm.loglikelihood(requests)
    assert first == again
    for value, greedy in first:
        assert value < 0 and isinstance(greedy, bool)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling .* not supported by l2pd"):
        lm.loglikelihood_rolling([instance("loglikelihood_rolling", ("text",))])


def test_loglikelihood_prefers_the_right_answer_on_the_shipped_model() -> None:
    shipped = L2PDLM.create_from_arg_string("mc_num=8,batch_size=8")
    for problem in sample_problems("arith", "test", 3, 123):
        *solution, answer = problem["answer"].split("\n")  # the last line is "#### N"
        wrong_answer = f"#### {int(answer.removeprefix('#### ')) + 1}"
        right, wrong = shipped.loglikelihood([
            instance("loglikelihood", (problem["prompt"], problem["answer"])),
            instance("loglikelihood", (problem["prompt"], "\n".join([*solution, wrong_answer])))])
        assert right[0] > wrong[0], (problem["question"], right, wrong)


def test_mask_counts_cover_the_range_evenly() -> None:
    counts = mask_counts(10, 10, torch.Generator().manual_seed(0))
    assert sorted(counts.tolist()) == list(range(1, 11))


def lm_eval_cli(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["lm_eval", "--model", "l2pd", "--tasks", "listops",
                                                     "--include_path", str(TASKS_DIR), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def read_outputs(directory: Path) -> tuple[dict, list[dict], list[dict]]:
    (results,) = directory.glob("*/results_*.json")
    (samples,) = directory.glob("*/samples_listops_*.jsonl")
    steps = [json.loads(line) for path in sorted(directory.glob("steps_rank*.jsonl"))
             for line in path.read_text().splitlines()]
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()], steps


MODEL_ARGS = "policy=threshold,eotp=true,gen_length=32,block_length=32"


@pytest.mark.slow
def test_stock_lm_eval_cli_single_and_two_processes(tmp_path: Path) -> None:
    single = lm_eval_cli("--model_args", f"{MODEL_ARGS},log_dir={tmp_path / 'single'}", "--limit", "6",
                         "--batch_size", "4", "--output_path", str(tmp_path / "single"), "--log_samples")
    assert single.returncode == 0, single.stderr[-3000:]
    results, samples, steps = read_outputs(tmp_path / "single")
    assert results["results"]["listops"]["exact_match,none"] == pytest.approx(
        sum(s["exact_match"] for s in samples) / 6)
    assert {(s["doc_id"], s["prompt_hash"]) for s in samples} == {(s["doc_id"], s["prompt_hash"]) for s in steps}
    assert all(s["nfe"] >= 1 and s["settings"]["policy"] == "threshold" and s["settings"]["eotp"] for s in steps)

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    double = lm_eval_cli("--model_args", f"{MODEL_ARGS},log_dir={tmp_path / 'double'}", "--limit", "6",
                         "--batch_size", "4", "--output_path", str(tmp_path / "double"), "--log_samples",
                         launcher=launcher)
    assert double.returncode == 0, double.stderr[-3000:]
    results2, samples2, steps2 = read_outputs(tmp_path / "double")
    assert results2["results"]["listops"] == results["results"]["listops"]
    by_doc = {s["doc_id"]: s["resps"] for s in samples}
    assert {s["doc_id"]: s["resps"] for s in samples2} == by_doc
    assert len(list((tmp_path / "double").glob("steps_rank*.jsonl"))) == 2  # each rank logs its share
    assert sorted(s["doc_id"] for s in steps2) == sorted(by_doc)


@pytest.mark.slow
def test_stock_cli_reports_bad_model_args_in_one_line(tmp_path: Path) -> None:
    result = lm_eval_cli("--model_args", "policy=foo", "--limit", "1")
    assert result.returncode == 1  # lm-eval's own convention for a usage error
    assert result.stderr.splitlines()[-1] == ("lm_eval --model l2pd: error: policy='foo' is not one of ['fixed', "
                                              "'threshold', 'factor', 'isolated', 'oracle', 'learned']")
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stderr
