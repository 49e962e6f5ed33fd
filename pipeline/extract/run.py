"""`pipeline extract`: clean and masked residual activations of a causal LM into a Zarr cache.

Several processes on one cache (launched by `torchrun` or `accelerate launch`, see
pipeline.processes): process r of N takes the chunks k with (k // chunks_per_batch) % N == r
(chunks_per_batch is 1 unless a forward batch spans chunks). Rank 0 takes the cache's writer
lock and creates (or checks) the cache, a barrier releases the others; once every rank has passed
a barrier at the end, rank 0 marks the cache complete (finalize) and only then lets the lock go,
so the ranks of one job never lock each other out and no other job can start in between. A
killed process leaves its chunks without records: the cache stays 'writing' and any later run
resumes it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_schema import (
    IS_MASKED,
    MASKED_TOKENS,
    SEQ,
    STATUS_COMPLETE,
    STREAMS,
    TOKENS,
    CacheError,
    Manifest,
    activation_array,
    chunk_stats,
    data_bytes,
    hook_name,
    list_done_chunks,
    read_manifest,
)
from cache_schema.clear import own_bytes
from cache_schema.dtypes import storage_dtype
from cache_schema.write import finalize
from pipeline import models
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import Corpus
from pipeline.extract.forward import Forward
from pipeline.extract.masking import choose_mask_token, mask_sequences
from pipeline.extract.output import lock_output, prepare_output, prepare_remote, uploader
from pipeline.extract.writer import ChunkWriter, check_finite
from pipeline.plan.estimate import check_space, human
from pipeline.processes import Workers, check_launch, workers
from pipeline.remote import is_remote, mirror


def plan(cfg: ExtractConfig) -> tuple[Manifest, Corpus, models.ModelSource, object]:
    """Resolve the model and read the corpus up to the token budget (for its fingerprint) to
    build the manifest; loads no weights."""
    src = models.resolve_model(cfg.model, cfg.revision)
    tok = models.load_tokenizer(src, cfg.trust_remote_code)
    config = models.load_config(src, cfg.trust_remote_code)
    n_layers, d_model = config.num_hidden_layers, config.hidden_size
    bad = [layer for layer in cfg.layers if layer >= n_layers]
    if bad:
        raise PipelineError(f"layer(s) {bad} out of range: {src.name} has {n_layers} layers "
                            f"(0 to {n_layers - 1})")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.context_length > positions:
        raise PipelineError(f"context length {cfg.context_length} exceeds the {positions} positions "
                            f"{src.name} was built for (max_position_embeddings): use "
                            f"--context-length {positions} or less")
    if tok.bos_token_id is None:
        raise PipelineError(f"the tokenizer of {src.name} has no BOS token; sequences start with BOS")
    if cfg.write and not is_remote(cfg.out):
        _check_space(cfg, d_model)
    device = resolve_device(cfg.device)
    compute = cfg.compute_dtype
    if compute == "auto":
        compute = "float32" if device == "cpu" else "bfloat16"
    special = sorted(set(tok.all_special_ids) | {tok.bos_token_id})
    corpus = Corpus(cfg.corpus, cfg.text_column, tok, cfg.context_length,
                    cfg.rows_per_chunk // cfg.context_length,
                    getattr(config, "vocab_size", None) or len(tok))
    n_chunks = cfg.tokens // cfg.rows_per_chunk
    fingerprint = corpus.survey(n_chunks)
    if len(corpus.digests) < n_chunks:
        have = len(corpus.digests)
        if have == 0:
            raise PipelineError(
                f"corpus {cfg.corpus} yields too few tokens, below one chunk ({cfg.rows_per_chunk} "
                "rows): use a larger corpus or smaller --rows-per-chunk")
        print(f"warning: corpus {cfg.corpus} holds only {have} chunks of {cfg.rows_per_chunk} "
              f"tokens; writing {have * cfg.rows_per_chunk} tokens, not {cfg.tokens}",
              file=sys.stderr)
        n_chunks = have
    m = Manifest(
        model_name=src.name, model_fingerprint=src.fingerprint, model_revision=src.revision,
        compute_dtype=compute, device_type=device.split(":")[0], layers=list(cfg.layers),
        n_model_layers=n_layers, d_model=d_model, context_length=cfg.context_length,
        n_sequences=n_chunks * corpus.seqs_per_chunk, rows_per_chunk=cfg.rows_per_chunk,
        batch_size=cfg.batch_size, storage_dtype=cfg.dtype, codec=cfg.codec, mask_rate=cfg.mask_rate,
        mask_strategy=cfg.mask_strategy, mask_token_id=choose_mask_token(tok, cfg.mask_token),
        mask_seed=cfg.seed, bos_token_id=tok.bos_token_id, special_token_ids=special,
        tokenizer_hash=models.tokenizer_hash(tok), corpus_source=cfg.corpus,
        corpus_fingerprint=fingerprint,
    )
    return m, corpus, src, tok


def _check_space(cfg: ExtractConfig, d_model: int) -> None:
    """The pre-flight check: the chunks still to write must fit on the output's filesystem
    (uncompressed size: a codec only shrinks them). Under --overwrite the folder's cache may be
    another one, so its bytes count as free (removed, or kept as this cache's done chunks)."""
    n_chunks = cfg.tokens // cfg.rows_per_chunk
    out = Path(cfg.out)
    if cfg.overwrite and out.is_dir():
        todo, freed = n_chunks, own_bytes(out)
    else:
        todo, freed = n_chunks - len([k for k in list_done_chunks(out) if k < n_chunks]), 0
    needed = data_bytes(todo * cfg.rows_per_chunk, d_model, len(cfg.layers), cfg.dtype) - freed
    check_space(cfg.out, needed, f"the cache ({todo} chunks of {cfg.rows_per_chunk} tokens x "
                f"{len(cfg.layers)} layer(s) x 2 streams in {cfg.dtype})", cfg.force)


def extract(cfg: ExtractConfig, progress: bool = True) -> Manifest:
    """Run the extraction (or resume it) and return the manifest of the finished cache."""
    check_launch(cfg.device, cfg.device_map)
    m, corpus, src, _tok = plan(cfg)
    remote = mirror(cfg.out) if is_remote(cfg.out) else None
    out = remote.folder(m.cache_id) if remote else Path(cfg.out)
    team = workers(resolve_device(cfg.device))
    error, lock = None, None
    if team.is_main and cfg.write:
        try:  # rank 0 holds the lock for the whole job, so its own ranks never meet it
            lock = lock_output(out, remote)
            out = prepare_remote(remote, m, cfg.overwrite) if remote else out
            if remote is None:
                prepare_output(out, m, cfg.overwrite)
        except (PipelineError, CacheError) as e:
            error = str(e)
            if lock is not None:
                lock.release()
    error = team.from_main(error)  # the others start once the cache exists, or stop with rank 0
    if error is not None:
        team.leave()  # every rank stops alike: no rank aborts in gloo's teardown after a peer left
        raise PipelineError(error)
    try:
        return _extract_locked(cfg, m, corpus, src, out, team, remote, progress)
    finally:
        if lock is not None:
            lock.release()


def _extract_locked(cfg, m: Manifest, corpus: Corpus, src, out: Path, team: Workers, remote,
                    progress: bool) -> Manifest:
    if remote is not None and not team.is_main:
        remote.pull_metadata()
    done = set(list_done_chunks(out)) if cfg.write else set()
    todo = team.mine([k for k in range(m.n_chunks) if k not in done], m.chunks_per_batch)
    if todo:
        where = f" (process {team.rank} of {team.world})" if team.world > 1 else ""
        print(f"cache {m.cache_id}: {m.n_chunks} chunks of {m.rows_per_chunk} tokens, "
              f"{len(done)} already written; hooks {', '.join(m.hooks)}{where}", file=sys.stderr)
        _run_chunks(cfg, m, corpus, src, out, todo, progress and team.is_main, team, remote)
    team.from_main(None)  # a barrier: rank 0 keeps the lock until every rank is done
    if cfg.write and team.is_main:
        m = finalize(out, m)
        if remote is not None and m.status == STATUS_COMPLETE:
            remote.push([out / "zarr.json"])
    team.from_main(None)
    return read_manifest(out) if cfg.write and not team.is_main else m


def _run_chunks(cfg, m: Manifest, corpus: Corpus, src, out: Path, todo: list[int], progress: bool,
                team: Workers, remote=None) -> None:
    """Compute and write the chunks in `todo`. Forward batches follow SPEC.md §3: within a
    chunk, or, for a batch_size above the sequences per chunk, whole groups of
    m.chunks_per_batch chunks; a group with any chunk to do is computed whole."""
    device = team.device(resolve_device(cfg.device))
    base = models.load_truncated(src, max(m.layers) + 1, getattr(torch, m.compute_dtype), device,
                                 cfg.device_map, cfg.trust_remote_code)
    forward = Forward(base, m.layers, m.storage_dtype)
    vocab_size = base.get_input_embeddings().weight.shape[0]
    spc, R, L, c = m.sequences_per_chunk, m.rows_per_chunk, m.context_length, m.chunks_per_batch
    groups = sorted({k // c for k in todo})
    upload, chunk_bytes, written = uploader(out, m, remote), data_bytes(
        R, m.d_model, len(m.hooks), m.storage_dtype), [0]

    def on_chunk(k: int) -> None:  # in the writer thread, once chunk k is on disk
        if upload is not None:
            upload(k)
        written[0] += chunk_bytes

    writer = ChunkWriter(out, m, on_chunk=on_chunk) if cfg.write else None
    rows = sum(min(c, m.n_chunks - g * c) for g in groups) * R
    bar = tqdm(total=rows, unit="tok", unit_scale=True, desc="extract", disable=not progress,
               file=sys.stderr, smoothing=0.1)
    total = human(len(todo) * chunk_bytes)

    def batches():
        needed = [k for g in groups for k in range(g * c, min((g + 1) * c, m.n_chunks))]
        parts: list[np.ndarray] = []
        for k, chunk in corpus.todo(needed):
            parts.append(chunk)
            if k + 1 < min((k // c + 1) * c, m.n_chunks):
                continue  # the group's next chunk is still to come
            clean, parts = np.concatenate(parts), []
            first, n_seq = (k // c) * c * spc, len(clean)
            masked, is_masked = mask_sequences(
                clean, first, m.mask_rate, m.mask_strategy, m.mask_token_id, m.mask_seed,
                m.special_token_ids, vocab_size)
            group = _Group((k // c) * c, clean, masked, is_masked, m)
            for b in range(0, n_seq, m.batch_size):
                n = min(m.batch_size, n_seq - b)
                ids = np.concatenate([clean[b:b + n], masked[b:b + n]])
                yield (group, b * L, b + n == n_seq), ids

    try:
        for result in forward.run(batches()):
            group, row, last = result.tag
            group.fill(row, result)
            bar.update(result.norms[m.layers[0]].shape[1])
            if writer is not None:
                bar.set_postfix_str(f"{human(written[0])} of {total} written", refresh=False)
            if last and writer is not None:
                for k, data, stats in group.chunks(set(todo)):
                    writer.submit(k, data, stats)
        if writer is not None:
            writer, w = None, writer
            w.close()
    finally:
        if writer is not None:  # an error in compute: still finish the chunks already submitted
            try:
                writer.close()
            except Exception as e:  # the compute error is the one to report
                print(f"warning: {e}", file=sys.stderr)
        bar.close()
        forward.close()


class _Group:
    """The sequences of consecutive chunks computed together, and their results as they come."""

    def __init__(self, first_chunk: int, clean, masked, is_masked, m: Manifest):
        self.first, self.clean, self.masked, self.is_masked, self.m = \
            first_chunk, clean, masked, is_masked, m
        n_rows = clean.size
        self.acts = {layer: np.empty((len(STREAMS), n_rows, m.d_model),
                                     dtype=storage_dtype(m.storage_dtype)) for layer in m.layers}
        self.norms = {layer: np.empty((len(STREAMS), n_rows), dtype=np.float32)
                      for layer in m.layers}

    def fill(self, row: int, result) -> None:
        for layer in self.m.layers:
            n = result.norms[layer].shape[1]
            self.acts[layer][:, row:row + n] = result.acts[layer]
            self.norms[layer][:, row:row + n] = result.norms[layer]

    def chunks(self, todo: set[int]):
        """(k, arrays, stats) of each chunk of the group still to write, checked finite."""
        m, R, spc = self.m, self.m.rows_per_chunk, self.m.sequences_per_chunk
        special = np.asarray(m.special_token_ids)
        for j in range(len(self.clean) // spc):
            k = self.first + j
            if k not in todo:
                continue
            rows, seqs = slice(j * R, (j + 1) * R), slice(j * spc, (j + 1) * spc)
            clean = self.clean[seqs].reshape(-1)
            data = {TOKENS: clean, MASKED_TOKENS: self.masked[seqs].reshape(-1),
                    IS_MASKED: self.is_masked[seqs].reshape(-1),
                    SEQ: np.repeat(np.arange(k * spc, (k + 1) * spc, dtype=np.int32),
                                   m.context_length)}
            norms = {}
            for layer in m.layers:
                hook = hook_name(layer)
                for i, stream in enumerate(STREAMS):
                    acts, nrm = self.acts[layer][i, rows], self.norms[layer][i, rows]
                    check_finite(m, k, 0, hook, stream, nrm, acts)
                    data[activation_array(stream, hook)] = acts
                    norms.setdefault(hook, {})[stream] = nrm
            yield k, data, chunk_stats(norms, np.isin(clean, special))
