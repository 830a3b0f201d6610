"""A word-level tokenizer for small task vocabularies, saved in Hugging Face layout with a LLaDA-style chat template.

Words keep their leading space (`` apples``) and every digit is its own token, so arithmetic is spelled digit by
digit and decoding is an exact concatenation (the ``Fuse`` decoder).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, EOT, MASK, UNK = "<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<|unk|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = (EOS, BOS, EOT, MASK, UNK, HEADER_START, HEADER_END)
"""Special tokens in id order: end-of-text is id 0 (it also pads), the mask token id 3."""

# The same turn layout as LLaDA-8B-Instruct's template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}" + HEADER_START + "{{ message['role'] }}" + HEADER_END
    + "\n\n{{ message['content'] }}" + EOT + "{% endfor %}{% if add_generation_prompt %}" + HEADER_START
    + "assistant" + HEADER_END + "\n\n{% endif %}"
)
ROLES = ("system", "user", "assistant")
# A word with its leading space, one digit (with its leading space), one other symbol, a newline run, a space run.
PIECE_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\n+| +"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")


def corpus_pieces(corpus: Iterable[str]) -> list[str]:
    """Every piece of ``corpus`` (plus chat roles and all digits), sorted."""
    pre = _pre_tokenizer()
    pieces: set[str] = set()
    extra = [f" {d}" for d in range(10)] + [str(d) for d in range(10)] + ["\n\n", *ROLES]
    for text in [*corpus, *extra]:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return sorted(pieces)


def build_tokenizer(corpus: Iterable[str], base: PreTrainedTokenizerFast | None = None) -> PreTrainedTokenizerFast:
    """Tokenizer whose vocabulary is every piece of ``corpus``; with ``base``, ``base``'s vocabulary with the new
    pieces appended after it, so every id ``base`` had keeps its meaning (a checkpoint's rows stay valid)."""
    vocab = dict(base.get_vocab()) if base is not None else {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in corpus_pieces(corpus):
        vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                  unk_token=UNK, mask_token=MASK,
                                  additional_special_tokens=[EOT, HEADER_START, HEADER_END], padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok
