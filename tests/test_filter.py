"""Learn2PD filter: features, networks, checkpoint format and checks, trace labelling, training, and the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from l2pd_harness.decoding.policies import Learned, StepState, top_k_commit
from l2pd_harness.decoding.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from l2pd_harness.filter.model import (
    DEFAULT_FILTER,
    FEATURES,
    FilterCard,
    FilterConfig,
    FilterError,
    FilterNet,
    LearnedFilter,
    block_features,
    load_filter,
    read_filter,
    resolve_filter,
    shipped_filters,
)
from l2pd_harness.filter.traces import StepRecorder, is_validation, read_problems
from l2pd_harness.filter.train import (
    ACCEPT_THRESHOLDS,
    FilterTrainConfig,
    TraceData,
    fit,
    precision_recall,
    serving_rank,
    training_questions,
)
from l2pd_harness.loading import DEFAULT_MODEL_DIR
from tests.test_cli import run_main
from tests.test_policies import state_row

ROOT = Path(__file__).resolve().parents[1]
BATCHES = [1, 2, 32]
L = 8


def synthetic_state(batch: int, seed: int = 0) -> StepState:
    gen = torch.Generator().manual_seed(seed * 100 + batch)
    confidence = torch.rand(batch, L, generator=gen, dtype=torch.float64)
    return StepState(confidence=confidence, margin=confidence * 0.5, entropy=1 - confidence,
                     prediction=torch.randint(0, 9, (batch, L), generator=gen),
                     masked=torch.rand(batch, L, generator=gen) < 0.7, block_step=torch.zeros(batch, dtype=torch.long),
                     noise=torch.zeros(batch, L, dtype=torch.float64))


def make_filter(architecture: str, seed: int = 0) -> LearnedFilter:
    features = ("confidence",) if architecture == "block_mlp" else FEATURES
    cfg = FilterConfig(architecture, features, block_length=L, hidden_size=16)
    torch.manual_seed(seed)
    return LearnedFilter(FilterNet(cfg), FilterCard(config=cfg, base_model="sha256:test", accept_threshold=0.7))


def test_config_errors_name_the_bad_value() -> None:
    with pytest.raises(FilterError, match="architecture='cnn' is not one of"):
        FilterConfig("cnn")
    with pytest.raises(FilterError, match=r"features=\['logit'\] must be a non-empty subset"):
        FilterConfig("position_mlp", ("logit",))
    with pytest.raises(FilterError, match=r"block_mlp' reads one of \[\['confidence'\], \['raw_confidence'\]\], got"):
        FilterConfig("block_mlp", ("confidence", "margin"))
    with pytest.raises(FilterError, match="hidden_size=0"):
        FilterConfig(hidden_size=0)


@pytest.mark.parametrize("batch", BATCHES)
def test_features_read_settled_positions_as_certain(batch: int) -> None:
    s = synthetic_state(batch)
    x = block_features(FEATURES, s.confidence, s.margin, s.entropy, s.masked)
    assert x.shape == (batch, L, len(FEATURES)) and x.dtype == torch.float32
    settled = ~s.masked
    assert (x[..., 0][settled] == 1).all() and (x[..., 1][settled] == 1).all() and (x[..., 2][settled] == 0).all()
    assert torch.allclose(x[..., 0][s.masked], s.confidence[s.masked].float())
    assert torch.allclose(x[0, :, 3], torch.arange(L) / L)
    assert torch.allclose(x[..., 4], settled.float().mean(-1, keepdim=True).expand(batch, L))


@pytest.mark.parametrize("architecture", ["block_mlp", "position_mlp"])
@pytest.mark.parametrize("batch", BATCHES)
def test_filter_rows_are_independent(architecture: str, batch: int) -> None:
    """A row's probabilities depend on that row alone, so learned decoding is the same at any batch size."""
    learned, state = make_filter(architecture), synthetic_state(batch, seed=1)
    together = learned(state)
    assert together.shape == (batch, L) and ((together >= 0) & (together <= 1)).all()
    for row in range(batch):
        assert torch.allclose(learned(state_row(state, row))[0], together[row], atol=1e-6)


def test_position_mlp_scores_each_position_from_its_own_features() -> None:
    """The position MLP is shared across the block: a position's logit depends on its feature vector alone (what
    couples positions is in the features: committed share, left neighbour, confidence rank)."""
    net, gen = make_filter("position_mlp").net, torch.Generator().manual_seed(4)
    features = torch.rand(1, L, len(FEATURES), generator=gen)
    base = net(features)
    features[0, 3] = torch.rand(len(FEATURES), generator=gen)
    changed = net(features)
    assert changed[0, 3] != base[0, 3]
    assert torch.equal(torch.cat([changed[0, :3], changed[0, 4:]]), torch.cat([base[0, :3], base[0, 4:]]))


def test_coupling_features_by_hand() -> None:
    confidence = torch.tensor([[0.5, 0.9, 0.2, 0.7]])
    masked = torch.tensor([[True, True, False, True]])
    names = ("left_settled", "confidence_rank")
    x = block_features(names, confidence, confidence, confidence, masked)[0]
    assert x[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # the first position follows a finished block
    assert x[:, 1].tolist() == [0.5, 0.0, 0.0, 0.25]  # masked positions more confident, over the block length


def test_learned_policy_commits_above_the_accept_threshold() -> None:
    learned, state = make_filter("block_mlp"), synthetic_state(32, seed=2)
    commit = Learned(learned, 0.7)(state)
    accepted = (learned(state) > 0.7) & state.masked
    assert not (commit & ~state.masked).any()
    has_accepted = accepted.any(-1)
    assert torch.equal(commit[has_accepted], accepted[has_accepted])
    assert (commit[~has_accepted & state.masked.any(-1)].sum(-1) == 1).all()  # the fallback: the most confident


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("candidates", [1, 3, L])
def test_judged_positions_alone_get_margin_and_entropy_and_commits_are_unchanged(batch: int, candidates: int) -> None:
    """Beside a threshold with candidates the filter's margin and entropy are made at the judged positions only
    (a gather of K rows of the logits per row, not the block's L); the commits are those of a filter fed every
    position's features."""
    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, L, 50, generator=gen, dtype=torch.float64) * 3  # [B, L, V]
    probs = logits.softmax(-1)
    masked = torch.rand(batch, L, generator=gen) < 0.8
    state = StepState(confidence=probs.amax(-1), prediction=probs.argmax(-1), masked=masked,
                      block_step=torch.zeros(batch, dtype=torch.long), noise=torch.zeros(batch, L), logits=logits)
    learned = make_filter("position_mlp", seed=batch)
    commit = Learned(learned, 0.5, threshold=0.6, candidates=candidates)(state)
    assert state.margin is None  # the full [B, L, V] spread was never made
    scores = learned(state)  # [B, L], every position's features (state.judged is None)
    above = state.confidence > 0.6
    asked = top_k_commit(state.confidence, masked & ~above, torch.full((batch,), candidates))
    expected = (((scores > 0.5) & asked) | above) & masked
    fallback = ~expected.any(-1) & masked.any(-1)  # rows with nothing accepted commit their most confident one
    assert torch.equal(commit[~fallback], expected[~fallback])
    assert (commit[fallback].sum(-1) == 1).all()
    positions = asked.float().topk(min(candidates, L), dim=-1).indices  # [B, K]
    margin, entropy = replace(state, judged=positions).spread_judged()
    full_margin, full_entropy = state.spread()
    assert torch.equal(margin[asked], full_margin[asked]) and torch.equal(entropy[asked], full_entropy[asked])


def test_checkpoint_round_trip_and_compatibility(tmp_path: Path, random_checkpoint: Path) -> None:
    from l2pd_harness.loading import model_fingerprint

    learned = make_filter("position_mlp", seed=3)
    learned.card.base_model = model_fingerprint(random_checkpoint)
    learned.save(tmp_path / "f.safetensors")
    assert (tmp_path / "f.json").is_file()
    again = read_filter(tmp_path / "f.json")
    state = synthetic_state(2)
    assert torch.equal(again(state), learned(state)) and again.card == learned.card
    assert load_filter(tmp_path / "f", random_checkpoint, L).card.accept_threshold == 0.7
    learned.save(tmp_path / "f-t0.95.safetensors")  # a name with a dot of its own keeps it
    assert {p.name for p in tmp_path.glob("f-t0.95.*")} == {"f-t0.95.safetensors", "f-t0.95.json"}
    assert read_filter(tmp_path / "f-t0.95").card == learned.card
    with pytest.raises(FilterError, match="trained for block_length=8, the decode uses block_length=32"):
        load_filter(tmp_path / "f", random_checkpoint, 32)
    with pytest.raises(FilterError, match="was trained on base model sha256:.*not on the loaded model"):
        load_filter(tmp_path / "f", None, L)  # the shipped tiny model is another base model
    with pytest.raises(FilterError, match="needs a filter trained for it"):
        load_filter(None, random_checkpoint, L)
    card = json.loads((tmp_path / "f.json").read_text())
    (tmp_path / "f.json").write_text(json.dumps({**card, "format": "other/9"}))
    with pytest.raises(FilterError, match="has format 'other/9', expected 'l2pd-filter/1'"):
        read_filter(tmp_path / "f")


def test_shipped_filter_matches_the_shipped_model() -> None:
    learned = load_filter(None, None, 32)  # raises if it was trained on another model or block length
    assert DEFAULT_FILTER.is_file() and 0 < learned.card.accept_threshold < 1
    assert learned.card.validation["precision"] > 0.9


@pytest.mark.parametrize(("name", "block_length", "cache"), [
    ("learned-b32", 32, "none"), ("learned-b128", 128, "none"), ("learned-b32-dual", 32, "dual"),
    ("learned-b128-dual", 128, "dual"), ("learn2pd-block-mlp", 32, "none"), ("learn2pd-filter", 32, "none")])
def test_shipped_filters_load_by_name(name: str, block_length: int, cache: str) -> None:
    learned = load_filter(name, None, block_length)  # raises if trained on another model or block length
    assert learned.card.cache == cache
    assert shipped_filters(DEFAULT_MODEL_DIR) == sorted(["learned-b32", "learned-b128", "learned-b32-dual",
                                                         "learned-b128-dual", "learn2pd-block-mlp", "learn2pd-filter"])


def test_a_checkpoint_on_disk_wins_over_a_shipped_name_and_an_unknown_name_lists_the_shipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_filter("position_mlp").save(tmp_path / "learned-b32.safetensors")
    assert resolve_filter("learned-b32", DEFAULT_MODEL_DIR) == Path("learned-b32")
    assert resolve_filter("learned-b128", DEFAULT_MODEL_DIR) == DEFAULT_MODEL_DIR / "learned-b128"
    with pytest.raises(FilterError, match="'nope': no checkpoint 'nope.safetensors' and no filter of that name "
                                          "beside the model \\(shipped there: learn2pd-block-mlp, learn2pd-filter"):
        resolve_filter("nope", DEFAULT_MODEL_DIR)


def test_recorder_labels_predictions_against_the_reference() -> None:
    """Two requests at different blocks: each step row is labelled against its own request's block."""
    references = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 8, 8, 8, 8]])  # [problems, gen_length]
    rows = [ScheduledRequest(0, 0, torch.zeros(6), 2, 2 + 4, 1, None),  # request 0 at its second block
            ScheduledRequest(1, 1, torch.zeros(6), 2, 2, 0, None)]  # request 1 at its first block
    prediction = torch.tensor([[5, 0, 7, 0], [9, 9, 1, 9]])
    state = StepState(confidence=torch.rand(2, 4), margin=torch.rand(2, 4), entropy=torch.rand(2, 4),
                      prediction=prediction, masked=torch.ones(2, 4, dtype=torch.bool),
                      block_step=torch.tensor([1, 0]), noise=torch.zeros(2, 4))
    recorder = StepRecorder()
    recorder(SchedulerOutput(rows), RunnerOutput([0, 1], torch.zeros(2, 4, dtype=torch.bool), [6, 6], state,
                                                torch.ones(2, dtype=torch.bool)))
    steps = recorder.steps(references, block_length=4)
    assert steps["label"].tolist() == [[True, False, True, False], [True, True, False, True]]
    assert steps["block"].tolist() == [1, 0] and steps["problem"].tolist() == [0, 1]


def test_threshold_choice_needs_the_filters_own_traces(tmp_path: Path) -> None:
    """Which problems a filter was fitted on comes from the trace directories on its card; without them the
    choice would not know which problems are unseen."""
    learned = make_filter("position_mlp")
    learned.card.training = {"trace_dirs": [str(tmp_path / "gone")], "val_share": 0.2}
    with pytest.raises(FilterError, match="its trace directory '.*gone' is not here"):
        training_questions(learned.card)


def test_a_missing_trace_directory_is_one_line(tmp_path: Path, run_cli) -> None:
    for command in (["train-filter", "--architecture", "position_mlp"], ["choose-threshold", "--filter",
                                                                          str(DEFAULT_FILTER)]):
        done = run_cli(*command, "--traces", str(ROOT / "results/learn2pd/traces/tr-arith17-oracle-fill"),
                       str(tmp_path / "nope"), "--out", str(tmp_path / "f.safetensors"))
        assert done.returncode == 2 and "nope' has no meta.json" in done.stderr.splitlines()[-1], done.stderr


def test_validation_split_is_by_problem_and_stable() -> None:
    questions = [f"question {i}" for i in range(400)]
    held_out = [is_validation(q, 0.2) for q in questions]
    assert held_out == [is_validation(q, 0.2) for q in questions]
    assert 0.12 < sum(held_out) / len(held_out) < 0.28


def test_fit_learns_a_separable_rule() -> None:
    """Labels 'final iff confidence > 0.8': the trained block MLP recovers the rule on validation rows."""
    gen = torch.Generator().manual_seed(0)
    confidence = torch.rand(2000, L, generator=gen)
    masked = torch.rand(2000, L, generator=gen) < 0.8
    features = block_features(("confidence",), confidence, confidence, confidence, masked)
    data = TraceData(features, (confidence > 0.8).float(), masked, masked, torch.arange(2000) % 5 == 0, [], [])
    torch.manual_seed(0)  # before the network is built: its initial weights must not depend on earlier tests
    net = FilterNet(FilterConfig("block_mlp", block_length=L, hidden_size=16))
    log = fit(net, data, FilterTrainConfig(lr=2e-2, batch_size=64, max_epochs=30, class_weight=False, seed=0))
    assert log["best_val_loss"] < log["val_loss"][0]
    metrics = precision_recall(net, data, 0.5)
    assert metrics["precision"] > 0.9 and metrics["recall"] > 0.9


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch: pytest.MonkeyPatch):
    """``l2pd ARGS`` in this process, from the repository root (the shipped filter's card names its traces from
    there); returns the exit code and output as a finished process would."""
    monkeypatch.chdir(ROOT)

    def run(*args: str) -> Finished:
        code, out, err = run_main(capsys, *args)
        return Finished(code, out, err)
    return run


@pytest.mark.slow
def test_collect_train_and_decode_end_to_end(tmp_path: Path, run_cli) -> None:
    """The real commands on the shipped model, small: traces -> filter -> learned decode."""
    traces = tmp_path / "traces"
    done = run_cli("collect-traces", "--task", "arith,listops", "--n", "4", "--gen-length", "32", "--out",
                   str(traces), "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    meta = json.loads((traces / "meta.json").read_text())
    assert meta["trajectory"] == "oracle" and meta["problems"] == 8 and summary["steps"] == meta["steps"] > 0
    trained = run_cli("train-filter", "--traces", str(traces), "--out", str(tmp_path / "f.safetensors"),
                      "--val-share", "0.5", "--max-epochs", "5")
    assert trained.returncode == 0, trained.stderr
    card = json.loads((tmp_path / "f.json").read_text())
    assert card["training"]["trajectories"] == ["oracle"]
    assert len(card["validation"]["threshold_search"]) == len(ACCEPT_THRESHOLDS)
    more = tmp_path / "more"
    assert run_cli("collect-traces", "--task", "arith", "--n", "3", "--data-seed", "5", "--gen-length", "32",
                   "--out", str(more), "--batch-size", "8").returncode == 0
    rechosen = run_cli("choose-threshold", "--filter", str(tmp_path / "f.safetensors"), "--traces", str(traces),
                       str(more), "--out", str(tmp_path / "g.safetensors"))
    assert rechosen.returncode == 0, rechosen.stderr
    again = json.loads((tmp_path / "g.json").read_text())
    fitted_on = {p["question"] for p in read_problems(traces) if not is_validation(p["question"], 0.5)}
    unseen = {p["question"] for p in read_problems(traces) + read_problems(more)} - fitted_on
    assert again["validation"]["problems"] == len(unseen) > card["validation"]["problems"]
    assert again["validation"]["replaces"] == {"accept_threshold": card["accept_threshold"], "decode_with": {},
                                               "problems": card["validation"]["problems"]}
    assert again["accept_threshold"] in ACCEPT_THRESHOLDS and again["training"] == card["training"]
    assert (tmp_path / "g.safetensors").read_bytes() == (tmp_path / "f.safetensors").read_bytes()
    beside = run_cli("choose-threshold", "--filter", str(tmp_path / "f.safetensors"), "--traces", str(more),
                     "--out", str(tmp_path / "h.safetensors"), "--thresholds", "0.5,0.9")
    assert beside.returncode == 2 and "this filter does not decode beside a threshold" in beside.stderr
    serving = {"learned_commit": "with_threshold", "threshold": 0.9, "learned_candidates": 1}
    (tmp_path / "f.json").write_text(json.dumps({**card, "training": {**card["training"], "decode_with": serving}}))
    beside = run_cli("choose-threshold", "--filter", str(tmp_path / "f.safetensors"), "--traces", str(traces),
                     str(more), "--out", str(tmp_path / "h.safetensors"), "--thresholds", "0.5,0.9",
                     "--accept-thresholds", "0.9,0.98")
    assert beside.returncode == 0, beside.stderr
    chosen = json.loads((tmp_path / "h.json").read_text())
    tried = chosen["validation"]["serving_search"]
    assert [t["decode_with"]["threshold"] for t in tried] == [0.5, 0.9]
    assert all([p["accept_threshold"] for p in t["threshold_search"]] == [0.9, 0.98] for t in tried)
    best = min(tried, key=serving_rank)
    assert chosen["training"]["decode_with"] == {**serving, "threshold": best["decode_with"]["threshold"]}
    assert chosen["accept_threshold"] == best["accept_threshold"]
    decoded = run_cli("generate", "--prompt", "Ann has 3 pens. She buys 2 more pens. How many pens does Ann have "
                      "now?", "--policy", "learned", "--filter", str(tmp_path / "f.safetensors"), "--eotp",
                      "--gen-length", "32")
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout)["nfe"] >= 1
    wrong = run_cli("generate", "--prompt", "x", "--policy", "learned", "--filter", str(tmp_path / "f"),
                    "--block-length", "16", "--gen-length", "32")
    assert wrong.returncode == 2 and "trained for block_length=32, the decode uses block_length=16" in wrong.stderr


def test_a_way_to_serve_is_ranked_by_passes_within_the_drop_then_by_accuracy() -> None:
    def tried(threshold: float, accuracy: float, passes: float, within: bool) -> dict:
        point = {"accept_threshold": 0.9, "arith": {"accuracy": accuracy, "mean_nfe": passes}, "within_drop": within}
        other = {"accept_threshold": 0.5, "arith": {"accuracy": 0.0, "mean_nfe": 1.0}, "within_drop": False}
        return {"decode_with": {"threshold": threshold}, "accept_threshold": 0.9, "threshold_search": [other, point]}

    ways = [tried(0.9, 0.70, 8.0, False), tried(0.95, 0.78, 11.0, True), tried(0.97, 0.79, 12.0, True),
            tried(0.99, 0.75, 9.0, False)]
    assert [w["decode_with"]["threshold"] for w in sorted(ways, key=serving_rank)] == [0.95, 0.97, 0.99, 0.9]
