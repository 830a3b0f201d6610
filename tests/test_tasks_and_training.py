"""Task generators, graders and `train-base`: splits stay disjoint, grading is GSM8K's, resume is exact."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l2pd_harness.tasks import get_task, sample_problems, split_of
from l2pd_harness.tasks.changeone import listed_digits
from l2pd_harness.tasks.pairsum import PAIR
from l2pd_harness.training import base
from l2pd_harness.training.base import BaseTrainConfig, train_base


@pytest.mark.parametrize("task", ["arith", "listops", "pairsum", "changeone"])
def test_splits_are_disjoint_and_seeded(task: str) -> None:
    test = sample_problems(task, "test", 200, seed=123)
    train = sample_problems(task, "train", 2000, seed=0)
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    assert all(split_of(p["question"]) == "test" for p in test)
    assert sample_problems(task, "test", 200, seed=123) == test
    assert len({p["question"] for p in test}) == 200


def test_graders() -> None:
    arith, listops = get_task("arith"), get_task("listops")
    assert arith.grade(" Then 3 + 4 = 7\n#### 7", {"answer": "4 + 3 = 7\n#### 7"})
    assert not arith.grade("3 + 4 = 7\n#### 8", {"answer": "3 + 4 = 7\n#### 7"})
    assert not arith.grade("3 + 4 = 7", {"answer": "3 + 4 = 7\n#### 7"})
    assert listops.grade("[1, 2] ", {"answer": "[1, 2]"}) and not listops.grade("[2, 1]", {"answer": "[1, 2]"})


def test_pairsum_grader_accepts_every_valid_pair_and_nothing_else() -> None:
    pairsum = get_task("pairsum")
    problem = {"question": "Which two of the numbers (3, 14), (11, 6) and (9, 8) add up to 17?",
               "answer": "3 + 14 = 17"}
    for answer in ("3 + 14 = 17", "14 + 3 = 17", "6 + 11 = 17", " 11 + 6 = 17 ", "8 + 9 = 17"):
        assert pairsum.grade(answer, problem), answer
    for answer in ("3 + 11 = 17", "3 + 14 = 18", "9 + 9 = 17", "17", "3 + 14 = 17 #### 17", "", "14 + 3"):
        assert not pairsum.grade(answer, problem), answer
    assert not pairsum.grade("4 + 4 = 8", {"question": "Which two of the numbers (4, 4) and (1, 7) add up to 8?"})
    # A sum of two listed numbers from different pairs is not one of the listed pairs.
    assert not pairsum.grade("3 + 6 = 9", {"question": "Which two of the numbers (3, 14) and (6, 11) add up to 9?"})


def test_pairsum_problems_have_several_valid_answers() -> None:
    pairsum = get_task("pairsum")
    lengths = set()
    for problem in sample_problems("pairsum", "train", 300, seed=2):
        pairs = [(int(a), int(b)) for a, b in PAIR.findall(problem["question"])]
        listed = [n for pair in pairs for n in pair]
        target = int(problem["question"].rstrip("?").split()[-1])
        valid = pairs + [(b, a) for a, b in pairs]
        assert len(pairs) >= 2 and len(listed) == len(set(listed))  # two pairs or more, each in either order
        assert all(a + b == target for a, b in pairs)  # every number starts a valid answer
        assert all(pairsum.grade(f"{a} + {b} = {target}", problem) for a, b in valid)
        assert pairsum.grade(problem["answer"], problem)
        lengths.add(len(problem["answer"].split()[0]) + len(problem["answer"].split()[2]))
    assert lengths == {2, 3, 4}  # one- and two-digit numbers: the answer's length depends on the pair


def test_changeone_grader_accepts_any_one_digit_changed_and_nothing_else() -> None:
    changeone = get_task("changeone")
    problem = {"question": "Copy the numbers 7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 3, 2 and change any one of them to 0.",
               "answer": "7, 3, 0, 1, 4, 4, 2, 8, 5, 6, 3, 2"}
    digits = "7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 3, 2".split(", ")
    for position in range(len(digits)):
        answer = ", ".join("0" if i == position else d for i, d in enumerate(digits))
        assert changeone.grade(answer, problem) and changeone.grade(f" {answer} ", problem), answer
    unchanged = ", ".join(digits)
    for answer in (unchanged, unchanged.replace("7", "0", 1).replace("9", "0"), unchanged.replace("7", "5", 1),
                   unchanged.replace("7", "0", 1) + ", 1", "0, 3, 9", "", "7 3 0 1 4 4 2 8 5 6 3 2"):
        assert not changeone.grade(answer, problem), answer


def test_changeone_digits_each_kept_above_threshold_but_never_all_kept() -> None:
    """What makes the task separate a confidence threshold from one token per step: every problem lists at least
    11 digits, so before the answer is written each digit is kept with probability above 0.9, yet the answer that
    keeps them all is wrong; and the list's length, hence the answer's, varies."""
    changeone = get_task("changeone")
    lengths = set()
    for problem in sample_problems("changeone", "train", 300, seed=2):
        listed = listed_digits(problem["question"])
        n = len(listed)
        assert (n - 1) / n > 0.9 and not changeone.grade(", ".join(listed), problem)
        assert changeone.grade(problem["answer"], problem)
        lengths.add(n)
    assert len(lengths) >= 4


def test_arith_solutions_are_consistent() -> None:
    for problem in sample_problems("arith", "train", 300, seed=4):
        *lines, final = problem["answer"].split("\n")
        assert 2 <= len(lines) <= 4
        for line in lines:
            left, op, right, _, result = line.split()[-5:]
            assert int(result) == (int(left) + int(right) if op == "+" else int(left) - int(right))
        assert final == f"#### {lines[-1].split()[-1]}"


def test_init_from_grows_the_vocabulary_for_a_new_task(tmp_path: Path) -> None:
    """A task that brings new words: the ids the checkpoint had keep their meaning and weights, new rows are added."""
    train_base(BaseTrainConfig(**{**TINY, "steps": 1}, tasks=("arith",)), tmp_path / "old")
    grown = train_base(BaseTrainConfig(**{**TINY, "steps": 1}, tasks=("arith", "pairsum")), tmp_path / "new",
                       init_from=tmp_path / "old")
    assert grown["steps_done"] == 1
    old_vocab = json.loads((tmp_path / "old" / "tokenizer.json").read_text())["model"]["vocab"]
    new_vocab = json.loads((tmp_path / "new" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {k: new_vocab[k] for k in old_vocab} == old_vocab and {" numbers", "Which"} <= new_vocab.keys()
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["vocab_size"] == config["embedding_size"] == len(new_vocab)
    assert load_file(tmp_path / "new" / "model.safetensors")["model.transformer.wte.weight"].shape[0] == len(new_vocab)


TINY = dict(steps=4, warmup=1, tokens_per_batch=2048, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48,
            checkpoint_every=2, max_gen_length=320)


def test_resume_after_a_crash_reproduces_an_uninterrupted_run(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BaseTrainConfig(**TINY)
    train_base(cfg, tmp_path / "straight")
    calls = []
    real_loss = base.diffusion_loss

    def crash_at_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 checkpoint
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(base, "diffusion_loss", crash_at_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_base(cfg, tmp_path / "crashed")
    monkeypatch.setattr(base, "diffusion_loss", real_loss)
    train_base(cfg, tmp_path / "crashed", resume=True)
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "crashed" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "crashed" / "training_log.json").read_text())["steps_done"] == 4


def test_resume_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "l2pd_harness.cli", "train-base", "--out", str(tmp_path),
                             "--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("holds no trainer_state.pt to resume from")


def test_pairsum_lm_eval_task_reads_its_data_and_accepts_any_valid_pair() -> None:
    from l2pd_harness.lm_eval_tasks import known_tasks
    from l2pd_harness.lm_eval_tasks.utils import load_pairsum, valid_pair

    assert "pairsum" in known_tasks()
    docs = load_pairsum()["test"]
    assert len(docs) == 500 and list(docs) == sample_problems("pairsum", "test", 500, seed=123)
    doc = {"question": "Which two of the numbers (3, 14), (11, 6) and (9, 8) add up to 17?", "answer": "3 + 14 = 17"}
    assert valid_pair(doc, ["11 + 6 = 17"]) == {"exact_match": 1.0}
    assert valid_pair(doc, ["3 + 11 = 17"]) == {"exact_match": 0.0}


def test_changeone_lm_eval_task_reads_its_data_and_accepts_any_one_change() -> None:
    from l2pd_harness.lm_eval_tasks import known_tasks
    from l2pd_harness.lm_eval_tasks.utils import changes_one, load_changeone

    assert "changeone" in known_tasks()
    docs = load_changeone()["test"]
    assert len(docs) == 500 and list(docs) == sample_problems("changeone", "test", 500, seed=123)
    doc = {"question": "Copy the numbers 7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 3 and change any one of them to 0."}
    assert changes_one(doc, ["7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 0"]) == {"exact_match": 1.0}
    assert changes_one(doc, ["7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 3"]) == {"exact_match": 0.0}


def test_task_weights_set_each_tasks_share_of_a_batch() -> None:
    from l2pd_harness.loading import DEFAULT_MODEL_DIR, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    equal = base.make_batch(BaseTrainConfig(**TINY, tasks=("arith", "listops")), tokenizer, 3)
    weighted = BaseTrainConfig(**TINY, tasks=("arith", "listops"), task_weights=(1, 3))
    streams = [itertools.count(), itertools.count(100)]  # endless, as iter_problems is
    assert list(itertools.islice(base.mixed(streams, (1, 3)), 8)) == [0, 100, 101, 102, 1, 103, 104, 105]
    assert base.make_batch(weighted, tokenizer, 3)["ids"].shape[0] == equal["ids"].shape[0]
    with pytest.raises(ValueError, match=r"task_weights=\[1\] must give a positive integer for each of the tasks"):
        BaseTrainConfig(tasks=("arith", "listops"), task_weights=(1,))


def test_semi_autoregressive_masks_keep_earlier_blocks_and_hide_later_ones() -> None:
    eos = 0
    target = torch.tensor([[5] * 40 + [eos] * 24, [6] * 3 + [eos] * 61] * 16)  # [32, 64]: answers of 40 and 3 tokens
    t = torch.full((32,), 0.5)
    masked, scored = base.semi_ar_masks(target, t, 16, eos, torch.Generator().manual_seed(0))
    starts = set()
    for row_masked, row_scored, answer in zip(masked, scored, [40, 3] * 16, strict=True):
        block = int(row_masked.nonzero()[0]) // 16  # the first masked position lies in the drawn block
        starts.add((answer, block))
        assert not row_masked[: block * 16].any() and row_masked[(block + 1) * 16:].all()
        assert torch.equal(row_scored, row_masked & (torch.arange(64) // 16 == block))
        assert block <= answer // 16  # never past the block of the answer's first end-of-text
    assert {block for answer, block in starts if answer == 40} == {0, 1, 2} and {b for a, b in starts if a == 3} == {0}


def test_without_semi_autoregressive_samples_the_loss_is_llada_sft() -> None:
    from l2pd_harness.loading import DEFAULT_MODEL_DIR, load_model, load_tokenizer

    model, tokenizer = load_model(DEFAULT_MODEL_DIR)[0], load_tokenizer(DEFAULT_MODEL_DIR)
    cfg = BaseTrainConfig(**TINY)
    batch = base.make_batch(cfg, tokenizer, 0)
    with torch.no_grad():
        loss = base.diffusion_loss(model, batch, cfg, torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(1)  # the same draws, worked out here as LLaDA's SFT loss
        ids, width = batch["ids"], int(batch["prompt_width"])
        t = cfg.eps + (1 - cfg.eps) * torch.rand(ids.shape[0], generator=gen)
        masked = torch.rand(ids[:, width:].shape, generator=gen) < t[:, None]
        noisy = torch.cat([ids[:, :width], ids[:, width:].masked_fill(masked, model.config.mask_token_id)], 1)
        ce = torch.nn.functional.cross_entropy(model(noisy, batch["attention"])[:, width:][masked],
                                               ids[:, width:][masked], reduction="none")
        expected = (ce / t[:, None].expand_as(masked)[masked]).sum() / masked.numel()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"semi_ar_share=1.5 must be in \[0, 1\]"):
        BaseTrainConfig(semi_ar_share=1.5)
