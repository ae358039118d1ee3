"""Document attention's kernels at h200's training shape, against causal attention (one layer).

    python benchmarks/doc_attn_bench.py [--bos-per-row 0.35] [--iters 20] [--out FILE]

bf16 q [B·T, 8, 64], k and v [B·T, 4, 64] (B = 128 rows of T = 1,024), BOS tokens drawn at
``--bos-per-row`` per row (the h200 training stream, Wikipedia under the 4,096-piece tokenizer, has
1.35 segments per row: 0.35 BOS inside a row on average; a segment's attention there is 0.90 of a
causal row's). Routes, each as ms per forward and per forward + backward:
``cudnn_causal`` (today's h200: no document isolation), ``flash_causal`` (FlashAttention 2, the same
attention), ``flash_varlen`` (``pgolf_train.doc_attn``: document-isolated, the fusion "varlen"),
``cudnn_bool_mask`` (document-isolated: SDPA with the model's [B, 1, T, T] mask, cuDNN) and
``cudnn_ragged`` (cuDNN's variable-length path through ``aten._cudnn_attention_forward``, K/V
expanded to 8 heads: it takes no grouped-query attention). A route that fails records its error.
The document-isolated outputs are checked against ``cudnn_bool_mask`` (largest absolute difference).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf_train import doc_attn
from pgolf_train.model import doc_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cuda_ms, git, write_json  # noqa: E402

B, T, H, KV, D = 128, 1024, 8, 4, 64


def routes(idx: torch.Tensor) -> dict:
    """name -> f(q, k, v) -> [B·T, H, D], on packed q [B·T, H, D], k and v [B·T, KV, D]."""
    cu = doc_attn.segments(idx, 1)
    rows = lambda t: t.view(B, T, -1, D).transpose(1, 2)  # noqa: E731
    flat = lambda y: y.transpose(1, 2).reshape(B * T, H, D)  # noqa: E731

    def sdpa(backend, mask=None):
        def f(q, k, v):
            with sdpa_kernel([backend]):
                return flat(F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=mask,
                                                           is_causal=mask is None, enable_gqa=True))
        return f

    def cudnn_ragged(q, k, v):  # forward only: its backward is not wrapped here
        k, v = (t.repeat_interleave(H // KV, 1) for t in (k, v))
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, T, T, True, 0.0, True, False,
                                                       scale=D ** -0.5)[0]

    return {"cudnn_causal": sdpa(SDPBackend.CUDNN_ATTENTION), "flash_causal": sdpa(SDPBackend.FLASH_ATTENTION),
            "flash_varlen": lambda q, k, v: doc_attn.varlen_attention(q, k, v, cu, T, None),
            "cudnn_bool_mask": sdpa(SDPBackend.CUDNN_ATTENTION, doc_mask(idx, 1)), "cudnn_ragged": cudnn_ragged}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bos-per-row", type=float, default=0.35)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "doc_attn_kernels_h200.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("doc_attn_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(2, 4096, (B, T), device="cuda", generator=g)
    idx[torch.rand(B, T, device="cuda", generator=g) < args.bos_per_row / T] = 1
    q0, k0, v0 = (torch.randn(B * T, n, D, device="cuda", generator=g).bfloat16() for n in (H, KV, KV))
    do = torch.randn(B * T, H, D, device="cuda", generator=g).bfloat16()
    rows, outputs = [], {}
    for name, f in routes(idx).items():
        row: dict = {"route": name}

        def fwd_bwd(f=f):
            q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
            torch.autograd.grad(f(q, k, v), (q, k, v), do)

        try:
            with torch.no_grad():
                outputs[name] = f(q0, k0, v0).float()
                row["fwd_ms"] = cuda_ms(lambda: f(q0, k0, v0), args.iters)
            row["fwd_bwd_ms"] = cuda_ms(fwd_bwd, args.iters)
        except Exception as e:  # recorded: the other routes still run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    ref = rows[0]
    for row in rows:
        for k in ("fwd_ms", "fwd_bwd_ms"):
            if k in row and k in ref:
                row[f"{k}_vs_cudnn_causal"] = row[k] / ref[k]
        if row["route"] in ("flash_varlen", "cudnn_ragged") and row["route"] in outputs and "cudnn_bool_mask" in outputs:
            row["max_abs_vs_bool_mask"] = (outputs[row["route"]] - outputs["cudnn_bool_mask"]).abs().max().item()
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
                          "code_commit": git("rev-parse", "HEAD"), "device": torch.cuda.get_device_name(0),
                          "torch": torch.__version__, "shape": {"B": B, "T": T, "H": H, "KV": KV, "D": D},
                          "segments": int(doc_attn.segments(idx, 1).numel() - 1), "bos_per_row": args.bos_per_row,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
