"""fastText text classifiers for Chinese (the spam and quality filters of SPEC §3).

A model is a binary fastText supervised model whose labels are `__label__pos` (the class the
filter scores: spam, or high quality) and `__label__neg`. Every model is written with a JSON
manifest beside it (`spam.bin` → `spam.json`) recording what it was trained on and how well it did
on held-out data, so a threshold can be chosen knowingly.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import fasttext
import fsspec
import numpy as np

from cleaning import charclass, minhash
from cleaning.outputs import nearest_existing, nothing_left_on_failure, write_failure
from cleaning.writers import write_json_atomic

POSITIVE = "__label__pos"
NEGATIVE = "__label__neg"

# Labels other people's binary models commonly use for the class a filter wants to score.
_KNOWN_POSITIVE = ("__label__pos", "__label__positive", "__label__spam", "__label__hq",
                   "__label__high", "__label__quality", "__label__1")

# fastText's Python wrapper prints a deprecation notice on every load_model; it is noise here.
fasttext.FastText.eprint = lambda *args, **kwargs: None

_DIGIT = re.compile(r"\d")
# A run of ASCII letters/digits is one token (a Latin word, a number); any other non-space
# character is a token of its own; whitespace only separates.
_TOKEN = re.compile(r"[a-z0-9]+|\S")


class ClassifierError(ValueError):
    """A model file that cannot be used as a binary fastText text classifier."""


def to_fasttext_text(text: str, max_chars: int | None = None) -> str:
    """One line of space-separated tokens: Chinese characters one by one, Latin words whole.

    Characters rather than jieba words keep this fast and dictionary-free; `word_ngrams=2` then
    sees character bigrams, which carry most of the signal for Chinese. NFKC folds full-width
    forms (People's Daily writes `１９９８`, the web `1998`), so the model learns content, not the
    typography of one source; every digit becomes 0, so numbers are generalised by shape (an
    11-digit run looks like a phone number) instead of being memorised.

    The tokens are those of `reference_fasttext_text` (one regex match per token); here they are
    cut with numpy over the code points of a whole batch (`to_fasttext_texts`).
    """
    return to_fasttext_texts([text], max_chars)[0]


# The spam and quality classifiers read the same documents one after the other: the second asks
# for what the first prepared. Bounded, and emptied whole when full (batches are small).
_PREPARED: dict[str, str] = {}
_PREPARED_LIMIT = 8192


def to_fasttext_texts(texts: Sequence[str], max_chars: int | None = None) -> list[str]:
    """`to_fasttext_text` for a batch, in one numpy pass over all of its code points."""
    cut = [t[:max_chars] if max_chars is not None else t for t in texts]
    missing = list(dict.fromkeys(t for t in cut if t not in _PREPARED))
    if len(_PREPARED) + len(missing) > _PREPARED_LIMIT:
        _PREPARED.clear()
        missing = list(dict.fromkeys(cut))
    if missing:
        _PREPARED.update(zip(missing, _prepare_batch(missing)))
    return [_PREPARED[t] for t in cut]


def _prepare_batch(texts: list[str]) -> list[str]:
    # Joined by newlines: whitespace, so no token runs from one text into the next.
    raw = charclass.code_points("\n".join(texts))
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    text_of = np.repeat(np.arange(len(texts)), lengths + 1)[: raw.size]
    contextual = set(np.unique(text_of[minhash.composing_table()[raw]]).tolist())
    cps, inserted = minhash.fold_expanded(raw)  # lower(NFKC(c)) per character, by table
    if inserted is not None:
        text_of = np.insert(text_of, inserted, text_of[inserted - 1])
    classes = charclass.classify(cps)
    cps = np.where(classes == charclass.DIGIT, np.uint32(0x30), cps)
    keep = classes != charclass.SPACE
    chars = cps[keep]
    owner = text_of[keep]
    ascii_word = ((chars >= 0x61) & (chars <= 0x7A)) | ((chars >= 0x30) & (chars <= 0x39))
    # A token starts at every kept character, except inside a run of [a-z0-9] that was not
    # interrupted by whitespace in the original text; the first token of a text gets no space.
    kept_positions = np.flatnonzero(keep)
    adjacent = np.zeros(chars.size, dtype=bool)
    adjacent[1:] = kept_positions[1:] == kept_positions[:-1] + 1
    starts = np.ones(chars.size, dtype=bool)
    starts[1:] = ~(ascii_word[1:] & ascii_word[:-1] & adjacent[1:])
    first = np.ones(chars.size, dtype=bool)
    first[1:] = owner[1:] != owner[:-1]
    starts &= ~first
    # Every character with a space before it where a token starts: (space, character) pairs with
    # the unwanted spaces masked out (one pass; a scatter through computed positions was 6x slower).
    pairs = np.empty((chars.size, 2), dtype=np.uint32)
    pairs[:, 0] = 0x20
    pairs[:, 1] = chars
    wanted = np.ones((chars.size, 2), dtype=bool)
    wanted[:, 0] = starts
    joined = pairs[wanted].tobytes().decode("utf-32-le")
    # Each text's tokens span from its first kept character to its last one; in `joined`, a
    # character moved right by the spaces placed before it (none before a text's first character).
    spaces_before = np.concatenate([[0], np.cumsum(starts)])
    begin = np.searchsorted(owner, np.arange(len(texts)), side="left")
    end = np.searchsorted(owner, np.arange(len(texts)), side="right")
    begin_at, end_at = (begin + spaces_before[begin]).tolist(), (end + spaces_before[end]).tolist()
    prepared = []
    for i, text in enumerate(texts):
        if i in contextual:
            # A mark, jamo or capital sigma: normalise the whole string, as the definition does.
            prepared.append(reference_fasttext_text(text))
        else:
            prepared.append(joined[begin_at[i]:end_at[i]])
    return prepared


def reference_fasttext_text(text: str, max_chars: int | None = None) -> str:
    """The definition `to_fasttext_text` must equal (kept for tests)."""
    if max_chars is not None:
        text = text[:max_chars]
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DIGIT.sub("0", text)
    return " ".join(_TOKEN.findall(text))


def _fasttext_version() -> str:
    for dist in ("fasttext-numpy2-wheel", "fasttext-wheel", "fasttext"):
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _split(items: list[str], test_fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    items = list(items)
    rng.shuffle(items)
    n_test = max(1, int(round(len(items) * test_fraction)))
    return items[n_test:], items[:n_test]


def _metrics(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = prob >= threshold
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": round(float(np.mean(pred == truth)), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "threshold": threshold,
    }


def manifest_path(model_path: str | os.PathLike[str]) -> Path:
    return Path(model_path).with_suffix(".json")


# The first four bytes of every fastText binary (FASTTEXT_FILEFORMAT_MAGIC_INT32, little-endian).
_FASTTEXT_MAGIC = (793712314).to_bytes(4, "little")


def _is_fasttext_model(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == _FASTTEXT_MAGIC


def check_model_path(output: str | os.PathLike[str]) -> Path:
    """`output` as the path of a model to write, refused before any training when it cannot take one: a
    directory, a `.json` name (the manifest's), an existing file that is not a fastText model (a mistyped
    path would replace the training data), a path below a file, or a folder that cannot be written."""
    text = os.fspath(output)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; a classifier is one file: give its path, "
                                f"e.g. {path / 'classifier.bin'}")
    if path.suffix == ".json":
        raise ValueError(f"{path}: a model path may not end in .json (the manifest is written beside the model "
                         "under its name with .json); name the model .bin")
    if path.is_file() and not _is_fasttext_model(path):
        raise FileExistsError(f"{path} exists and is not a fastText model; choose another path or remove it")
    if manifest_path(path).is_dir():
        raise IsADirectoryError(f"cannot write the classifier's manifest {manifest_path(path)}: it is a directory")
    folder = nearest_existing(path.parent)
    if folder is not None and not folder.is_dir():
        raise NotADirectoryError(f"cannot write the classifier to {path}: {folder} is a file")
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the classifier to {path}: {folder} is not writable")
    return path


# fastText 0.9.2 initialises only `thread`/10 of the input matrix (DenseMatrix::uniformThread
# fills block i of 10 per thread) and leaves the rest as allocated. A fresh process gets that
# memory zeroed from the OS; a second training in the same process can reuse freed heap holding
# garbage, and fails at random with "Encountered NaN" (seen here with thread=1, any lr). So every
# training runs in its own short-lived interpreter.
_TRAIN_SCRIPT = (
    "import json, sys, fasttext\n"
    "model = fasttext.train_supervised(input=sys.argv[1], verbose=0, **json.loads(sys.argv[3]))\n"
    "model.save_model(sys.argv[2])\n"
)


def _train_in_subprocess(train_file: str, model_file: str, params: dict[str, Any]) -> None:
    proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, train_file, model_file, json.dumps(params)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(model_file):
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"fastText training failed: {tail[0]}")


def _train_into(output: Path, lines: list[str], params: dict[str, Any]) -> Any:
    """fastText on the labelled `lines`, in a temporary folder beside `output`; the model is renamed to
    `output` (whole, or not at all) and returned loaded. `params["lr"]` is lowered where it diverges."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        tmp_model = os.path.join(tmp, "model.bin")
        while True:
            try:
                _train_in_subprocess(train_file, tmp_model, params)
                break
            except RuntimeError as err:
                # fastText diverges on small sets when lr is too high; halve it rather than fail
                # (the manifest records the lr that was used).
                if "NaN" not in str(err) or params["lr"] < 0.01:
                    raise
                params["lr"] = round(params["lr"] / 2, 4)
        model = fasttext.load_model(tmp_model)
        os.replace(tmp_model, output)
    return model


def train_classifier(
    positives: Iterable[str],
    negatives: Iterable[str],
    output: str | os.PathLike[str],
    *,
    epoch: int = 10,
    lr: float = 0.3,
    word_ngrams: int = 2,
    dim: int = 32,
    bucket: int = 200_000,
    min_count: int = 2,
    max_chars: int = 3000,
    test_fraction: float = 0.1,
    seed: int = 0,
    thread: int = 1,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a binary classifier (positive = the class to score), hold out a test split, save.

    Writes `output` (a fastText .bin) and its manifest `output` with `.json`, both atomically;
    returns the manifest. `description` is merged into the manifest (sources, how the sets were
    picked). `thread=1` with a fixed seed makes a run reproducible; documents are cut to
    `max_chars` so that training time depends on the number of documents, not their length
    (the default bucket and dim keep a model around 25 MB instead of fastText's 2M-bucket ~800 MB).
    A failure leaves nothing behind: no model, and no folder made for it.
    """
    output = check_model_path(output)
    rng = random.Random(seed)
    pos = [t for t in (to_fasttext_text(x, max_chars) for x in positives) if t]
    neg = [t for t in (to_fasttext_text(x, max_chars) for x in negatives) if t]
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"need at least 2 non-empty positive and negative texts (got {len(pos)}, {len(neg)})")
    pos_train, pos_test = _split(pos, test_fraction, rng)
    neg_train, neg_test = _split(neg, test_fraction, rng)
    lines = [f"{POSITIVE} {t}" for t in pos_train] + [f"{NEGATIVE} {t}" for t in neg_train]
    rng.shuffle(lines)

    params = {"epoch": epoch, "lr": lr, "wordNgrams": word_ngrams, "dim": dim, "bucket": bucket,
              "minCount": min_count, "loss": "softmax", "seed": seed, "thread": thread}
    started = time.perf_counter()
    try:
        with nothing_left_on_failure(output.parent):  # no folder made for the model is left by a failure
            model = _train_into(output, lines, params)
    except OSError as exc:  # a temporary beside `output` that could not be written: name `output`
        raise write_failure("the classifier", output, exc) from exc
    train_seconds = time.perf_counter() - started

    classifier = TextClassifier(model, POSITIVE, str(output))
    prob = classifier._score_prepared(pos_test + neg_test)
    truth = np.array([True] * len(pos_test) + [False] * len(neg_test))
    manifest: dict[str, Any] = {
        "model": output.name,
        "labels": {"positive": POSITIVE, "negative": NEGATIVE},
        "counts": {"positive": {"train": len(pos_train), "test": len(pos_test)},
                   "negative": {"train": len(neg_train), "test": len(neg_test)}},
        "held_out": _metrics(truth, prob),
        "hyper_parameters": {**params, "max_chars": max_chars, "test_fraction": test_fraction,
                             "tokens": "NFKC, lower-cased, digits → 0, whitespace dropped, "
                                       "one token per CJK character / symbol / ASCII word"},
        "fasttext": _fasttext_version(),
        "train_seconds": round(train_seconds, 2),
        "vocabulary": len(model.words),
    }
    if description:
        manifest.update(description)
    write_json_atomic(str(manifest_path(output)), manifest)
    return manifest


def _jsonl_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Every JSONL(.gz) file a URI names: one file, a glob, or a directory (recursive)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if re.search(r"\.(jsonl|json|ndjson)(\.gz)?$", p))
    elif any(c in path for c in "*?["):
        paths = sorted(fs.glob(path))
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"{uri} does not exist")
    if not paths:
        raise FileNotFoundError(f"no JSONL files at {uri}")
    return fs, paths


def _read_jsonl_texts(uri: str, text_field: str, fs: fsspec.AbstractFileSystem,
                      paths: list[str]) -> tuple[list[str], dict[str, int]]:
    """The non-empty `text_field` strings of the JSONL files `uri` names (`paths`), and counts of what was
    read. One bad line (not UTF-8, not a JSON object, no text) is skipped and counted: it should not stop a
    training. An input with fewer than 2 texts is unusable, and refused with what its lines hold."""
    texts: list[str] = []
    counts = {"files": len(paths), "lines": 0, "texts": 0, "not_json_objects": 0, "without_text": 0}
    fields_found: set[str] = set()
    for p in paths:
        try:
            with fs.open(p, "rb", compression="gzip" if p.endswith(".gz") else None) as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    counts["lines"] += 1
                    try:
                        record = json.loads(line)  # bytes: not UTF-8 (a UnicodeDecodeError) is a ValueError too
                    except ValueError:
                        record = None
                    if not isinstance(record, dict):
                        counts["not_json_objects"] += 1
                        continue
                    text = record.get(text_field)
                    if isinstance(text, str) and text.strip():
                        texts.append(text)
                    else:
                        counts["without_text"] += 1
                        fields_found.update(list(record)[:20])
        except (OSError, EOFError, zlib.error) as exc:  # a damaged or truncated .gz, a folder named .jsonl
            raise OSError(f"{p} cannot be read ({exc})") from exc
    counts["texts"] = len(texts)
    if len(texts) < 2:
        raise ValueError(_too_few_texts(uri, text_field, counts, fields_found))
    return texts, counts


def _too_few_texts(uri: str, text_field: str, counts: dict[str, int], fields_found: set[str]) -> str:
    if not counts["lines"]:
        return f"{uri} is empty: no JSONL lines" if counts["files"] == 1 else f"{uri}: its JSONL files have no lines"
    if counts["texts"] == 1:
        return f"{uri} holds 1 text (a non-empty {text_field!r} field); a class needs at least 2"
    skipped = []
    if counts["not_json_objects"]:
        skipped.append(f"{counts['not_json_objects']:,} not JSON objects")
    if counts["without_text"]:
        found = f"; fields found: {', '.join(sorted(fields_found))}" if fields_found else ""
        skipped.append(f"{counts['without_text']:,} without it{found}")
    return (f"no texts in {uri}: none of its {counts['lines']:,} lines is a JSON object with a non-empty "
            f"{text_field!r} field ({'; '.join(skipped)})")


def train_from_files(positives_uri: str, negatives_uri: str, output: str | os.PathLike[str],
                     text_field: str = "text", **kwargs: Any) -> dict[str, Any]:
    """Train from JSONL inputs (file, glob or directory; any fsspec URI); see `train_classifier`. The manifest
    records what was read of each (`read`: files, lines, texts, and the lines skipped)."""
    check_model_path(output)  # before reading the inputs
    positive_fs, positive_paths = _jsonl_files(positives_uri)
    negative_fs, negative_paths = _jsonl_files(negatives_uri)
    shared = sorted({positive_fs.unstrip_protocol(p) for p in positive_paths}
                    & {negative_fs.unstrip_protocol(p) for p in negative_paths})
    if shared:  # one file cannot hold texts of both classes
        more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
        raise ValueError(f"{shared[0].removeprefix('file://')}{more} is among both the positives and the "
                         "negatives; a text belongs to one class")
    positives, positive_counts = _read_jsonl_texts(positives_uri, text_field, positive_fs, positive_paths)
    negatives, negative_counts = _read_jsonl_texts(negatives_uri, text_field, negative_fs, negative_paths)
    description = {"sources": {"positive": positives_uri, "negative": negatives_uri},
                   "text_field": text_field, "read": {"positive": positive_counts, "negative": negative_counts}}
    description.update(kwargs.pop("description", None) or {})
    return train_classifier(positives, negatives, output, description=description, **kwargs)


class TextClassifier:
    """A loaded binary classifier; `score` gives P(positive class) per text."""

    def __init__(self, model: Any, positive_label: str, path: str):
        self.model = model
        self.positive_label = positive_label
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str], positive_label: str | None = None) -> "TextClassifier":
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classifier model not found: {path} (train one with "
                                    "`pangu data fetch-assets` or point the config at your own)")
        try:
            model = fasttext.load_model(path)
        except ValueError as err:
            raise ClassifierError(f"{path} is not a fastText model: {err}") from err
        labels = list(model.labels or [])
        if not labels or not model.f.getArgs().model.name == "supervised":
            raise ClassifierError(f"{path} is a fastText model but not a supervised classifier")
        if positive_label is None:
            manifest = manifest_path(path)
            if manifest.is_file():
                positive_label = json.loads(manifest.read_text(encoding="utf-8")).get(
                    "labels", {}).get("positive")
            if positive_label is None:
                positive_label = next((lab for lab in _KNOWN_POSITIVE if lab in labels), None)
        if positive_label not in labels:
            raise ClassifierError(f"{path}: positive label {positive_label!r} is not among the "
                                  f"model's labels {labels}; pass positive_label=")
        return cls(model, positive_label, path)

    def _score_prepared(self, lines: list[str], batch_size: int = 4096) -> np.ndarray:
        out = np.empty(len(lines), dtype=np.float32)
        k = len(self.model.labels)
        for start in range(0, len(lines), batch_size):
            batch = lines[start:start + batch_size]
            labels, probs = self.model.predict(batch, k=k)
            for i, (labs, ps) in enumerate(zip(labels, probs)):
                scores = dict(zip(labs, ps))
                out[start + i] = min(1.0, max(0.0, float(scores.get(self.positive_label, 0.0))))
        return out

    def score(self, texts: Sequence[str], batch_size: int = 4096, max_chars: int = 3000) -> np.ndarray:
        """P(positive label) for each text, as float32 in [0, 1] (one fastText call per batch).

        Only the first `max_chars` characters of a document are read, as in training
        (`train_classifier` cuts documents at 3,000): it bounds the cost of megabyte documents,
        and a class like spam or quality shows in any long stretch.
        """
        return self._score_prepared(to_fasttext_texts(texts, max_chars), batch_size)
