"""Cross-entropy with the SAE's reconstruction spliced into the forward pass at its layer, against
the clean forward and against zero-ablation of that layer's output. Special-token positions (BOS,
whose norm is ~100x the rest and which the SAE never trained on) keep their clean activations in
both interventions."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models import decoder_layers


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def spliced_ce(model, layer: int, sae, tokens: np.ndarray, special_ids: list[int],
               batch_size: int = 8, progress=None, baseline: dict | None = None) -> dict:
    """Mean next-token CE over `tokens` [n, ctx]: clean, with the SAE, with zero-ablation; the CE
    increase and the fraction of loss recovered ((zero - sae) / (zero - clean)). `baseline`: an
    earlier result on the same tokens, whose clean and zero-ablation CE do not depend on the SAE,
    so only the SAE's forward runs (several SAEs of one model and layer)."""
    block = decoder_layers(model.model if hasattr(model, "model") else model)[layer]
    device = next(model.parameters()).device
    mode: dict = {"replace": None}

    def hook(_module, _inputs, output):
        fn = mode["replace"]
        if fn is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        new = torch.where(mode["keep"].unsqueeze(-1), h, fn(h))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    modes = [("sae", lambda h: sae(h.float()).to(h.dtype))]
    if baseline is None:
        modes += [("clean", None), ("zero", torch.zeros_like)]
    handle = block.register_forward_hook(hook)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_batches = 0
    try:
        for i in range(0, len(tokens), batch_size):
            ids = torch.from_numpy(np.ascontiguousarray(tokens[i:i + batch_size])).long().to(device)
            mode["keep"] = torch.isin(ids, torch.tensor(special_ids, device=device))
            for name, fn in modes:
                mode["replace"] = fn
                logits = model(input_ids=ids, use_cache=False).logits
                totals[name] += float(_next_token_ce(logits, ids))
            n_batches += 1
            if progress is not None:
                progress(len(ids))
    finally:
        handle.remove()
    ce = {k: v / n_batches for k, v in totals.items()}
    if baseline is not None:
        ce.update(clean=baseline["ce_clean"], zero=baseline["ce_zero_ablation"])
    gap = ce["zero"] - ce["clean"]
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_increase": ce["sae"] - ce["clean"],
            "loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap > 0 else None,
            "sequences": len(tokens)}
