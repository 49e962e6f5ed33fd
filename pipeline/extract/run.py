"""`pipeline extract`: clean and masked residual activations of a causal LM into a Zarr cache."""

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
    hook_name,
    list_done_chunks,
    read_manifest,
)
from cache_schema.dtypes import read_dtype, storage_dtype
from cache_schema.write import finalize
from pipeline import models
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import Corpus
from pipeline.extract.distributed import Workers, workers
from pipeline.extract.masking import choose_mask_token, mask_sequences
from pipeline.extract.output import lock_output, prepare_output, prepare_remote, uploader
from pipeline.extract.writer import ChunkWriter, check_finite
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


def _to_numpy(h: torch.Tensor, dtype: str) -> np.ndarray:
    h = h.to(getattr(torch, dtype)).cpu()
    return h.view(getattr(torch, read_dtype(dtype))).numpy().view(storage_dtype(dtype))


def extract(cfg: ExtractConfig, progress: bool = True) -> Manifest:
    """Run the extraction (or resume it) and return the manifest of the finished cache."""
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
    todo = team.mine([k for k in range(m.n_chunks) if k not in done])
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
    device = team.device(resolve_device(cfg.device))
    base = models.load_truncated(src, max(m.layers) + 1, getattr(torch, m.compute_dtype), device,
                                 cfg.device_map, cfg.trust_remote_code)
    blocks = models.decoder_layers(base)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer):
        def fn(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in m.layers]
    input_device = next(base.parameters()).device
    vocab_size = base.get_input_embeddings().weight.shape[0]
    writer = ChunkWriter(out, m, on_chunk=uploader(out, m, remote)) if cfg.write else None
    seqs_per_chunk, bs, R = m.sequences_per_chunk, m.batch_size, m.rows_per_chunk
    special = np.asarray(m.special_token_ids)
    bar = tqdm(total=len(todo) * R, unit="tok", unit_scale=True, desc="extract",
               disable=not progress, file=sys.stderr, smoothing=0.1)
    try:
        for k, clean in corpus.todo(todo):
            masked, is_masked = mask_sequences(
                clean, k * seqs_per_chunk, m.mask_rate, m.mask_strategy, m.mask_token_id, m.mask_seed,
                m.special_token_ids, vocab_size)
            acts = {hook_name(layer): {s: [] for s in STREAMS} for layer in m.layers}
            norms = {hook_name(layer): {s: [] for s in STREAMS} for layer in m.layers}
            for b in range(0, seqs_per_chunk, bs):
                n = min(bs, seqs_per_chunk - b)
                ids = torch.from_numpy(np.concatenate([clean[b:b + n], masked[b:b + n]]))
                with torch.inference_mode():
                    base(input_ids=ids.to(input_device, dtype=torch.long), use_cache=False)
                for layer in m.layers:
                    h = captured.pop(layer).reshape(2, n * m.context_length, m.d_model)
                    nrm = h.float().norm(dim=-1).cpu().numpy()
                    for i, stream in enumerate(STREAMS):
                        stored = _to_numpy(h[i], m.storage_dtype)
                        check_finite(m, k, b * m.context_length, hook_name(layer), stream,
                                     nrm[i], stored)
                        acts[hook_name(layer)][stream].append(stored)
                        norms[hook_name(layer)][stream].append(nrm[i])
                bar.update(n * m.context_length)
            if writer is None:
                continue
            data = {TOKENS: clean.reshape(-1), MASKED_TOKENS: masked.reshape(-1),
                    IS_MASKED: is_masked.reshape(-1),
                    SEQ: np.repeat(np.arange(k * seqs_per_chunk, (k + 1) * seqs_per_chunk, dtype=np.int32),
                                   m.context_length)}
            for hook_name_, streams in acts.items():
                for stream, parts in streams.items():
                    data[activation_array(stream, hook_name_)] = np.concatenate(parts)
            flat_norms = {h: {s: np.concatenate(v) for s, v in st.items()} for h, st in norms.items()}
            writer.submit(k, data, chunk_stats(flat_norms, np.isin(clean.reshape(-1), special)))
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
        for h in handles:
            h.remove()
