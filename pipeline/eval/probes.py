"""The probes of the first-letter absorption eval, trained as SAEBench 0.6 trains them
(sae_bench/evals/absorption/probing.py and k_sparse_probing.py), in torch alone:

- `train_probes`: SAEBench's `train_multi_probe`, one-vs-rest logistic probes trained together
  with Adam on minibatches, BCE with pos_weight = negatives / positives per class, Adam weight
  decay, the learning rate decayed exponentially from `lr` to `end_lr` over the epochs, an
  optional L1 term on the weights, nn.Linear's initialisation. The result depends on the seed
  as SAEBench's does on its unseeded RNG: the probes stop far from convergence.
- `balanced_logistic`: sklearn's `LogisticRegression(class_weight="balanced")` (C = 1, L2 on the
  weights, not the intercept), solved to convergence: the optimum is unique, so it is sklearn's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


@contextmanager
def one_thread():
    """Run torch on one thread: the probes' matmuls are small, and handing them to a second
    thread costs more than it saves (20x more on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probes(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, epochs: int = 50,
                 lr: float = 1e-2, end_lr: float = 1e-5, weight_decay: float = 0.0,
                 l1: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [classes, d] and biases [classes] of one-vs-rest probes; `y` is one-hot
    [n, classes]."""
    with one_thread():
        return _train(x, y, batch_size, epochs, lr, end_lr, weight_decay, l1, seed)


def _train(x, y, batch_size, epochs, lr, end_lr, weight_decay, l1, seed):
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    bound = 1 / math.sqrt(d)  # nn.Linear's default init
    w = ((torch.rand(y.shape[1], d, generator=g) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(y.shape[1], generator=g) * 2 - 1) * bound).requires_grad_()
    y = y.float()
    pos = y.sum(0)
    # a class absent from the data would get an infinite weight (SAEBench's NaN); 1 keeps it finite
    pos_weight = (n - pos) / pos.clamp_min(1)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(
        opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x[idx] @ w.T + b, y[idx],
                                                      pos_weight=pos_weight)
            if l1:
                loss = loss + l1 * w.abs().sum(-1).mean()
            loss.backward()
            opt.step()
        sched.step()
    return w.detach(), b.detach()


def balanced_logistic(x: torch.Tensor, y: torch.Tensor, max_iter: int = 500,
                      ) -> tuple[torch.Tensor, float]:
    """(coef, intercept) minimising sum_i c_i * logloss_i + |coef|^2 / 2 with the balanced class
    weights c_i = n / (2 n_class(i)): sklearn's objective for C = 1."""
    x, t = x.double(), y.double()
    n_pos = float(t.sum())
    if n_pos in (0.0, float(len(t))):
        raise ValueError(f"a logistic probe needs both classes, got {int(n_pos)} positives of "
                         f"{len(t)}")
    c = torch.where(y, len(t) / (2 * n_pos), len(t) / (2 * (len(t) - n_pos)))
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = x @ w[:-1] + w[-1]
        loss = (c * F.binary_cross_entropy_with_logits(logit, t, reduction="none")).sum()
        loss = loss + 0.5 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    return w[:-1].float(), float(w[-1])


def f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    """sklearn's binary f1_score (0 when there is no true positive)."""
    tp = float((pred & y).sum())
    fp, fn = float((pred & ~y).sum()), float((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
