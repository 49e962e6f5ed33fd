"""Corpus formats (issue 18): every format of the same documents packs into the same tokens,
pre-tokenized corpora become sequences as SAELens reads them, and reading is streamed: the
fingerprint reads only the token budget and nothing holds more than a chunk."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.extract import corpus as corpus_module
from pipeline.extract import sources
from pipeline.extract.corpus import Corpus, iter_pieces
from tests.conftest import WORDS

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

L, SPC = 32, 4  # context length, sequences per chunk


def docs(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def reading(tok, source, column: str = "text") -> Corpus:
    return Corpus(str(source), column, tok, L, SPC, len(tok))


def all_chunks(tok, source, column: str = "text") -> np.ndarray:
    return np.stack(list(reading(tok, source, column).chunks()))


def write_jsonl(path: Path, texts: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    return path


def write_arrow(path: Path, table, stream: bool) -> Path:
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
    return path


def save_to_disk_layout(folder: Path, table) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow stream files listed in state.json."""
    folder.mkdir()
    half = table.num_rows // 2
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    write_arrow(folder / names[0], table.slice(0, half), stream=True)
    write_arrow(folder / names[1], table.slice(half), stream=True)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_every_format_of_the_same_documents_packs_the_same_tokens(tmp_path, tok):
    texts = docs()
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    ref = all_chunks(tok, write_jsonl(tmp_path / "c.jsonl", texts))
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 25), shards / "part-0.parquet", row_group_size=10)
    pq.write_table(table.slice(25), shards / "part-1.parquet", row_group_size=10)
    (shards / "README.md").write_text("A hub snapshot's card: not a document.")
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(texts):
        (txt / f"doc{i:03d}.txt").write_text(t)
    others = {
        "jsonl.gz": write_jsonl(tmp_path / "c.jsonl.gz", texts, gzip.open),
        "jsonl.zst": write_jsonl(tmp_path / "c.jsonl.zst", texts, zstandard.open),
        "parquet": tmp_path / "c.parquet",
        "arrow file": write_arrow(tmp_path / "f.arrow", table, stream=False),
        "arrow stream": write_arrow(tmp_path / "s.arrow", table, stream=True),
        "parquet folder": shards,
        "datasets folder": save_to_disk_layout(tmp_path / "saved", table),
        "txt folder": txt,
    }
    pq.write_table(table, others["parquet"], row_group_size=16)
    assert len(ref) >= 4
    for name, path in others.items():
        np.testing.assert_array_equal(all_chunks(tok, path), ref, err_msg=name)
    assert (ref[:, :, 0] == tok.bos_token_id).all()


def test_text_column_names_the_documents(tmp_path, tok):
    texts = docs()
    pq.write_table(pa.table({"content": texts, "text": ["decoy"] * len(texts)}), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "ref.jsonl", texts)
    np.testing.assert_array_equal(all_chunks(tok, tmp_path / "c.parquet", "content"),
                                  all_chunks(tok, tmp_path / "ref.jsonl"))


def test_pretokenized_rows_are_sequences_as_saelens_reads_them(tmp_path, tok):
    """A row starting with BOS gives its first L ids; one without gets BOS put in front."""
    rng = np.random.default_rng(0)
    bos = tok.bos_token_id
    with_bos = [[bos, *rng.integers(5, 250, L + 7).tolist()] for _ in range(SPC)]
    without = [rng.integers(5, 250, L + 3).tolist() for _ in range(SPC)]
    pq.write_table(pa.table({"input_ids": with_bos + without}), tmp_path / "ids.parquet")
    chunks = all_chunks(tok, tmp_path / "ids.parquet")
    np.testing.assert_array_equal(chunks[0], np.array([r[:L] for r in with_bos]))
    np.testing.assert_array_equal(chunks[1], np.array([[bos, *r[:L - 1]] for r in without]))
    np.save(tmp_path / "rows.npy", np.array(without, dtype=np.uint16))
    np.testing.assert_array_equal(all_chunks(tok, tmp_path / "rows.npy")[0], chunks[1])


def test_a_npy_stream_packs_like_tokenized_text(tmp_path, tok):
    """A 1-D .npy is a token stream: BOS + L-1 of its ids per sequence, nothing added."""
    write_jsonl(tmp_path / "c.jsonl", docs())
    ref = all_chunks(tok, tmp_path / "c.jsonl")
    np.save(tmp_path / "ids.npy", ref[:, :, 1:].reshape(-1).astype(np.int64))
    np.testing.assert_array_equal(all_chunks(tok, tmp_path / "ids.npy"), ref)


def test_a_corpus_mixing_rows_and_text_is_refused(tmp_path, tok):
    pq.write_table(pa.table({"text": docs(5)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"tokens": [list(range(1, L + 1))] * 5}), tmp_path / "b.parquet")
    with pytest.raises(PipelineError, match="mixes pre-tokenized rows"):
        all_chunks(tok, tmp_path)


def test_a_large_text_file_is_read_in_pieces_with_eos_once(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_PIECE", 1000)
    text = "".join(f"line {i} of the state of the union\n" for i in range(400))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(iter_pieces(str(tmp_path / "big.txt")))
    assert len(pieces) > 10 and max(len(p.data) for p in pieces) <= 2000
    assert "".join(p.data for p in pieces) == text
    assert [p.end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.data.endswith("\n") for p in pieces)  # cut after a line break
    stream = all_chunks(tok, tmp_path / "big.txt")[:, :, 1:].reshape(-1)
    assert tok.eos_token_id not in stream  # the one EOS ends the file, past these chunks


def test_the_fingerprint_reads_only_the_token_budget(tmp_path, tok):
    """No hash of the whole corpus: a damaged tail past the budget is never read."""
    write_jsonl(tmp_path / "c.jsonl", docs(200))
    with open(tmp_path / "c.jsonl", "a") as fh:
        fh.write("{not json\n")
    c = reading(tok, tmp_path / "c.jsonl")
    fingerprint = c.survey(3)
    chunks = list(itertools.islice(c.chunks(), 3))
    assert len(c.digests) == 3
    assert fingerprint == hashlib.sha256(b"".join(x.astype("<i4").tobytes() for x in chunks)).hexdigest()
    with pytest.raises(PipelineError, match=r"c.jsonl:201 is not valid JSON"):
        reading(tok, tmp_path / "c.jsonl").survey(10_000)


def endless(counter: list[int], limit: int = 20_000):
    """A corpus that never ends, counting the documents read from it; reading it whole fails
    at `limit` instead of hanging."""
    def pieces(corpus, column="text"):
        for i in itertools.count():
            assert i < limit, "the corpus is being read whole"
            counter[0] = i + 1
            yield sources.Piece("text", f"document {i}: " + " ".join(WORDS[: 1 + i % 40]), "x")
    return pieces


def documents_read(tok, monkeypatch, use) -> int:
    """How far into an endless corpus the last reading of it got."""
    read = [0]
    monkeypatch.setattr(corpus_module, "iter_pieces", endless(read))
    use(reading(tok, "endless"))
    return read[0]


def test_reading_is_streamed_however_long_the_corpus(tok, monkeypatch):
    """Generator semantics stand in for a flaky RSS test: an endless corpus is surveyed and
    extracted chunk by chunk, reading at most one tokenizer batch past the chunks it uses."""
    batch = corpus_module.TOKENIZE_DOCS
    two, ten = (documents_read(tok, monkeypatch, lambda c, n=n: c.survey(n)) for n in (2, 10))
    assert two < ten <= 5 * two + batch

    def todo_up_to(last: int):
        def use(c: Corpus) -> None:
            c.survey(10)
            assert [k for k, _ in c.todo([0, last])] == [0, last]
        return use
    assert documents_read(tok, monkeypatch, todo_up_to(1)) <= two + batch
    assert documents_read(tok, monkeypatch, todo_up_to(9)) <= ten + batch


def test_reading_parquet_takes_no_more_arrow_memory_for_a_larger_file(tmp_path, tok):
    """pyarrow's pool counts every buffer it allocates: four times the rows, the same peak."""
    rng = random.Random(0)
    peaks = []
    for n in (2000, 8000):
        texts = [" ".join(rng.choices(WORDS, k=400)) for _ in range(n)]
        pq.write_table(pa.table({"text": texts}), tmp_path / f"{n}.parquet", row_group_size=500)
        del texts
        peak = 0
        for _ in iter_pieces(str(tmp_path / f"{n}.parquet")):
            peak = max(peak, pa.total_allocated_bytes())
        peaks.append(peak)
    assert 0 < peaks[1] < 1.5 * peaks[0], peaks


def test_a_corpus_changed_during_the_run_is_an_error(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", docs())
    c = reading(tok, tmp_path / "c.jsonl")
    c.survey(4)
    write_jsonl(tmp_path / "c.jsonl", docs(seed=1))
    with pytest.raises(PipelineError, match="changed since this run read it"):
        list(c.todo([0, 1]))


def test_missing_pyarrow_names_the_install(tmp_path, tok, monkeypatch):
    pq.write_table(pa.table({"text": docs(5)}), tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PipelineError, match=r"needs the pyarrow package: pip install 'sae-pipeline\["):
        list(iter_pieces(str(tmp_path / "c.parquet")))


def test_extract_from_parquet_with_text_column_matches_the_text_files(tmp_path, tiny_model, corpus):
    """End to end through the CLI: the same documents as a Parquet column give the same cache
    id (the corpus fingerprint is of the tokens, not of the files)."""
    from cache_schema import read_manifest

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    common = ["--model", str(tiny_model), "--layer", "1", "--tokens", "512", "--context-length",
              "32", "--rows-per-chunk", "256", "--device", "cpu", "--no-progress"]
    runner = CliRunner()
    a = runner.invoke(app, ["extract", "--out", str(tmp_path / "a"), "--corpus", str(corpus), *common])
    b = runner.invoke(app, ["extract", "--out", str(tmp_path / "b"), "--corpus",
                            str(tmp_path / "c.parquet"), "--text-column", "body", *common])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert ma.cache_id == mb.cache_id and ma.corpus_fingerprint == mb.corpus_fingerprint
