"""Human-readable summary of a cache for `pipeline inspect`."""

from __future__ import annotations

from pathlib import Path

from cache_schema import (
    STATUS_COMPLETE,
    aggregate_norm_stats,
    array_specs,
    list_done_chunks,
    read_chunk_record,
    read_manifest,
)
from pipeline.plan.estimate import human


def _disk_bytes(path: Path) -> int:
    """The data of one array, linked chunk files included (unlike cache_schema.files.tree_bytes,
    which counts what removing a tree frees)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def describe(root: str | Path) -> str:
    root = Path(root)
    m = read_manifest(root)
    done = list_done_chunks(root)
    lines = [
        f"cache       {m.cache_id}  (schema v{m.schema_version})",
        f"status      {m.status}: {len(done)}/{m.n_chunks} chunks of {m.rows_per_chunk} rows",
        f"model       {m.model_name}  ({m.n_model_layers} layers, d_model {m.d_model}, "
        f"ran in {m.compute_dtype} on {m.device_type})",
        f"hooks       {', '.join(m.hooks)}",
        f"tokens      {m.n_tokens:,} per stream = {m.n_sequences:,} sequences x "
        f"{m.context_length}",
        f"storage     {m.storage_dtype}, codec {m.codec}",
        f"masking     rate {m.mask_rate}, {m.mask_strategy}, mask token {m.mask_token_id}, "
        f"seed {m.mask_seed}",
        f"special ids {m.special_token_ids} (BOS {m.bos_token_id}); left out of norm stats",
        f"corpus      {m.corpus_source}  (tokens sha256 {m.corpus_fingerprint[:16]}...)",
        "",
        "arrays (on disk):",
    ]
    total = 0
    for name, (shape, dtype) in array_specs(m).items():
        size = _disk_bytes(root / name)
        total += size
        lines.append(f"  {name:<40} {list(shape)!s:<16} {dtype.str:<4} {human(size):>10}")
    lines.append(f"  {'total':<40} {'':<16} {'':<4} {human(total):>10}")
    stats = m.norm_stats
    label = "norm stats"
    if m.status != STATUS_COMPLETE:
        stats = aggregate_norm_stats([read_chunk_record(root, k) for k in done])
        label = f"norm stats so far ({len(done)} chunks)"
    lines += ["", f"{label} (L2 norm per token, special tokens apart):"]
    lines.append(f"  {'hook':<28} {'stream':<7} {'mean':>9} {'std':>9} {'max':>10} "
                 f"{'special mean':>13} {'special max':>12}")
    for hook, streams in stats.items():
        for stream, s in streams.items():
            sm = "-" if s["special_mean_norm"] is None else f"{s['special_mean_norm']:.1f}"
            sx = "-" if s["special_max_norm"] is None else f"{s['special_max_norm']:.1f}"
            lines.append(f"  {hook:<28} {stream:<7} {s['mean_norm']:>9.2f} {s['std_norm']:>9.2f} "
                         f"{s['max_norm']:>10.2f} {sm:>13} {sx:>12}")
    return "\n".join(lines)
