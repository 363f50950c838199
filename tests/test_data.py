"""Calibration text: default passages, local files and their errors, HF datasets, splits."""

import json

import pytest

from gfwsvd_core.data import TextSource, default_passages, load_texts, split_texts


def test_default_passages_deterministic_bounded_and_many():
    a, b = default_passages(), default_passages()
    assert a == b and a is not b  # cached, but callers get their own copy
    assert len(a) >= 800  # ~52k distinct words of help text
    counts = [len(p.split()) for p in a]
    assert min(counts) >= 40 and max(counts) <= 120
    assert all(p == " ".join(p.split()) for p in a)  # whitespace-normalised
    assert len(set(a)) == len(a)  # topics repeating other topics' paragraphs add nothing
    small = default_passages(10, 30)
    assert all(10 <= len(p.split()) <= 30 for p in small) and len(small) > len(a)


def test_default_passages_bad_bounds():
    with pytest.raises(ValueError, match="min_words"):
        default_passages(50, 20)


def test_load_default_description():
    src = load_texts("default")
    d = src.description
    assert d["kind"] == "default" and d["count"] == len(src.texts) and src.labels is None
    assert len(d["sha256"]) == 64
    json.dumps(d)


def test_txt_blank_line_passages(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first  passage\nstill first\n\n\nsecond passage\n\nthird\n")
    src = load_texts(str(f))
    assert src.texts == ["first passage still first", "second passage", "third"]
    assert src.description["kind"] == "file" and src.description["count"] == 3


def test_txt_one_per_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\nthree\n")
    assert load_texts(f).texts == ["one", "two", "three"]


def test_jsonl_text_and_labels(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"text": "good movie", "label": 1}, {"text": "bad movie", "label": 0}, {"text": "", "label": 0}]))
    src = load_texts(str(f))
    assert src.texts == ["good movie", "bad movie"] and src.labels == [1, 0]
    assert src.description["column"] == "text" and src.description["label_column"] == "label"


def test_jsonl_custom_column_and_missing_column(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"body": "hello there", "y": 2}\n{"body": "again", "y": 3}\n')
    src = load_texts(str(f), text_column="body", label_column="y")
    assert src.texts == ["hello there", "again"] and src.labels == [2, 3]
    with pytest.raises(ValueError, match="available columns: 'body', 'y'"):
        load_texts(str(f))
    with pytest.raises(ValueError, match="label column 'nope'"):
        load_texts(str(f), text_column="body", label_column="nope")


def test_jsonl_bad_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_texts(str(f))


def test_csv_labels_become_ints(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('text,label\n"hello, world",1\nbye,0\n')
    src = load_texts(str(f))
    assert src.texts == ["hello, world", "bye"] and src.labels == [1, 0]
    with pytest.raises(ValueError, match="available columns"):
        load_texts(str(f), text_column="sentence")


@pytest.mark.parametrize("content,match", [
    (b"", "empty"), (b"  \n\n \t", "empty"), (b"abc\x00def", "binary"), (b"\xff\xfe\xfa abc", "UTF-8"),
])
def test_file_content_errors(tmp_path, content, match):
    f = tmp_path / "a.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_texts(str(f))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))
    f = tmp_path / "a.pdf"
    f.write_text("text")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_texts(str(f))


def test_hf_dataset_missing_offline(monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="not available offline") as e:
        load_texts("no-such-user-xyz/no_such_dataset:cfg")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_hf_dataset_columns(monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"idx": [0, 1], "sentence": ["a b c", "d e"], "label": [1, 0]})
    seen = {}

    def fake_load(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = load_texts("glue:sst2", split="validation")
    assert seen == {"name": "glue", "config": "sst2", "split": "validation"}
    assert src.texts == ["a b c", "d e"] and src.labels == [1, 0]
    d = src.description
    assert (d["kind"], d["name"], d["config"], d["column"], d["label_column"]) == ("hf", "glue", "sst2", "sentence", "label")
    with pytest.raises(ValueError, match="available columns"):
        load_texts("glue:sst2", text_column="text")


def test_split_disjoint_and_seeded():
    src = TextSource([f"text {i}" for i in range(50)], list(range(50)), {"kind": "test"})
    c1, e1 = split_texts(src, 10, 20, seed=3)
    c2, e2 = split_texts(src, 10, 20, seed=3)
    c3, _ = split_texts(src, 10, 20, seed=4)
    assert c1.texts == c2.texts and e1.texts == e2.texts and c1.texts != c3.texts
    assert len(c1.texts) == 10 and len(e1.texts) == 20 and not set(c1.texts) & set(e1.texts)
    assert [int(t.split()[1]) for t in c1.texts] == c1.labels  # labels stay aligned
    assert c1.description["disjoint"] and c1.description["seed"] == 3
    assert c1.description["parent"] == {"kind": "test"} and e1.description["count"] == 20


def test_split_too_few():
    src = TextSource([f"t{i}" for i in range(6)], None, {})
    calib, ev = split_texts(src, 10, 10)
    assert (len(calib.texts), len(ev.texts)) == (4, 2)
    with pytest.raises(ValueError, match="only 2 texts"):
        split_texts(TextSource(["a", "b"], None, {}), 1, 2)
