"""Train the PanGu-α tokenizer: sample lines → jieba → sentencepiece (SPEC §4).

Lines are sampled before segmentation, because jieba is the slow part: a seeded uniform sample of the
lines of the input documents (`tokenizer.sampling`, read by `workers` processes; or the first lines, with
`shuffle_input_sentence=False`), bounded by `input_sentence_size` whatever the corpus size. Each sampled
line is segmented exactly as the encoder segments text (jieba words joined by spaces, " " → "▂"), so
sentencepiece, which never merges across a space, learns no piece that crosses a jieba word boundary.
jieba cuts text at every newline anyway, so segmenting a line alone gives the same words as segmenting
its whole document.
"""
from __future__ import annotations

import io
import multiprocessing
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import sentencepiece as spm

from cleaning.orphans import exit_with_parent
from cleaning.temporaries import temporary_directory
from cleaning.writers import read_json
from tokenizer.artifacts import META_FILE, write_tokenizer_dir
from tokenizer.config import TokenizerTrainConfig
from cleaning.outputs import check_output_directory, nothing_left_on_failure, write_failure
from tokenizer.pangu import PanguTokenizer, check_layout, load_sentencepiece
from tokenizer.parallel import chunk_texts
from tokenizer.sampling import Progress, sample_corpus, sample_lines
from tokenizer.segment import fast_segment
from tokenizer.specials import TRAINER_LAYOUT


# Seconds between the sampling pass's progress lines: it reads every document of the corpus (to sample its
# lines uniformly), hours at a terabyte on one process, and said nothing while it did.
PROGRESS_EVERY_S = 60.0


class TrainError(ValueError):
    """sentencepiece refused the sample (vocabulary too large for it, no usable text, …): the text or the
    options have to change, so it is the user's to fix (a ValueError)."""


# sentencepiece's words for a vocabulary larger than the sample holds, and smaller than its characters
_VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_VOCAB_BELOW_CHARS = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _train_error(exc: RuntimeError, config: TokenizerTrainConfig, lines: int, documents: int) -> TrainError:
    """What the user has to change, where sentencepiece's message says it in its own terms."""
    sample = f"the {lines:,} lines sampled from {documents:,} documents"
    if too_high := _VOCAB_TOO_HIGH.search(str(exc)):
        asked, most = (int(n) for n in too_high.groups())
        return TrainError(f"a vocabulary of {asked:,} pieces is more than the training text holds: sentencepiece "
                          f"finds at most {most:,} in {sample}; give a vocab_size (--vocab-size) of {most:,} or less, "
                          "or more text")
    if below := _VOCAB_BELOW_CHARS.search(str(exc)):
        asked, needed = (int(n) for n in below.groups())
        return TrainError(f"a vocabulary of {asked:,} pieces is smaller than the {needed:,} pieces (characters and "
                          f"special tokens) that character_coverage {config.character_coverage} keeps of {sample}; "
                          f"give a vocab_size (--vocab-size) of at least {needed:,} (well above it, for pieces "
                          "longer than a character), or a lower character_coverage (--character-coverage)")
    return TrainError(f"sentencepiece training failed: {exc}")


def _segment_chunk(lines: list[str]) -> list[str]:
    return [fast_segment(line) for line in lines]


def segment_lines(lines: list[str], workers: int) -> list[str]:
    """The encoder's segmentation of every line, in order."""
    if workers <= 1:
        return _segment_chunk(lines)
    chunks = list(chunk_texts(lines, chunk_chars=200_000, chunk_docs=4096))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent) as pool:
        return [s for part in pool.map(_segment_chunk, chunks) for s in part]


def split_long(segmented: str, max_bytes: int) -> Iterator[str]:
    """Pieces of at most `max_bytes` UTF-8 bytes, cut at spaces (jieba word boundaries) where possible.

    sentencepiece silently skips longer lines, which would bias the sample against long paragraphs.
    """
    if len(segmented.encode("utf-8")) <= max_bytes:
        yield segmented
        return
    piece: list[str] = []
    size = 0
    for word in segmented.split(" "):
        w = len(word.encode("utf-8")) + 1
        if piece and size + w > max_bytes:
            yield " ".join(piece)
            piece, size = [], 0
        if w > max_bytes:  # one enormous "word" (e.g. a base64 blob): cut by characters
            while len(word.encode("utf-8")) > max_bytes:
                cut = max_bytes // 4
                yield word[:cut]
                word = word[cut:]
            w = len(word.encode("utf-8")) + 1
        piece.append(word)
        size += w
    if piece:
        yield " ".join(piece)


def trainer_arguments(config: TokenizerTrainConfig) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "character_coverage": config.character_coverage,
        "normalization_rule_name": config.normalization_rule_name,
        "byte_fallback": config.byte_fallback,
        # Already sampled (and shuffled) above, so sentencepiece takes every line it is given.
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "max_sentence_length": config.max_sentence_length,
        "max_sentencepiece_length": config.max_sentencepiece_length,
        "split_digits": config.split_digits,
        "num_threads": config.num_threads,
        "minloglevel": 0 if config.verbose else 2,
        **TRAINER_LAYOUT,
    }
    clash = set(config.trainer_options) & set(TRAINER_LAYOUT)
    if clash:
        raise ValueError(f"trainer_options may not change the special-token layout: {sorted(clash)}")
    return {**args, **config.trainer_options}


# Said to whoever gives an output that holds something else. The command line has no overwrite flag (a
# mistyped output would be emptied): it names the config field for library callers only.
_ELSEWHERE = "choose another output or remove it (from Python, TokenizerTrainConfig(overwrite=True) replaces it)"


def _existing(output: Path, config: TokenizerTrainConfig) -> dict[str, Any] | None:
    check_output_directory(output, "the tokenizer")
    meta_path = output / META_FILE
    if not meta_path.is_file():
        if output.exists() and any(output.iterdir()) and not config.overwrite:
            raise FileExistsError(f"{output} is not empty and is not a tokenizer directory; {_ELSEWHERE}")
        return None
    meta = read_json(str(meta_path))
    if meta.get("training", {}).get("config_fingerprint") == config.fingerprint() and not config.overwrite:
        return meta
    if not config.overwrite:
        raise FileExistsError(f"{output} holds a tokenizer trained with another config; {_ELSEWHERE}")
    return None


def train_tokenizer(config: TokenizerTrainConfig, texts: Iterable[str] | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Train into `config.output`; return the contents of its tokenizer.json.

    `texts` (any iterable of documents) replaces `config.input`. A finished directory made with the
    same config is kept as it is (the training is not repeated). A failure leaves nothing it created.
    `progress(message)` hears where the training is: the sampling pass every PROGRESS_EVERY_S (documents
    read, of how many), then the start and end of each phase.
    """
    output = Path(config.output)
    done = _existing(output, config)
    if done is not None:
        if progress is not None:
            progress(f"{output} already holds a tokenizer of this corpus and these options: kept, not trained again")
        return done
    with nothing_left_on_failure(output):
        return _sample_and_train(config, output, texts, progress or (lambda message: None))


def _sample_and_train(config: TokenizerTrainConfig, output: Path, texts: Iterable[str] | None,
                      progress: Progress) -> dict[str, Any]:
    source = "" if texts is not None else f" in {config.input}"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if texts is None:
        if config.input is None:
            raise ValueError("give config.input (a corpus directory) or texts")
        lines, counts = sample_corpus(config.input, config.text_field, config.input_sentence_size,
                                      config.shuffle_input_sentence, config.seed, config.workers,
                                      config.max_input_documents, progress, PROGRESS_EVERY_S)
    else:
        if config.max_input_documents is not None:
            texts = islice(texts, config.max_input_documents)
        lines, counts = sample_lines(texts, config.input_sentence_size, config.shuffle_input_sentence, config.seed,
                                     progress, every_s=PROGRESS_EVERY_S)
    timings["sample"] = time.perf_counter() - start
    if not lines:
        raise TrainError(f"no text to train on{source}: every document is empty or blank (or there are none)")
    progress(f"sampled {len(lines):,} of {counts['lines_seen']:,} lines from {counts['documents_read']:,} documents "
             f"in {timings['sample']:.0f} s; segmenting them with jieba ({config.workers} worker(s))")

    start = time.perf_counter()
    segmented = [p for s in segment_lines(lines, config.workers) for p in split_long(s, config.max_sentence_length)]
    timings["segment"] = time.perf_counter() - start
    progress(f"segmented in {timings['segment']:.0f} s; training sentencepiece ({config.model_type}, vocabulary "
             f"{config.vocab_size:,}) on {len(segmented):,} lines")

    try:
        meta = _train_sentencepiece(config, output, segmented, lines, counts, timings)
    except OSError as exc:  # a temporary beside `output` that could not be written: name `output`
        raise write_failure("the tokenizer", output, exc) from exc
    progress(f"sentencepiece trained in {timings['train']:.0f} s")
    return meta


def _train_sentencepiece(config: TokenizerTrainConfig, output: Path, segmented: list[str], lines: list[str],
                         counts: dict[str, int], timings: dict[str, float]) -> dict[str, Any]:
    """sentencepiece on the segmented sample, in a temporary directory beside `output`, moved into place."""
    with temporary_directory(output) as work:
        start = time.perf_counter()
        spm.set_random_generator_seed(config.seed)
        trained = io.BytesIO()
        try:
            # The model comes back as bytes, not as files under a `model_prefix`, which the model would record:
            # the temporary directory's random name made every training's spm.model (and its sha256, which
            # packed shards record) differ from the last one's, the pieces and scores all equal.
            spm.SentencePieceTrainer.train(sentence_iterator=iter(segmented), model_writer=trained,
                                           **trainer_arguments(config))
        except RuntimeError as exc:
            raise _train_error(exc, config, len(lines), counts["documents_read"]) from exc
        timings["train"] = time.perf_counter() - start

        model_proto = trained.getvalue()
        sp = load_sentencepiece(model_proto, "the trained model")
        check_layout(sp, "the trained model")
        meta = {
            "options": {
                "model_type": config.model_type,
                "vocab_size": config.vocab_size,
                "character_coverage": config.character_coverage,
                "normalization_rule_name": config.normalization_rule_name,
                "byte_fallback": config.byte_fallback,
                "max_sentencepiece_length": config.max_sentencepiece_length,
                "split_digits": config.split_digits,
                "trainer_options": config.trainer_options,
            },
            "training": {
                "input": config.input,
                "seed": config.seed,
                "input_sentence_size": config.input_sentence_size,
                "shuffle_input_sentence": config.shuffle_input_sentence,
                "sample_lines": len(lines),
                "sample_characters": sum(len(line) for line in lines),
                "sentencepiece_lines": len(segmented),
                **counts,
                "seconds": {k: round(v, 3) for k, v in timings.items()},
                "config_fingerprint": config.fingerprint(),
            },
            "config": config.model_dump(),
        }
        staged = work / "out"
        write_tokenizer_dir(staged, model_proto, meta)  # spm.vocab as sentencepiece writes it (vocab_text)
        if output.exists():
            shutil.rmtree(output)
        staged.rename(output)
    return PanguTokenizer.load(output).meta


__all__ = ["TokenizerTrainConfig", "TrainError", "train_tokenizer", "sample_lines", "split_long"]
