"""Training-speed baselines from two other SAE libraries, timed on the same in-memory batches.

- ``saelens_steps_per_s``: SAELens (``sae-lens``, written against 6.54.12). Its own ``SAETrainer.fit``
  runs, fed a generator that cycles over the batches, with a ``StandardTrainingSAE`` (ReLU + L1) or a
  ``TopKTrainingSAE`` (TopK + AuxK). The step is SAELens's: training forward pass, dead-latent and
  firing-frequency bookkeeping, backward, grad-norm clip, Adam, LR and coefficient schedulers.
- ``sparsify_steps_per_s``: EleutherAI sparsify (``eai-sparsify``, written against 1.3.3). Its
  ``SparseCoder`` (TopK) stepped as ``sparsify.trainer.Trainer.fit`` steps it with ``loss_fn="fvu"``
  and the default ``optimizer="signum"``. That ``Trainer`` needs a Hugging Face model and a token
  dataset to produce activations, so the loop body is copied here, not the ``Trainer`` itself.

Each function raises ImportError if its library is missing, so the caller can skip it. Nothing goes to
stdout: stdout carries the caller's JSON.
"""

import contextlib
import functools
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator
from unittest import mock

import torch


def _cycle(batches: list[torch.Tensor], warmup: int, marks: list[float]) -> Iterator[torch.Tensor]:
    """Yield the batches in a cycle. Asking for batch number `warmup` means the warm-up steps are
    done, so the time of that request is recorded in `marks`."""
    for i, batch in enumerate(itertools.cycle(batches)):
        if i == warmup:
            marks.append(time.perf_counter())
        yield batch


def saelens_steps_per_s(batches: list[torch.Tensor], d_sae: int, arch: str, k: int, steps: int,
                        warmup: int = 2) -> float:
    """Steps/s of SAELens's own ``SAETrainer.fit`` for `arch` 'standard' or 'topk' (k active latents).

    One ``fit`` runs ``warmup + steps`` steps (``total_training_samples`` = that many batches). The data
    generator records the time when ``fit`` asks for batch number ``warmup``, i.e. when the warm-up
    steps are finished; the clock stops when ``fit`` returns, so the measured span is exactly ``steps``
    steps (plus ``fit``'s trivial end: final sparsity metadata). No wandb (``log_to_wandb=False``, so
    no per-step log dicts or evals), no checkpoints, no activation normalization (``"none"``), so no
    batches are spent estimating a scale. Its tqdm bar is disabled.
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training import sae_trainer
    from tqdm.auto import tqdm

    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    batch_size, d_in = batches[0].shape
    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae))
    elif arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    else:
        raise ValueError(f"arch must be 'standard' or 'topk', not {arch!r}")
    # lr_end as LanguageModelSAERunnerConfig's post-init sets it (only read by decaying schedulers)
    cfg = SAETrainerConfig(total_training_samples=(warmup + steps) * batch_size,
                           train_batch_size_samples=batch_size, device="cpu", lr=3e-4, lr_end=3e-5,
                           n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
                           logger=LoggingConfig(log_to_wandb=False))
    marks: list[float] = []
    # evaluator and save_checkpoint_fn stay None: no model to evaluate, nothing to save
    trainer = sae_trainer.SAETrainer(cfg=cfg, sae=sae, data_provider=_cycle(batches, warmup, marks))
    with mock.patch.object(sae_trainer, "tqdm", functools.partial(tqdm, disable=True)):
        trainer.fit()
    end = time.perf_counter()
    assert trainer.n_training_steps == warmup + steps and len(marks) == 1
    return steps / (end - marks[0])


def sparsify_steps_per_s(batches: list[torch.Tensor], d_sae: int, k: int, steps: int, warmup: int = 2,
                         auxk_alpha: float = 1 / 32, device: str | torch.device = "cpu",
                         triton: bool = False) -> float:
    """Steps/s of sparsify's ``SparseCoder`` (TopK, k) stepped the way ``Trainer.fit`` steps it.

    Per step, as in sparsify 1.3.3 ``trainer.py`` with ``loss_fn="fvu"``: on the first step only,
    ``b_dec`` set to the batch mean; ``set_decoder_norm_to_unit_norm``; ``dead_mask`` from
    ``num_tokens_since_fired > dead_feature_threshold``; ``sae(x=x, y=x, dead_mask=...,
    total_variance=...)``; ``loss = fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8``; backward;
    ``remove_gradient_parallel_to_decoder_directions``; the default ``signum`` optimizer
    (``ScheduleFreeWrapper(SignSGD, momentum=0.95)`` at its default LR, no LR scheduler); zero_grad;
    the did-fire / tokens-since-fired update; ``float(fvu)`` for its running log. ``auxk_alpha``
    defaults to 1/32 (1.3.3's own default is 0, which passes no dead mask at all). Eager decoder
    (``SPARSIFY_DISABLE_TRITON=1``) unless ``triton`` (CUDA; sparsify chooses at its import, so the
    first call in a process decides: see ``sparsify_decoder``). On `device`, with the batches
    moved there. Timed with ``perf_counter`` over ``steps`` steps after ``warmup``, the device
    synchronised at both ends.
    """
    if not triton:
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    with contextlib.redirect_stdout(sys.stderr):  # sparsify prints its decoder choice on import
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.config import TrainConfig
        from sparsify.sign_sgd import SignSGD

    device = torch.device(device)
    batches = [b.to(device) for b in batches]
    batch_size, d_in = batches[0].shape
    cfg = TrainConfig(SparseCoderConfig(num_latents=d_sae, k=k), loss_fn="fvu", optimizer="signum",
                      auxk_alpha=auxk_alpha)
    torch.manual_seed(0)
    sae = SparseCoder(d_in, cfg.sae, device, dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(),
                                            lr=cfg.lr or 5e-3 / (sae.num_latents / 2**14) ** 0.5)]),
                              momentum=0.95)
    opt.train()
    num_tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    avg_fvu = 0.0

    def step(i: int) -> None:
        nonlocal avg_fvu
        x = batches[i % len(batches)]
        if i == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = num_tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        avg_fvu += float(out.fvu.detach())
        (out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            num_tokens_since_fired.add_(batch_size)
            num_tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    for i in range(warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return steps / (time.perf_counter() - start)


def sparsify_decoder() -> str:
    """The sparse decoder sparsify chose at its import: triton_decode or eager_decode."""
    from sparsify import utils

    impl = utils.decoder_impl
    return getattr(impl, "__name__", type(impl).__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
