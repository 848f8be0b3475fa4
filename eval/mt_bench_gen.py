"""MT-bench answers, as fastchat/llm_judge/gen_model_answer.py writes them, but batched.

Each question is a conversation in the format the model was tuned with: its chat template, or, for
a template-less base model tuned by train_sft.py, the same Alpaca prompt data_prep trained it on
(`--template auto` picks as the trainer does). Turn 2 sees the model's own turn-1 answer.
Sampling follows FastChat's per-category temperature (0 = greedy) with the top_k=50, top_p=1 that
its bare `generate(temperature=...)` call got from transformers' defaults; pinned here so a model's
own generation_config cannot change the benchmark. Questions are batched by
temperature and prompt length (left padding); the answer file is rewritten (atomically, sorted by
question id) after every batch, and a rerun skips the questions already answered.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import torch

from eval.common import atomic_write_jsonl
from eval.mt_bench_data import DEFAULT_TEMPERATURE, TEMPERATURE_CONFIG, answer_turns, load_answer_file


def temperature_for(category: str) -> float:
    return TEMPERATURE_CONFIG.get(category, DEFAULT_TEMPERATURE)


def generation_config(model, tokenizer, temperature: float, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    sample = temperature >= 1e-4   # FastChat's threshold
    extra = {"temperature": temperature, "top_k": 50, "top_p": 1.0} if sample else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id, **extra)


def prompt_ids(tokenizer, conversation: list[dict], template: str) -> list[int]:
    """Token ids that end where the model's next reply starts."""
    if template == "chat":  # the template writes its own specials
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    # Alpaca: exactly the training text before the reply (data_prep renders an empty reply + EOS)
    from data_prep.templates import render

    rendered = render(conversation + [{"role": "assistant", "content": ""}], tokenizer, "alpaca")
    text = rendered.text[: -len(tokenizer.eos_token)]
    return rendered.prefix_ids + tokenizer(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def generate(model, tokenizer, conversations: list[list[dict]], template: str, temperature: float,
             max_new_tokens: int, context: int, seed: int) -> list[str]:
    """One assistant reply per conversation, decoded without special tokens and stripped."""
    batch = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, c, template) for c in conversations]},
                          padding=True, return_tensors="pt")  # left padding: set by generate_answers
    longest = batch["input_ids"].shape[1]
    budget = min(max_new_tokens, context - longest)
    if budget < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the {context}-token context")
    if budget < max_new_tokens:
        print(f"warning: max_new_tokens cut to {budget} for a batch with a {longest}-token prompt")
    torch.manual_seed(seed)
    out = model.generate(**batch.to(model.device),
                         generation_config=generation_config(model, tokenizer, temperature, budget))
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, longest:]]


def plan_batches(questions: list[dict], tokenizer, batch_size: int) -> list[list[dict]]:
    """Same temperature within a batch (one sampling config per generate call), similar lengths."""
    groups: dict[float, list[dict]] = {}
    for q in questions:
        groups.setdefault(temperature_for(q["category"]), []).append(q)
    batches = []
    for temperature in sorted(groups):
        group = sorted(groups[temperature], key=lambda q: -len(tokenizer(q["turns"][0]).input_ids))
        batches += [group[i: i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def generate_answers(model, tokenizer, questions: list[dict], answer_file: str | Path, model_id: str,
                     template: str = "chat", max_new_tokens: int = 1024, batch_size: int = 8, seed: int = 0,
                     context: int = 4096, progress=None) -> dict[int, dict]:
    """Answer the questions not yet in `answer_file`; returns all answers by question id."""
    answers = load_answer_file(answer_file, tolerate_torn_tail=True) if Path(answer_file).exists() else {}
    todo = [q for q in questions
            if q["question_id"] not in answers or len(answer_turns(answers[q["question_id"]])) < len(q["turns"])]
    print(f"{len(questions)} questions, {len(questions) - len(todo)} already answered in {answer_file}, "
          f"{len(todo)} to generate")
    tokenizer.padding_side = "left"  # generation appends on the right: every row's prompt must end at the edge
    for batch in plan_batches(todo, tokenizer, batch_size):
        temperature = temperature_for(batch[0]["category"])
        conversations = [[] for _ in batch]
        turns = [[] for _ in batch]
        for t in range(max(len(q["turns"]) for q in batch)):
            live = [i for i, q in enumerate(batch) if t < len(q["turns"])]
            for i in live:
                conversations[i].append({"role": "user", "content": batch[i]["turns"][t]})
            replies = generate(model, tokenizer, [conversations[i] for i in live], template, temperature,
                               max_new_tokens, context, seed + 1000 * t + min(q["question_id"] for q in batch))
            for i, reply in zip(live, replies):
                conversations[i].append({"role": "assistant", "content": reply})
                turns[i].append(reply)
        for q, q_turns in zip(batch, turns):
            answers[q["question_id"]] = {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex,
                                         "model_id": model_id, "choices": [{"index": 0, "turns": q_turns}],
                                         "tstamp": time.time()}
        atomic_write_jsonl(answer_file, [answers[k] for k in sorted(answers)])
        if progress is not None:
            progress.update(len(batch))
    return answers
