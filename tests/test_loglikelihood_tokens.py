"""Loglikelihood requests are tokenized as lm-eval's HF model tokenizes them, checked on a byte-level BPE tokenizer
(one that merges across the context/continuation boundary) against lm-eval's own code."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from l2pd_harness.text import encode_pair, encode_prompt, prompt_text, token_ids
from l2pd_harness.tokenizer import BOS, CHAT_TEMPLATE, EOS, EOT, HEADER_END, HEADER_START, MASK, SPECIAL_TOKENS, UNK

CORPUS = ["The answer is 19.", "Tom has 12 apples and buys 7 more, so he has 19.", "12 + 7 is 19", "The answer is 7.",
          "Question: what is 12 + 7?\nAnswer: 19"]
REQUESTS = [("The answer is ", "19"), ("The answer is", " 19"), ("The answer is  ", "19"),
            ("Question: 12 + 7?\n", "19"), ("Answer:", " 19."), ("   ", "19")]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``CORPUS``, with the shipped tokenizer's special tokens and chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  mask_token=MASK, additional_special_tokens=[EOT, HEADER_START, HEADER_END])
    tok.chat_template = CHAT_TEMPLATE
    return tok


class LmEvalHF:
    """lm-eval's HF model reduced to what its request tokenization reads; its methods are lm-eval's own code."""

    backend, add_bos_token, custom_prefix_token_id = "causal", None, None
    tok_encode, prefix_token_id = HFLM.tok_encode, HFLM.prefix_token_id
    _encode_pair, loglikelihood = TemplateLM._encode_pair, TemplateLM.loglikelihood

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer

    def _loglikelihood_tokens(self, requests: list, **kwargs) -> list[tuple[list[int], list[int]]]:
        return [(context, continuation) for _, context, continuation in requests]

    def pairs(self, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        return self.loglikelihood([SimpleNamespace(args=request) for request in requests], disable_tqdm=True)


def test_the_bpe_tokenizer_merges_across_the_boundary(bpe: PreTrainedTokenizerFast) -> None:
    apart = token_ids(bpe, "The answer is ") + token_ids(bpe, "19")
    assert apart != token_ids(bpe, "The answer is 19")
    assert bpe.convert_ids_to_tokens(token_ids(bpe, " 19")) == ["Ġ19"]


def test_raw_pairs_follow_lm_eval(bpe: PreTrainedTokenizerFast) -> None:
    ours = [encode_pair(bpe, context, continuation, chat_template=False) for context, continuation in REQUESTS]
    assert ours == LmEvalHF(bpe).pairs(REQUESTS)
    spaced, unspaced = ours[:2]
    assert spaced == unspaced == (token_ids(bpe, "The answer is"), token_ids(bpe, " 19"))
    assert ours[2][1] == token_ids(bpe, "  19")  # every trailing space moves
    assert ours[5] == ([], token_ids(bpe, "   19"))  # a blank context is not an empty one


def test_templated_pairs_are_lm_evals_for_the_rendered_context(bpe: PreTrainedTokenizerFast) -> None:
    ours = [encode_pair(bpe, context, continuation, chat_template=True) for context, continuation in REQUESTS]
    rendered = [(prompt_text(bpe, context), continuation) for context, continuation in REQUESTS]
    assert ours == LmEvalHF(bpe).pairs(rendered)
    context, continuation = encode_pair(bpe, "The answer is", " 19")
    assert context + continuation == encode_prompt(bpe, "The answer is") + token_ids(bpe, " 19")
    assert continuation == token_ids(bpe, "\n\n 19")  # the generation prompt's newlines start the continuation


def test_an_empty_context_is_conditioned_on_bos_as_in_lm_eval(bpe: PreTrainedTokenizerFast) -> None:
    requests = [("", " 19"), ("", BOS + " 19")]
    ours = [encode_pair(bpe, context, continuation) for context, continuation in requests]
    assert ours == LmEvalHF(bpe).pairs(requests) == [([bpe.bos_token_id], token_ids(bpe, " 19"))] * 2

    without_bos = copy.deepcopy(bpe)
    without_bos.bos_token = None
    assert encode_pair(without_bos, "", " 19") == LmEvalHF(without_bos).pairs([("", " 19")])[0]
    assert encode_pair(without_bos, "", " 19")[0] == [bpe.eos_token_id]

    without_either = copy.deepcopy(without_bos)
    without_either.eos_token = None
    with pytest.raises(ValueError, match="has neither a BOS nor an EOS token to condition an empty loglikelihood"):
        encode_pair(without_either, "", " 19")


def test_prompts_are_the_chat_templates_own_tokens(bpe: PreTrainedTokenizerFast) -> None:
    text = "Tom has 12 apples. <|eot_id|>"
    assert encode_prompt(bpe, text) == list(bpe.apply_chat_template([{"role": "user", "content": text}],
                                                                    add_generation_prompt=True)["input_ids"])
    assert encode_prompt(bpe, text, chat_template=False) == token_ids(bpe, text)
