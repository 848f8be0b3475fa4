"""data_prep: reading, validation with file/line messages, conversion of real samples, ShareGPT
cleaning and splitting, the converter commands."""
import json
import re
from pathlib import Path

import pytest

from data_prep import BUNDLED_ALPACA, DataError, Report, read_conversations
from data_prep import alpaca as alpaca_cli
from data_prep import sharegpt as sharegpt_cli
from data_prep.clean import html_to_markdown, split_conversation
from data_prep.conversation import normalize, rounds
from data_prep.formats import iter_conversations

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = BUNDLED_ALPACA.parent


class Collecting(Report):
    """A Report that also keeps every error (the real one keeps the first few per reason)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.errors = []

    def drop(self, err):
        self.errors.append(err)
        super().drop(err)


def roles(conv):
    return [m["role"] for m in conv["messages"]]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --- real samples ----------------------------------------------------------------------------------

def test_bundled_alpaca_and_sharegpt_samples():
    alpaca = read_conversations(BUNDLED_ALPACA, Report(strict=True))
    assert len(alpaca) == 999
    assert all(roles(c) == ["user", "assistant"] for c in alpaca)
    assert sum("input" in c["messages"][0] for c in alpaca) == 412

    sharegpt = read_conversations(SAMPLES / "sharegpt_dummy_conversation.json", Report(strict=True))
    assert len(sharegpt) == 500
    assert sorted(len(c["messages"]) for c in sharegpt) == [2] * 167 + [4] * 166 + [6] * 167
    assert all(roles(c) == ["user", "assistant"] * (len(c["messages"]) // 2) for c in sharegpt)
    assert sharegpt[0]["id"] == "identity_0" and sharegpt[0]["messages"][1]["content"].startswith("I am Vicuna")


def test_alpaca_record_becomes_one_round():
    records = json.loads((FIXTURES / "alpaca_en_demo_sample.json").read_text())
    convs = read_conversations(FIXTURES / "alpaca_en_demo_sample.json", Report(strict=True))
    assert len(convs) == 42
    with_input = next(i for i, r in enumerate(records) if r["input"])
    user, reply = convs[with_input]["messages"]
    record = records[with_input]
    assert user == {"role": "user", "content": record["instruction"] + "\n\n" + record["input"],
                    "instruction": record["instruction"], "input": record["input"]}
    assert reply == {"role": "assistant", "content": record["output"]}
    assert convs[0]["messages"][0] == {"role": "user", "content": records[0]["instruction"]}
    assert (convs[0]["id"], convs[0]["source"]) == ("alpaca_en_demo_sample-0", "alpaca_en_demo_sample.json")


def test_alpaca_cli_drops_the_duplicate_and_writes_unified_jsonl(tmp_path):
    out = tmp_path / "alpaca.jsonl"
    assert alpaca_cli.main([str(FIXTURES / "alpaca_en_demo_sample.json"), "-o", str(out)]) == 0
    written = read_jsonl(out)
    assert len(written) == 41  # records 40 and 41 are alpaca_en_demo's #92 and its duplicate #610
    assert all(set(r) == {"id", "messages", "source"} for r in written)
    assert all(set(m) == {"role", "content"} for r in written for m in r["messages"])
    summary = json.loads((tmp_path / "alpaca.summary.json").read_text())
    assert (summary["read"], summary["kept"], summary["dropped"]) == (42, 41, {"duplicate_content": 1})
    assert "alpaca_en_demo_sample.json:" in summary["examples"]["duplicate_content"][0]

    assert alpaca_cli.main([str(FIXTURES / "alpaca_en_demo_sample.json"), "-o", str(out),
                            "--keep_duplicates"]) == 0
    assert len(read_jsonl(out)) == 42


def test_sharegpt_cli_on_real_dummy_conversations(tmp_path):
    out = tmp_path / "dummy.jsonl"
    assert sharegpt_cli.main([str(FIXTURES / "sharegpt_dummy_conversation_sample.json"), "-o", str(out)]) == 0
    written = read_jsonl(out)
    source = json.loads((FIXTURES / "sharegpt_dummy_conversation_sample.json").read_text())
    assert [r["id"] for r in written] == [r["id"] for r in source]
    assert sum(len(r["messages"]) for r in written) == 160
    for record, conv in zip(source, written):
        assert [m["content"] for m in conv["messages"]] == [t["value"] for t in record["conversations"]]
        assert roles(conv) == ["user", "assistant"] * (len(record["conversations"]) // 2)
    summary = json.loads((tmp_path / "dummy.summary.json").read_text())
    assert (summary["read"], summary["kept"], summary["dropped"], summary["notes"]) == (40, 40, {}, {})


def test_sharegpt_tool_roles_are_dropped_unless_mapped(tmp_path):
    glaive = FIXTURES / "glaive_toolcall_en_demo_sample.json"
    out = tmp_path / "glaive.jsonl"
    assert sharegpt_cli.main([str(glaive), "-o", str(out)]) == 0
    summary = json.loads((tmp_path / "glaive.summary.json").read_text())
    # Record 6 of glaive_toolcall_en_demo repeats record 4's messages (their tool lists differ).
    assert (summary["read"], summary["kept"], summary["dropped"]) == (20, 11, {"unknown_role": 8,
                                                                               "duplicate_content": 1})
    assert "unknown role 'function_call'" in summary["examples"]["unknown_role"][0]

    assert sharegpt_cli.main([str(glaive), "-o", str(out), "--role_map", "function_call=assistant",
                              "observation=user"]) == 0
    written = read_jsonl(out)
    assert len(written) == 19
    # human, gpt, human, function_call, observation, gpt, human, gpt
    assert roles(written[0]) == ["user", "assistant"] * 4
    assert written[0]["messages"][3]["content"].startswith('{"name": "search_recipes"')


# --- ShareGPT cleaning -----------------------------------------------------------------------------

def test_sharegpt_cleaning_rules_on_hand_made_conversations(tmp_path):
    out = tmp_path / "messy.jsonl"
    assert sharegpt_cli.main([str(FIXTURES / "sharegpt_messy.json"), "-o", str(out), "--html_to_markdown"]) == 0
    convs = {r["id"]: r["messages"] for r in read_jsonl(out)}
    assert list(convs) == ["system-kept", "leading-gpt", "continued", "empty-turns", "trailing-human",
                           "aliases", "html", "long"]
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    assert convs["system-kept"] == [{"role": "system", "content": "You are terse."}, u("Hi"), a("Hello.")]
    assert convs["leading-gpt"] == [u("What is 3*3?"), a("9")]
    assert convs["continued"] == [u("Write a two-line poem."), a("Roses are red,\n\nviolets are blue.")]
    assert convs["empty-turns"] == [u("First question?\n\nAnyone there?"), a("Yes, sorry.")]
    assert convs["trailing-human"] == [u("Capital of France?"), a("Paris.")]
    assert convs["aliases"] == [u("Q1"), a("A1"), u("Q2"), a("A2"), u("Q3"), a("A3")]
    assert convs["html"] == [u("Show me **code**"), a("Here it is:\n\n```python\nsnake_case = 1\n```")]
    summary = json.loads((tmp_path / "messy.summary.json").read_text())
    assert summary["dropped"] == {"duplicate_content": 1, "duplicate_id": 1, "no_complete_round": 1,
                                  "unknown_role": 1}
    assert summary["notes"] == {"empty_turn_removed": 1, "leading_assistant_removed": 1, "merged_turns": 2,
                                "trailing_user_removed": 1}
    assert summary["examples"]["duplicate_id"] == [
        f"{FIXTURES / 'sharegpt_messy.json'}:171 (record 9): id 'system-kept' already seen"]


@pytest.mark.parametrize("html, markdown", [
    ("<p>Use <code>x_y</code> and <b>bold</b>.</p>", "Use `x_y` and **bold**."),
    ("1 / 2<p>Regenerated answer</p>", "Regenerated answer"),
    ("<h2>Plan</h2><ol><li>one</li><li>two</li></ol>", "## Plan\n\n1. one\n2. two"),
    ("<pre><div><span>bash</span><span>Copy code</span></div><div><code>ls -la\n</code></div></pre>",
     "```bash\nls -la\n```"),
    ("<p>Done.</p><p>Copy12 chars / 3 words</p>", "Done."),
])
def test_html_to_markdown(html, markdown):
    assert html_to_markdown(html) == markdown


def test_normalize_reports_changes_only_for_kept_conversations():
    report = Report()
    with pytest.raises(DataError, match="no user message followed by an assistant reply"):
        normalize([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello?"}], "x", report)
    assert not report.notes


# --- splitting -------------------------------------------------------------------------------------

def words(messages):
    """A transparent token counter for exact split expectations: one token per word."""
    return sum(len(m["content"].split()) for m in messages)


def conversation(*round_sizes, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for k, n in enumerate(round_sizes):
        messages += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": " ".join(["w"] * (n - 1))}]
    return {"id": "c", "messages": messages, "source": "test"}


def test_split_packs_whole_rounds_and_keeps_the_last():
    conv = conversation(4, 3, 5, 2, 9, 1)  # round sizes in words; budget 8
    report = Report()
    chunks = split_conversation(conv, 8, words, report)
    sizes = [[len(m["content"].split()) for m in c["messages"]] for c in chunks]
    assert sizes == [[1, 3, 1, 2], [1, 4, 1, 1], [1, 8], [1, 0]]  # 4+3 | 5+2 | 9 (alone, over) | 1
    assert [c["id"] for c in chunks] == ["c_0", "c_1", "c_2", "c_3"]
    assert dict(report.notes) == {"split_conversations": 1, "chunks_added": 3, "round_over_budget": 1}
    assert all(c["messages"][0]["role"] == "user" for c in chunks)
    assert [m for c in chunks for m in c["messages"]] == conv["messages"]


def test_split_repeats_the_system_message_and_leaves_short_ones_alone():
    conv = conversation(3, 3, 3, system="Be kind.")
    chunks = split_conversation(conv, 8, words, Report())  # 2 + 3 + 3 > 8: system counts too
    assert [roles(c) for c in chunks] == [["system", "user", "assistant", "user", "assistant"],
                                          ["system", "user", "assistant"]]
    assert [m for c in chunks for m in rounds(c["messages"])[1]] == rounds(conv["messages"])[1]
    assert split_conversation(conv, 100, words, Report()) == [conv]


def test_sharegpt_cli_splits_by_real_token_budget(tmp_path):
    from transformers import AutoTokenizer

    from data_prep.encode import encoded_length
    from common.modeling import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    source = json.loads((FIXTURES / "sharegpt_messy.json").read_text())
    original = next(r for r in source if r["id"] == "long")["conversations"]
    budget = 150
    out = tmp_path / "split.jsonl"
    assert sharegpt_cli.main([str(FIXTURES / "sharegpt_messy.json"), "-o", str(out), "--max_tokens", str(budget)]) == 0
    chunks = [r for r in read_jsonl(out) if r["id"].startswith("long_")]
    # Rounds alone encode to 66, 96, 126, 156 and 186 tokens (SmolLM2's default system prompt in each):
    # 66 + 96 fit together (141 tokens encoded), the last two exceed the budget alone.
    assert [len(c["messages"]) for c in chunks] == [4, 2, 2, 2]
    assert [m["content"] for c in chunks for m in c["messages"]] == [t["value"] for t in original]
    for chunk in chunks:
        assert chunk["messages"][0]["role"] == "user"
        length = encoded_length(chunk["messages"], tokenizer)
        assert length <= budget or len(chunk["messages"]) == 2
    assert chunks[-1]["messages"][-1]["content"] == original[-1]["value"]  # the final round is kept


# --- malformed input -------------------------------------------------------------------------------

MALFORMED_UNIFIED = [
    (2, "bad_json", "invalid JSON: Expecting ',' delimiter (column 66)"),
    (3, "not_object", "expected a JSON object, got an array"),
    (5, "missing_field", "missing field 'messages'"),
    (6, "wrong_type", "field 'messages[1].content': expected a string, got a number"),
    (7, "unknown_role", "field 'messages[1].role': unknown role 'bot' (expected one of system, user, assistant)"),
    (8, "not_utf8", "not valid UTF-8 (byte 0xe9 at byte 64 of the line)"),
    (9, "no_complete_round", "no user message followed by an assistant reply (after removing empty turns)"),
    (10, "system_not_first", "a system message may only be the first message"),
    (11, "wrong_type", "field 'messages[0]': expected an object, got a string"),
    (12, "wrong_type", "field 'messages': expected an array, got a string"),
    (13, "wrong_type", "field 'id': expected a string, got an object"),
]


def test_each_malformed_jsonl_line_is_reported_with_file_line_and_field():
    path = FIXTURES / "malformed_unified.jsonl"
    report = Collecting()
    kept = read_conversations(path, report)
    assert [c["id"] for c in kept] == ["ok-1", "ok-2"]
    assert [(str(e), e.reason) for e in report.errors] == [
        (f"{path}:{line}: {message}", reason) for line, reason, message in MALFORMED_UNIFIED]
    assert report.read == 13 and sum(report.dropped.values()) == 11 and report.dropped["wrong_type"] == 4


def test_strict_stops_at_the_first_bad_record():
    path = FIXTURES / "malformed_unified.jsonl"
    with pytest.raises(DataError) as err:
        read_conversations(path, Report(strict=True))
    assert (str(err.value), err.value.reason) == (f"{path}:2: " + MALFORMED_UNIFIED[0][2], "bad_json")


def test_malformed_json_array_names_line_and_record():
    path = FIXTURES / "malformed_alpaca.json"
    report = Collecting()
    kept = list(iter_conversations(path, report))
    assert [(where, c["id"], c["messages"][0]["content"]) for where, c in kept] == [
        (f"{path}:2 (record 0)", "malformed_alpaca-0", "Say hi."),
        (f"{path}:6 (record 4)", "malformed_alpaca-4", "A null input is no input.")]
    assert [str(e) for e in report.errors] == [
        f"{path}:3 (record 1): expected a JSON object, got a string",
        f"{path}:4 (record 2): missing field 'output'",
        f"{path}:5 (record 3): field 'instruction': expected a string, got an array",
        f"{path}:7 (record 5): missing field 'instruction' (this record looks like sharegpt data)",
        f"{path}:8 (record 6): no user message followed by an assistant reply (after removing empty turns)",
    ]


@pytest.mark.parametrize("name, message", [
    ("broken_array.json", ":4: invalid JSON: expected ',' or ']' after a record (column 3)"),
    ("not_utf8_array.json", ":3: not valid UTF-8 (byte 0xe9)"),
])
def test_unreadable_json_array_fails_even_when_not_strict(name, message):
    with pytest.raises(DataError, match="^" + re.escape(str(FIXTURES / name) + message)):
        read_conversations(FIXTURES / name, Report())


def test_cli_strict_failure_leaves_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    assert sharegpt_cli.main([str(FIXTURES / "malformed_unified.jsonl"), "-o", str(out), "--strict"]) == 1
    assert "malformed_unified.jsonl:1: missing field 'conversations' (this record looks like unified data)" \
        in capsys.readouterr().err
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file left behind
    assert alpaca_cli.main([str(tmp_path / "missing.json"), "-o", str(out)]) == 2


def test_hub_dataset_ids_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": "Add 2 and 3.", "input": None, "output": "5"}, {"instruction": "x"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = Collecting()
    convs = read_conversations("someone/some-alpaca", report, split="validation")
    assert calls == [("someone/some-alpaca", "validation")]
    assert [c["messages"][0]["content"] for c in convs] == ["Add 2 and 3."]
    assert (convs[0]["id"], convs[0]["source"]) == ("some-alpaca-0", "someone/some-alpaca")
    assert [str(e) for e in report.errors] == ["someone/some-alpaca[validation][1]: missing field 'output'"]
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_conversations("someone/missing.json", Report())
