"""eval/mmlu.py: the hendrycks/test protocol byte for byte, answer-letter token ids for two tokenizer
families, micro vs category aggregation, exact batched scoring, and end-to-end CLI runs checked
against a plain one-question-at-a-time reference loop."""
import csv
import json
import math
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval import mmlu  # noqa: E402
from eval.mmlu_data import DEFAULT_DATA_DIR, Question, load_local, questions_from_records, read_split  # noqa: E402
from eval.mmlu_forward import common_prefix_len, next_token_logits, plan_batches  # noqa: E402
from eval.mmlu_prompts import answer_token_ids, chat_messages, encode, render, render_answered  # noqa: E402
from eval.mmlu_report import Prediction, aggregate  # noqa: E402

LETTERS = "ABCD"


# ----------------------------------------------------------------------------- shared fixtures
# (test_mt_bench.py imports these helpers too)

def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from common.modeling import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def sentencepiece_tokenizer(directory):
    """A LLaMA-style SentencePiece BPE tokenizer (byte fallback, dummy prefix '▁', BOS), trained here."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    text = [row for path in sorted((DEFAULT_DATA_DIR / "dev").glob("*.csv"))[:20]
            for row in path.read_text(encoding="utf-8").splitlines()] + ["Answer: A", "Answer: B", "Answer: C",
                                                                         "Answer: D", "multiple choice questions"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(directory / "tokenizer"), vocab_size=800, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return LlamaTokenizer.from_pretrained(directory, add_bos_token=True)


def tiny_model_dir(directory, tokenizer, seed=0, layers=2):
    """A random LlamaForCausalLM over `tokenizer`'s vocabulary, saved with it (what --model loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: handing ops to a second thread costs more than it saves (far more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smol_tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def management():
    return load_local(DEFAULT_DATA_DIR, ["management"])[0]


# ----------------------------------------------------------------------------- prompts

def test_zero_shot_prompt_byte_for_byte(management):
    expected = ("The following are multiple choice questions (with answers) about  management.\n\n"
                "What is the term for a sub-optimal but acceptable outcome of negotiations between parties?\n"
                "A. Bargaining\nB. Satisficing\nC. Accepting\nD. Compromising\nAnswer:")
    assert render(None, management.dev, management.test[0], 0, chat=False) == expected


def test_five_shot_prompt_byte_for_byte(management):
    expected = (
        "The following are multiple choice questions (with answers) about  management.\n\n"
        "What are the two main dimensions of the Ohio Studies into leadership?\n"
        "A. Starting position and end position\nB. Initial environment and changed environment\n"
        "C. Organisational structure and conditioning\nD. Initiating structure and considerations\nAnswer: D\n\n"
        "Hygiene factors are associated with which writer?\n"
        "A. Frederick Hertzberg\nB. D.C. McClelland\nC. Abraham Maslow\nD. Douglas McGregor\nAnswer: A\n\n"
        "Which element of the cultural web forms regalia?\n"
        "A. Symbols\nB. Rituals and routines\nC. Power structures\nD. Control systems\nAnswer: A\n\n"
        "What characteristic is not a key feature of the 'open systems' model of management?\n"
        "A. Morale\nB. Innovation\nC. Growth resource\nD. Adaptation\nAnswer: A\n\n"
        "How can organisational structures that are characterised by democratic and inclusive styles of "
        "management be described?\n"
        "A. Hierarchical\nB. Bureaucratic\nC. Flat\nD. Functional\nAnswer: C\n\n"
        "What is the term for a sub-optimal but acceptable outcome of negotiations between parties?\n"
        "A. Bargaining\nB. Satisficing\nC. Accepting\nD. Compromising\nAnswer:")
    assert render(None, management.dev, management.test[0], 5, chat=False) == expected
    # the answered variant continues exactly as the in-context examples do
    assert render_answered(None, management.dev, management.test[0], 5, False, "B") == expected + " B\n\n"


def test_chat_prompt_byte_for_byte(management, smol_tok):
    messages = chat_messages(management.dev, management.test[1], 1)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nThe following are multiple choice questions (with answers) about  management.\n\n"
        "What are the two main dimensions of the Ohio Studies into leadership?\n"
        "A. Starting position and end position\nB. Initial environment and changed environment\n"
        "C. Organisational structure and conditioning\nD. Initiating structure and considerations\nAnswer:"
        "<|im_end|>\n<|im_start|>assistant\nD<|im_end|>\n"
        "<|im_start|>user\nWhat is the term for the 'rule of thumb' type of bias in decision making?\n"
        "A. Framing bias\nB. Hindsight bias\nC. Over-confidence bias\nD. Heuristics\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(smol_tok, management.dev, management.test[1], 1, chat=True) == expected


def test_csv_reader_keeps_literal_none_and_reports_bad_rows(tmp_path):
    rows = read_split(DEFAULT_DATA_DIR / "test" / "college_computer_science_test.csv", "college_computer_science")
    assert rows[10].choices[0] == "None"  # pandas would have made this NaN -> "nan"
    bad = tmp_path / "x_test.csv"
    bad.write_text('q1,a,b,c,d,A\n"multi\nline q",a,b,c,d,E\nq3,a,b,c\n', encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_split(bad, "x")
    assert f"{bad}:2: field 6 (answer) is 'E'" in str(e.value) and f"{bad}:4: expected 6 fields" in str(e.value)


def test_hub_loader_groups_cais_mmlu_rows_like_the_csvs(monkeypatch):
    """`--hf_dataset cais/mmlu` (config "all": question, subject, choices, answer index) yields the same
    questions as the CSVs; `datasets.load_dataset` is replaced by the same rows in memory."""
    import datasets

    local = load_local(DEFAULT_DATA_DIR, ["management", "virology"])
    rows = {split: [{"question": q.question, "subject": s.name, "choices": list(q.choices),
                     "answer": LETTERS.index(q.answer)} for s in local for q in getattr(s, split)]
            for split in ("dev", "test")}
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert mmlu.load_hub("cais/mmlu", ["virology", "management"]) == local
    assert calls == [("cais/mmlu", "all", "dev"), ("cais/mmlu", "all", "test")]


def test_hub_records_become_questions():
    qs = questions_from_records([{"question": "Q?", "choices": ["w", "x", "y", "z"], "answer": 2}], "anatomy", "hub")
    assert qs == [Question("anatomy", 0, "Q?", ("w", "x", "y", "z"), "C")]
    with pytest.raises(ValueError, match="hub row 0"):
        questions_from_records([{"question": "Q?", "choices": ["w"], "answer": 0}], "anatomy", "hub")


# ----------------------------------------------------------------------------- answer-letter token ids

def _letter_ids(tok, subject, k, chat):
    q = subject.test[0]
    return answer_token_ids(tok, render(tok, subject.dev, q, k, chat),
                            [render_answered(tok, subject.dev, q, k, chat, c) for c in LETTERS], chat)


def test_letter_ids_bpe_tokenizer_use_the_space_prefixed_letters(management, smol_tok):
    ids = _letter_ids(smol_tok, management, 5, chat=False)
    assert ids == smol_tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    # the pitfall this guards against: tokenizer("A") is a different token for this tokenizer
    assert ids != [smol_tok(c).input_ids[-1] for c in LETTERS]
    # in chat mode the letter opens the assistant turn, with no space before it
    assert _letter_ids(smol_tok, management, 2, chat=True) == smol_tok.convert_tokens_to_ids(list(LETTERS))


def test_letter_ids_sentencepiece_tokenizer(management, sp_tok):
    ids = _letter_ids(sp_tok, management, 5, chat=False)
    assert ids == sp_tok.convert_tokens_to_ids(["▁A", "▁B", "▁C", "▁D"])
    assert encode(sp_tok, ["x"], chat=False)[0][0] == sp_tok.bos_token_id  # plain prompts keep the BOS


def test_letter_ids_refuse_a_prompt_whose_tokenization_is_not_a_prefix(smol_tok):
    prompt = "Question?\nAnswer: "  # trailing space: 'Ġ' alone, while "Answer: A" has 'ĠA'
    with pytest.raises(ValueError, match="not a prefix"):
        answer_token_ids(smol_tok, prompt, [prompt + c for c in LETTERS], chat=False)


# ----------------------------------------------------------------------------- aggregation

def test_micro_average_and_categories_on_a_synthetic_result_set():
    sub = {"alg": ["math"], "phys": ["physics"], "law": ["law"], "hist": ["history"]}
    cats = {"STEM": ["physics", "math"], "humanities": ["history", "law"]}

    def preds(subject, correct, total):
        return [Prediction(subject, i, "A" if i < correct else "B", "A", (0.25,) * 4, 5) for i in range(total)]

    result = aggregate(preds("alg", 1, 1) + preds("phys", 0, 3) + preds("law", 6, 8) + preds("hist", 0, 0),
                       sub, cats)
    assert result["num_questions"] == 12
    assert result["accuracy"] == pytest.approx(7 / 12)                      # micro, not (1 + 0 + .75) / 3
    assert result["subjects"] == {"alg": {"accuracy": 1.0, "num_questions": 1},
                                  "law": {"accuracy": 0.75, "num_questions": 8},
                                  "phys": {"accuracy": 0.0, "num_questions": 3}}
    assert result["categories"]["STEM"] == {"accuracy": 0.25, "num_questions": 4}   # pooled: 1 of 4, not 0.5
    assert result["categories"]["humanities"] == {"accuracy": 0.75, "num_questions": 8}
    assert "history" not in result["subcategories"]                         # nothing evaluated there
    assert list(result["subcategories"]) == ["math", "physics", "law"]


# ----------------------------------------------------------------------------- batched scoring

def test_plan_batches_respects_the_token_budget():
    lengths = [5, 40, 12, 33, 7, 40, 1]
    batches = plan_batches(lengths, prefix_len=10, max_batch_tokens=110, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * (10 + max(lengths[i] for i in b)) <= 110
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_logits_equal_one_by_one_forwards(prefix_cache):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 300, (25,), generator=g).tolist()
    seqs = [shared + torch.randint(3, 300, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 20, (11,), generator=g)]
    seqs.append(shared[:7])  # a prompt that is all prefix: the shared part shrinks to keep one own token
    ids = [5, 9, 200, 17]
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([s])).logits[0, -1, ids] for s in seqs])
    assert common_prefix_len(seqs) == 7
    for size, budget in ((1, 10**6), (4, 10**6), (32, 120)):
        got = next_token_logits(model, seqs, ids, pad_id=0, prefix_cache=prefix_cache, max_batch_size=size,
                                max_batch_tokens=budget)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_k_shrinks_to_the_largest_fitting_shot_count(management, smol_tok):
    full = [len(encode(smol_tok, [render(smol_tok, management.dev, management.test[0], k, False)], False)[0])
            for k in range(6)]
    limit = (full[2] + full[3]) // 2  # 2 shots fit, 3 do not
    subject = type(management)(management.name, management.dev, management.test[:1])
    [(k, ids, truncated)] = mmlu.fit_prompts(smol_tok, subject, 5, False, limit)
    assert (k, len(ids), truncated) == (2, full[2], False)
    [(k, ids, truncated)] = mmlu.fit_prompts(smol_tok, subject, 5, False, full[0] - 3)
    assert (k, len(ids), truncated) == (0, full[0] - 3, True)  # left-truncated: the end ("Answer:") stays


# ----------------------------------------------------------------------------- end to end

def _reference_predictions(model_dir, subject, n, ntrain):
    """The reference protocol, one question at a time, written independently of eval/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def example(row, answer=True):
        text = row[0] + "".join(f"\n{c}. {row[j + 1]}" for j, c in enumerate(LETTERS)) + "\nAnswer:"
        return text + (f" {row[5]}\n\n" if answer else "")

    dev = list(csv.reader(open(DEFAULT_DATA_DIR / "dev" / f"{subject}_dev.csv", newline="", encoding="utf-8")))
    test = list(csv.reader(open(DEFAULT_DATA_DIR / "test" / f"{subject}_test.csv", newline="", encoding="utf-8")))
    topic = " ".join([""] + subject.split("_"))  # " abstract algebra", as the reference's format_subject
    header = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    out = []
    for row in test[:n]:
        prompt = header + "".join(example(r) for r in dev[:ntrain]) + example(row, answer=False)
        ids = tok(prompt).input_ids
        letters = [tok(prompt + f" {c}").input_ids[len(ids)] for c in LETTERS]
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0, -1, letters].softmax(-1)
        out.append((LETTERS[int(probs.argmax())], row[5], probs.tolist()))
    return out


def test_cli_matches_the_reference_loop(tmp_path, smol_tok):
    model_dir = tiny_model_dir(tmp_path / "model", smol_tok)
    out = tmp_path / "out"
    results = mmlu.main(["--model", model_dir, "--subjects", "management", "abstract_algebra", "--limit", "7",
                         "--output_dir", str(out), "--max_batch_size", "3"])
    saved = json.loads((out / "mmlu_results.json").read_text())
    assert saved["accuracy"] == results["accuracy"] and saved["ntrain"] == 5 and saved["chat_template"] is False
    assert saved["num_questions"] == 14 and set(saved["subjects"]) == {"management", "abstract_algebra"}
    assert set(saved["categories"]) == {"STEM", "other (business, health, misc.)"}
    rows = list(csv.DictReader(open(out / "mmlu_predictions.csv", encoding="utf-8")))
    assert len(rows) == 14 and not (out / "mmlu_predictions.partial.csv").exists()
    assert saved["accuracy"] == pytest.approx(sum(r["prediction"] == r["answer"] for r in rows) / 14)
    for subject in ("abstract_algebra", "management"):
        mine = [r for r in rows if r["subject"] == subject]
        for r, (pred, answer, probs) in zip(mine, _reference_predictions(model_dir, subject, 7, 5)):
            assert (r["prediction"], r["answer"], r["shots"]) == (pred, answer, "5")
            got = [float(r[f"prob_{c}"]) for c in LETTERS]
            assert math.fsum(got) == pytest.approx(1.0, abs=1e-5)
            assert got == pytest.approx(probs, abs=1e-5)


def test_cli_zero_shot_with_a_sentencepiece_model_and_chat_flag_errors(tmp_path, sp_tok):
    model_dir = tiny_model_dir(tmp_path / "model", sp_tok)
    results = mmlu.main(["--model", model_dir, "--subjects", "management", "--limit", "5", "--ntrain", "0",
                         "--output_dir", str(tmp_path / "out"), "--no_prefix_cache"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "mmlu_predictions.csv", encoding="utf-8")))
    for r, (pred, _, probs) in zip(rows, _reference_predictions(model_dir, "management", 5, 0)):
        assert r["prediction"] == pred and [float(r[f"prob_{c}"]) for c in LETTERS] == pytest.approx(probs, abs=1e-5)
    assert results["ntrain"] == 0 and results["num_questions"] == 5
    with pytest.raises(ValueError, match="has none"):  # this tokenizer has no chat template
        mmlu.main(["--model", model_dir, "--subjects", "management", "--limit", "1", "--chat_template",
                   "--output_dir", str(tmp_path / "out2")])


def test_the_script_runs_as_a_program(tmp_path, smol_tok):
    """`python eval/mmlu.py ...` from the repository root, as users and the acceptance run call it."""
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tiny_model_dir(tmp_path / "model", smol_tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "eval/mmlu.py", "--model", model_dir, "--subjects", "virology",
                           "--limit", "3", "--output_dir", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MMLU accuracy (micro, 3 questions, 5-shot)" in done.stdout
    assert json.loads((tmp_path / "out" / "mmlu_results.json").read_text())["subjects"]["virology"]["num_questions"] == 3


def test_cli_rejects_bad_arguments_all_at_once(tmp_path):
    with pytest.raises(ValueError) as e:
        mmlu.main(["--ntrain", "-1", "--limit", "0", "--data_dir", str(tmp_path), "--increment", str(tmp_path / "x")])
    for needle in ("--ntrain must be >= 0", "--limit must be >= 1", "no test/ subdirectory", "no such file"):
        assert needle in str(e.value)
    with pytest.raises(ValueError, match="unknown"):
        load_local(DEFAULT_DATA_DIR, ["astrology"])


def test_increment_equals_the_merged_model(tmp_path, smol_tok):
    """--model base --increment file scores exactly like the merged weights (DESIGN's increment format)."""
    pytest.importorskip("sift.increment")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir(tmp_path / "base", smol_tok)
    model = AutoModelForCausalLM.from_pretrained(base)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    g = torch.Generator().manual_seed(3)
    indices = torch.randperm(weight.numel(), generator=g)[: weight.numel() // 2].sort().values.to(torch.int32)
    values = torch.randn(indices.numel(), generator=g) * 3
    increment = tmp_path / "run" / "sift_increment.safetensors"
    increment.parent.mkdir()
    save_file({f"{name}.indices": indices, f"{name}.values": values}, increment,
              metadata={"format": "sift-increment", "version": "1", "base_model": base, "rate": "0.5",
                        "targets": '["down_proj"]', "selection": "random"})
    with torch.no_grad():
        weight.view(-1)[indices.long()] = values
    model.save_pretrained(tmp_path / "merged")
    smol_tok.save_pretrained(tmp_path / "merged")

    def run(*extra):
        mmlu.main(["--subjects", "management", "--limit", "6", "--output_dir", str(tmp_path / "o"), *extra])
        return [r for r in csv.DictReader(open(tmp_path / "o" / "mmlu_predictions.csv", encoding="utf-8"))]

    with_increment = run("--model", base, "--increment", str(increment))
    assert with_increment == run("--model", str(tmp_path / "merged"))
    assert [r["prob_A"] for r in with_increment] != [r["prob_A"] for r in run("--model", base)]
