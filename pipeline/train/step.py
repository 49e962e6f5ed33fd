"""The training step on static buffers: forward, loss, backward, clipping, Adam, decoder
renormalisation and metric accumulation, with no host sync. On CUDA it is captured once in a CUDA
graph and replayed; elsewhere (or with --cuda-graph off) the same function runs eagerly."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.processes import ALONE, Workers
from pipeline.sae import SAE
from pipeline.sae.mse import mean_square
from pipeline.train.memory import keep_freed_memory

# Metric sums accumulated on the device between two log points.
SUMS = ("loss", "mse", "fve", "l0", "steps", "nonfinite")


def make_optimizer(sae: SAE, lr: float, betas: tuple[float, float], device: torch.device,
                   capturable: bool = False,
                   ) -> tuple[torch.optim.Adam, torch.Tensor, dict[str, tuple[nn.Parameter, nn.Parameter]]]:
    """Adam whose learning rate is a device tensor (the schedule writes it inside the step).

    Fused on every device: one pass per parameter. `capturable` for CUDA graphs only (its
    state stays on the device, so the graph can replay it; a cost when nothing is captured).
    Adam sees each parameter as a contiguous tensor: a column-major one (W_enc) through its
    transpose, a leaf over the same memory, because fused Adam on CPU copies a non-contiguous
    parameter, its gradient and moments to contiguous memory and back every step.
    Returns (optimizer, lr, {name: (parameter, what Adam sees)})."""
    lr_t = torch.tensor(lr, dtype=torch.float32, device=device)
    views = {name: (p, _contiguous_leaf(p)) for name, p in sae.named_parameters()}
    opt = torch.optim.Adam([q for _, q in views.values()], lr=lr_t, betas=betas, fused=True,
                           capturable=capturable and device.type == "cuda")
    return opt, lr_t, views


def _contiguous_leaf(p: nn.Parameter) -> nn.Parameter:
    """p if contiguous, else (a column-major matrix) a parameter over p's memory as p.t()."""
    if p.is_contiguous():
        return p
    if p.dim() != 2 or not p.t().is_contiguous():
        raise ValueError(f"parameter of shape {tuple(p.shape)} and strides {p.stride()} is "
                         "neither row- nor column-major")
    return nn.Parameter(p.detach().t())


def _as_seen(p: torch.Tensor, q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like parameter p, as optimizer tensor q sees it (and back: it's t())."""
    return value.t() if q is not p and value.dim() == 2 else value


class TrainStep:
    """One step of SAE training as a fixed-shape function of static buffers.

    `x` is the static input: copy each raw batch into it (`load`), then `run()`. The learning rate
    and the l1 warm-up factor are computed on the device from the step counter `step_t`, and the
    metric sums live in `sums`, so nothing in a step waits for the host.
    """

    def __init__(self, sae: SAE, batch_size: int, d_in: int, scale: float, total_steps: int,
                 lr: float, betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0,
                 lr_warmup_steps: int = 0, lr_decay_fraction: float = 0.0,
                 l1_warmup_steps: int = 0, history: int = 50, use_graph: bool = False,
                 ranks: Workers = ALONE):
        self.sae, self.ranks = sae, ranks
        # Data parallel: every process holds the whole batch and trains on its own equal slice
        # of rows; gradients and statistics are averaged, so the step is one step on the batch.
        share = batch_size // ranks.world
        self.rows = slice(ranks.rank * share, (ranks.rank + 1) * share)
        self.device = next(sae.parameters()).device
        dev = self.device
        self.x = torch.zeros(batch_size, d_in, device=dev)
        self.scale = torch.tensor(scale, dtype=torch.float32, device=dev)
        if dev.type == "cpu":
            keep_freed_memory()
        self.opt, self.lr_t, self.views = make_optimizer(sae, lr, betas, dev, use_graph)
        self.base_lr, self.grad_clip = lr, grad_clip
        self.total_steps, self.lr_warmup, self.lr_decay = total_steps, lr_warmup_steps, \
            lr_decay_fraction
        self.l1_warmup = l1_warmup_steps
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.sums = {name: torch.zeros((), dtype=torch.float32, device=dev) for name in SUMS}
        self.history = torch.zeros(history, dtype=torch.float32, device=dev)
        self.use_graph = use_graph
        # One captured graph per value of sae.graph_key() (host-side switches such as AuxK on
        # or off), each with its own memory pool; the first steps of each run eagerly (warm-up).
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}
        self.eager_steps: dict[object, int] = {}

    # -- the step itself ------------------------------------------------------------------------
    def _schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.step_t.to(torch.float32)
        warm = torch.clamp((s + 1) / max(self.lr_warmup, 1), max=1.0)
        decay_steps = max(self.lr_decay * self.total_steps, 1.0)
        decay = torch.clamp((self.total_steps - s) / decay_steps, min=0.0, max=1.0)
        l1_scale = torch.clamp((s + 1) / max(self.l1_warmup, 1), max=1.0)
        return self.base_lr * warm * decay, l1_scale

    def _step(self) -> None:
        lr, l1_scale = self._schedule()
        self.lr_t.copy_(lr)
        x = self.x * self.scale
        loss, parts, _x_hat, code = self.sae.loss(x[self.rows], l1_scale)
        loss.backward()
        if self.ranks.world > 1:
            for p in self.sae.parameters():
                if p.grad is not None:
                    self.ranks.mean_(p.grad)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.grad_clip)
        for p, q in self.views.values():
            if q is not p:  # a view of p's gradient (which autograd keeps in p's strides)
                q.grad = None if p.grad is None else p.grad.t()
        self.opt.step()
        self.sae.normalize_decoder()
        with torch.no_grad():
            mse = parts["mse"].detach()  # every architecture's reconstruction term
            var = mean_square(x - x.mean(0))  # mean per-dimension variance (var(0): 10x slower)
            s = self.sums
            s["loss"].add_(loss.detach())
            s["mse"].add_(mse)
            s["fve"].add_(1 - mse / var.clamp_min(1e-12))
            s["l0"].add_(self.sae.l0(code))
            s["steps"].add_(1)
            s["nonfinite"].add_((~torch.isfinite(loss.detach())).float())
            idx = torch.remainder(self.step_t, self.history.numel()).view(1)
            self.history.index_copy_(0, idx, mse.view(1))
            self.step_t.add_(1)

    # -- running it -----------------------------------------------------------------------------
    def load(self, batch: torch.Tensor) -> None:
        """Copy a raw batch into the static input (asynchronous on CUDA)."""
        self.x.copy_(batch, non_blocking=True)

    def run(self) -> None:
        """One training step on the current static input."""
        if not self.use_graph:
            self.sae.zero_grad(set_to_none=True)  # Adam's views take theirs in _step
            self._step()
            return
        graph = self.graphs.get(self.sae.graph_key())
        if graph is None:
            self._warm_up_or_capture()
            return
        graph.replay()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured step for the SAE's current graph key, if captured yet."""
        return self.graphs.get(self.sae.graph_key())

    def _warm_up_or_capture(self, warmup: int = 3) -> None:
        """The first steps run eagerly on a side stream (lazy state, cuBLAS workspaces), then the
        step is captured once; capturing executes nothing, so the captured step is replayed."""
        key = self.sae.graph_key()
        graph = None
        with torch.cuda.device(self.device):  # the SAE's GPU, whichever is current
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.sae.zero_grad(set_to_none=True)  # Adam's views take theirs in _step
                if self.eager_steps.get(key, 0) < warmup:
                    self._step()
                    self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
                else:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=side):
                        self._step()
                    self.graphs[key] = graph  # only once captured: a failed capture is retried
            torch.cuda.current_stream(self.device).wait_stream(side)
            if graph is not None:
                graph.replay()

    def take_sums(self) -> dict[str, float]:
        """Host copy of the metric sums since the last call, then reset them (one sync)."""
        stacked = self.ranks.sum_(torch.stack([self.sums[n] for n in SUMS]))
        if self.ranks.world > 1:  # means of the processes' means; nonfinite (last) stays a count
            stacked[:-1] /= self.ranks.world
        self.ranks.mean_(self.history)  # each process's step mse: the batch's is their mean
        values = stacked.tolist()
        for t in self.sums.values():
            t.zero_()
        return dict(zip(SUMS, values, strict=True))

    def current_lr(self) -> float:
        return float(self.lr_t)

    # -- state for checkpoints ------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs besides the SAE: optimizer, counters, sums, history."""
        out = {"step": self.step_t, "history": self.history, "lr": self.lr_t}
        out.update({f"sums.{k}": v for k, v in self.sums.items()})
        for name, (p, q) in self.views.items():
            for key, value in self.opt.state.get(q, {}).items():
                out[f"adam.{name}.{key}"] = _as_seen(p, q, value)  # in the parameter's shape
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what state_tensors saved, in place (the CUDA graph's buffers stay valid)."""
        self.step_t.copy_(tensors["step"])
        self.history.copy_(tensors["history"])
        self.lr_t.copy_(tensors["lr"])
        for k, v in self.sums.items():
            v.copy_(tensors[f"sums.{k}"])
        for name, (p, q) in self.views.items():
            keys = [k for k in tensors if k.startswith(f"adam.{name}.")]
            if not keys:
                continue
            state = self.opt.state[q]
            for k in keys:
                key = k[len(f"adam.{name}."):]
                value = tensors[k].to(self.device if key != "step" or self._state_on_device()
                                      else "cpu")
                if value.shape == p.shape:  # moments: saved in the parameter's shape
                    value = _as_seen(p, q, value)
                if key in state:
                    state[key].copy_(value)
                else:
                    state[key] = value.clone(memory_format=torch.contiguous_format)

    def _state_on_device(self) -> bool:
        group = self.opt.param_groups[0]
        return bool(group.get("capturable") or group.get("fused"))
