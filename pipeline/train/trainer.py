"""`pipeline train`: an SAE on one layer and stream of a cache, with checkpoints, resume, metrics,
a plot, and the result saved in the SAELens folder format."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from cache_schema import open_cache
from pipeline.data import ActivationLoader
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.processes import ALONE, Workers, check_launch, workers
from pipeline.remote import local_cache
from pipeline.run import RunDir
from pipeline.sae import SAE, build_sae
from pipeline.sae.recon import reconstruction_metrics
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import TrainConfig, check_data_parallel
from pipeline.train.plot import plot_training
from pipeline.train.rundir import check_run_dir, create_run_dir
from pipeline.train.step import TrainStep


def resolve_layer(cfg: TrainConfig, layers: list[int]) -> int:
    layer = layers[0] if cfg.layer is None else cfg.layer
    if layer not in layers:
        raise PipelineError(f"layer {layer} is not in the cache {cfg.cache}, which holds layers "
                            f"{layers}: pass one of those with --layer")
    return layer


def use_cuda_graph(cfg: TrainConfig, device: torch.device, world: int = 1) -> bool:
    """auto captures a single process's step; a data-parallel step is captured, all-reduces
    (NCCL) included, only with `on`, until a multi-GPU box measures it against eager."""
    if cfg.cuda_graph == "on" and device.type != "cuda":
        raise PipelineError("--cuda-graph on needs a CUDA device; use --cuda-graph auto or off")
    return device.type == "cuda" and (cfg.cuda_graph == "on"
                                      or (cfg.cuda_graph == "auto" and world == 1))


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one SAE; returns the summary also written to summary.json. Under a
    launcher (torchrun, accelerate launch), data-parallel over the processes: each takes an
    equal slice of every batch; rank 0 writes the run folder and returns the summary, the
    others {}."""
    check_launch(cfg.device)
    team = workers(resolve_device(cfg.device))
    if team.world > 1:
        team.together(lambda: check_data_parallel(cfg, team.world))
        cache_id = team.together(lambda: open_cache(local_cache(cfg.cache)).cache_id)
        team.same("training run", {"cache id": cache_id, **{
            k: v for k, v in cfg.identity().items() if k != "cache"}})
    return team.checked(lambda ready: train_many(
        [cfg], before_writing=ready, device=team.device(resolve_device(cfg.device)),
        team=team))[0]


# Settings every SAE of one sweep must share: they read the same batches in lockstep.
SWEEP_COMMON = ("cache", "layer", "batch_size", "seed", "window_chunks", "keep_special",
          "holdout_chunks", "device", "tokens", "steps", "log_every", "checkpoint_every", "tf32")


def train_many(cfgs: list[TrainConfig], progress: bool | None = None,
               before_writing: Callable[[], None] | None = None,
               device: str | None = None, team: Workers = ALONE) -> list[dict]:
    """Train K SAEs from one read of the cache: every batch goes to every SAE (one loader per
    distinct stream). Each has its own folder, metrics and checkpoints; resuming restarts all of
    them from the newest checkpoint step they all have. Nothing is written before every check
    has passed; `before_writing` runs then, before the run folders are created. `device`: this
    process's own device in a launched job (cuda:LOCAL_RANK for --device cuda); `team`: the
    processes that train these SAEs data-parallel (rank 0 writes)."""
    base = cfgs[0]
    for cfg in cfgs[1:]:
        differ = [k for k in SWEEP_COMMON if getattr(cfg, k) != getattr(base, k)]
        if differ:
            raise PipelineError(f"the SAEs of one sweep must share {', '.join(differ)} "
                                f"(run {cfg.out} differs from {base.out})")
    if len({c.out for c in cfgs}) < len(cfgs):
        raise PipelineError("two SAEs of the sweep have the same output folder")
    manifest = open_cache(local_cache(base.cache))
    layer = resolve_layer(base, manifest.layers)
    device = torch.device(device or resolve_device(base.device))
    for cfg in cfgs:  # bad SAE or device settings fail before any folder is created
        cfg.sae_config(manifest.d_model)
        use_cuda_graph(cfg, device)
    resume_from = [check_run_dir(cfg, manifest) for cfg in cfgs]
    if device.type == "cuda":  # a process-wide switch: one value for every SAE of the sweep
        torch.backends.cuda.matmul.allow_tf32 = base.tf32
    start = _common_start(cfgs, resume_from)
    loaders: dict[tuple, ActivationLoader] = {}
    try:
        for cfg in cfgs:  # the loaders check their settings before any run folder is written
            key = _stream_key(cfg)
            if key not in loaders:
                loaders[key] = ActivationLoader(
                    cfg.cache, layer, stream=cfg.stream, batch_size=cfg.batch_size,
                    seed=cfg.seed, start_step=start, window_chunks=cfg.window_chunks,
                    device=device, keep_special=cfg.keep_special,
                    holdout_chunks=cfg.holdout_chunks, mix_fraction=cfg.mix_fraction)
        if before_writing is not None:
            before_writing()
        for cfg in cfgs if team.is_main else []:
            create_run_dir(cfg, manifest)
        total = _total_steps(base, next(iter(loaders.values())))
        runs = [Run(cfg, manifest, layer, device, total, loaders[_stream_key(cfg)], start, team)
                for cfg in cfgs]
        show = base.progress if progress is None else progress
        desc = f"train {base.arch}" if len(runs) == 1 else f"sweep of {len(runs)}"
        bar = tqdm(total=total, initial=start, unit="step", desc=desc, disable=not show or not team.is_main,
                   file=sys.stderr, smoothing=0.05)
        try:
            for s in range(start, total):
                batches = {key: next(loader) for key, loader in loaders.items()}
                for run in runs:
                    run.train_step(s, batches[_stream_key(run.cfg)])
                bar.update(1)
                for run in runs:
                    postfix = run.after_step(s + 1)
                    if postfix and len(runs) == 1:
                        bar.set_postfix(postfix)
        finally:
            bar.close()
            for run in runs:
                if run.metrics is not None:
                    run.metrics.close()
        return [run.finish() for run in runs]
    finally:
        for loader in loaders.values():
            loader.close()


def _stream_key(cfg: TrainConfig) -> tuple:
    return (cfg.stream, cfg.mix_fraction if cfg.stream == "mix" else None)


def _common_start(cfgs: list[TrainConfig], resume_from: list[Path | None]) -> int:
    """The step every run restarts from: the newest checkpoint step all of them have."""
    if all(r is None for r in resume_from):
        return 0
    steps = [{RunDir.step_of(p) for p in RunDir(c.out).checkpoints()} for c in cfgs]
    common = set.intersection(*steps)
    return max(common) if common else 0


def _total_steps(cfg: TrainConfig, loader: ActivationLoader) -> int:
    if cfg.steps is not None:
        return cfg.steps
    tokens = cfg.tokens if cfg.tokens is not None else loader.rows_per_epoch
    return max(tokens // cfg.batch_size, 1)


class Run:
    """One SAE being trained: its folder, step function, metrics log and checkpoints."""

    def __init__(self, cfg: TrainConfig, manifest, layer: int, device: torch.device,
                 total: int, loader: ActivationLoader, start: int, team: Workers = ALONE):
        self.cfg, self.manifest, self.layer, self.total = cfg, manifest, layer, total
        self.loader, self.dir, self.team = loader, RunDir(cfg.out), team
        self.scale = loader.norm_scale if cfg.normalize else 1.0
        self.sae = build_sae(cfg.sae_config(manifest.d_model),
                             generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        self.sae.ranks = team
        self.step = TrainStep(self.sae, cfg.batch_size, manifest.d_model, self.scale, total,
                              cfg.lr, (cfg.beta1, cfg.beta2), cfg.grad_clip,
                              cfg.lr_warmup_steps, cfg.lr_decay_fraction, cfg.sae["l1_warmup_steps"],
                              history=cfg.log_every,
                              use_graph=use_cuda_graph(cfg, device, team.world),
                              ranks=team)
        meta: dict = {}
        if start:
            meta = self._resume(start)
        self.metrics = self.dir.metrics_log(truncate_at=meta.get("metrics_offset", 0)) \
            if team.is_main else None
        self.t0, self.last_log = time.perf_counter(), start

    def _resume(self, start: int) -> dict:
        path = self.dir.checkpoint(start)
        tensors, meta = self.dir.load_checkpoint(path, ckpt.expected_entries(self.sae, self.step))
        if meta.get("cache_id") != self.manifest.cache_id:
            raise PipelineError(
                f"cannot resume {self.dir}: it was trained on cache {meta.get('cache_id')}, but "
                f"{self.cfg.cache} now holds cache {self.manifest.cache_id}; use another --out")
        try:
            self.sae.load_state_dict({k[4:]: v for k, v in tensors.items()
                                      if k.startswith("sae.")})
        except RuntimeError as e:
            raise PipelineError(f"the checkpoint does not fit this SAE (d_model "
                                f"{self.manifest.d_model}, d_sae {self.sae.cfg.d_sae}): {e}"
                                ) from e
        self.step.load_state_tensors({k[6:]: v for k, v in tensors.items()
                                      if k.startswith("train.")})
        ckpt.set_rng_state(tensors)
        print(f"resuming {self.dir} from step {start} ({path.name})", file=sys.stderr)
        return meta

    def train_step(self, s: int, batch: torch.Tensor) -> None:
        if s == 0:
            _init_b_dec(self.sae, batch, self.scale)
        self.step.load(batch)
        self.step.run()
        self.sae.refresh(s + 1)

    def after_step(self, done: int) -> dict | None:
        """Log (and checkpoint) when due; returns the progress-bar fields when it logged."""
        cfg = self.cfg
        if done % cfg.log_every and done != self.total:
            return None
        row = _log_row(self.step, self.sae, done, cfg.batch_size, self.t0, self.last_log)
        self.t0, self.last_log = time.perf_counter(), done
        if row["nonfinite_steps"]:
            last = self.dir.checkpoints()
            raise PipelineError(
                f"{self.dir}: the loss became NaN or infinite between steps "
                f"{done - row['steps']} and {done}; stopped. Last good checkpoint: "
                f"{last[-1] if last else 'none yet'}. Lower --lr or check the cache "
                "(`pipeline verify`)")
        if self.metrics is None:  # not rank 0: it took part in the sums, rank 0 writes
            return None
        self.metrics.write(row)
        if done % cfg.checkpoint_every == 0 or done == self.total:
            _save(self.dir, self.step, self.sae, done, self.metrics.offset(), self.manifest, cfg)
        return {"loss": f"{row['loss']:.4g}", "L0": f"{row['l0']:.1f}",
                "dead": f"{100 * row['dead_fraction']:.1f}%",
                "tok_s": f"{row['tokens_per_s']:.3g}"}

    def finish(self) -> dict:
        if not self.team.is_main:
            return {}
        return _finish(self.cfg, self.dir, self.sae, self.scale, self.manifest, self.layer,
                       self.loader, self.total)


@torch.no_grad()
def _init_b_dec(sae: SAE, batch: torch.Tensor, scale: float) -> None:
    """Start the decoder bias at the mean of the first batch (in the scaled space)."""
    sae.b_dec.copy_(batch.mean(0) * scale)


def _log_row(step: TrainStep, sae: SAE, done: int, batch_size: int, t0: float,
             last: int) -> dict:
    sums = step.take_sums()
    n = max(int(sums["steps"]), 1)
    dt = time.perf_counter() - t0
    h = step.history.numel()
    order = [(done - n + i) % h for i in range(n)]
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1)
        extra = torch.stack([sae.dead_mask().float().mean(), sae.mask_density().float(),
                             norms.min(), norms.mean()]).tolist()
    return {
        "step": done, "tokens": done * batch_size, "loss": sums["loss"] / n,
        "mse": sums["mse"] / n, "fve": sums["fve"] / n, "l0": sums["l0"] / n,
        "dead_fraction": extra[0], "mask_density": extra[1], "dec_norm_min": extra[2],
        "dec_norm_mean": extra[3], "lr": step.current_lr(), "steps": n,
        "nonfinite_steps": int(sums["nonfinite"]),
        "steps_per_s": (done - last) / dt if dt > 0 else None,
        "tokens_per_s": (done - last) * batch_size / dt if dt > 0 else 0.0,
        "step_mse": step.history[order].tolist(),
    }


def _save(run: RunDir, step: TrainStep, sae: SAE, done: int, metrics_offset: int,
          manifest, cfg: TrainConfig) -> None:
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    tensors.update({f"train.{k}": v for k, v in step.state_tensors().items()})
    tensors.update(ckpt.rng_state())
    run.save_checkpoint(done, tensors, {
        "metrics_offset": metrics_offset, "cache_id": manifest.cache_id,
        "arch": cfg.arch, "loader_step": done})


def _finish(cfg: TrainConfig, run: RunDir, sae: SAE, scale: float, manifest, layer: int,
            loader: ActivationLoader, total: int) -> dict:
    metadata = {
        "model_name": manifest.model_name, "context_size": manifest.context_length,
        "cache_id": manifest.cache_id, "stream": cfg.stream,
        "training_tokens": total * cfg.batch_size, "norm_scale": scale,
        "train_config": cfg.identity(),
    }
    hashes = run.save_sae(sae, scale, layer, metadata, step=total)  # a CPU copy; the SAE stays
    plot = plot_training(run)
    summary = {"run": str(run), "steps": total, "tokens": total * cfg.batch_size,
               "arch": cfg.arch, "d_sae": sae.cfg.d_sae, "layer": layer, "stream": cfg.stream,
               "cache_id": manifest.cache_id, "norm_scale": scale, "files": hashes,
               "plot": str(plot) if plot else None}
    if cfg.holdout_chunks:
        metrics, _ = reconstruction_metrics(sae, (x * scale for x in loader.holdout()))
        summary["holdout"] = metrics  # in the training (scaled) space
    run.write_summary(summary)
    return summary
