"""Calibration and evaluation text: the embedded default corpus, local files, Hugging Face datasets.

Everything returns a :class:`TextSource`: the texts, optional labels, and a JSON-ready
``description`` (what was loaded and a sha256 of the content) so that a report can say exactly
which data produced its numbers. :func:`split_texts` makes the disjoint, seeded calibration and
evaluation subsets (calibration and evaluation data never overlap, so held-out metrics are honest).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
# Suffixes that mark a source as a file (not a dataset name) even though we cannot read it.
_OTHER_FILE_SUFFIXES = (
    ".json", ".tsv", ".parquet", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".bz2", ".xz", ".md",
    ".html", ".htm", ".pdf", ".doc", ".docx", ".bin", ".pt", ".npy", ".pkl", ".xml", ".yaml", ".yml",
)
TEXT_COLUMNS = ("text", "sentence")  # tried in this order when no column is given
LABEL_COLUMN = "label"

_UNDERLINE = re.compile(r"^\s*([*=\-~^#+_.])\1{2,}\s*$")  # reST heading underlines
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


@dataclass
class TextSource:
    """Texts (one sample each), optional labels aligned with them, and a JSON-ready description.

    ``description`` always has ``kind`` ("default", "file", "hf" or "subset"), ``count``
    and ``sha256`` (of the texts and labels, see :func:`content_sha256`).
    """

    texts: list[str]
    labels: Optional[list] = None
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def content_sha256(texts: list[str], labels: Optional[list] = None) -> str:
    """sha256 of the texts and labels as canonical JSON: identical data gives an identical hash."""
    payload = json.dumps({"texts": texts, "labels": labels}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The embedded default corpus


def _words(text: str) -> list[str]:
    return text.split()


def _paragraphs(doc: str) -> list[str]:
    """Blank-line separated paragraphs of a pydoc topic, heading underlines dropped, whitespace normalised."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in block.splitlines() if not _UNDERLINE.match(ln)]
        text = " ".join(" ".join(lines).split())
        if text:
            out.append(text)
    return out


def _pieces(paragraph: list[str], max_words: int) -> list[list[str]]:
    """Split one paragraph (a word list) into sentence pieces of at most ``max_words`` words.

    Sentences longer than ``max_words`` (code listings, grammar rules) are cut by word count into
    equal parts.
    """
    pieces = []
    for sentence in _SENTENCE_END.split(" ".join(paragraph)):
        w = sentence.split()
        if not w:
            continue
        parts = math.ceil(len(w) / max_words)
        size = math.ceil(len(w) / parts)
        pieces.extend(w[i : i + size] for i in range(0, len(w), size))
    return pieces


def _pack(paragraphs: list[list[str]], min_words: int, max_words: int, slack: int = 10) -> list[list[str]]:
    """Greedy packing of one topic's paragraphs into passages of ``min_words..max_words`` words.

    Whole paragraphs are preferred. A paragraph is split into sentences when it is longer than
    ``max_words``, or when appending it whole would overshoot ``min_words`` by more than
    ``slack`` words (then only the sentences needed are taken and the rest starts the next
    passage). A passage is closed as soon as it reaches ``min_words``: short passages mean more
    of them, from a corpus of only ~52k distinct words. A short tail is merged into the previous
    passage, or the two are rebalanced.
    """
    passages: list[list[str]] = []
    buf: list[str] = []
    queue: list[tuple[list[str], bool]] = [(p, True) for p in reversed(paragraphs)]  # (words, whole paragraph?)
    while queue:
        unit, whole = queue.pop()  # next unit is at the end
        total = len(buf) + len(unit)
        overshoot = bool(buf) and total > min_words + slack
        if total <= max_words and not (whole and overshoot):
            buf.extend(unit)
            if len(buf) >= min_words:
                passages.append(buf)
                buf = []
            continue
        pieces = _pieces(unit, max_words) if whole else [unit]
        if len(pieces) > 1:  # retry sentence by sentence
            queue.extend((piece, False) for piece in reversed(pieces))
        elif total <= max_words:  # a one-sentence paragraph that fits: keep it whole
            queue.append((unit, False))
        else:  # one sentence that does not fit: cut it by word count
            take = max_words - len(buf)
            buf.extend(unit[:take])
            if len(buf) >= min_words:
                passages.append(buf)
                buf = []
            queue.append((unit[take:], False))
    if buf:
        if passages and len(passages[-1]) + len(buf) <= max_words:
            passages[-1].extend(buf)
        elif passages and len(passages[-1]) + len(buf) >= 2 * min_words:
            joined = passages.pop() + buf
            half = len(joined) // 2
            passages.extend([joined[:half], joined[half:]])
        # else: a topic shorter than min_words in all; dropped
    return passages


@functools.lru_cache(maxsize=8)
def _topic_passages(min_words: int, max_words: int) -> tuple[tuple[str, str], ...]:
    """(passage, help topic) pairs of the default corpus; a passage repeated by a later topic keeps
    its first topic."""
    from pydoc_data.topics import topics

    out: dict[str, str] = {}
    seen: set[str] = set()
    for key in sorted(topics):
        paragraphs = []
        for p in _paragraphs(topics[key]):
            if p not in seen:  # several topics repeat whole sections of others
                seen.add(p)
                paragraphs.append(_words(p))
        for passage in _pack(paragraphs, min_words, max_words):
            out.setdefault(" ".join(passage), key)
    return tuple(out.items())


def _default_passages(min_words: int, max_words: int) -> tuple[str, ...]:
    return tuple(text for text, _ in _topic_passages(min_words, max_words))


def default_passages(min_words: int = 40, max_words: int = 120) -> list[str]:
    """The embedded calibration corpus: CPython's ``pydoc_data.topics`` cut into passages.

    The 79 help topics (~65k words, shipped with every CPython, so nothing is downloaded) are
    read in sorted key order, split into whitespace-normalised paragraphs (heading underlines
    dropped) and packed into passages of ``min_words..max_words`` words that never cross a topic.
    Paragraphs repeated by several topics are kept once, so passages are distinct. With the
    defaults this gives ~1000 passages (~52k distinct words at 40+ words each). Deterministic.
    """
    if not isinstance(min_words, int) or not isinstance(max_words, int) or min_words < 2 or max_words < min_words:
        raise DataError(
            f"need integers 2 <= min_words <= max_words, got min_words={min_words!r}, max_words={max_words!r}; "
            "pick word bounds such as 40 and 120"
        )
    return list(_default_passages(min_words, max_words))


#: a help topic needs at least this many passages to be a class of the labelled default corpus
TOPIC_MIN_PASSAGES = 30


def topic_passages(min_passages: int = TOPIC_MIN_PASSAGES, min_words: int = 40,
                   max_words: int = 120) -> tuple[list[str], list[str]]:
    """The labelled default corpus: the passages of :func:`default_passages` whose help topic has
    at least ``min_passages`` of them, each labelled by its topic (e.g. "compound", "types").

    Topics with few passages are dropped rather than merged, so every class means one help page
    and a held-out split of a few hundred texts still holds several examples of each. With
    CPython 3.11 and the defaults this keeps 12 topics and ~700 passages. Deterministic.
    """
    if isinstance(min_passages, bool) or not isinstance(min_passages, int) or min_passages < 2:
        raise DataError(f"min_passages must be an integer >= 2, got {min_passages!r}")
    default_passages(min_words, max_words)  # validates the word bounds
    pairs = _topic_passages(min_words, max_words)
    counts: dict[str, int] = {}
    for _, key in pairs:
        counts[key] = counts.get(key, 0) + 1
    keep = [(t, k) for t, k in pairs if counts[k] >= min_passages]
    if len({k for _, k in keep}) < 2:
        raise DataError(f"fewer than 2 help topics have {min_passages} passages; lower min_passages")
    return [t for t, _ in keep], [k for _, k in keep]


# ---------------------------------------------------------------------------------------------
# Local files


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"file '{path}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    if not data.strip():
        raise DataError(f"file '{path}' is empty; give a file with at least one text")
    if b"\x00" in data:
        raise DataError(f"file '{path}' looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"file '{path}' is not valid UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8 text"
        ) from None


def _txt_texts(content: str) -> list[str]:
    """Paragraphs separated by blank lines; a file without blank lines is one text per line."""
    if re.search(r"\n[ \t\r]*\n", content.strip()):
        blocks = re.split(r"\n[ \t\r]*\n", content)
    else:
        blocks = content.splitlines()
    return [" ".join(b.split()) for b in blocks if b.strip()]


def _jsonl_rows(content: str, path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"file '{path}' line {i} is not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"file '{path}' line {i} is a JSON {type(row).__name__}, not an object; write one JSON object per line")
        rows.append(row)
    return rows


def _csv_rows(content: str, path: Path) -> tuple[list[dict], list[str]]:
    try:
        reader = csv.DictReader(io.StringIO(content))
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"file '{path}' is not a readable CSV file ({exc}); check its quoting") from None
    return rows, columns


def _available(columns: list[str]) -> str:
    return ", ".join(map(repr, columns)) or "none"


def _pick_text_column(columns: list[str], sample: dict, text_column: Optional[str], where: str,
                      any_string: bool) -> str:
    """The explicit column, else "text", else "sentence", else (``any_string``) the first string column."""
    if text_column is not None:
        if text_column not in columns:
            raise DataError(f"{where} has no column {text_column!r}; available columns: {_available(columns)}")
        return text_column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    if any_string:
        for name in columns:
            if isinstance(sample.get(name), str):
                return name
    raise DataError(
        f"{where} has no 'text' or 'sentence' column; pass text_column=, available columns: {_available(columns)}"
    )


def _pick_label_column(columns: list[str], label_column: Optional[str], text_column: str, where: str) -> Optional[str]:
    """The explicit label column (must exist), else "label" when present, else None."""
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"{where} has no label column {label_column!r}; available columns: {_available(columns)}")
        return label_column
    return LABEL_COLUMN if LABEL_COLUMN in columns and text_column != LABEL_COLUMN else None


def _normalise_labels(labels: list) -> Optional[list]:
    """Integer-like strings (CSV) become ints; all -1 (an unlabelled split, e.g. GLUE test) means None."""
    if all(isinstance(x, str) and re.fullmatch(r"\s*-?\d+\s*", x) for x in labels):
        labels = [int(x) for x in labels]
    if labels and all(isinstance(x, int) and not isinstance(x, bool) and x == -1 for x in labels):
        return None
    return labels


def _rows_to_source(rows: list[dict], columns: list[str], text_column: Optional[str], label_column: Optional[str],
                    where: str, any_string: bool) -> tuple[list[str], Optional[list], str, Optional[str], int]:
    if not rows:
        raise DataError(f"{where} has no rows; give data with at least one text")
    column = _pick_text_column(columns, rows[0], text_column, where, any_string)
    label_name = _pick_label_column(columns, label_column, column, where)
    has_labels = label_name is not None
    texts, labels, skipped = [], [], 0
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            skipped += 1  # empty texts (e.g. wikitext's blank lines) carry no signal
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{where} row {i + 1}: column {column!r} holds a {type(value).__name__}, not text; pick a text column with text_column="
            )
        texts.append(value)
        if has_labels:
            labels.append(row.get(label_name))
    if not texts:
        raise DataError(f"{where}: column {column!r} has only empty values; pick another column with text_column=")
    if has_labels and any(lab is None or (isinstance(lab, str) and not lab.strip()) for lab in labels):
        raise DataError(f"{where}: some rows have no {label_name!r} value; give every row a label or drop the column")
    labels = _normalise_labels(labels) if has_labels else None
    return texts, labels, column, (label_name if labels is not None else None), skipped


def _load_file(path: Path, text_column: Optional[str], label_column: Optional[str]) -> TextSource:
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"file '{path}' does not exist; check the path")
    if path.is_dir():
        raise DataError(f"'{path}' is a folder; give a .txt, .jsonl or .csv file")
    content = _read_text_file(path)
    labels = None
    column = label_name = None
    skipped = 0
    if suffix == ".txt":
        if text_column is not None or label_column is not None:
            raise DataError("a .txt file has no columns; leave text_column/label_column unset or use a .jsonl/.csv file")
        texts = _txt_texts(content)
        if not texts:
            raise DataError(f"file '{path}' is empty; give a file with at least one text")
    elif suffix == ".jsonl":
        rows = _jsonl_rows(content, path)
        columns = list(dict.fromkeys(k for row in rows[:100] for k in row))
        texts, labels, column, label_name, skipped = _rows_to_source(
            rows, columns, text_column, label_column, f"file '{path}'", any_string=False)
    else:  # .csv
        rows, columns = _csv_rows(content, path)
        texts, labels, column, label_name, skipped = _rows_to_source(
            rows, columns, text_column, label_column, f"file '{path}'", any_string=False)
    description = {
        "kind": "file",
        "path": str(path.resolve()),
        "format": suffix[1:],
        "column": column,
        "label_column": label_name,
        "skipped_empty": skipped,
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return TextSource(texts, labels, description)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _offline_if_requested() -> Iterator[None]:
    """Honour HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set after ``datasets`` was imported.

    ``datasets`` and ``huggingface_hub`` read these variables once, at import; without this an
    offline request would retry the network for ~30 s before failing. Restored on exit.
    """
    if not (_env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")):
        yield
        return
    import datasets.config as dconfig
    import huggingface_hub.constants as hconstants

    saved = (hconstants.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE, dconfig.HF_DATASETS_OFFLINE)
    hconstants.HF_HUB_OFFLINE = dconfig.HF_HUB_OFFLINE = dconfig.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hconstants.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE, dconfig.HF_DATASETS_OFFLINE = saved


def _load_hf(source: str, text_column: Optional[str], label_column: Optional[str], split: str) -> TextSource:
    import datasets
    from datasets.exceptions import DatasetsError

    name, _, config = source.partition(":")
    config = config or None
    if not name:
        raise DataError(f"bad dataset name {source!r}; write 'name' or 'name:config'")
    label = f"dataset '{source}' (split '{split}')"
    try:
        with _offline_if_requested():
            ds = datasets.load_dataset(name, config, split=split)
    except (OSError, DatasetsError):
        raise DataError(
            f"dataset '{source}' is not available offline (or does not exist); "
            "save the texts as a local .txt, .jsonl or .csv file and pass its path"
        ) from None
    except ValueError as exc:  # unknown config or split: datasets lists the valid ones
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load {label}: {first}; check the config and split names") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{label} did not load as one table; name a single split, e.g. split='train'")
    columns = list(ds.column_names)
    rows = ds.to_list() if len(ds) else []
    texts, labels, column, label_name, skipped = _rows_to_source(
        rows, columns, text_column, label_column, label, any_string=True)
    fingerprint = getattr(ds, "_fingerprint", None)
    description = {
        "kind": "hf",
        "name": name,
        "config": config,
        "split": split,
        "column": column,
        "label_column": label_name,
        "skipped_empty": skipped,
        "fingerprint": fingerprint,
    }
    return TextSource(texts, labels, description)


# ---------------------------------------------------------------------------------------------


def _finish(src: TextSource) -> TextSource:
    src.description["count"] = len(src.texts)
    src.description["sha256"] = content_sha256(src.texts, src.labels)
    return src


def load_texts(source: str = "default", text_column: Optional[str] = None, split: str = "train",
               label_column: Optional[str] = None) -> TextSource:
    """Load texts (and labels, when present) from the default corpus, a local file or an HF dataset.

    Args:
        source: ``"default"`` (see :func:`default_passages`); ``"topics"``, the same passages
            labelled by help topic (see :func:`topic_passages`); a local ``.txt`` (one text per
            paragraph separated by blank lines, or per line when there are no blank lines),
            ``.jsonl`` or ``.csv`` file; or a Hugging Face dataset ``"name"`` / ``"name:config"``.
        text_column: for .jsonl/.csv/datasets; by default "text", then "sentence" (for a
            dataset, then the first column holding strings).
        split: dataset split (HF datasets only; slicing like ``"train[:1000]"`` works).
        label_column: labels (for classification); by default "label" when there is one.
            Integer-like strings become ints; a split whose labels are all -1 has none.

    Empty texts are skipped (counted in ``description["skipped_empty"]``).
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError("source must be 'default', a .txt/.jsonl/.csv path or a dataset name; got an empty value")
    source_str = os.fspath(source).strip()
    if source_str == "default":
        if text_column is not None or label_column is not None:
            raise DataError("the default corpus has no columns; leave text_column and label_column unset")
        texts = default_passages()
        src = TextSource(texts, None, {"kind": "default", "name": "pydoc_data.topics", "min_words": 40, "max_words": 120})
        return _finish(src)
    if source_str == "topics":
        if text_column is not None or label_column is not None:
            raise DataError("the labelled default corpus has no columns; leave text_column and label_column unset")
        texts, labels = topic_passages()
        src = TextSource(texts, labels, {"kind": "default", "name": "pydoc_data.topics", "labels": "help topic",
                                         "classes": sorted(set(labels)), "min_passages": TOPIC_MIN_PASSAGES,
                                         "min_words": 40, "max_words": 120})
        return _finish(src)
    path = Path(source_str).expanduser()
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES:
        return _finish(_load_file(path, text_column, label_column))
    if path.is_dir():
        raise DataError(f"'{source_str}' is a folder; give a .txt, .jsonl or .csv file, or a dataset name")
    if path.is_file() or suffix in _OTHER_FILE_SUFFIXES:
        raise DataError(
            f"unsupported file type {suffix or '(no extension)'!r} for '{source_str}'; convert it to .txt, .jsonl or .csv"
        )
    return _finish(_load_hf(source_str, text_column, label_column, split))


def split_texts(source: TextSource, num_calib: int, num_eval: int, seed: int = 0) -> tuple[TextSource, TextSource]:
    """Seeded, disjoint calibration and evaluation subsets of ``source``.

    One permutation (NumPy PCG64 with ``seed``) is drawn; calibration takes its first
    ``num_calib`` indices and evaluation the next ``num_eval``. When there are too few texts,
    calibration keeps what it asked for as long as at least 2 texts remain for evaluation, and
    evaluation gets the rest (a warning says so; requested and actual counts are recorded).
    """
    for name, value, least in (("num_calib", num_calib, 1), ("num_eval", num_eval, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
    n = len(source.texts)
    if n < 3:
        raise DataError(
            f"only {n} texts: need at least 1 for calibration and 2 for evaluation; give more data"
        )
    calib_n = min(int(num_calib), n - 2)
    eval_n = min(int(num_eval), n - calib_n)
    if calib_n < num_calib or eval_n < num_eval:
        warnings.warn(
            f"only {n} texts for {num_calib} calibration + {num_eval} evaluation; using {calib_n} + {eval_n}",
            stacklevel=2,
        )
    perm = np.random.default_rng(seed).permutation(n)
    parts = {"calibration": perm[:calib_n], "evaluation": perm[calib_n : calib_n + eval_n]}
    out = []
    for role, idx in parts.items():
        idx = [int(i) for i in idx]
        texts = [source.texts[i] for i in idx]
        labels = [source.labels[i] for i in idx] if source.labels is not None else None
        other = "evaluation" if role == "calibration" else "calibration"
        description = {
            "kind": "subset",
            "role": role,
            "parent": dict(source.description),
            "seed": int(seed),
            "requested": int(num_calib if role == "calibration" else num_eval),
            "indices_count": len(idx),
            "indices_sha256": hashlib.sha256(json.dumps(idx).encode()).hexdigest(),
            "disjoint_with": other,
            "disjoint": True,
        }
        out.append(_finish(TextSource(texts, labels, description)))
    return out[0], out[1]
