"""A canonical conversation → the exact training text and the character spans that are labels.

    render(messages, tokenizer, template) -> Rendered(text, label_spans, round_ends, prefix_ids)

Templates:

- "chat": the tokenizer's own chat template (`apply_chat_template(..., tokenize=False)`), so the
  text is exactly what the model sees at inference. Spans come from rendering prefixes of the
  conversation: assistant turn i lies between the end of `messages[:i]` rendered with the
  generation prompt (the `<|im_start|>assistant\\n` header is context, not a label) and the end of
  `messages[:i+1]`; a probe reply rendered in its place tells where the content sits in the turn.
  The label is the reply's content plus the end-of-turn special token right after it (`<|im_end|>`,
  `</s>`, `<|eot_id|>`, ...), not what the template puts after that (ChatML's newline). This works
  for any template whose rendering of a conversation's first turns is a prefix of the rendering of
  the whole (ChatML, Llama-2/3, Mistral, Gemma, Qwen2.5 are); a template that is not (one that
  rewrites earlier turns) is refused with an error rather than guessed at.
- "alpaca": the Stanford Alpaca prompt (`PROMPT_DICT`, byte-for-byte as in stanford_alpaca's
  train.py), the reply, then the EOS token; BOS first when the tokenizer adds one. Multi-turn rule:
  the first round is exactly the Stanford prompt; each later round appends
  `"\\n\\n### Instruction:\\n{user}\\n\\n### Response:"` (with the `### Input:` section when that turn
  came from an Alpaca record with an input) and its reply + EOS; every reply is a label. A system
  message replaces the preamble sentence ("Below is an instruction ...").
- "auto": "chat" when the tokenizer has a chat template, else "alpaca".

`round_ends[k]` is the character offset where round k ends: `text[:round_ends[k]]` is exactly the
rendering of the first k+1 rounds, which is what truncation by whole rounds needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import jinja2

TEMPLATES = ("auto", "chat", "alpaca")

PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}
_SEP = "\n\n### Instruction:"
_PROBE = "SIFTreplyPROBE7f3a"


@dataclass(frozen=True)
class Rendered:
    text: str
    label_spans: list[tuple[int, int]]  # [start, end) character spans of `text` that are trained
    round_ends: list[int]               # text[:round_ends[k]] renders rounds 0..k
    prefix_ids: list[int]               # token ids that precede `text` (Alpaca's BOS)


def resolve_template(tokenizer, template: str = "auto") -> str:
    """"chat" or "alpaca" for `template`, checking that a requested chat template exists."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise ValueError("template 'chat' needs a tokenizer with a chat template; this one has none "
                         "(use template 'alpaca' for base models)")
    return template


def render(messages: list[dict], tokenizer, template: str) -> Rendered:
    """Text and label spans of a canonical conversation under "chat" or "alpaca" (resolved)."""
    if template == "chat":
        return _render_chat(messages, tokenizer)
    if template == "alpaca":
        return _render_alpaca(messages, tokenizer)
    raise ValueError(f"render() needs a resolved template ('chat' or 'alpaca'), got {template!r}")


def _render_chat(messages: list[dict], tokenizer) -> Rendered:
    def chat(msgs, generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, e.g. "no system role"
            raise ValueError(f"the chat template refused the conversation: {e}") from e

    text = chat(messages)
    specials = _special_strings(tokenizer)
    spans, round_ends = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, upto = chat(messages[:i], generation_prompt=True), chat(messages[:i + 1])
        probe = chat(messages[:i] + [{"role": "assistant", "content": _PROBE}])
        if not (text.startswith(head) and text.startswith(upto) and probe.startswith(head)):
            raise ValueError(f"the chat template is not prefix-stable: messages[:{i}] render differently "
                             "inside the whole conversation, so the turn boundaries (and the label mask) "
                             "are ambiguous")
        # Where the template puts a reply's content inside its turn: found with a probe reply, so
        # that content which also occurs in the turn's own markup cannot be matched there.
        start = probe.find(_PROBE, len(head)) - len(head)
        body = text[len(head):len(upto)]
        content = next((c for c in (message["content"], message["content"].strip())
                        if start >= 0 and body.startswith(c, start)), None)
        if content is None:  # the template rewrites contents beyond trimming them
            raise ValueError(f"the chat template does not reproduce the text of message {i}; "
                             "cannot tell which tokens are the assistant's")
        end = start + len(content)
        rest = body[end:]
        gap = len(rest) - len(rest.lstrip())
        eot = next((s for s in specials if rest.startswith(s, gap)), None)
        if eot is not None:
            end += gap + len(eot)
        spans.append((len(head) + start, len(head) + end))
        round_ends.append(len(upto))
    return Rendered(text, spans, round_ends, [])


def _special_strings(tokenizer) -> list[str]:
    """Special-token strings, longest first (so `<|im_end|>` wins over a shorter prefix)."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((s for s in specials if s), key=len, reverse=True)


def _render_alpaca(messages: list[dict], tokenizer) -> Rendered:
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError("the Alpaca template needs a tokenizer with an EOS token")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    text, spans, round_ends = "", [], []
    for k in range(0, len(turns), 2):
        user, reply = turns[k], turns[k + 1]
        if "input" in user:
            prompt = PROMPT_DICT["prompt_input"].format(instruction=user["instruction"], input=user["input"])
        else:
            prompt = PROMPT_DICT["prompt_no_input"].format(instruction=user["content"])
        preamble, body = prompt.split(_SEP, 1)
        if k == 0:
            prompt = (system if system is not None else preamble) + _SEP + body
        else:
            prompt = _SEP + body
        text += prompt
        spans.append((len(text), len(text) + len(reply["content"]) + len(eos)))
        text += reply["content"] + eos
        round_ends.append(len(text))
    return Rendered(text, spans, round_ends, _bos_prefix(tokenizer))


def _bos_prefix(tokenizer) -> list[int]:
    """[bos_token_id] when the tokenizer prepends BOS to plain text (LLaMA does), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []
