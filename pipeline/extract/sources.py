"""Corpus files, read one piece at a time: text, JSON lines (plain, gzip, zstd), Parquet and
Arrow tables, `datasets` folders saved with save_to_disk, and .npy arrays of token ids.
Nothing here holds more than one piece, one line, or one record batch (Parquet: one row group) of
a file."""

from __future__ import annotations

import gzip
import importlib
import io
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.errors import PipelineError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
ID_COLUMNS = ("tokens", "input_ids")
"""Columns of token-id lists found without --text-column (the names SAELens reads)."""
TEXT_PIECE = 1 << 20
"""Characters of a text file read at a time (then up to the next line break)."""
BATCH_ROWS = 1024
NPY_PIECE = 1 << 20
FORMATS = (".txt/.md/.text, .jsonl (also .jsonl.gz, .jsonl.zst), .parquet, .arrow or .npy files, "
           "a folder of them, or a `datasets` folder saved with save_to_disk")


class Piece(NamedTuple):
    kind: str
    """'text' (a document or part of one), 'ids' (a run of a token-id stream) or 'row' (one
    pre-tokenized sequence)."""
    data: str | np.ndarray
    where: str
    """File and line or row, for errors."""
    end: bool = True
    """The last piece of its document (EOS follows a text document)."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (*JSONL_SUFFIXES, *TABLE_SUFFIXES, *TEXT_SUFFIXES, ".npy"):
        if name.endswith(s):
            return s
    return path.suffix


def corpus_files(path: Path) -> list[Path]:
    """The files of a corpus in reading order. A folder is read as the first kind it holds of:
    Parquet/Arrow tables, .npy arrays, text and JSON-lines files (a hub snapshot's README.md
    beside its Parquet shards is not a document); hidden files and folders are skipped."""
    if not path.is_dir():
        if _suffix(path) not in (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *TABLE_SUFFIXES, ".npy"):
            raise PipelineError(f"corpus {path}: unknown file type '{path.suffix}'; --corpus takes "
                                f"{FORMATS}")
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        example = "train" if "train" in splits or not splits else splits[0]
        raise PipelineError(f"corpus {path} is a `datasets` DatasetDict (splits: "
                            f"{', '.join(splits) or 'none found'}): pass one split's folder, "
                            f"e.g. --corpus {path / example}")
    if (path / "state.json").is_file():
        return _saved_dataset_files(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for kinds in (TABLE_SUFFIXES, (".npy",), (*TEXT_SUFFIXES, *JSONL_SUFFIXES)):
        found = [p for p in files if _suffix(p) in kinds]
        if found:
            return found
    raise PipelineError(f"corpus folder {path} has no corpus files: expected {FORMATS}")


def _saved_dataset_files(path: Path) -> list[Path]:
    """A `datasets` save_to_disk folder: its Arrow files in the order state.json lists them."""
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"corpus {path}: state.json is not that of a `datasets` folder saved "
                            f"with save_to_disk ({e})") from e
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise PipelineError(f"corpus {path}: state.json lists {', '.join(missing)}, not in the folder")
    return files


def read_pieces(path: Path, column: str) -> Iterator[Piece]:
    """The pieces of one file, in order; a file that cannot be read is a PipelineError naming it."""
    reader = {".parquet": _parquet, ".arrow": _arrow, ".npy": _npy}.get(_suffix(path))
    if reader is None:
        reader = _jsonl if _suffix(path) in JSONL_SUFFIXES else _text
    try:
        yield from reader(path, column)
    except PipelineError:
        raise
    except _read_errors() as e:
        raise PipelineError(f"cannot read corpus file {path}: {e}") from e


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises: the standard library's, and those of the optional readers
    that are loaded."""
    errors = [OSError, EOFError, ValueError, zlib.error]
    if "pyarrow" in sys.modules:
        errors.append(sys.modules["pyarrow"].ArrowException)
    if "zstandard" in sys.modules:
        errors.append(sys.modules["zstandard"].ZstdError)
    return tuple(errors)


def _text(path: Path, column: str) -> Iterator[Piece]:
    """One document per file, read a piece at a time; each piece ends at a line break where the
    line is shorter than TEXT_PIECE, so a cut rarely falls inside a word."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        piece = fh.read(TEXT_PIECE) + fh.readline(TEXT_PIECE)
        while piece:
            following = fh.read(TEXT_PIECE) + fh.readline(TEXT_PIECE)
            yield Piece("text", piece, str(path), end=not following)
            piece = following


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.lower().endswith(".zst"):
        zstd = _optional("zstandard", path)
        fh = open(path, "rb")  # noqa: SIM115 (closed with the reader: closefd)
        raw = zstd.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl(path: Path, column: str) -> Iterator[Piece]:
    with _open_text(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise PipelineError(f"{path}:{i} is not valid JSON ({e})") from e
            key = _pick_column(list(rec) if isinstance(rec, dict) else [], column, f"{path}:{i}")
            value = rec[key]
            if isinstance(value, str):
                yield Piece("text", value, f"{path}:{i}")
            elif isinstance(value, list) and all(isinstance(v, int) for v in value):
                yield Piece("row", np.asarray(value, dtype=np.int64), f"{path}:{i}")
            else:
                raise PipelineError(f"{path}:{i}: field '{key}' is neither text nor a list of "
                                    "token ids")


def _pick_column(names: list[str], column: str, where: str) -> str:
    if column in names:
        return column
    for name in ID_COLUMNS:
        if name in names:
            return name
    raise PipelineError(f"corpus file {where} has no column '{column}' (nor a token-id column "
                        f"{' or '.join(ID_COLUMNS)}); its columns: {', '.join(names) or 'none'}. "
                        "Pass --text-column NAME")


def _optional(module: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PipelineError(f"reading {path} needs the {module.split('.')[0]} package: pip install "
                            "'sae-pipeline[parquet]' (or pip install pyarrow zstandard)") from e


def _parquet(path: Path, column: str) -> Iterator[Piece]:
    pq = _optional("pyarrow.parquet", path)
    pf = pq.ParquetFile(path)
    try:
        name = _pick_column(pf.schema_arrow.names, column, str(path))
        # a row group at a time: one iter_batches over the whole file holds memory in proportion
        # to its number of row groups (tests/test_corpora.py measures it)
        batches = (b for g in range(pf.num_row_groups)
                   for b in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=[name]))
        yield from _table_pieces((b.column(0) for b in batches), path, name)
    finally:
        pf.close()


def _arrow(path: Path, column: str) -> Iterator[Piece]:
    """Arrow IPC, file or stream format (`datasets` writes streams), memory-mapped."""
    pa = _optional("pyarrow", path)
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        name = _pick_column(reader.schema.names, column, str(path))
        yield from _table_pieces((b.column(name) for b in batches), path, name)


def _table_pieces(columns: Iterator, path: Path, name: str) -> Iterator[Piece]:
    """The rows of one column, batch by batch: strings are documents, integer lists are
    pre-tokenized sequences."""
    pa = _optional("pyarrow", path)
    row = 0
    for col in columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            for i, text in enumerate(col.to_pylist()):
                if text is not None:
                    yield Piece("text", text, f"{path} row {row + i}")
        elif _is_id_list(pa, col.type):
            values, offsets = _flat_ids(pa, col, path, name)
            for i in range(len(col)):
                yield Piece("row", values[offsets[i]:offsets[i + 1]], f"{path} row {row + i}")
        else:
            raise PipelineError(f"corpus {path}: column '{name}' holds {col.type}, neither text "
                                "nor lists of integer token ids; pass --text-column NAME")
        row += len(col)


def _is_id_list(pa, t) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_integer(t.value_type))


def _flat_ids(pa, col, path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """All ids of a batch and each row's offsets into them, without a Python list per row."""
    if pa.types.is_fixed_size_list(col.type):
        values = col.flatten()
        offsets = np.arange(len(col) + 1) * col.type.list_size
    else:
        values, offsets = col.values, col.offsets.to_numpy()
    if values.null_count:
        raise PipelineError(f"corpus {path}: column '{name}' holds null token ids")
    return values.to_numpy(zero_copy_only=False), offsets


def _npy(path: Path, column: str) -> Iterator[Piece]:
    """A 1-D array is a token stream; a 2-D array holds one pre-tokenized sequence per row."""
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
    if not np.issubdtype(ids.dtype, np.integer):
        raise PipelineError(f"corpus {path} holds {ids.dtype} values, not integer token ids")
    if ids.ndim == 1:
        for start in range(0, len(ids), NPY_PIECE):
            piece = np.asarray(ids[start:start + NPY_PIECE])
            yield Piece("ids", piece, f"{path} ids {start}..{start + len(piece) - 1}")
    elif ids.ndim == 2:
        for i in range(len(ids)):
            yield Piece("row", np.asarray(ids[i]), f"{path} row {i}")
    else:
        raise PipelineError(f"corpus {path} has shape {ids.shape}: expected a 1-D stream of token "
                            "ids or a 2-D array of sequences")
