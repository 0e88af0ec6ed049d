"""A user's bad input to `pangu tokenizer train|pack|released`: one `error:` line that names the file at fault and
says what is wrong, exit status 2, and nothing left that the command created."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.tokenization  # noqa: F401 - see below
from tests.test_tokenizer_common import clue_documents, corpus_dir, trained_model_dir, write_corpus

# The `tokenizer` commands import Prefect, whose log handler keeps the standard error of the moment Prefect is
# first imported. Imported here (at collection), that is pytest's own; imported first inside a test, it would
# be that test's capsys stream, closed when the test ends, and every later flow test would fail to log.


def _refused(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> str:
    """Runs `pangu ARGV`; asserts exit status 2 and one `error:` line holding every `expected` text."""
    from flows.cli import main

    os.environ.pop("PANGU_DEBUG", None)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _snapshot(path: Path) -> list[tuple[str, bytes]] | bytes | None:
    """What is at `path`, to tell whether a command changed it."""
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def _damaged_page() -> bytes:
    """A Parquet file whose footer is intact but whose text page holds bytes that are not UTF-8 (what a flipped
    bit on disk looks like once the page is read)."""
    buffer = io.BytesIO()
    texts = ["第一篇文档。", "第二篇文档，独一无二的句子。", "第三篇。"]
    pq.write_table(pa.table({"text": texts, "domain": ["news"] * 3}), buffer, compression="none",
                   use_dictionary=False, write_statistics=False)
    raw = bytearray(buffer.getvalue())
    raw[raw.index("独一无二".encode())] = 0xFF
    return bytes(raw)


def _table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# case → (the bytes of the damaged part made from a good one, what the message says right after the part's path)
SHARDS = {
    "random bytes": (lambda good: bytes(range(256)) * 8, " is not a readable Parquet file (Parquet magic bytes"),
    "truncated": (lambda good: good[: len(good) // 2], " is not a readable Parquet file (Parquet magic bytes"),
    "zero bytes": (lambda good: b"", " is not a readable Parquet file (Parquet file size is 0 bytes)"),
    "damaged page": (lambda good: _damaged_page(),
                     " is not a readable Parquet file (In column 0: Invalid: Invalid UTF8"),
    "no text column": (lambda good: _table_bytes(pa.table({"body": ["一篇文档。"] * 3})),
                       " has no 'text' column (its columns: body)"),
    "integer text": (lambda good: _table_bytes(pa.table({"text": [1, 2, 3]})), ": column 'text' holds int64, not text"),
}


def _corpus_with_a_damaged_part(root: Path, case: str) -> Path:
    """A corpus of a good part-00000 and a damaged part-00001."""
    corpus = write_corpus(root / "corpus", list(clue_documents())[:120], shards=2)
    part = corpus / "data" / "part-00001.parquet"
    part.write_bytes(SHARDS[case][0](part.read_bytes()))
    return part


def _command(command: str, corpus: Path, output: Path) -> list[str]:
    if command == "train":
        return ["tokenizer", "train", "--corpus", str(corpus), "--output", str(output), "--vocab-size", "3000",
                "--workers", "1"]
    return ["tokenizer", "pack", "--corpus", str(corpus), "--tokenizer", str(trained_model_dir()),
            "--output", str(output), "--workers", "1"]


@pytest.mark.parametrize("case", sorted(SHARDS))
@pytest.mark.parametrize("command", ["train", "pack"])
def test_a_damaged_or_textless_part_is_named_and_nothing_is_left(tmp_path, capsys, command, case):
    """Random bytes named part-00000.parquet, a part cut short or damaged inside, one without its text column:
    the message used to be pyarrow's alone (or a traceback, for a column of integers), and `pack` left its
    output directory behind. A pre-existing empty output stays empty. A damaged page is found only when `pack`
    reads it, after it packed the first part: that part stays, and the rerun after the repair skips it."""
    part = _corpus_with_a_damaged_part(tmp_path, case)
    fresh = tmp_path / "runs" / "out"  # its parent does not exist either
    _refused(capsys, _command(command, part.parents[1], fresh),
             f"pangu tokenizer {command}: error: {part}{SHARDS[case][1]}")
    if command == "pack" and case == "damaged page":
        assert sorted(p.name for p in fresh.glob("*.done.json")) == ["part-00000.done.json"]
        packed = (fresh / "part-00000.done.json").stat().st_mtime_ns
        part.write_bytes(_table_bytes(pa.table({"text": ["修好的第二部分，一篇新的文档。"], "domain": ["news"]})))
        from flows.cli import main

        assert main(_command(command, part.parents[1], fresh)) == 0, capsys.readouterr().err
        assert (fresh / "part-00000.done.json").stat().st_mtime_ns == packed
        assert (fresh / "part-00001.done.json").is_file()
        return
    assert not (tmp_path / "runs").exists()
    if command == "pack":
        empty = tmp_path / "empty"
        empty.mkdir()
        _refused(capsys, _command(command, part.parents[1], empty), f"error: {part}")
        assert list(empty.iterdir()) == []


@pytest.mark.parametrize("rows", ["no rows", "only blank texts"])
@pytest.mark.parametrize("command", ["train", "pack"])
def test_a_corpus_without_text_is_refused_naming_it(tmp_path, capsys, command, rows):
    """A corpus whose parts hold no text: `pack` used to write token shards of nothing (exit 0), and `train`'s
    message did not say which corpus."""
    texts = [] if rows == "no rows" else ["", "  \n ", None]
    corpus = tmp_path / "corpus"
    (corpus / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), corpus / "data" / "part-00000.parquet")
    verb = {"train": "train on", "pack": "pack"}[command]
    _refused(capsys, _command(command, corpus, tmp_path / "out"), f"no text to {verb} in {corpus}", "empty or blank")
    assert not (tmp_path / "out").exists()


_WHAT = {"train": "the tokenizer", "pack": "token shards", "released": "the released tokenizer"}


@pytest.mark.parametrize("case", ["a file", "below a file", "a folder nobody may write"])
@pytest.mark.parametrize("command", ["train", "pack", "released"])
def test_an_output_that_cannot_be_written_says_why_in_its_own_terms(tmp_path, capsys, command, case):
    """The message used to be an errno line naming the file that was in the way, or the temporary directory
    beside the output (`/sys/.tok.1234-….tmp`), not the user's --output."""
    if case == "a folder nobody may write" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("mine\n")
    output = {"a file": in_the_way, "below a file": in_the_way / "out",
              "a folder nobody may write": Path("/sys/pangu-tokens")}[case]
    reason = {"a file": "it is a file", "below a file": f"{in_the_way} is a file",
              "a folder nobody may write": ""}[case]  # /sys: "not writable", or the file system's refusal as root
    corpus = write_corpus(tmp_path / "corpus", list(clue_documents())[:40], shards=1)
    argv = (["tokenizer", "released", "--output", str(output)] if command == "released"
            else _command(command, corpus, output))
    _refused(capsys, argv, f"error: cannot write {_WHAT[command]} to {output}: {reason}")
    assert in_the_way.read_text() == "mine\n"


def test_file_uris_are_local_paths_and_other_schemes_are_refused_before_any_work():
    """`tokenizer train --output file:///x` trained for minutes, then failed naming `file:/x`; `pack` into
    `file:///x` failed with "No such file or directory: 'file:/x/part-00000.domains.npy'" and left its files."""
    from tokenizer.config import PackConfig, TokenizerTrainConfig

    assert TokenizerTrainConfig(output="file:///tmp/tok").output == "/tmp/tok"
    pack = PackConfig(input="c", output="file:///tmp/tokens", tokenizer="file:///tmp/tok")
    assert (pack.output, pack.tokenizer) == ("/tmp/tokens", "/tmp/tok")
    with pytest.raises(ValueError, match="s3://bucket/tok is not a local path: the tokenizer stage writes local"):
        TokenizerTrainConfig(output="s3://bucket/tok")
    with pytest.raises(ValueError, match="s3://bucket/tokens is not a local path"):
        PackConfig(input="c", output="s3://bucket/tokens", tokenizer="/tmp/tok")


@pytest.mark.parametrize("command, holds", [("pack", "notes"), ("released", "notes"), ("released", "a tokenizer")])
def test_an_output_holding_something_else_is_left_as_it_was(tmp_path, capsys, command, holds):
    """`pack` used to put its shards among a folder's own files, and `released` to replace another tokenizer's
    spm.model (exit 0 both)."""
    output = tmp_path / "out"
    if holds == "notes":
        output.mkdir()
        (output / "notes.txt").write_text("mine\n")
    else:
        shutil.copytree(trained_model_dir(), output)
    before = _snapshot(output)
    argv = (["tokenizer", "released", "--output", str(output)] if command == "released"
            else _command(command, corpus_dir(), output))
    expected = ({"notes": "holds other files", "a tokenizer": "holds another tokenizer"}[holds]
                if command == "released" else "holds no token shards")
    _refused(capsys, argv, f"error: {output}", expected, "choose another output")
    assert _snapshot(output) == before


def test_a_failed_training_leaves_no_folder_it_made(tmp_path, capsys):
    """A vocabulary larger than the text holds is found by sentencepiece, after the folders of --output were
    made for its temporary directory: they used to stay behind."""
    corpus = write_corpus(tmp_path / "corpus", list(clue_documents())[:40], shards=1)
    _refused(capsys, ["tokenizer", "train", "--corpus", str(corpus), "--output", str(tmp_path / "runs" / "a" / "tok"),
                      "--vocab-size", "60000", "--workers", "1"], "is more than the training text holds")
    assert not (tmp_path / "runs").exists()


def test_an_output_whose_tokenizer_json_is_damaged_is_named(tmp_path, capsys):
    """It used to be json's message alone (`Expecting property name ...`), without the file."""
    output = tmp_path / "tok"
    output.mkdir()
    (output / "tokenizer.json").write_text("{not json")
    corpus = write_corpus(tmp_path / "corpus", list(clue_documents())[:40], shards=1)
    _refused(capsys, _command("train", corpus, output), f"error: {output / 'tokenizer.json'}: not JSON")
    assert [p.name for p in output.iterdir()] == ["tokenizer.json"]


def test_the_flow_retries_a_read_that_failed_but_not_a_damaged_part(prefect_api, tmp_path, monkeypatch):
    """The tokenizer flow's pack task retried a damaged part twice, 10 s apart, though it fails the same way each
    time; a read that fails once (a timeout on an object store) is still retried."""
    from prefect import flow

    import flows.tokenization as tokenization
    from tokenizer.config import PackConfig
    from tokenizer.corpus import CorpusError
    from tokenizer.pack import start_packing

    part = _corpus_with_a_damaged_part(tmp_path, "damaged page")
    config = PackConfig(input=str(part.parents[1]), output=str(tmp_path / "tokens"), tokenizer=str(trained_model_dir()))
    shards, domain_ids = start_packing(config)
    calls: list[str] = []
    real = tokenization.pack_shard

    def pack_shard(shard, *args, **kwargs):
        calls.append(shard.rsplit("/", 1)[-1])
        if shard.endswith("part-00000.parquet") and calls.count("part-00000.parquet") == 1:
            raise OSError("read timed out")
        return real(shard, *args, **kwargs)

    monkeypatch.setattr(tokenization, "pack_shard", pack_shard)
    task = tokenization.pack_shard_task.with_options(retry_delay_seconds=0)

    @flow
    def pack_each(shard: str) -> dict:
        return task(shard, config, domain_ids)

    assert pack_each(shards[0])["documents"] > 0
    state = pack_each(shards[1], return_state=True)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), CorpusError)
    assert calls == ["part-00000.parquet", "part-00000.parquet", "part-00001.parquet"]
