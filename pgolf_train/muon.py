"""Muon (momentum + Newton–Schulz orthogonalization) for 2-D weight matrices, and the parameter
split that decides which optimizer trains which tensor."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf_train.model import CastedLinear


# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932; used by modded-nanogpt's
# records): one quintic per iteration instead of one fixed quintic. Iteration k's (a_k, b_k, c_k)
# is the odd quintic minimizing max |1 − p(σ)| over the interval the singular values are known to
# lie in (the first: [1e-3, 1] after the Frobenius normalization), fitted on [max(l, 0.02407·u), u]
# and recentred (the paper's cushion), then evaluated as p(σ/1.01) (its safety factor); the next
# interval is p's range. Derived by a Remez exchange in benchmarks/polar_express_coeffs.py, which
# prints this table (polar_express_coeffs(steps=8)); tests/train/test_techniques_opt.py holds the
# two equal. Without the safety factor its first row is the paper's (8.28721, −23.59589, 17.30039).
# Iterations past the table repeat its last row (by then the interval has collapsed onto 1).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.205160414005567, -22.901934987056027, 16.4607249101803),
    (4.066915619879591, -2.8612845345884783, 0.5183804464778612),
    (3.9134926112054647, -2.8242518767230904, 0.5248485625148541),
    (3.3060139701337707, -2.430227567449686, 0.4869515205509481),
    (2.3040168139444726, -1.6427206546268946, 0.40091009490222074),
    (1.8771914635817006, -1.2356588245606897, 0.35900461074586976),
    (1.8564430512932206, -1.2132457535190868, 0.3568004238191866),
    (1.856438461319272, -1.2132432093531549, 0.3568023406356772),
)
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)
NS_COEFFS = ("quintic", "polar_express")  # the choices of TrainConfig.muon_ns_coeffs


def ns_schedule(coeffs: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The ``steps`` (a, b, c) of Newton–Schulz schedule ``coeffs`` ("quintic" or "polar_express")."""
    if coeffs == "quintic":
        return (QUINTIC_COEFFS,) * steps
    if coeffs == "polar_express":
        table = POLAR_EXPRESS_COEFFS
        return table[:steps] + (table[-1],) * max(steps - len(table), 0)
    raise ValueError(f"unknown Newton-Schulz coefficients {coeffs!r}; expected one of {', '.join(NS_COEFFS)}")


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7, coeffs: str = "quintic") -> Tensor:
    """Approximately orthogonalize G: [rows, cols] or a stack [n, rows, cols] (returns bf16, same shape).

    ``coeffs="quintic"``: the quintic's coefficients are tuned for speed, not convergence: singular
    values land in roughly [0.7, 1.2] rather than exactly 1, which trains just as well.
    ``coeffs="polar_express"``: the per-iteration minimax schedule ``POLAR_EXPRESS_COEFFS``, the
    matrix first divided by 1.01·‖G‖_F as the paper does; in 5 steps every singular value above
    1e-3·‖G‖_F lands within about ±0.14 of 1 (bf16 round-off aside). Same cost per step."""
    schedule = ns_schedule(coeffs, steps)  # Python floats: no tensors, no host syncs
    X = G.bfloat16()
    # Frobenius norm >= spectral norm, so all singular values start <= 1
    if coeffs == "quintic":
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    else:  # polar_express: the paper's 1 % margin against round-off
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix X·Xᵀ is the smaller one
        X = X.mT
    for a, b, c in schedule:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


@functools.cache
def _compiled_newton_schulz():
    # On GPU the iteration is launch-bound in eager mode; compiling fuses its elementwise work.
    return torch.compile(newton_schulz, dynamic=False)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Group fields: lr, momentum (read every step, so it can be warmed up),
    nesterov, backend_steps, weight_decay (decoupled: p ← p·(1 − lr·wd); also read every step, so a
    schedule can taper it), row_normalize, ns_coeffs (Newton–Schulz schedule: "quintic" or
    "polar_express", see :func:`newton_schulz`).

    Matrices of the same shape are orthogonalized together as one batched Newton–Schulz: a
    baseline-size model has 54 matrices but only 4 shapes, and one-by-one the step is bound by
    kernel launches, not arithmetic. With torch.distributed initialized, rank r orthogonalizes
    parameters r, r+W, r+2W, ... into a flat bf16 buffer and one all_reduce(SUM) hands every rank
    every update; ranks must hold identical gradients (as after DDP), and then they apply identical
    updates. One process runs the same path without the collective."""

    def __init__(self, params, lr: float = 0.04, momentum: float = 0.95, nesterov: bool = True,
                 backend_steps: int = 5, weight_decay: float = 0.0, row_normalize: bool = False,
                 ns_coeffs: str = "quintic"):
        ns_schedule(ns_coeffs, 1)  # a misspelt schedule fails here, not at the first step
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, backend_steps=backend_steps,
                        weight_decay=weight_decay, row_normalize=row_normalize, ns_coeffs=ns_coeffs)
        super().__init__(params, defaults)
        for group in self.param_groups:
            ns_schedule(group["ns_coeffs"], 1)
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon trains 2-D matrices only, got shape {tuple(p.shape)}")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # optimizer states saved before ns_coeffs existed
            group.setdefault("ns_coeffs", "quintic")

    def _updates(self, group: dict, owned: list[Tensor]) -> dict[Tensor, Tensor]:
        """Momentum, then the orthogonalized, RMS-matched update of every owned parameter (float32)."""
        grads = [p.grad for p in owned]
        bufs = []
        for p in owned:
            state = self.state[p]
            if "momentum_buffer" not in state:  # only the owning rank keeps momentum
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        steer = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(owned):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        out: dict[Tensor, Tensor] = {}
        for (rows, cols), idx in by_shape.items():
            G = torch.stack([steer[i] for i in idx])
            orthogonalize = _compiled_newton_schulz() if G.is_cuda else newton_schulz
            U = orthogonalize(G, group["backend_steps"], coeffs=group["ns_coeffs"]).float()
            if group["row_normalize"]:  # equalize per-output-row step sizes
                U = U / (U.square().mean(dim=-1, keepdim=True).sqrt() + 1e-7)
            # Orthogonal rows have unit norm; tall matrices need larger entries for the same RMS.
            U *= max(1.0, rows / cols) ** 0.5
            for i, u in zip(idx, U.unbind(0)):
                out[owned[i]] = u
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # same on every rank (DDP)
            if not params:
                continue
            owned = [p for i, p in enumerate(params) if i % world == rank]
            updates = self._updates(group, owned) if owned else {}
            # bf16 on the wire (and on one process too, so both paths apply identical updates)
            flat = torch.cat([updates[p].flatten() if p in updates else p.new_zeros(p.numel())
                              for p in params]).bfloat16()
            if distributed and world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            deltas = list(flat.float().split([p.numel() for p in params]))
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [d.view_as(p) for d, p in zip(deltas, params)], alpha=-group["lr"])
        return loss


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Optimizer groups for a GPT: `matrix` (CastedLinear weights inside blocks and a factorized
    embedding's embed_proj → Muon), `embed` (tok_emb, a bigram table → Adam at tied_embed_lr), `scalar` (vectors,
    gains, mixes, skip weights → Adam at scalar_lr), `head` (an untied lm_head → Adam at head_lr).
    Every parameter lands in exactly one group; a group may be empty.

    embed_proj is a dense matrix that every token's gradient reaches. Under Adam at the embedding's
    learning rate (0.05, sized for sparse rows) each step moves every entry by about 0.05, as much
    as the entries' own spread at init (std 0.036 for E = 256), and the factorized model stalled
    (H200-300: train loss 5.66 at step 100 against 3.47 unfactorized)."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "scalar": [], "head": []}
    matrix_ids = {id(m.weight) for m in model.blocks.modules() if isinstance(m, CastedLinear)}
    if getattr(model, "embed_proj", None) is not None:
        matrix_ids.add(id(model.embed_proj.weight))
    if getattr(model, "bigram_proj", None) is not None:  # BigramHash: projection → Muon, table → embed
        matrix_ids.add(id(model.bigram_proj.weight))
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if id(p) in matrix_ids:
            groups["matrix"].append(p)
        elif top in ("tok_emb", "bigram"):
            groups["embed"].append(p)
        elif top == "lm_head":
            groups["head"].append(p)
        else:
            groups["scalar"].append(p)
    return groups
