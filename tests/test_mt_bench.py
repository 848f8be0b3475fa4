"""eval/mt_bench.py: FastChat-format answers and judgments, the judge's parse rules, retries, resume
and `show` averages. The judge is a real HTTP server on 127.0.0.1 speaking the OpenAI chat-
completions protocol; what it replies is steered by markers the test plants in the answers."""
import json
import os
import re
import threading
from collections import Counter
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval import mt_bench  # noqa: E402
from eval.judge_client import ChatClient, JudgeAPIError, JudgeConfigError  # noqa: E402
from eval.mt_bench_data import DEFAULT_JUDGE_FILE, DEFAULT_QUESTION_FILE, DEFAULT_REF_ANSWER_FILE  # noqa: E402
from eval.mt_bench_judge import parse_rating  # noqa: E402
from test_mmlu import one_thread, sentencepiece_tokenizer, smollm2_tokenizer, tiny_model_dir  # noqa: E402,F401

KEY = "sk-test-secret-0123456789"
QUESTION_IDS = (81, 101, 111, 151)  # writing, reasoning (reference), math (reference), humanities


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ----------------------------------------------------------------------------- the judge server

ODD_KEY = 'sk-pr/oj"Q\\x-0123456789abcdefABCDEF/=+'  # every character JSON, URLs or HTML may escape


def spellings(key: str) -> list[str]:
    """The key as servers and libraries may print it: JSON (with \\/ too), \\uXXXX, doubly escaped
    JSON, URL-encoded, HTML entities, a Python repr."""
    import html
    import urllib.parse

    as_json = json.dumps(key)[1:-1]
    return [as_json, as_json.replace("/", "\\/"), "".join(f"\\u{ord(c):04x}" for c in key),
            json.dumps(as_json)[1:-1], urllib.parse.quote(key, safe=""), html.escape(key),
            "".join(f"&#{ord(c)};" for c in key), repr(key.encode())]


def leaky_reply(kind: str, key: str, ok):
    """A judge handing the key back, escaped every way: in the reply the judgment file keeps (ECHO),
    in an error body that is retried and then recorded (LEAK500), across the 300-byte cut of an error
    detail (LEAK401)."""
    if kind == "ECHO":
        return ok("Rating: [[5]] " + " ".join(spellings(key)))
    if kind == "LEAK500":
        return 500, ("oops " + " ".join(spellings(key))).encode(), ()
    return 401, ("x" * 280 + json.dumps(key)[1:-1]).encode(), ()


def key_leaks(text: str, key: str = ODD_KEY) -> list[str]:
    """Runs of 8 characters of `key` in `text` read through the standard library's own decoders
    (an implementation independent of the client's): repeated unicode_escape, URL and HTML
    unescaping, backslashes dropped."""
    import codecs
    import html
    import urllib.parse

    readings, frontier = {text}, {text}
    for _ in range(3):
        frontier = {f(t) for t in frontier for f in (
            html.unescape, urllib.parse.unquote,
            lambda t: codecs.decode(t.encode("utf-8", "backslashreplace"), "unicode_escape", "ignore"))}
        readings |= frontier
    flat = [r.replace("\\", "") for r in readings]
    bare = key.replace("\\", "")
    grams = {bare[i: i + 8] for i in range(len(bare) - 7)}
    return sorted({g for g in grams for r in flat if g in r})

class JudgeServer:
    """OpenAI-compatible /v1/chat/completions. The last `<<KIND[:N]>>` marker in the user message
    picks the reply; every request is recorded, and in-flight requests are counted."""

    def __init__(self):
        self.requests, self.calls, self.lock = [], Counter(), threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.down = True
        self.key = KEY                   # the key it accepts, and the one the LEAK markers spell out
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, payload, headers=()):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                threading.Event().wait(0.03)  # keep requests overlapping, so concurrency is observable
                status, payload, headers = self.answer(body)
                with server.lock:  # before replying: the client may send its next request at once
                    server.in_flight -= 1
                self.reply(status, payload, headers)

            def answer(self, body):
                if self.path != "/v1/chat/completions":
                    return 404, {"error": {"message": "no such route"}}, ()
                if self.headers.get("Authorization") != f"Bearer {server.key}":
                    return 401, {"error": {"message": "Incorrect API key provided: sk-te***789"}}, ()
                user = body["messages"][-1]["content"]
                kind, arg = (re.findall(r"<<(\w+)(?::(\d+))?>>", user) or [("R", "5")])[-1]
                with server.lock:
                    server.calls[user] += 1
                    n = server.calls[user]

                def ok(text):
                    return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]}, ()
                error = {"error": {"message": kind.lower()}}
                if kind == "R":
                    return ok(f"The response is adequate.\n\nRating: [[{arg}]]")
                if kind == "BACKUP":
                    return ok(f"Rating: [{arg}]")
                if kind == "FIRST":
                    return ok("Rating: [[3]]. Had it been complete it would earn [[9]].")
                if kind == "NONE":
                    return ok("I will not give this a number.")
                if kind == "FLAKY":
                    return (500, error, ()) if n <= 2 else ok("[[6]]")
                if kind == "RATE":
                    return (429, error, [("Retry-After", arg or "0")]) if n == 1 else ok("Rating: [[8]]")
                if kind == "DOWN":
                    return (503, error, ()) if server.down else ok("Rating: [[2]]")
                if kind == "BAD":
                    return 400, {"error": {"message": "context length exceeded"}}, ()
                if kind == "MALFORMED":
                    return (200, b"<html>gateway</html>", ()) if n == 1 else ok("Rating: [[4]]")
                if kind == "GARBAGE":
                    return 200, b"<html>gateway</html>", ()
                if kind in ("ECHO", "LEAK500", "LEAK401"):
                    return leaky_reply(kind, server.key, ok)
                raise AssertionError(kind)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = JudgeServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


# ----------------------------------------------------------------------------- a bench directory

ANSWERS = {  # model -> question id -> (turn 1, turn 2); markers steer the judge server
    "alpha": {81: ("<<R:7>>", "<<R:9>>"), 101: ("<<BACKUP:4>>", "<<FIRST>>"), 111: ("<<NONE>>", "<<FLAKY>>"),
              151: ("<<RATE>>", "<<R:10>>")},
    "beta": {81: ("<<DOWN>>", "<<R:1>>"), 101: ("<<R:5>>", "<<MALFORMED>>"), 111: ("<<R:3>>", "<<BAD>>"),
             151: ("<<R:6>>", "<<R:2>>")},
}


@pytest.fixture
def bench(tmp_path):
    questions = [q for q in _jsonl(DEFAULT_QUESTION_FILE) if q["question_id"] in QUESTION_IDS]
    _write_jsonl(tmp_path / "question.jsonl", questions)
    for model, rows in ANSWERS.items():
        _write_jsonl(tmp_path / "model_answer" / f"{model}.jsonl",
                     [{"question_id": qid, "answer_id": f"{model}{qid}", "model_id": model,
                       "choices": [{"index": 0, "turns": [f"My answer. {t1}", f"Second answer. {t2}"]}],
                       "tstamp": 1.0} for qid, (t1, t2) in rows.items()])
    return tmp_path


def _judge(bench, url, *extra):
    return mt_bench.main(["judge", "--judge_model", "judge-x", "--judge_base_url", url, "--judge_api_key_env",
                          "SIFT_TEST_JUDGE_KEY", "--output_dir", str(bench), "--question_file",
                          str(bench / "question.jsonl"), "--parallel", "2", "--max_retries", "2",
                          "--retry_base_delay", "0.001", "--retry_max_delay", "0.01", *extra])


# ----------------------------------------------------------------------------- tests

def test_parse_rating_follows_fastchat():
    assert parse_rating("Rating: [[7]]") == 7
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("Rating: [3]") == 3                               # single-bracket fallback
    assert parse_rating("first [[2]] then [[9]]") == 2                    # first match wins
    assert parse_rating("see [1] ... final [[5]]") == 5                   # [[x]] preferred over an earlier [x]
    assert parse_rating("no number here") == -1
    assert parse_rating("[[ten]]") == -1


def test_judge_writes_fastchat_judgments_with_parse_rules_retries_and_resume(bench, judge_server, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", KEY)
    assert _judge(bench, judge_server.url) == 1                           # API failures remain -> non-zero
    out_file = bench / "model_judgment" / "judge-x_single.jsonl"
    rows = _jsonl(out_file)
    assert len(rows) == 16                                                # 2 models x 4 questions x 2 turns
    by = {(r["model"], r["question_id"], r["turn"]): r for r in rows}
    expected = {("alpha", 81, 1): 7, ("alpha", 101, 1): 4, ("alpha", 111, 1): -1, ("alpha", 151, 1): 8,
                ("alpha", 81, 2): 9, ("alpha", 101, 2): 3, ("alpha", 111, 2): 6, ("alpha", 151, 2): 10,
                ("beta", 81, 1): -1, ("beta", 101, 1): 5, ("beta", 111, 1): 3, ("beta", 151, 1): 6,
                ("beta", 81, 2): 1, ("beta", 101, 2): 4, ("beta", 111, 2): -1, ("beta", 151, 2): 2}
    assert {k: r["score"] for k, r in by.items()} == expected
    fields = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    assert all(set(r) == fields for k, r in by.items() if k not in {("beta", 81, 1), ("beta", 111, 2)})
    assert by["alpha", 111, 1]["judgment"] == "I will not give this a number."   # unparseable: kept, -1
    for k in (("beta", 81, 1), ("beta", 111, 2)):                          # API failures: FastChat's marker
        assert by[k]["judgment"] == "$ERROR$" and by[k]["score"] == -1 and "HTTP" in by[k]["error"]
    # judge prompts: general vs reference-based, single vs multi-turn, formatted as FastChat does
    prompts = {p["name"]: p for p in _jsonl(DEFAULT_JUDGE_FILE)}
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(DEFAULT_REF_ANSWER_FILE)}
    questions = {q["question_id"]: q["turns"] for q in _jsonl(bench / "question.jsonl")}
    assert by["alpha", 81, 1]["judge"] == ["judge-x", "single-v1"]
    assert by["alpha", 111, 1]["judge"] == ["judge-x", "single-math-v1"]
    assert by["alpha", 151, 2]["judge"] == ["judge-x", "single-v1-multi-turn"]
    assert by["alpha", 101, 2]["judge"] == ["judge-x", "single-math-v1-multi-turn"]
    assert by["alpha", 111, 1]["user_prompt"] == prompts["single-math-v1"]["prompt_template"].format(
        question=questions[111][0], answer="My answer. <<NONE>>", ref_answer_1=refs[111][0])
    assert by["beta", 101, 2]["user_prompt"] == prompts["single-math-v1-multi-turn"]["prompt_template"].format(
        question_1=questions[101][0], question_2=questions[101][1], answer_1="My answer. <<R:5>>",
        answer_2="Second answer. <<MALFORMED>>", ref_answer_1=refs[101][0], ref_answer_2=refs[101][1])
    # the wire: system + user message, temperature 0, FastChat's max_tokens, bearer key, concurrency cap
    calls = judge_server.requests
    assert all(c["temperature"] == 0 and c["max_tokens"] == 2048 and c["model"] == "judge-x" for c in calls)
    assert all(c["auth"] == f"Bearer {KEY}" and c["path"] == "/v1/chat/completions" for c in calls)
    first = next(c for c in calls if "<<R:7>>" in c["messages"][1]["content"])
    assert first["messages"][0] == {"role": "system", "content": prompts["single-v1"]["system_prompt"]}
    assert judge_server.max_in_flight == 2
    count = Counter(re.findall(r"<<(\w+)", c["messages"][1]["content"])[-1] for c in calls)
    assert count["FLAKY"] == 3 and count["RATE"] == 2 and count["MALFORMED"] == 2  # retried, then succeeded
    assert count["DOWN"] == 3 and count["BAD"] == 1                      # 1 + max_retries; a 400 is final

    # resume: only the two API failures are asked again; the DOWN one now succeeds, the 400 fails again
    judge_server.down, before = False, len(calls)
    assert _judge(bench, judge_server.url) == 1
    assert len(judge_server.requests) - before == 2
    again = {(r["model"], r["question_id"], r["turn"]): r for r in _jsonl(out_file)}
    assert again["beta", 81, 1]["score"] == 2 and again["beta", 111, 2]["score"] == -1
    assert all(again[k] == by[k] for k in by if k not in {("beta", 81, 1), ("beta", 111, 2)})  # untouched

    # a crash mid-append leaves a torn last line: it is dropped on resume and its judgment redone
    with open(out_file, "a", encoding="utf-8") as f:
        f.write('{"question_id": 81, "model": "al')
    _judge(bench, judge_server.url)
    assert len(_jsonl(out_file)) == 16
    # the key is never printed nor written
    assert KEY not in capsys.readouterr().out
    assert all(KEY not in p.read_text(encoding="utf-8") for p in bench.rglob("*") if p.is_file())


def test_judge_stops_at_once_on_a_rejected_key(bench, judge_server, monkeypatch):
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", "sk-wrong")
    with pytest.raises(JudgeConfigError, match="HTTP 401") as e:
        _judge(bench, judge_server.url)
    assert "sk-wrong" not in str(e.value)
    prompts = [c["messages"][1]["content"] for c in judge_server.requests]
    assert len(set(prompts)) == len(prompts) <= 4                          # no retries; the queue is cancelled


def test_judge_refuses_answers_with_missing_turns(bench, judge_server):
    _write_jsonl(bench / "model_answer" / "gamma.jsonl",
                 [{"question_id": 81, "answer_id": "g", "model_id": "gamma",
                   "choices": [{"index": 0, "turns": ["only one turn"]}], "tstamp": 1.0}])
    with pytest.raises(ValueError) as e:
        _judge(bench, judge_server.url)
    assert "model gamma: question 81 has 1 answer turn(s)" in str(e.value)
    assert judge_server.requests == []


def test_judge_judges_a_partial_answer_file_and_subsets_agree_across_commands(bench, judge_server, monkeypatch,
                                                                             capsys):
    # changed contract: questions a model has not answered yet are not an error, they are not judged
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", KEY)
    _write_jsonl(bench / "model_answer" / "gamma.jsonl",
                 [{"question_id": 81, "answer_id": "g", "model_id": "gamma",
                   "choices": [{"index": 0, "turns": ["One. <<R:8>>", "Two. <<R:6>>"]}], "tstamp": 1.0}])
    assert _judge(bench, judge_server.url, "--model_list", "gamma") == 0
    assert "model gamma answered 1 of the 4 questions; judging those" in capsys.readouterr().out
    rows = _jsonl(bench / "model_judgment" / "judge-x_single.jsonl")
    assert sorted((r["model"], r["question_id"], r["turn"], r["score"]) for r in rows) == \
        [("gamma", 81, 1, 8), ("gamma", 81, 2, 6)]
    # gen, judge and show take the same --question_begin / --question_end
    for command in ("gen", "judge", "show"):
        names = {f.name for f in fields(mt_bench.COMMANDS[command][0])}
        assert {"question_begin", "question_end"} <= names and "first_n" not in names, command
    assert _judge(bench, judge_server.url, "--model_list", "alpha", "--question_begin", "1",
                  "--question_end", "2") == 0  # question 101 only
    assert mt_bench.main(["show", "--judge_model", "judge-x", "--output_dir", str(bench), "--no_plot",
                          "--question_file", str(bench / "question.jsonl"), "--question_end", "1"]) == 0
    shown = json.loads((bench / "mt_bench_results.json").read_text())["models"]
    assert set(shown) == {"gamma"} and shown["gamma"]["num_judgments"] == 2


@pytest.mark.parametrize("bad", [KEY + "\n", " " + KEY, KEY[:5] + "\t" + KEY[5:], KEY + "\x1b"])
def test_judge_key_with_whitespace_or_control_characters_is_refused_before_any_request(bench, judge_server,
                                                                                      monkeypatch, bad):
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", bad)
    with pytest.raises(SystemExit) as e:
        _judge(bench, judge_server.url)
    assert e.value.code == 2 and "$SIFT_TEST_JUDGE_KEY: the API key contains whitespace or control" in str(e.value)
    assert KEY not in str(e.value) and judge_server.requests == []
    with pytest.raises(ValueError, match="whitespace or control"):
        ChatClient(judge_server.url, "judge-x", bad)


def test_every_stored_error_is_redacted_of_the_key_whatever_raised_it(bench, judge_server):
    from eval.mt_bench_judge import judge_one, make_matches
    from eval.mt_bench_data import load_answer_file, load_judge_prompts, load_model_answers, load_questions

    questions = load_questions(bench / "question.jsonl")[:1]
    matches = make_matches(questions, load_model_answers(bench / "model_answer", ["alpha"]),
                           load_judge_prompts(DEFAULT_JUDGE_FILE), load_answer_file(DEFAULT_REF_ANSWER_FILE))
    client = ChatClient(judge_server.url, "judge-x", KEY, max_retries=0)
    client.api_key = KEY + "\n"  # past the check: what http.client does with it (its header error quotes it)
    row = judge_one(client, matches[0], 16)
    assert row["judgment"] == "$ERROR$" and "Invalid header value" in row["error"]
    assert KEY not in row["error"] and "<redacted>" in row["error"]

    class Leaky(ChatClient):  # any exception, whatever its type, that quotes the key
        def _post(self, body):
            raise RuntimeError(f"proxy said: bad credentials {self.api_key!r} / {self.api_key.encode()!r}")

    row = judge_one(Leaky(judge_server.url, "judge-x", KEY, max_retries=0), matches[0], 16)
    assert "RuntimeError" in row["error"] and KEY not in row["error"]


def test_client_honours_retry_after_and_backs_off(judge_server):
    delays = []
    client = ChatClient(judge_server.url, "judge-x", KEY, max_retries=3, base_delay=1.0, max_delay=30.0,
                        sleep=delays.append)
    assert client.complete([{"role": "user", "content": "<<RATE:7>>"}]) == "Rating: [[8]]"
    assert delays == [7.0]                                                   # the server's Retry-After
    delays.clear()
    assert client.complete([{"role": "user", "content": "<<FLAKY>>"}]) == "[[6]]"
    assert len(delays) == 2 and 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # exponential, jittered
    assert KEY not in repr(client)


def test_show_reports_turn_overall_category_averages_and_failures(bench, judge_server, monkeypatch, capsys):
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", KEY)
    _judge(bench, judge_server.url)
    capsys.readouterr()
    assert mt_bench.main(["show", "--judge_model", "judge-x", "--output_dir", str(bench),
                          "--question_file", str(bench / "question.jsonl")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((bench / "mt_bench_results.json").read_text())["models"]
    alpha, beta = result["alpha"], result["beta"]
    assert (alpha["turn_1"], alpha["turn_2"], alpha["overall"]) == (round(19 / 3, 4), 7.0, round(47 / 7, 4))
    assert (beta["turn_1"], beta["turn_2"], beta["overall"]) == (round(14 / 3, 4), round(7 / 3, 4), 3.5)
    assert alpha["categories"] == {"writing": 8.0, "reasoning": 3.5, "math": 6.0, "humanities": 9.0}
    assert beta["categories"] == {"writing": 1.0, "reasoning": 4.5, "math": 3.0, "humanities": 4.0}
    assert (alpha["num_failed"], alpha["num_unparseable"], alpha["num_api_errors"]) == (1, 1, 0)
    assert (beta["num_failed"], beta["num_unparseable"], beta["num_api_errors"]) == (2, 0, 2)
    assert "alpha" in printed and "6.714" in printed and "(2 / 0)" in printed
    for png in ("mt_bench_radar.png", "mt_bench_scores.png"):
        assert (bench / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), smollm2_tokenizer(), seed=1)


def test_gen_writes_fastchat_answers_conditioned_on_own_turn_one_and_resumes(tmp_path, tiny_chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = [q for q in _jsonl(DEFAULT_QUESTION_FILE) if q["question_id"] in (81, 101, 111)]
    _write_jsonl(tmp_path / "q.jsonl", questions)
    argv = ["gen", "--model", tiny_chat_model, "--model_id", "tiny", "--output_dir", str(tmp_path / "bench"),
            "--question_file", str(tmp_path / "q.jsonl"), "--max_new_tokens", "6", "--batch_size", "2"]
    assert mt_bench.main(argv) == 0
    answer_file = tmp_path / "bench" / "model_answer" / "tiny.jsonl"
    rows = _jsonl(answer_file)
    assert [r["question_id"] for r in rows] == [81, 101, 111]
    for r in rows:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and r["model_id"] == "tiny"
        assert r["choices"][0]["index"] == 0 and len(r["choices"][0]["turns"]) == 2

    # greedy categories (reasoning, math): the same text as an unbatched generate over the conversation
    # that carries the model's own turn-1 answer
    tok, model = AutoTokenizer.from_pretrained(tiny_chat_model), AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    for r, q in zip(rows[1:], questions[1:]):
        conversation, turns = [], []
        for turn in q["turns"]:
            conversation.append({"role": "user", "content": turn})
            ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
            turns.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
            conversation.append({"role": "assistant", "content": turns[-1]})
        assert r["choices"][0]["turns"] == turns

    # resume: nothing to do on a rerun; a lost row is regenerated, the others keep their answer ids
    before = {r["question_id"]: r["answer_id"] for r in rows}
    _write_jsonl(answer_file, [r for r in rows if r["question_id"] != 101])
    assert mt_bench.main(argv) == 0
    after = {r["question_id"]: r["answer_id"] for r in _jsonl(answer_file)}
    assert after[81] == before[81] and after[111] == before[111] and after[101] != before[101]


def test_gen_uses_the_alpaca_prompt_for_a_template_less_model(tmp_path):
    """A base model tuned on Alpaca data (no chat template) is asked in the training format, BOS and all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir(tmp_path / "sp", sentencepiece_tokenizer(tmp_path))
    q = next(q for q in _jsonl(DEFAULT_QUESTION_FILE) if q["question_id"] == 111)  # math: greedy
    _write_jsonl(tmp_path / "q.jsonl", [q])
    argv = ["gen", "--model", model_dir, "--output_dir", str(tmp_path / "b"), "--question_file",
            str(tmp_path / "q.jsonl"), "--max_new_tokens", "5", "--model_id", "sp"]
    with pytest.raises(ValueError, match="has none"):
        mt_bench.main(argv + ["--template", "chat"])
    assert mt_bench.main(argv) == 0  # auto -> alpaca
    [row] = _jsonl(tmp_path / "b" / "model_answer" / "sp.jsonl")
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n")
    text, turns = preamble, []
    for turn in q["turns"]:
        text += f"### Instruction:\n{turn}\n\n### Response:"
        ids = tok(text, return_tensors="pt").input_ids
        assert ids[0, 0] == tok.bos_token_id
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=tok.eos_token_id)
        turns.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        text += turns[-1] + tok.eos_token + "\n\n"
    assert row["choices"][0]["turns"] == turns


# ----------------------------------------------------------------------------- an adversarial judge

def _bench_files(bench):
    return {p: p.read_text(encoding="utf-8", errors="replace") for p in bench.rglob("*") if p.is_file()}


def _answers(bench, model, markers):
    _write_jsonl(bench / "model_answer" / f"{model}.jsonl",
                 [{"question_id": qid, "answer_id": f"{model}{qid}", "model_id": model,
                   "choices": [{"index": 0, "turns": [f"One. <<{m}>>", f"Two. <<{m}>>"]}], "tstamp": 1.0}
                  for qid, m in zip(QUESTION_IDS, markers)])


def test_the_key_is_nowhere_whatever_the_judge_echoes(bench, judge_server, monkeypatch, capsys):
    """A judge that echoes the key in its replies and error bodies, escaped every way: the judgment
    file, the error details and the console hold no 8 characters of it in any spelling."""
    judge_server.key = ODD_KEY
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", ODD_KEY)
    _answers(bench, "gamma", ["ECHO", "LEAK500", "ECHO", "R:7"])
    assert _judge(bench, judge_server.url, "--model_list", "gamma") == 1   # the LEAK500 ones failed
    rows = {(r["question_id"], r["turn"]): r for r in _jsonl(bench / "model_judgment" / "judge-x_single.jsonl")}
    assert rows[81, 1]["score"] == 5 and "<redacted>" in rows[81, 1]["judgment"]
    assert rows[101, 1]["judgment"] == "$ERROR$" and "<redacted>" in rows[101, 1]["error"]
    out = capsys.readouterr()
    assert "judge failed on model gamma, question 101" in out.err and "<redacted>" in out.err
    assert key_leaks(out.out + out.err) == []
    assert {str(p): key_leaks(text) for p, text in _bench_files(bench).items() if key_leaks(text)} == {}
    judge_server.key = KEY  # a 401 whose body puts the key across the 300-byte cut of the error detail
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", KEY)
    _answers(bench, "delta", ["LEAK401"] * 4)
    with pytest.raises(JudgeConfigError, match="HTTP 401") as e:
        _judge(bench, judge_server.url, "--model_list", "delta")
    assert key_leaks(str(e.value), KEY) == [] and "<redacted>" in str(e.value)


@pytest.mark.parametrize("marker", ["DOWN", "GARBAGE"])
def test_a_dead_or_garbled_judge_is_said_at_once_and_stops(bench, judge_server, monkeypatch, capsys, marker):
    monkeypatch.setenv("SIFT_TEST_JUDGE_KEY", KEY)
    _answers(bench, "gamma", [marker] * 4)                               # 8 judgments, every one failing
    with pytest.raises(JudgeAPIError, match="3 judgments in a row failed, stopping") as e:
        _judge(bench, judge_server.url, "--model_list", "gamma", "--parallel", "1", "--max_consecutive_failures", "3")
    assert ("503" if marker == "DOWN" else "malformed response") in str(e.value)
    err = capsys.readouterr().err.splitlines()
    retrying = [line for line in err if line.startswith("judge: ") and "retrying (up to 2 times" in line]
    failed = [line for line in err if line.startswith("judge failed on model gamma")]
    assert len(retrying) == 1 and err.index(retrying[0]) < err.index(failed[0]) and len(failed) == 3, err
    assert len(judge_server.requests) == 3 * 3                          # 3 judgments x (1 + 2 retries), no more
    rows = _jsonl(bench / "model_judgment" / "judge-x_single.jsonl")
    assert len(rows) == 3 and all(r["judgment"] == "$ERROR$" for r in rows)  # kept: a rerun redoes them


def test_judge_cli_keeps_the_key_off_the_console_and_stops_a_dead_judge(bench, judge_server, tmp_path):
    """The real command: one line and exit 2 for a 401 that echoes the key and for a judge that is
    down, the failures said on stderr as they happen, the key nowhere."""
    import subprocess
    import sys
    from pathlib import Path

    judge_server.key = ODD_KEY
    _answers(bench, "gamma", ["ECHO", "LEAK500", "DOWN", "R:7"])
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SIFT_TEST_JUDGE_KEY": ODD_KEY, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    argv = [sys.executable, "eval/mt_bench.py", "judge", "--judge_model", "judge-x", "--judge_base_url",
            judge_server.url, "--judge_api_key_env", "SIFT_TEST_JUDGE_KEY", "--output_dir", str(bench),
            "--question_file", str(bench / "question.jsonl"), "--parallel", "1", "--max_retries", "1",
            "--retry_base_delay", "0.001", "--max_consecutive_failures", "2", "--model_list"]
    done = subprocess.run(argv + ["gamma"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "2 judgments in a row failed, stopping" in errors[0], done.stderr
    assert "judge failed on model gamma, question 101" in done.stderr
    assert key_leaks(done.stdout + done.stderr) == [], done.stderr
    assert all(key_leaks(text) == [] for text in _bench_files(bench).values())
    _answers(bench, "delta", ["LEAK401"] * 4)
    done = subprocess.run(argv + ["delta"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "HTTP 401" in errors[0], done.stderr
    assert key_leaks(done.stdout + done.stderr) == [], done.stderr
