"""Dream as a second native family: parity with transformers' Qwen2 run bidirectionally, the engine with every policy
and cache, lm-eval, the filter pipeline, and one-line refusals, all on a random tiny checkpoint in Dream's layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.decoding.policies import build_policy
from l2pd_harness.decoding.runner import ModelRunner, StepBatch
from l2pd_harness.decoding.scheduler import ScheduledRequest
from l2pd_harness.lm_eval_model import L2PDLM
from l2pd_harness.loading import DEFAULT_MODEL_DIR, load_model
from l2pd_harness.models.common import ConfigError
from l2pd_harness.models.dream import DreamModel
from l2pd_harness.text import encode_prompt
from l2pd_harness.tokenizer import build_tokenizer
from l2pd_harness.training.base import task_corpus
from tests.test_cli import one_line_error, run_main

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def dream_config(vocab_size: int, mask_id: int, eos_id: int, **overrides) -> dict:
    """config.json with the key set of Dream-v0-Instruct-7B's, at a tiny size (GQA: 4 query heads, 2 KV heads)."""
    return {"architectures": ["DreamModel"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "mask_token_id": mask_id,
            "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48, "initializer_range": 0.02,
            "max_position_embeddings": 512, "max_window_layers": 2, "model_type": "Dream",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False,
            "use_sliding_window": False, "vocab_size": vocab_size, **overrides}


def dream_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under Dream's tensor names (biases on q/k/v only), written independently of DreamModel."""
    generator = torch.Generator().manual_seed(seed)
    d, hidden, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update({f"{layer}.self_attn.q_proj.weight": (d, d), f"{layer}.self_attn.q_proj.bias": (d,),
                       f"{layer}.self_attn.k_proj.weight": (kv, d), f"{layer}.self_attn.k_proj.bias": (kv,),
                       f"{layer}.self_attn.v_proj.weight": (kv, d), f"{layer}.self_attn.v_proj.bias": (kv,),
                       f"{layer}.self_attn.o_proj.weight": (d, d), f"{layer}.mlp.gate_proj.weight": (hidden, d),
                       f"{layer}.mlp.up_proj.weight": (hidden, d), f"{layer}.mlp.down_proj.weight": (d, hidden),
                       f"{layer}.input_layernorm.weight": (d,), f"{layer}.post_attention_layernorm.weight": (d,)})
    return {name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}


def write_dream_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Dream: ChatML tokenizer with its own mask and end-of-turn tokens, config.json in Dream's keys,
    weights in two safetensors shards with the index file, as Dream's hub checkpoints are laid out."""
    tokenizer = build_tokenizer(task_corpus(("arith", "listops")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    cfg = dream_config(len(tokenizer), tokenizer.mask_token_id, tokenizer.eos_token_id, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dream_tensors(cfg, seed)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, members in shards.items():
        save_file({name: tensors[name].contiguous() for name in members}, directory / file)
    index = {"metadata": {}, "weight_map": {name: file for file, members in shards.items() for name in members}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dream_checkpoint(tmp_path_factory) -> Path:
    return write_dream_checkpoint(tmp_path_factory.mktemp("tiny-dream"))


def qwen2_twin(ckpt: Path) -> Qwen2ForCausalLM:
    """transformers' own Qwen2 holding the checkpoint's tensors (Dream's names are Qwen2's)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"], max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False)).eval()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    state = {k: v for file in sorted(set(index.values())) for k, v in load_file(ckpt / file).items()}
    qwen.load_state_dict(state, strict=True)
    return qwen


def test_logits_match_qwen2_bidirectional_and_shifted(dream_checkpoint: Path) -> None:
    model, _ = load_model(dream_checkpoint)
    assert isinstance(model, DreamModel) and model.logit_shift == 1
    qwen = qwen2_twin(dream_checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding of different widths
    attention_mask[2, :11] = 0
    full_mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)  # no causal mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask)
        theirs = qwen(ids, attention_mask=full_mask, position_ids=positions).logits
        index = torch.arange(3, 17).expand(3, -1)
        gathered = model(ids, attention_mask, logits_index=index)
    shifted = torch.cat([theirs[:, :1], theirs[:, :-1]], dim=1)  # the token at i is predicted at i - 1
    real = attention_mask.bool()
    real[:, 0] = False
    real[1, 5] = real[2, 11] = False  # a row's first real token has no prediction
    diff = (ours - shifted)[real].abs().max().item()
    print(f"max |logit diff| vs Qwen2ForCausalLM (bidirectional, shifted, GQA, qkv biases, left padding): {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(gathered, ours[:, 3:])


def test_loads_in_bfloat16(dream_checkpoint: Path) -> None:
    fp32, _ = load_model(dream_checkpoint)
    bf16, _ = load_model(dream_checkpoint, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, fp32.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close = (bf16(ids).float() - fp32(ids)).abs().max().item()
    assert close < 0.2 * fp32(ids).abs().max().item()


def dream_engine_rows(ckpt: Path, batch_size: int, **settings) -> list[dict]:
    model, tokenizer = load_model(ckpt)
    cfg = DecodeConfig(gen_length=32, block_length=8, batch_size=batch_size, **settings)
    prompts = ["Tom has 12 apples. How many apples does Tom have now?", "xs = [3, 1, 2]\nprint(sorted(xs))",
               "Mia has 4 coins.", "12 + 7 = 19"]
    engine = Engine(model, cfg, eot_ids={tokenizer.eos_token_id}, policy=build_policy(cfg))
    results = engine.generate([encode_prompt(tokenizer, p) for p in prompts] * 2)
    return [{"canvas": r.token_ids, "nfe": r.nfe} for r in results]


SETTINGS = [dict(policy="fixed", steps=32), dict(policy="fixed", steps=8, eotp=True),
            dict(policy="threshold", threshold=0.3), dict(policy="factor", factor=1.0, eotp=True),
            dict(policy="threshold", threshold=0.3, cache="prefix"),
            dict(policy="threshold", threshold=0.3, cache="dual"),
            dict(policy="fixed", steps=16, cache="dual", eotp=True, eotp_mode="truncate")]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_engine_runs_dream_batch_invariant(dream_checkpoint: Path, settings: dict) -> None:
    alone, together = dream_engine_rows(dream_checkpoint, 1, **settings), dream_engine_rows(dream_checkpoint, 8,
                                                                                            **settings)
    assert alone == together


def test_cached_pass_reads_the_shifted_prediction(dream_checkpoint: Path) -> None:
    """Right after a refresh nothing is stale, so a dual-cache pass over the block must give the full pass's logits:
    it only can if the slice includes the position before the block, where Dream reads the block's first token."""
    model, _ = load_model(dream_checkpoint)
    for cache in ("prefix", "dual"):
        cfg = DecodeConfig(gen_length=16, block_length=8, batch_size=2, cache=cache, policy="threshold")
        runner = ModelRunner(model, cfg, build_policy(cfg))
        ids = torch.randint(5, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
        rows = [ScheduledRequest(i, i, ids[i, : 20 - 2 * i], 4, 12 - 2 * i, 0, None) for i in range(2)]
        batch = StepBatch.of(rows, model.config.eos_token_id, torch.device("cpu"))
        full, _ = runner._full_pass(batch)
        cached, _ = runner._cached_pass(batch)
        assert torch.allclose(full, cached, atol=1e-5), cache


def test_generate_cli_every_policy_and_cache(dream_checkpoint: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tom has 12 apples.", "xs = [2, 1]"] * 4))
    for policy in ("fixed", "threshold", "factor"):
        for cache in ("none", "prefix", "dual"):
            outputs = []
            for batch in ("1", "8"):
                out = tmp_path / f"{policy}-{cache}-{batch}.jsonl"
                code, _, err = run_main(capsys, "generate", "--model", str(dream_checkpoint), "--input", str(prompts),
                                        "--output", str(out), "--gen-length", "16", "--block-length", "8",
                                        "--policy", policy, "--cache", cache, "--batch-size", batch, "--eotp")
                assert code == 0, err
                outputs.append([json.loads(line)["canvas"] for line in out.read_text().splitlines()])
            assert outputs[0] == outputs[1], (policy, cache)
    references = tmp_path / "fixed-none-1.jsonl"  # the oracle replays an earlier decode
    canvases = []
    for batch in ("1", "8"):
        out = tmp_path / f"oracle-{batch}.jsonl"
        code, _, err = run_main(capsys, "generate", "--model", str(dream_checkpoint), "--input", str(prompts),
                                "--output", str(out), "--gen-length", "16", "--block-length", "8", "--policy",
                                "oracle", "--references", str(references), "--batch-size", batch)
        assert code == 0, err
        canvases.append([json.loads(line)["canvas"] for line in out.read_text().splitlines()])
    assert canvases[0] == canvases[1] == [json.loads(line)["canvas"] for line in references.read_text().splitlines()]


@pytest.mark.parametrize("override, message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported; allowed: ['silu']"),
    ({"use_sliding_window": True}, "use_sliding_window=True is not supported; allowed: [False]"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling={'type': 'yarn', 'factor': 4.0} is not "
                                                        "supported; allowed: [None]"),
    ({"n_layers": 2}, "unknown config.json keys ['n_layers']"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
])
def test_bad_dream_config_is_one_line(dream_checkpoint: Path, tmp_path: Path, capsys, override: dict,
                                      message: str) -> None:
    ckpt = Path(shutil.copytree(dream_checkpoint, tmp_path / "ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **override}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_model(ckpt)
    line = one_line_error(capsys, "generate", "--model", str(ckpt), "--prompt", "x")
    assert message in line


def test_a_llada_filter_refuses_a_dream_checkpoint(dream_checkpoint: Path, capsys) -> None:
    shipped = DEFAULT_MODEL_DIR / "learn2pd-filter.safetensors"
    line = one_line_error(capsys, "generate", "--model", str(dream_checkpoint), "--prompt", "x", "--policy",
                          "learned", "--filter", str(shipped))
    assert re.search(r"was trained on base model sha256:\w+, not on the loaded model \(sha256:\w+\)", line), line


def test_filter_pipeline_runs_on_dream(dream_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """collect-traces -> train-filter -> a learned decode, on the random Dream (shapes and files, not quality)."""
    traces, net = tmp_path / "traces", tmp_path / "f.safetensors"
    code, _, err = run_main(capsys, "collect-traces", "--model", str(dream_checkpoint), "--task", "arith,listops",
                            "--n", "3", "--gen-length", "16", "--block-length", "8", "--out", str(traces))
    assert code == 0, err
    meta = json.loads((traces / "meta.json").read_text())
    assert meta["problems"] == 6 and meta["steps"] > 0
    code, _, err = run_main(capsys, "train-filter", "--model", str(dream_checkpoint), "--traces", str(traces),
                            "--out", str(net), "--val-share", "0.5", "--max-epochs", "2")
    assert code == 0, err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tom has 12 apples.", "xs = [2, 1]"] * 4))
    for cache in ("none", "prefix", "dual"):
        rows = []
        for batch in ("1", "8"):
            out = tmp_path / f"learned-{cache}-{batch}.jsonl"
            code, _, err = run_main(capsys, "generate", "--model", str(dream_checkpoint), "--input", str(prompts),
                                    "--output", str(out), "--policy", "learned", "--filter", str(net),
                                    "--gen-length", "16", "--block-length", "8", "--cache", cache, "--eotp",
                                    "--batch-size", batch)
            assert code == 0, err
            rows.append([json.loads(line) for line in out.read_text().splitlines()])
        assert [r["canvas"] for r in rows[0]] == [r["canvas"] for r in rows[1]] and rows[0][0]["nfe"] >= 2


def test_lm_eval_generates_and_scores_with_dream(dream_checkpoint: Path) -> None:
    lm = L2PDLM.create_from_arg_string(f"pretrained={dream_checkpoint},gen_length=16,block_length=8,"
                                       "policy=threshold,cache=dual,mc_num=4")
    request = Instance("generate_until", {}, ("Tom has 12 apples.", {"until": [], "max_gen_toks": 16}), 0)
    assert isinstance(lm.generate_until([request])[0], str)
    scores = lm.loglikelihood([Instance("loglikelihood", {}, ("Tom has 12", " apples."), 0)])
    assert len(scores) == 1 and scores[0][0] < 0
