"""`pipeline extract`: clean and masked residual activations of a causal LM into a Zarr cache."""

from __future__ import annotations

import shutil
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
    TOKENS,
    CacheError,
    Manifest,
    activation_array,
    aggregate_norm_stats,
    array_specs,
    chunk_file,
    hook_name,
    list_done_chunks,
    read_chunk_record,
    read_manifest,
    records_digest,
    remove_leftovers,
    write_manifest,
)
from cache_schema.store import record_path
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.extract import model as models
from pipeline.extract.config import ExtractConfig
from pipeline.extract.corpus import pack_sequences
from pipeline.extract.distributed import Workers, workers
from pipeline.extract.masking import mask_sequences
from pipeline.extract.writer import ChunkWriter, chunk_stats, open_arrays
from pipeline.remote import is_remote, mirror

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plan(cfg: ExtractConfig) -> tuple[Manifest, np.ndarray, models.ModelSource, object]:
    """Resolve the model and corpus and build the manifest; loads no weights."""
    src = models.resolve_model(cfg.model, cfg.revision)
    tok = models.load_tokenizer(src, cfg.trust_remote_code)
    config = models.load_config(src, cfg.trust_remote_code)
    n_layers, d_model = config.num_hidden_layers, config.hidden_size
    bad = [layer for layer in cfg.layers if layer >= n_layers]
    if bad:
        raise PipelineError(f"layer(s) {bad} out of range: {src.name} has {n_layers} layers "
                            f"(0 to {n_layers - 1})")
    if tok.bos_token_id is None:
        raise PipelineError(f"the tokenizer of {src.name} has no BOS token; sequences start with BOS")
    device = resolve_device(cfg.device)
    compute = cfg.compute_dtype
    if compute == "auto":
        compute = "float32" if device == "cpu" else "bfloat16"
    special = sorted(set(tok.all_special_ids) | {tok.bos_token_id})
    spc = cfg.rows_per_chunk // cfg.context_length
    n_chunks = cfg.tokens // cfg.rows_per_chunk
    seqs = pack_sequences(cfg.corpus, tok, n_chunks * spc, cfg.context_length,
                          tok.bos_token_id, tok.eos_token_id)
    if len(seqs) < n_chunks * spc:
        have = len(seqs) // spc
        if have == 0:
            raise PipelineError(
                f"corpus {cfg.corpus} yields {len(seqs) * cfg.context_length} tokens, below one "
                f"chunk ({cfg.rows_per_chunk} rows): use a larger corpus or smaller --rows-per-chunk")
        print(f"warning: corpus {cfg.corpus} holds only {have} chunks of {cfg.rows_per_chunk} "
              f"tokens; writing {have * cfg.rows_per_chunk} tokens, not {cfg.tokens}",
              file=sys.stderr)
        n_chunks = have
    seqs = seqs[: n_chunks * spc]
    m = Manifest(
        model_name=src.name, model_fingerprint=src.fingerprint, model_revision=src.revision,
        compute_dtype=compute, device_type=device.split(":")[0], layers=list(cfg.layers),
        n_model_layers=n_layers, d_model=d_model, context_length=cfg.context_length,
        n_sequences=len(seqs), rows_per_chunk=cfg.rows_per_chunk, batch_size=cfg.batch_size,
        storage_dtype=cfg.dtype, codec=cfg.codec, mask_rate=cfg.mask_rate,
        mask_strategy=cfg.mask_strategy, mask_token_id=models.choose_mask_token(tok, cfg.mask_token),
        mask_seed=cfg.seed, bos_token_id=tok.bos_token_id, special_token_ids=special,
        tokenizer_hash=models.tokenizer_hash(tok), corpus_source=cfg.corpus,
        corpus_fingerprint=_sha256(seqs),
    )
    return m, seqs, src, tok


def _sha256(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def prepare_output(out: Path, m: Manifest, overwrite: bool) -> list[int]:
    """Create the cache (manifest and every array's metadata), or check that an existing one is
    this one; returns chunks already done. Run by one process only: with several, the others
    start after it (creating the arrays from several processes at once races)."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        try:
            old = read_manifest(out)
        except CacheError as e:
            raise PipelineError(f"output {out} is not empty and is not a pipeline cache ({e}); "
                                "choose another --out or empty it yourself") from e
        if old.cache_id != m.cache_id:
            if not overwrite:
                changed = sorted(k for k, v in m.identity().items() if old.identity().get(k) != v)
                raise PipelineError(
                    f"output {out} holds cache {old.cache_id}, made with different settings "
                    f"(differs in: {', '.join(changed)}); pass --overwrite to replace it or "
                    "choose another --out")
            shutil.rmtree(out)
        else:
            remove_leftovers(out)  # a killed writer's temporary files: not part of the cache
            open_arrays(out, m)  # a run killed before it created them all
            return list_done_chunks(out)
    try:
        write_manifest(out, m)
        open_arrays(out, m)
    except OSError as e:
        raise PipelineError(f"cannot write the cache to {out}: {e.strerror or e}") from e
    return []


def _to_numpy(h: torch.Tensor, dtype: str) -> np.ndarray:
    h = h.to(_TORCH_DTYPES[dtype]).cpu()
    if dtype == "bfloat16":
        return h.view(torch.int16).numpy().view(np.uint16)
    return h.numpy()


def extract(cfg: ExtractConfig, progress: bool = True) -> Manifest:
    """Run the extraction (or resume it) and return the manifest of the finished cache."""
    m, seqs, src, _tok = plan(cfg)
    remote = mirror(cfg.out) if is_remote(cfg.out) else None
    out = remote.root if remote else Path(cfg.out)
    team = workers(resolve_device(cfg.device))
    error = None
    if team.is_main and cfg.write:
        try:
            _prepare(out, m, cfg.overwrite, remote)
        except PipelineError as e:
            error = str(e)
    error = team.from_main(error)  # the others start once the cache exists, or stop with rank 0
    if error is not None:
        raise PipelineError(error)
    if remote is not None and not team.is_main:
        remote.pull_metadata()
    done = set(list_done_chunks(out)) if cfg.write else set()
    todo = team.mine([k for k in range(m.n_chunks) if k not in done])
    if todo:
        where = f" (process {team.rank} of {team.world})" if team.world > 1 else ""
        print(f"cache {m.cache_id}: {m.n_chunks} chunks of {m.rows_per_chunk} tokens, "
              f"{len(done)} already written; hooks {', '.join(m.hooks)}{where}", file=sys.stderr)
        _run_chunks(cfg, m, seqs, src, out, todo, progress and team.is_main, team, remote)
    if cfg.write:
        m = finalize(out, m)
        if remote is not None and m.status == STATUS_COMPLETE:
            remote.push([out / "zarr.json"])
    return m


def _prepare(out: Path, m: Manifest, overwrite: bool, remote) -> None:
    """prepare_output, for a remote cache on a fresh local mirror of its metadata (the remote
    is the truth), then the manifest uploaded."""
    if remote is None:
        prepare_output(out, m, overwrite)
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    existed = remote.pull_metadata()
    old_id = read_manifest(out).cache_id if existed else None
    prepare_output(out, m, overwrite)
    if old_id not in (None, m.cache_id):
        remote.clear_remote()  # --overwrite of a different cache
    arrays = [p for p in sorted(out.rglob("zarr.json")) if p != out / "zarr.json"]
    remote.push([*arrays, out / "zarr.json"])  # every array's metadata, then the manifest


def _run_chunks(cfg, m: Manifest, seqs, src, out: Path, todo: list[int], progress: bool,
                team: Workers, remote=None) -> None:
    device = team.device(resolve_device(cfg.device))
    base = models.load_truncated(src, max(m.layers) + 1, _TORCH_DTYPES[m.compute_dtype], device,
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
    writer = ChunkWriter(out, m, on_chunk=_uploader(out, m, remote)) if cfg.write else None
    spc, bs, R = m.sequences_per_chunk, m.batch_size, m.rows_per_chunk
    special = np.asarray(m.special_token_ids)
    bar = tqdm(total=len(todo) * R, unit="tok", unit_scale=True, desc="extract",
               disable=not progress, file=sys.stderr, smoothing=0.1)
    try:
        for k in todo:
            clean = seqs[k * spc:(k + 1) * spc]
            masked, is_masked = mask_sequences(
                clean, k * spc, m.mask_rate, m.mask_strategy, m.mask_token_id, m.mask_seed,
                m.special_token_ids, vocab_size)
            acts = {hook_name(layer): {s: [] for s in ("clean", "masked")} for layer in m.layers}
            norms = {hook_name(layer): {s: [] for s in ("clean", "masked")} for layer in m.layers}
            for b in range(0, spc, bs):
                n = min(bs, spc - b)
                ids = torch.from_numpy(np.concatenate([clean[b:b + n], masked[b:b + n]]))
                with torch.inference_mode():
                    base(input_ids=ids.to(input_device, dtype=torch.long), use_cache=False)
                for layer in m.layers:
                    h = captured.pop(layer).reshape(2, n * m.context_length, m.d_model)
                    nrm = h.float().norm(dim=-1).cpu().numpy()
                    for i, stream in enumerate(("clean", "masked")):
                        acts[hook_name(layer)][stream].append(_to_numpy(h[i], m.storage_dtype))
                        norms[hook_name(layer)][stream].append(nrm[i])
                bar.update(n * m.context_length)
            if writer is None:
                continue
            data = {TOKENS: clean.reshape(-1), MASKED_TOKENS: masked.reshape(-1),
                    IS_MASKED: is_masked.reshape(-1),
                    SEQ: np.repeat(np.arange(k * spc, (k + 1) * spc, dtype=np.int32),
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


def _uploader(out: Path, m: Manifest, remote):
    """For a remote cache: upload chunk k's files, then its record (so a record on the remote
    always means the chunk's data is there)."""
    if remote is None:
        return None
    specs = array_specs(m)

    def upload(k: int) -> None:
        remote.push([chunk_file(out, name, len(shape), k) for name, (shape, _) in specs.items()]
                    + [record_path(out, k)])
    return upload


def finalize(out: Path, m: Manifest) -> Manifest:
    """Mark the cache complete once every chunk has a record: aggregate stats, pin the records."""
    done = list_done_chunks(out)
    current = read_manifest(out)
    if current.status == STATUS_COMPLETE:
        return current
    if len(done) < m.n_chunks:
        return current
    records = [read_chunk_record(out, k) for k in range(m.n_chunks)]
    m.norm_stats = aggregate_norm_stats(records)
    m.chunks_digest = records_digest(out, m)
    m.status = STATUS_COMPLETE
    write_manifest(out, m)
    return m
