"""Text <-> token ids around the decoder: chat-formatted prompts in, responses cut at end-of-text out."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

END_OF_TURN = ("<|eot_id|>", "<|im_end|>")
"""Chat end-of-turn markers: LLaDA's (Llama 3 style) and Dream's (Qwen2 ChatML)."""


def prompt_text(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool = True) -> str:
    """``text`` as a user turn of the tokenizer's chat template, ending where the answer starts (or raw, without
    template)."""
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return text


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` as written: a rendered template's special-token strings become their tokens, and the
    tokenizer adds none of its own."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of ``text`` as a user turn of the tokenizer's chat template (or raw, without template)."""
    return token_ids(tokenizer, prompt_text(tokenizer, text, chat_template))


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str,
                chat_template: bool = True) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of a loglikelihood request, split as lm-eval's HF model splits them.

    A BPE tokenizer merges across the boundary: ``"is "`` + ``"19"`` tokenized apart ends the context on a lone
    space token and starts the continuation on ``"19"``, a pair the model never reads, while the text itself
    tokenizes to ``"is"`` + ``" 19"``. So, as lm-eval does, the context's trailing whitespace moves to the
    continuation, the pair is tokenized jointly, and the continuation is what follows the context's own tokens.
    Scores then match lm-eval's HF models and do not depend on which side of the boundary a task put the space.
    No special tokens are added, as for generation prompts: a BOS that lm-eval's tokenizer call adds would precede
    both encodings and leave the split where it is.

    With ``chat_template`` the convention applies to the text the model reads, the rendered user turn followed by
    the continuation: the tokens are exactly those lm-eval's ``--apply_chat_template`` would produce for the same
    request, and the generation prompt's trailing whitespace (``"\\n\\n"`` after the assistant header) becomes the
    start of the continuation. The raw context's own trailing whitespace stays inside the user turn, where it is
    not next to the continuation.

    An empty context is never templated (lm-eval sends its unconditional requests raw): the continuation alone is
    conditioned on the BOS token (EOS without one), or on its own first token when that already is it.
    """
    if not context:
        return unconditional_pair(tokenizer, continuation)
    text = prompt_text(tokenizer, context, chat_template)
    # Moving the trailing whitespace leaves the joint text as it is: only the context's own tokens lose it.
    context_ids = token_ids(tokenizer, text.rstrip())
    return context_ids, token_ids(tokenizer, text + continuation)[len(context_ids):]


def unconditional_pair(tokenizer: PreTrainedTokenizerBase, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's pair for an empty context: its prefix token (BOS, else EOS) and the continuation's ids."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token to condition an "
                         "empty loglikelihood context on")
    target = token_ids(tokenizer, continuation)
    if target[:1] == [prefix]:
        return target[:1], target[1:]
    return [prefix], target


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, eos_token_id: int) -> set[int]:
    """Ids that end a response: the model's end-of-text, the tokenizer's, and the chat end-of-turn marker."""
    stops = {eos_token_id}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    for marker in END_OF_TURN:
        eot = tokenizer.convert_tokens_to_ids(marker)
        if eot is not None and eot != tokenizer.unk_token_id:
            stops.add(eot)
    return stops


def response_length(canvas: list[int], stops: set[int]) -> int:
    """Generated tokens of a canvas: the positions before its first stop token."""
    return next((i for i, tok in enumerate(canvas) if tok in stops), len(canvas))


def decode_response(tokenizer: PreTrainedTokenizerBase, canvas: list[int], stops: set[int]) -> str:
    """Text of ``canvas`` up to its first stop token, special tokens dropped."""
    return tokenizer.decode(canvas[: response_length(canvas, stops)], skip_special_tokens=True)
