"""MMLU prompts exactly as hendrycks/test builds them, and the answer-letter token ids they imply.

Plain (the protocol, default):

    The following are multiple choice questions (with answers) about  abstract algebra.\\n\\n
    <dev question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: B\\n\\n      (k times, the first k dev rows)
    <test question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

The double space after "about" is the reference's: its `format_subject` returns " abstract algebra".
Chat mode (`--chat_template`, for chat models, off by default): the same text as a conversation,
each shot a user turn (question + options + "Answer:") answered by an assistant turn holding the
letter, the header opening the first user turn, and the generation prompt at the end.
"""
from __future__ import annotations

from eval.mmlu_data import CHOICES, Question

HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"


def format_subject(subject: str) -> str:
    return "".join(" " + word for word in subject.split("_"))


def format_example(q: Question, include_answer: bool = True) -> str:
    text = q.question
    for letter, choice in zip(CHOICES, q.choices):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {q.answer}\n\n"
    return text


def gen_prompt(dev: list[Question], subject: str, k: int) -> str:
    return HEADER.format(format_subject(subject)) + "".join(format_example(q) for q in dev[:k])


def chat_messages(dev: list[Question], q: Question, k: int) -> list[dict]:
    header = HEADER.format(format_subject(q.subject))
    messages = []
    for i, shot in enumerate(dev[:k]):
        messages.append({"role": "user", "content": (header if i == 0 else "") + format_example(shot, False)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": (header if k == 0 else "") + format_example(q, False)})
    return messages


def render(tokenizer, dev: list[Question], q: Question, k: int, chat: bool) -> str:
    """The prompt whose next token is scored."""
    if not chat:
        return gen_prompt(dev, q.subject, k) + format_example(q, include_answer=False)
    return tokenizer.apply_chat_template(chat_messages(dev, q, k), tokenize=False, add_generation_prompt=True)


def render_answered(tokenizer, dev: list[Question], q: Question, k: int, chat: bool, letter: str) -> str:
    """The same prompt completed by `letter` the way the in-context examples complete theirs."""
    if not chat:
        return render(tokenizer, dev, q, k, chat) + f" {letter}\n\n"
    messages = chat_messages(dev, q, k) + [{"role": "assistant", "content": letter}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def add_special_tokens(chat: bool) -> bool:
    """Plain prompts get the tokenizer's usual specials (BOS for LLaMA), as the reference code does;
    a chat template writes its own."""
    return not chat


def encode(tokenizer, texts: list[str], chat: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens(chat)).input_ids


def answer_token_ids(tokenizer, prompt: str, answered: list[str], chat: bool) -> list[int]:
    """Token ids of the letters A-D as the model would produce them right after `prompt`.

    Taken from the tokenization of each full answered string, never from `tokenizer("A")`: a BPE
    tokenizer writes the letter after "Answer:" as " A" (SmolLM2: 'ĠA' = 330, while "A" alone is 49),
    a SentencePiece one as '▁A'. Scoring the wrong id silently gives near-chance accuracy.
    """
    base = encode(tokenizer, [prompt], chat)[0]
    ids = []
    for letter, full in zip(CHOICES, answered):
        if not full.startswith(prompt):
            raise ValueError(f"the answered prompt does not extend the prompt (letter {letter}); "
                             "the chat template rewrites earlier turns?")
        toks = encode(tokenizer, [full], chat)[0]
        if toks[: len(base)] != base or len(toks) == len(base):
            raise ValueError(
                f"tokenizing the prompt alone is not a prefix of tokenizing prompt + answer {letter!r} "
                f"(tail {full[-30:]!r}); the next-token score would not match the in-context answer")
        tid = toks[len(base)]
        if tokenizer.decode([tid]).strip() != letter:
            raise ValueError(f"the first token after the prompt for answer {letter!r} is "
                             f"{tokenizer.decode([tid])!r}: the letter is not a token of its own")
        ids.append(tid)
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer letters share token ids {ids}")
    return ids
