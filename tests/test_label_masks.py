"""Label masks: decoding the labelled tokens gives exactly the assistant replies (+ end of turn),
for the SmolLM2 ChatML template, a Llama-2 chat template and the Stanford Alpaca prompt; ids equal
the tokenizer's own tokenization of the rendered text; truncation keeps whole rounds."""
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaTokenizer

from data_prep import IGNORE_INDEX, PROMPT_DICT, collate, encode_conversation, load_dataset_for_training
from data_prep.encode import CUT_ROUND, DROPPED_ROUNDS, FULL, NO_LABEL, encode_with_status
from data_prep.templates import resolve_template
from common.modeling import embedded_model_dir

FIXTURES = Path(__file__).parent / "fixtures"

# meta-llama/Llama-2-7b-chat-hf's chat template: strips contents, BOS as text, " </s>" after replies.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

CONVERSATION = [
    {"role": "system", "content": "You answer in one short paragraph."},
    {"role": "user", "content": "What is the boiling point of water?"},
    {"role": "assistant", "content": "It is 100 degrees Celsius at sea level.\n\nLower on mountains."},
    {"role": "user", "content": "And in Fahrenheit? Use <b>bold</b> if you like."},
    {"role": "assistant", "content": "That is **212 °F** 🌡️ (same pressure)."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory):
    """A template-less LLaMA tokenizer: a 500-piece BPE sentencepiece model trained here, BOS added."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    records = json.loads((FIXTURES / "alpaca_en_demo_sample.json").read_text())
    (root / "corpus.txt").write_text("\n".join(r["instruction"] + "\n" + r["output"] for r in records))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=500, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return LlamaTokenizer.from_pretrained(str(root), add_bos_token=True)


def labelled_runs(sample: dict) -> list[list[int]]:
    """Maximal runs of consecutive labelled tokens; labels must equal the ids where set."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def first_label(sample: dict) -> int:
    return next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)


def decoded_runs(tokenizer, sample: dict) -> list[str]:
    return [tokenizer.decode(run) for run in labelled_runs(sample)]


# --- chat template -------------------------------------------------------------------------------

def test_chatml_labels_are_exactly_the_replies_plus_im_end(smol):
    sample = encode_conversation(CONVERSATION, smol, "chat")
    assert sample["input_ids"] == smol.apply_chat_template(CONVERSATION)["input_ids"]
    assert decoded_runs(smol, sample) == [reply + "<|im_end|>" for reply in REPLIES]


def test_chatml_injected_default_system_prompt_is_not_labelled(smol):
    messages = CONVERSATION[1:3]
    sample = encode_conversation(messages, smol, "auto")
    text = smol.apply_chat_template(messages, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template adds it
    assert sample["input_ids"] == smol(text, add_special_tokens=False)["input_ids"]
    assert decoded_runs(smol, sample) == [REPLIES[0] + "<|im_end|>"]
    # Everything before the reply is context: the first label is the reply's first token.
    assert smol.decode(sample["input_ids"][:first_label(sample)]).endswith("<|im_start|>assistant\n")


def test_llama2_chat_template_trimmed_replies_and_eos(spm_llama):
    tokenizer = spm_llama
    tokenizer.chat_template = LLAMA2_TEMPLATE
    try:
        sample = encode_conversation(CONVERSATION, tokenizer, "chat")
        assert sample["input_ids"] == tokenizer.apply_chat_template(CONVERSATION)["input_ids"]
        # The template renders " {content.strip()} </s>": the reply, the space before EOS, and EOS.
        assert decoded_runs(tokenizer, sample) == [reply.strip() + " </s>" for reply in REPLIES]
    finally:
        tokenizer.chat_template = None


def test_reply_text_that_also_occurs_in_the_turn_markup(smol):
    """A template with a plain-text header and no generation prompt: the reply "ass" also occurs
    in "<|assistant|>"; the label must still start at the reply, not inside the header."""
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
                               "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "Say ass."}, {"role": "assistant", "content": "ass"},
                {"role": "user", "content": "Now sis."}, {"role": "assistant", "content": "sis"}]
    sample = encode_conversation(messages, tokenizer, "chat")
    assert sample["input_ids"] == tokenizer.apply_chat_template(messages)["input_ids"]
    assert decoded_runs(tokenizer, sample) == ["ass<|im_end|>", "sis<|im_end|>"]


def test_template_that_rewrites_earlier_turns_is_refused(smol):
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{% if loop.last %} [END]{% endif %}\n{% endfor %}")
    with pytest.raises(ValueError, match=r"not prefix-stable: messages\[:1\]"):
        encode_conversation(CONVERSATION[1:5], tokenizer, "chat")


def test_conversation_refused_by_the_template_is_counted(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + tokenizer.chat_template)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": CONVERSATION[1:]}) + "\n")
    samples, report = load_dataset_for_training(path, tokenizer)
    assert (len(samples), dict(report.dropped)) == (1, {"template_error": 1})
    assert report.examples["template_error"] == [
        f"{path}:1: the chat template refused the conversation: System role not supported"]


def test_offsets_free_fallback_matches_on_chatml(smol):
    class NoOffsets:
        """The SmolLM2 tokenizer seen as a slow tokenizer: no offsets, so tokenized span by span."""
        is_fast = False

        def __getattr__(self, name):
            return getattr(smol, name)

        def __call__(self, *args, **kwargs):
            return smol(*args, **kwargs)

    assert encode_conversation(CONVERSATION, NoOffsets(), "chat") == encode_conversation(CONVERSATION, smol, "chat")


# --- Alpaca prompt -------------------------------------------------------------------------------

def test_alpaca_single_turn_is_stanford_exactly(spm_llama):
    record = {"instruction": "Rewrite the sentence.", "input": "the cat sat", "output": "The cat sat down."}
    messages = [{"role": "user", "content": "Rewrite the sentence.\n\nthe cat sat",
                 "instruction": record["instruction"], "input": record["input"]},
                {"role": "assistant", "content": record["output"]}]
    assert resolve_template(spm_llama, "auto") == "alpaca"
    sample = encode_conversation(messages, spm_llama, "auto")
    source = PROMPT_DICT["prompt_input"].format_map(record)
    # stanford_alpaca train.py: tokenizer(source + output + eos) with BOS, first len(source) masked.
    assert sample["input_ids"] == spm_llama(source + record["output"] + "</s>")["input_ids"]
    assert sample["input_ids"][0] == spm_llama.bos_token_id
    assert decoded_runs(spm_llama, sample) == ["The cat sat down.</s>"]
    assert spm_llama.decode(sample["input_ids"][1:first_label(sample)]) == source


def test_alpaca_multi_turn_rule_and_labels(spm_llama):
    messages = [m for m in CONVERSATION if m["role"] != "system"]
    sample = encode_conversation(messages, spm_llama, "alpaca")
    text = (PROMPT_DICT["prompt_no_input"].format(instruction=messages[0]["content"]) + REPLIES[0] + "</s>"
            + "\n\n### Instruction:\n" + messages[2]["content"] + "\n\n### Response:" + REPLIES[1] + "</s>"
            + "\n\n### Instruction:\n" + messages[4]["content"] + "\n\n### Response:" + REPLIES[2] + "</s>")
    assert sample["input_ids"] == spm_llama(text)["input_ids"]
    assert decoded_runs(spm_llama, sample) == [reply + "</s>" for reply in REPLIES]


def test_alpaca_system_message_replaces_the_preamble(smol):
    sample = encode_conversation(CONVERSATION[:3], smol, "alpaca")
    text = smol.decode(sample["input_ids"])
    assert text.startswith("You answer in one short paragraph.\n\n### Instruction:\nWhat is the boiling")
    assert decoded_runs(smol, sample) == [REPLIES[0] + smol.eos_token]


# --- truncation ----------------------------------------------------------------------------------

def test_truncation_keeps_whole_rounds_then_cuts_then_drops(smol):
    full = encode_conversation(CONVERSATION, smol, "chat")
    two = encode_conversation(CONVERSATION[:5], smol, "chat")
    one = encode_conversation(CONVERSATION[:3], smol, "chat")
    assert len(one["input_ids"]) < len(two["input_ids"]) < len(full["input_ids"])

    sample, status = encode_with_status(CONVERSATION, smol, "chat", max_length=len(full["input_ids"]))
    assert (sample, status) == (full, FULL)
    for budget, expected in [(len(full["input_ids"]) - 1, two), (len(two["input_ids"]), two),
                             (len(two["input_ids"]) - 1, one), (len(one["input_ids"]), one)]:
        sample, status = encode_with_status(CONVERSATION, smol, "chat", max_length=budget)
        assert (sample, status) == (expected, DROPPED_ROUNDS), budget

    prompt = first_label(one)
    sample, status = encode_with_status(CONVERSATION, smol, "chat", max_length=prompt + 3)
    assert status == CUT_ROUND
    assert sample["input_ids"] == full["input_ids"][:prompt + 3]
    assert decoded_runs(smol, sample) == [smol.decode(one["input_ids"][prompt:prompt + 3])]

    for budget in (prompt, 1):
        assert encode_with_status(CONVERSATION, smol, "chat", max_length=budget) == (None, NO_LABEL)
        assert encode_conversation(CONVERSATION, smol, "chat", max_length=budget) is None


def test_loader_counts_truncations_and_label_less_samples(smol, tmp_path):
    long_reply = "word " * 200
    conversations = [
        {"id": "short", "messages": CONVERSATION[1:3]},
        {"id": "three-rounds", "messages": CONVERSATION},
        {"id": "long-prompt", "messages": [{"role": "user", "content": long_reply},
                                           {"role": "assistant", "content": "ok"}]},
        {"id": "long-reply", "messages": [{"role": "user", "content": "Say word a lot."},
                                          {"role": "assistant", "content": long_reply}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    samples, report = load_dataset_for_training(path, smol, max_length=96)
    assert (report.read, report.kept, dict(report.dropped)) == (4, 3, {NO_LABEL: 1})
    assert dict(report.notes) == {DROPPED_ROUNDS: 1, CUT_ROUND: 1}
    assert f"{path}:3" in report.examples[NO_LABEL][0]
    assert all(len(s["input_ids"]) <= 96 and any(label != IGNORE_INDEX for label in s["labels"]) for s in samples)
    assert decoded_runs(smol, samples[1]) == [reply + "<|im_end|>" for reply in REPLIES[:2]]  # 93 of 110
    with pytest.raises(Exception, match=r"data.jsonl:3: no assistant token left within max_length=96"):
        load_dataset_for_training(path, smol, max_length=96, strict=True)


# --- loader and collate on real data ---------------------------------------------------------------

def test_loader_on_real_alpaca_with_sentencepiece(spm_llama):
    samples, report = load_dataset_for_training(FIXTURES / "alpaca_en_demo_sample.json", spm_llama,
                                                max_length=None)
    records = json.loads((FIXTURES / "alpaca_en_demo_sample.json").read_text())
    # record 41 repeats record 40: the loader drops it (it could straddle a train / held-out split)
    assert (report.read, report.kept, len(samples)) == (42, 41, 41)
    assert report.dropped == {"duplicate_content": 1}
    for record, sample in zip(records[:41], samples):
        prompt = PROMPT_DICT["prompt_input" if record["input"] else "prompt_no_input"].format_map(record)
        assert sample["input_ids"] == spm_llama(prompt + record["output"] + "</s>")["input_ids"]
        assert len(labelled_runs(sample)) == 1


def test_collate_right_pads_with_ignored_labels(smol):
    samples = [encode_conversation(CONVERSATION[:3], smol), encode_conversation(CONVERSATION, smol)]
    batch = collate(samples, pad_token_id=smol.pad_token_id)
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, width) for k in
                                                             ("input_ids", "attention_mask", "labels")}
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0].tolist() == samples[0]["input_ids"] + [smol.pad_token_id] * (width - lengths[0])
    assert batch["labels"][0].tolist() == samples[0]["labels"] + [IGNORE_INDEX] * (width - lengths[0])
    assert batch["labels"][1].tolist() == samples[1]["labels"]
    assert collate(samples, 0, pad_to_multiple_of=64)["input_ids"].shape[1] == -(-width // 64) * 64
