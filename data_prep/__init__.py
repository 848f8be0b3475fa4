"""Training data for SIFT: Alpaca / ShareGPT / unified chat data → token ids with exact label masks.

For the trainer:

    from data_prep import BUNDLED_ALPACA, IGNORE_INDEX, collate, load_dataset_for_training
    samples, report = load_dataset_for_training(data_path, tokenizer, template="auto",
                                                max_length=model_max_length, strict=False)
    print(report.summary())                       # kept / dropped per reason / truncations
    batch = collate(samples[:4], tokenizer.pad_token_id)   # input_ids, attention_mask, labels

    encode_conversation(messages, tokenizer, template="auto", max_length=None)
        -> {"input_ids": [...], "labels": [...]} | None     # one conversation

Converters (unified JSONL `{"id", "messages": [{"role", "content"}], "source"}` out):

    python -m data_prep.alpaca IN... -o OUT.jsonl
    python -m data_prep.sharegpt IN... -o OUT.jsonl [--html_to_markdown] [--max_tokens N] ...

Files, one job each: records.py (JSON / JSONL / hub records with their location), formats.py
(Alpaca / ShareGPT / unified → conversations), conversation.py (canonical turns), clean.py
(HTML, duplicates, splitting), templates.py (chat template or Alpaca prompt → text + label spans),
encode.py (ids and labels in one pass, truncation), dataset.py (the trainer's loader and collate),
report.py (errors with file and line, drop counts), cli.py + alpaca.py + sharegpt.py (commands).
"""
from .dataset import BUNDLED_ALPACA, collate, load_dataset_for_training
from .encode import IGNORE_INDEX, encode_conversation
from .formats import read_conversations
from .report import DataError, Report
from .templates import PROMPT_DICT, TEMPLATES, resolve_template

__all__ = ["BUNDLED_ALPACA", "DataError", "IGNORE_INDEX", "PROMPT_DICT", "Report", "TEMPLATES", "collate",
           "encode_conversation", "load_dataset_for_training", "read_conversations", "resolve_template"]
