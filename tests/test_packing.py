"""--packing: rows of whole samples whose tokens see only their own sample; a packed step's loss and
gradients equal the unpacked ones; deterministic order, sharding and resume stay."""
import copy
import json

import pytest
import torch

from conftest import tiny_llama, train_args
from data_prep.dataset import collate
from trainer.data import batches_for_window
from trainer.loss import causal_lm_loss, label_tokens
from trainer.packing import collate_packed, pack, padding_share


def samples(lengths, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        cut = n // 3  # a prompt, then the answer as labels
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_token_in_a_packed_row_has_the_logits_of_its_own_unpadded_row(attn):
    model = tiny_llama(attn_implementation=attn).eval()
    parts = samples([7, 12, 5])
    rows = pack(parts, max_length=30, seed=0)
    assert len(rows) == 1 and rows[0]["n_samples"] == 3
    b = collate_packed(rows + [{"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 1]}], pad_token_id=0)
    with torch.no_grad():
        # use_cache=False, as trainer.loss calls the decoder: with a KV cache transformers skips the
        # packed-sequence detection (as it does next to a 2-D mask), and the mask is only causal
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        crossed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]
    starts = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0] + [len(rows[0]["input_ids"])]
    assert len(starts) == 4
    for start, end in zip(starts, starts[1:]):
        s = next(s for s in parts if s["input_ids"] == rows[0]["input_ids"][start:end])
        n = end - start
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
        if start:
            assert not torch.allclose(crossed[start:start + n], alone, atol=1e-3)


def test_a_packed_step_has_the_loss_and_gradients_of_the_same_samples_unpacked():
    ref = tiny_llama(dtype=torch.float64)
    ours = copy.deepcopy(ref)
    parts = samples([9, 14, 6, 11, 8], seed=1)
    rows = pack(parts, max_length=24, seed=3)
    assert len(rows) > 1 and sum(r["n_samples"] for r in rows) == len(parts)
    packed = collate_packed(rows, pad_token_id=0)
    n = label_tokens(packed["labels"])
    assert n == sum(label_tokens(collate([s], 0)["labels"]) for s in parts)  # the sample boundaries add no label
    loss = causal_lm_loss(ours, packed, n)
    loss.backward()
    expected = 0.0
    for s in parts:  # token-weighted: each sample's summed token loss over the same count
        one = collate([s], 0)
        part = ref(**one, num_items_in_batch=n).loss
        part.backward()
        expected += float(part.detach())
    # float tolerance: the logits are fp32 in both (as HF upcasts them), summed in another order
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_packing_is_deterministic_complete_and_within_the_row_length():
    parts = samples([5 + (7 * i) % 40 for i in range(60)], seed=2)
    rows = pack(parts, max_length=64, seed=5)
    assert rows == pack(parts, max_length=64, seed=5)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    packed_ids = sorted(tuple(r["input_ids"]) for r in rows)
    assert sorted(x for r in rows for x in r["input_ids"]) == sorted(x for s in parts for x in s["input_ids"])
    assert len(packed_ids) < len(parts) / 2
    # fewer rows, far less padding than batching the samples
    assert padding_share(rows, 4) < 0.5 * padding_share(parts, 4)
    two = [batches_for_window(rows, 1, 1, 2, seed=1, pad_id=0, rank=r, world=2, packed=True) for r in (0, 1)]
    one = batches_for_window(rows, 1, 2, 2, seed=1, pad_id=0, packed=True)
    for i in range(2):  # ranks share out the same global micro-batch
        got = sorted(two[r][i]["input_ids"][0, :5].tolist() for r in (0, 1))
        assert got == sorted(one[i]["input_ids"][r, :5].tolist() for r in (0, 1))


def test_packed_run_resumes_bit_exactly(tiny_dir, alpaca_40, tmp_path):
    import train_sft

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--packing", "--generate_tokens", "0", "--model_max_length", "192")
    train_sft.main(train_args(tiny_dir, alpaca_40, straight, *extra, "--save_steps", "2"))
    train_sft.main(train_args(tiny_dir, alpaca_40, resumed, *extra, "--resume_from_checkpoint",
                              str(straight / "checkpoint-2")))
    rows = [json.loads(line) for line in open(straight / "train_log.jsonl")]
    assert [json.loads(line)["loss"] for line in open(resumed / "train_log.jsonl")] == [r["loss"] for r in rows][2:]
    args = json.loads((straight / "args.json").read_text())
    assert args["data_report"]["packed_rows"] < args["data_report"]["train_samples"]


def test_pipeline_counts_cover_one_epoch_of_each_loader_exactly(tiny_dir, alpaca_40):
    """benchmarks.packing's counts (no training): at batch 1 every sample of the training split is one
    unit (padded) or part of one row (packed) exactly once per epoch, so both loaders count its label
    tokens and tokens, against the samples' own lists; at batch 4 x 2 the padded grid holds padding."""
    from benchmarks.packing import pipeline_counts
    from common.modeling import load_tokenizer
    from trainer.args import DataArguments
    from trainer.data import build_datasets

    train, _, _ = build_datasets(DataArguments(data_path=alpaca_40, model_max_length=512), load_tokenizer(tiny_dir),
                                 42, verbose=False)  # the tool's split: --eval_samples 32 of 40, seed 42
    labels = sum(sum(x != -100 for x in s["labels"]) for s in train)
    tokens = sum(len(s["input_ids"]) for s in train)
    kw = dict(data_path=alpaca_40, model=tiny_dir)
    padded, packed = (pipeline_counts(512, p, batch_size=1, accumulation=1, **kw) for p in (False, True))
    assert padded["steps"] == len(train) > packed["steps"] == packed["units"]
    for r in (padded, packed):
        assert (r["label_tokens"], r["real_tokens"], r["grid_tokens"]) == (labels, tokens, tokens)
    padded, packed = (pipeline_counts(512, p, batch_size=2, accumulation=2, **kw) for p in (False, True))
    assert padded["grid_tokens"] > padded["real_tokens"] and padded["steps"] == len(train) // 4
