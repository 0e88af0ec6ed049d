"""Training: the special-id layout, tokenizer.json, jieba boundaries, sampling, reuse of a finished dir."""
from __future__ import annotations

import json
import re

import pytest
import sentencepiece as spm

from tests.test_temporaries import left_by_a_killed_writer
from tests.test_tokenizer_common import TINY, clue_documents, trained_model_dir, write_corpus
from tokenizer.corpus import CorpusError
from tokenizer.pangu import PanguTokenizer
from tokenizer.specials import SPECIAL_PIECES
from tokenizer.train import TokenizerTrainConfig, TrainError, sample_lines, split_long, train_tokenizer


def test_special_ids_are_pinned() -> None:
    sp = spm.SentencePieceProcessor(model_file=str(trained_model_dir() / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(10)] == [
        "<unk>", "<s>", "</s>", "▃", "▂", "<sep>", "<pad>", "<mask>", "<eod>", "<eot>"
    ]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 6)
    assert sp.get_piece_size() == 4000
    # "▃"/"▂" are always single pieces, whatever surrounds them.
    assert 3 in sp.encode("你好 ▃ 世界") and 4 in sp.encode("a ▂ b")


def test_tokenizer_json_records_the_run() -> None:
    meta = json.loads((trained_model_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    assert meta["special_tokens"]["eot"] == {"id": 9, "piece": "<eot>"}
    assert meta["encoding"]["jieba_version"] == "0.42.1"
    assert meta["options"]["model_type"] == "unigram" and meta["options"]["byte_fallback"] is False
    assert meta["options"]["normalization_rule_name"] == "nmt_nfkc"
    training = meta["training"]
    assert training["sample_lines"] == TINY["input_sentence_size"] < training["lines_seen"]
    assert training["seconds"]["train"] > 0 and training["seed"] == TINY["seed"]
    assert (trained_model_dir() / "spm.vocab").read_text(encoding="utf-8").startswith("<unk>\t0\n<s>\t0\n")


def test_pieces_never_cross_jieba_words() -> None:
    tok = PanguTokenizer.load(trained_model_dir())
    for _, text in clue_documents()[::40]:
        segmented = tok.segment(text)
        pieces = tok.sp.encode(segmented, out_type=str)
        words, current = [], ""
        for piece in pieces:
            if piece.startswith("▁") and current:
                words.append(current)
                current = ""
            current += piece
        words.append(current)
        # Each sentencepiece word (pieces from one "▁" to the next) is exactly one jieba word.
        normalised = [tok.sp.normalize(w).lstrip("▁") for w in segmented.split(" ")]
        assert [w.lstrip("▁") for w in words if w != "▁"] == [w for w in normalised if w]


def test_sampling_is_seeded_and_bounded() -> None:
    docs = [f"第{i}行\n  \n第{i}行乙" for i in range(500)]
    a, counts = sample_lines(docs, 100, shuffle=True, seed=3)
    b, _ = sample_lines(docs, 100, shuffle=True, seed=3)
    c, _ = sample_lines(docs, 100, shuffle=True, seed=4)
    assert a == b != c and len(a) == 100 and counts == {"documents_read": 500, "lines_seen": 1000}
    assert any(line.startswith("第4") for line in a[50:])  # a reservoir, not the first lines
    first, _ = sample_lines(docs, 10, shuffle=False, seed=3)
    assert first == [f"第{i // 2}行" + ("乙" if i % 2 else "") for i in range(10)]


def test_split_long_cuts_at_word_boundaries() -> None:
    words = ["中国", "人民", "银行"] * 300
    pieces = list(split_long(" ".join(words), 300))
    assert all(len(p.encode()) <= 300 for p in pieces)
    assert " ".join(pieces).split(" ") == words
    assert all(len(p.encode()) <= 300 for p in split_long("长" * 1000, 300))


def test_bpe_from_iterator_reuse_and_conflicts(tmp_path) -> None:
    texts = [t for _, t in clue_documents()[::6]]
    config = TokenizerTrainConfig(output=str(tmp_path / "bpe"), model_type="bpe", vocab_size=3000,
                                  character_coverage=0.99, input_sentence_size=3000, seed=1)
    meta = train_tokenizer(config, iter(texts))
    assert meta["options"]["model_type"] == "bpe"
    tok = PanguTokenizer.load(tmp_path / "bpe")
    assert [tok.id_to_piece(i) for i in range(10)] == list(SPECIAL_PIECES)
    vocab = (tmp_path / "bpe" / "spm.vocab").read_text(encoding="utf-8")
    # Same config: the finished directory is kept (the iterator is never read), and the user is told so (a rerun
    # that reused it said nothing, and the command then said "tokenizer written to").
    heard: list[str] = []
    assert train_tokenizer(config, iter(()), progress=heard.append) == meta
    assert heard == [f"{tmp_path / 'bpe'} already holds a tokenizer of this corpus and these options: kept, not "
                     "trained again"]
    # Same seed and sample, fresh directory: the same model, byte for byte (it embedded the trainer's
    # temporary path, and packed shards record its sha256), and the same vocabulary file.
    again = config.model_copy(update={"output": str(tmp_path / "bpe2")})
    killed = left_by_a_killed_writer(tmp_path / "bpe2")  # the work directory of a killed training
    (killed / "spm.model").parent.mkdir()
    (killed / "spm.model").write_bytes(b"partial")
    assert train_tokenizer(again, iter(texts))["model_sha256"] == meta["model_sha256"]
    assert (tmp_path / "bpe2" / "spm.model").read_bytes() == (tmp_path / "bpe" / "spm.model").read_bytes()
    assert (tmp_path / "bpe2" / "spm.vocab").read_text(encoding="utf-8") == vocab
    assert not killed.exists() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileExistsError):
        train_tokenizer(config.model_copy(update={"vocab_size": 2500}), iter(texts))


def test_bad_inputs(tmp_path) -> None:
    with pytest.raises(CorpusError, match="no corpus shards"):
        train_tokenizer(TokenizerTrainConfig(input=str(tmp_path), output=str(tmp_path / "t")))
    with pytest.raises(TrainError, match="no text"):
        train_tokenizer(TokenizerTrainConfig(output=str(tmp_path / "t")), iter(["", "  \n "]))
    # A vocabulary larger than the text holds: what to change, with sentencepiece's own bound
    with pytest.raises(TrainError, match=r"vocabulary of 40,000 pieces is more than the training text holds: "
                                         r"sentencepiece finds at most \d+ in the 20 lines sampled from 20 documents"):
        train_tokenizer(TokenizerTrainConfig(output=str(tmp_path / "t"), vocab_size=40_000), iter(["一二三 四五六"] * 20))
    lines = ["一二三四五六七八九十甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥"[i:i + 5] for i in range(30)]
    with pytest.raises(TrainError, match=r"vocabulary of 12 pieces is smaller than the \d+ pieces \(characters and "
                                         r"special tokens\) that character_coverage 0.9995 keeps"):
        train_tokenizer(TokenizerTrainConfig(output=str(tmp_path / "t"), vocab_size=12), iter(lines))
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.*"))
    with pytest.raises(ValueError, match="layout"):
        train_tokenizer(TokenizerTrainConfig(output=str(tmp_path / "t"), trainer_options={"pad_id": 3}), iter(["一"]))


def test_trains_from_corpus_shards_with_empty_documents(tmp_path) -> None:
    docs = [("news", t) for _, t in clue_documents()[:300]] + [("news", None), ("web", "   ")]
    corpus = write_corpus(tmp_path / "corpus", docs, shards=2)
    meta = train_tokenizer(TokenizerTrainConfig(input=str(corpus), output=str(tmp_path / "tok"), vocab_size=2500,
                                                character_coverage=0.98, input_sentence_size=800,
                                                max_input_documents=250))
    assert meta["training"]["documents_read"] == 250 and meta["training"]["sample_lines"] == 800


def test_training_says_where_it_is(tmp_path, monkeypatch) -> None:
    """The sampling pass reads every document of the corpus (hours at a terabyte), then jieba and sentencepiece
    run for minutes more, and the training said nothing until it ended: progress lines, the sampling's with
    the documents read of how many (from the shards' footers)."""
    import tokenizer.train

    monkeypatch.setattr(tokenizer.train, "PROGRESS_EVERY_S", 0.0)  # a line every 1,024 documents
    docs = [("news", t) for _, t in clue_documents()[:300]] * 8
    corpus = write_corpus(tmp_path / "corpus", docs, shards=2)
    heard: list[str] = []
    train_tokenizer(TokenizerTrainConfig(input=str(corpus), output=str(tmp_path / "tok"), vocab_size=2000,
                                         character_coverage=0.98, input_sentence_size=800), progress=heard.append)
    # a line every 1,024 documents of a reader, and at the end of each shard (2 of 1,200 documents)
    sampling = [line for line in heard if line.startswith("sampling lines:")]
    assert re.fullmatch(r"sampling lines: 1,024 of 2,400 documents read \(42\.7 %\), [\d,]+ characters, \d+ s",
                        sampling[0]), sampling
    assert re.fullmatch(r"sampling lines: 2,400 of 2,400 documents read \(100\.0 %\), .*", sampling[-1]), sampling
    phases = heard[len(sampling):]
    assert re.fullmatch(r"sampled 800 of [\d,]+ lines from 2,400 documents in \d+ s; segmenting them with jieba "
                        r"\(\d+ worker\(s\)\)", phases[0]), phases[0]
    assert re.fullmatch(r"segmented in \d+ s; training sentencepiece \(unigram, vocabulary 2,000\) on [\d,]+ lines",
                        phases[1]), phases[1]
    assert re.fullmatch(r"sentencepiece trained in \d+ s", phases[2]) and len(phases) == 3
    # documents given as an iterable: no total to measure against
    heard.clear()
    train_tokenizer(TokenizerTrainConfig(output=str(tmp_path / "tok2"), vocab_size=2000, character_coverage=0.98,
                                         input_sentence_size=800), (t for _, t in docs), progress=heard.append)
    assert re.fullmatch(r"sampling lines: 1,024 documents read, [\d,]+ characters, \d+ s", heard[0]), heard[0]


def test_the_character_coverage_the_error_advises_is_a_flag_of_the_command(tmp_path, capsys) -> None:
    """The too-small-vocabulary error advised "a lower character_coverage", which no command could set."""
    from flows.cli import main

    corpus = write_corpus(tmp_path / "corpus", [("news", t) for _, t in clue_documents()[:300]], shards=1)
    args = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "1600", "--input-sentence-size", "800"]
    assert main([*args, "--output", str(tmp_path / "refused")]) == 2
    assert "or a lower character_coverage (--character-coverage)" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "tok"), "--character-coverage", "0.98"]) == 0
    assert "[pangu] tokenizer: sentencepiece trained in" in capsys.readouterr().err  # progress, phase by phase
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["options"]["character_coverage"] == 0.98


def test_sentencepiece_s_thread_count_is_part_of_the_fingerprint(tmp_path) -> None:
    """sentencepiece's unigram trainer gives another model for another thread count, and a tokenizer trained
    with 2 threads was taken as made by a config that asked for 1."""
    import hashlib

    texts = [t for _, t in clue_documents()[:200]]
    config = {"output": str(tmp_path / "tok"), "vocab_size": 1800, "character_coverage": 0.98,
              "input_sentence_size": 600}
    made = train_tokenizer(TokenizerTrainConfig(**config), iter(texts))
    with pytest.raises(FileExistsError, match="trained with another config"):
        train_tokenizer(TokenizerTrainConfig(**config, num_threads=1), iter(texts))
    alone = train_tokenizer(TokenizerTrainConfig(**{**config, "output": str(tmp_path / "alone")}, num_threads=1),
                            iter(texts))
    assert alone["training"]["config_fingerprint"] != made["training"]["config_fingerprint"]
    # the default's fingerprint is the one tokenizers trained before the thread count counted carry
    default = TokenizerTrainConfig(**config)
    payload = default.model_dump(exclude={"output", "num_threads", "workers", "overwrite", "verbose"})
    assert default.fingerprint() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
