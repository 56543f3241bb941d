"""Token-in-token-out: the token ids an environment turn adds, from the chat template, without re-tokenising text.

An episode's tokens are the prompt, then the model's tokens exactly as the engine sampled them, then for each
environment turn only the tokens the chat template adds after the model's turn: the end of the assistant turn that
the model did not sample itself, the environment's messages, and the next assistant header. Chat templates are not
append-only (a later render may change how an earlier turn looks), and text that was sampled as one sequence of
tokens tokenises differently as a whole, so the conversation is never rendered and tokenised again: each delta is
taken from a render in which the model's last turn is a placeholder, and only the text after that placeholder is
tokenised (once).
"""

from __future__ import annotations

PLACEHOLDER = "\u2063reasonrl-assistant-turn\u2063"  # text no model writes: marks where the model's turn ends


class TemplateError(ValueError):
    """The chat template cannot render an episode turn by turn."""


def render(tokenizer, messages: list[dict], *, tools: list[dict] | None, generation_prompt: bool) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as one piece (special tokens written in it, such as <|im_end|>, become those tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_prompt_ids(tokenizer, messages: list[dict], *, tools: list[dict] | None = None) -> list[int]:
    """The episode's prompt: the first messages rendered by the chat template, ending with the assistant header."""
    return encode_text(tokenizer, render(tokenizer, messages, tools=tools, generation_prompt=True))


def turn_delta_text(tokenizer, history: list[dict], replies: list[dict], *, sampled_end: str = "",
                    tools: list[dict] | None = None) -> str:
    """The text the template adds after the model's last turn: `history` ends with that assistant turn (its text is
    not used), `replies` are the environment's messages. `sampled_end` is the text of the model's own end-of-turn
    token when it sampled one (EOS): the template's copy of it is left out, since the model's token is kept."""
    if not history or history[-1]["role"] != "assistant":
        raise TemplateError("an environment turn follows an assistant turn")
    marked = [*history[:-1], {**history[-1], "content": PLACEHOLDER}, *replies]
    text = render(tokenizer, marked, tools=tools, generation_prompt=True)
    at = text.rfind(PLACEHOLDER)
    if at < 0:
        raise TemplateError("the chat template does not render the assistant's text as given, so the tokens after "
                            "the model's turn cannot be found")
    delta = text[at + len(PLACEHOLDER):]
    if sampled_end and delta.startswith(sampled_end):
        delta = delta[len(sampled_end):]
    return delta


def turn_delta_ids(tokenizer, history: list[dict], replies: list[dict], *, sampled_end: str = "",
                   tools: list[dict] | None = None) -> list[int]:
    """`turn_delta_text`, tokenised once."""
    return encode_text(tokenizer, turn_delta_text(tokenizer, history, replies, sampled_end=sampled_end, tools=tools))


def end_of_turn_text(tokenizer, token_ids: list[int], eos_ids: set[int]) -> str:
    """The text of the model's end-of-turn token when its turn ends with one, else ''."""
    if token_ids and token_ids[-1] in eos_ids:
        return tokenizer.decode(token_ids[-1:], skip_special_tokens=False)
    return ""
