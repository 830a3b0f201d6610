"""Settings: the one coercion, the one place configs are built, and options generated from DecodeConfig's fields
(a knob added as a field reaches the command line and lm-eval's model_args with no other change)."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import l2pd_harness.cli as cli
from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.filter.model import DEFAULT_FILTER
from l2pd_harness.lm_eval_model import L2PDLM
from l2pd_harness.settings import SettingsError, coerce, decode_setup, make_config, option_values


@dataclass
class ConfigWithKnob(DecodeConfig):
    """DecodeConfig plus one knob, as a contributor would add it."""

    lookahead: int = 3
    """Positions a future policy would read ahead."""


@pytest.mark.parametrize("value, kind, optional, expected", [
    ("64", int, False, 64), (64.0, int, False, 64), ("None", int, True, None), (None, int, True, None),
    ("0.5", float, False, 0.5), ("True", bool, False, True), ("off", bool, False, False), (False, bool, False, False),
    ("dual", str, False, "dual"),
])
def test_coerce_reads_text_and_typed_values(value, kind: type, optional: bool, expected) -> None:
    assert coerce("x", value, kind, optional) == expected


@pytest.mark.parametrize("value, kind, message", [
    ("64.5", int, "x='64.5' is not an integer"), (True, int, "x=True is not an integer"),
    ("abc", float, "x='abc' is not a number"), ("maybe", bool, r"x='maybe' is not a boolean \(use one of"),
    ("None", int, "x='None' is not an integer"),
])
def test_coerce_names_a_bad_value(value, kind: type, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        coerce("x", value, kind)


def test_make_config_refuses_unknown_names_and_bad_values() -> None:
    assert make_config({"gen_length": "64", "eotp": "yes"}) == DecodeConfig(gen_length=64, eotp=True)
    with pytest.raises(SettingsError, match=r"unknown settings \['colour'\]; known: \['accept_threshold'"):
        make_config({"colour": "red"})
    with pytest.raises(SettingsError, match="block_length=5 must be a positive divisor of gen_length=64"):
        make_config({"gen_length": 64, "block_length": 5})


def test_decode_setup_resolves_the_learned_filter_and_its_threshold() -> None:
    cfg, policy = decode_setup({"policy": "learned"})
    assert 0 < cfg.accept_threshold < 1 and policy.accept_threshold == cfg.accept_threshold
    cfg, policy = decode_setup({"policy": "learned", "accept_threshold": "0.42"})
    assert cfg.accept_threshold == policy.accept_threshold == 0.42
    assert decode_setup({"policy": "threshold", "threshold": 0.7})[1].threshold == 0.7


def test_a_filter_card_says_how_its_filter_decodes_unless_told(tmp_path: Path) -> None:
    rollout_filter = tmp_path / "rollout.safetensors"
    shutil.copy(DEFAULT_FILTER, rollout_filter)
    card = json.loads(DEFAULT_FILTER.with_suffix(".json").read_text())
    card["training"]["decode_with"] = {"learned_commit": "with_threshold", "threshold": 0.9, "learned_candidates": 1}
    rollout_filter.with_suffix(".json").write_text(json.dumps(card))
    cfg, policy = decode_setup({"policy": "learned", "filter": str(rollout_filter), "threshold": "0.95"})
    assert (cfg.learned_commit, cfg.learned_candidates, cfg.threshold) == ("with_threshold", 1, 0.95)
    assert (policy.threshold, policy.candidates) == (0.95, 1)
    cfg, policy = decode_setup({"policy": "learned", "filter": str(rollout_filter), "learned_commit": "accepted"})
    assert (cfg.learned_commit, cfg.learned_candidates, policy.threshold) == ("accepted", None, None)
    card["training"]["decode_with"]["threshold"] = 0.97  # a filter trained beside a higher threshold serves there
    rollout_filter.with_suffix(".json").write_text(json.dumps(card))
    assert decode_setup({"policy": "learned", "filter": str(rollout_filter)})[1].threshold == 0.97
    assert decode_setup({"policy": "learned", "filter": str(rollout_filter), "threshold": "0.8"})[1].threshold == 0.8
    told = {"policy": "learned", "filter": str(rollout_filter), "learned_commit": "with_threshold"}
    assert decode_setup(told)[1].threshold == 0.9  # learned_commit given: nothing is left to the card
    assert make_config({"policy": "threshold"}).threshold == make_config({"policy": "isolated"}).threshold == 0.9
    card["training"]["decode_with"]["threshold"] = 1.5
    rollout_filter.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(SettingsError, match=r"threshold=1.5 must be in \(0, 1\]"):
        decode_setup({"policy": "learned", "filter": str(rollout_filter)})
    assert decode_setup({"policy": "learned"})[0].learned_commit == "accepted"  # the shipped card names none
    assert make_config({"policy": "threshold"}).learned_commit == "accepted"
    with pytest.raises(SettingsError, match="learned_candidates=2 must be a positive integer"):
        decode_setup({"policy": "learned", "learned_candidates": "2"})


def test_a_preset_fills_what_is_not_given_and_yields_to_what_is() -> None:
    cfg, policy = decode_setup({"preset": "learn2pd-paper", "gen_length": "64"})
    assert (cfg.policy, cfg.learned_commit, cfg.eotp, cfg.eotp_mode, cfg.block_length, cfg.steps) == (
        "learned", "with_schedule", True, "truncate", 32, 64)
    assert policy.schedule is not None and policy.accept_threshold == cfg.accept_threshold
    assert make_config({"preset": "learn2pd-paper", "eotp_mode": "fill"}).eotp_mode == "fill"
    with pytest.raises(SettingsError, match=r"preset='paper' is not one of \['learn2pd-paper'\]"):
        make_config({"preset": "paper"})


def test_the_preset_reaches_the_command_line_and_lm_eval(random_checkpoint: Path) -> None:
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--preset", "learn2pd-paper", "--no-eotp"])
    assert option_values(args, DecodeConfig) == {"preset": "learn2pd-paper", "eotp": False}  # only what was given
    with pytest.raises(SettingsError, match="eotp_mode='truncate' needs eotp=true"):
        make_config(option_values(args, DecodeConfig))
    lm = L2PDLM.create_from_arg_string("preset=learn2pd-paper,gen_length=64", {"batch_size": 4})
    assert (lm.cfg.policy, lm.cfg.learned_commit, lm.cfg.eotp_mode, lm.cfg.batch_size) == (
        "learned", "with_schedule", "truncate", 4)


def test_a_new_field_reaches_the_command_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(cli, "DecodeConfig", ConfigWithKnob)
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    assert "--lookahead LOOKAHEAD" in capsys.readouterr().out.replace("\n", " ")
    args = parser.parse_args(["generate", "--prompt", "x", "--lookahead", "5", "--gen-length", "64"])
    assert make_config(option_values(args, ConfigWithKnob), ConfigWithKnob).lookahead == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--lookahead", "five"])
    assert "argument --lookahead: lookahead='five' is not an integer" in capsys.readouterr().err


def test_a_new_field_reaches_lm_eval_model_args(random_checkpoint: Path) -> None:
    class ModelWithKnob(L2PDLM):
        config_class = ConfigWithKnob

    lm = ModelWithKnob.create_from_arg_string(f"pretrained={random_checkpoint},lookahead=7,gen_length=32")
    assert isinstance(lm.cfg, ConfigWithKnob) and lm.cfg.lookahead == 7 and lm.settings["lookahead"] == 7


def test_help_of_every_option_is_its_field_doc() -> None:
    parser = argparse.ArgumentParser()
    cli.add_decode_options(parser)
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["accept_threshold"].startswith("``learned``: commit the masked positions whose filter probability")
    assert helps["cfg_scale"].startswith("Classifier-free guidance strength")
