"""Text <-> token ids around the decoder: chat-formatted prompts in, responses cut at end-of-text out."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

END_OF_TURN = "<|eot_id|>"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of ``text`` as a user turn of the tokenizer's chat template (or raw, without template)."""
    if chat_template and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, eos_token_id: int) -> set[int]:
    """Ids that end a response: the model's end-of-text, the tokenizer's, and the chat end-of-turn marker."""
    stops = {eos_token_id}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is not None and eot != tokenizer.unk_token_id:
        stops.add(eot)
    return stops


def response_length(canvas: list[int], stops: set[int]) -> int:
    """Generated tokens of a canvas: the positions before its first stop token."""
    return next((i for i, tok in enumerate(canvas) if tok in stops), len(canvas))


def decode_response(tokenizer: PreTrainedTokenizerBase, canvas: list[int], stops: set[int]) -> str:
    """Text of ``canvas`` up to its first stop token, special tokens dropped."""
    return tokenizer.decode(canvas[: response_length(canvas, stops)], skip_special_tokens=True)
