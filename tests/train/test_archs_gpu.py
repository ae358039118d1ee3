"""The SSM mixer, the MoE MLP and early exit on a real GPU: compiled bf16 training steps (the
trainer's path), CUDA numerics of the chunked scan, causality on the device.

CPU tests cannot exercise inductor's CUDA kernels, TF32 matmuls or bf16 autocast; run on a GPU
machine with ``python3 -m pytest tests/train/test_archs_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch

from pgolf_train.model import GPT, GPTConfig, _ssd_chunks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARMS = {
    "ssm": dict(ssm_layers="1,3"),
    "moe": dict(moe_experts=4, moe_top_k=2, mlp_mult=0.5),
    "early_exit": dict(exit_layers="1,2"),
}


def _model(arm: str) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, seq_len=256,
                    **ARMS[arm])
    model = GPT(cfg).cuda()
    with torch.no_grad():  # zero-init output projections would hide every block from the checks
        for name, p in model.named_parameters():
            if p.ndim == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def test_gpu_chunked_scan_matches_the_float64_recurrence():
    g = torch.Generator().manual_seed(0)
    b, T, H, P, N = 2, 300, 4, 32, 16
    x, B, C = torch.randn(b, T, H, P, generator=g), torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    dt, A = torch.rand(b, T, H, generator=g) * 0.2, -torch.rand(H, generator=g) * 4
    h = torch.zeros(b, H, P, N, dtype=torch.float64)
    ref = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None, None].double() * A[:, None, None].double()) * h \
            + (dt[:, t, :, None].double() * x[:, t].double())[..., None] * B[:, t, None, None].double()
        ref.append(torch.einsum("bhpn,bn->bhp", h, C[:, t].double()))
    ref = torch.stack(ref, 1)
    for chunk in (32, 64, 100):
        y = _ssd_chunks(*(t.cuda() for t in (x, dt, A, B, C)), chunk)
        err = (y.double().cpu() - ref).abs().max().item()
        assert err < 2e-2 * ref.abs().max().item(), (chunk, err)  # TF32 matmuls


@pytest.mark.parametrize("arm", list(ARMS))
def test_gpu_compiled_bf16_training_step_matches_eager(arm):
    model = _model(arm).train()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    x = torch.randint(0, 512, (4, 256), device="cuda")
    y = torch.randint(0, 512, (4, 256), device="cuda")
    losses, grads = [], []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0]), losses
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99, cos


@pytest.mark.parametrize("arm", list(ARMS))
def test_gpu_eval_is_causal(arm):
    model = _model(arm).eval()
    # one row: a second row's tokens would follow this row's later ones in the MoE's packing order,
    # which moves them to other slots (the same arithmetic, but not necessarily the same GEMM tiles)
    x = torch.randint(0, 512, (1, 200), device="cuda")
    if arm == "early_exit":  # bisect for a threshold at which some tokens exit and some do not
        lo, hi = 0.0, 1.0
        for _ in range(40):
            model.exit_threshold = (lo + hi) / 2
            model.exit_counts.zero_()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model.logits(x)
            counts = model.exit_counts.tolist()
            if counts[-1] == 0:
                lo = model.exit_threshold
            elif sum(counts[:-1]) == 0:
                hi = model.exit_threshold
            else:
                break
        model.exit_counts.zero_()
    x2 = x.clone()
    x2[:, 120:] = torch.randint(0, 512, (1, 80), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model.logits(x), model.logits(x2)
    assert torch.equal(a[:, :120], b[:, :120])
    if arm == "early_exit":
        counts = model.exit_counts.tolist()
        assert counts[-1] > 0 and sum(counts[:-1]) > 0, counts
