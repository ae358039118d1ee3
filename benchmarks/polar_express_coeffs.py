"""The Polar-Express coefficient schedule of Muon's Newton–Schulz iteration, derived from scratch.

    python benchmarks/polar_express_coeffs.py [--steps 8] [--l0 1e-3] [--cushion 0.02407327424182761]
                                              [--safety 1.01]

Polar Express (Amsel, Persson, Musco & Gower 2025, "The Polar Express: Optimal Matrix Sign Methods
and Their Application to the Muon Algorithm", arXiv:2505.16932) replaces the one fixed quintic of
Newton–Schulz, ``X ← a X + b (XXᵀ) X + c (XXᵀ)² X``, by one quintic per iteration. Each acts on the
singular values σ as ``p(σ) = a σ + b σ³ + c σ⁵``; iteration k takes the odd quintic that minimizes
``max |1 − p(σ)|`` over the interval ``[l, u]`` the singular values are known to lie in (the
first: ``[l0, 1]`` after the Frobenius normalization), and the next interval is ``p([l, u])``.
The paper proves this greedy choice optimal for the composition.

The minimax quintic is found by Remez exchange, in plain Python floats (no numpy): by Chebyshev's
equioscillation theorem the error ``1 − p`` of the optimum takes ±E alternately at four points; for
an odd quintic on ``0 < l < u`` they are ``l``, the two positive critical points of ``p`` (roots
of ``p'(σ) = a + 3bσ² + 5cσ⁴``, a quadratic in σ²) and ``u``. Each round solves the 4×4 linear
system ``p(t_i) + (−1)^i E = 1`` on the current points and moves the two inner points to the new
critical points, until E stops changing. The optimum has ``p(l) = 1 − E`` and ``p(u) = 1 + E``, so
the next interval is ``[1 − E, 1 + E]``, i.e. ``[p(l), 2 − p(l)]``.

Two finite-precision safeguards, as in the paper (the iteration runs in bf16):

* cushion: the quintic is fitted on ``[max(l, cushion·u), u]`` (the paper's cushion is
  0.02407327424182761) and then rescaled so that its values at the true ``l`` and ``u`` are
  centred on 1 (``1 − s·p(l) = s·p(u) − 1``): the early quintics, fitted on a less extreme
  interval, are a little gentler (first row a = 8.29, c = 17.3 against 8.47, 18.6 uncushioned);
* safety: each quintic is evaluated as ``p(σ / safety)`` (``a/s, b/s³, c/s⁵``; safety 1.01), so a
  singular value that round-off pushes up to 1 % past the interval is still mapped inside it.

``pgolf_train/muon.py`` hard-codes :func:`polar_express_coeffs` ``(steps=8)`` with these defaults
as ``POLAR_EXPRESS_COEFFS``; tests/train/test_techniques_opt.py checks the two agree.
"""
from __future__ import annotations

import argparse
import math

PAPER_CUSHION = 0.02407327424182761


def _solve(A: list[list[float]], y: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (A: n×n, y: n)."""
    n = len(y)
    M = [row[:] + [v] for row, v in zip(A, y)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(M[r][col]))
        M[col], M[piv] = M[piv], M[col]
        for r in range(col + 1, n):
            f = M[r][col] / M[col][col]
            for k in range(col, n + 1):
                M[r][k] -= f * M[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][k] * x[k] for k in range(r + 1, n))) / M[r][r]
    return x


def quintic(coeffs: tuple[float, float, float], x: float) -> float:
    a, b, c = coeffs
    return a * x + b * x ** 3 + c * x ** 5


def minimax_quintic(l: float, u: float, tol: float = 1e-15, max_rounds: int = 100
                    ) -> tuple[float, float, float, float]:
    """``(a, b, c, E)``: the odd quintic minimizing ``max_{x ∈ [l, u]} |1 − p(x)|`` and that error."""
    if not 0 < l <= u:
        raise ValueError(f"need 0 < l <= u, got l={l}, u={u}")
    if l / u >= 1 - 5e-6:
        # The interval has collapsed: the limit is the Taylor quintic with p(u)=1, p'(u)=p''(u)=0
        # (the equioscillating system is numerically singular there).
        return 15 / 8 / u, -10 / 8 / u ** 3, 3 / 8 / u ** 5, 0.0
    pts = [l, (3 * l + u) / 4, (l + 3 * u) / 4, u]  # exact in the limit l → u
    E_old = math.inf
    for _ in range(max_rounds):
        a, b, c, E = _solve([[t, t ** 3, t ** 5, (-1.0) ** i] for i, t in enumerate(pts)], [1.0] * 4)
        disc = 9 * b * b - 20 * a * c
        if disc < 0 or c == 0:
            raise ArithmeticError(f"Remez lost its alternation on [{l}, {u}]")
        y1, y2 = sorted(((-3 * b - s * math.sqrt(disc)) / (10 * c) for s in (1, -1)))
        if not l * l < y1 < y2 < u * u:
            raise ArithmeticError(f"Remez critical points left [{l}, {u}]")
        pts = [l, math.sqrt(y1), math.sqrt(y2), u]
        if abs(E - E_old) <= tol:
            break
        E_old = E
    return a, b, c, E


def polar_express_coeffs(steps: int = 8, l0: float = 1e-3, cushion: float = PAPER_CUSHION,
                         safety: float = 1.01) -> list[tuple[float, float, float]]:
    """The greedy minimax schedule: ``steps`` quintics ``(a_k, b_k, c_k)`` for singular values that
    start in ``[l0, 1]``; ``cushion = 0`` and ``safety = 1`` give the pure (exact-arithmetic) one."""
    l, u = l0, 1.0
    out = []
    for _ in range(steps):
        a, b, c, _E = minimax_quintic(max(l, cushion * u), u)
        s = 2.0 / (quintic((a, b, c), l) + quintic((a, b, c), u))  # 1 for the uncushioned optimum
        a, b, c = a * s, b * s, c * s
        a, b, c = a / safety, b / safety ** 3, c / safety ** 5
        out.append((a, b, c))
        l = quintic((a, b, c), l)
        u = 2.0 - l
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--l0", type=float, default=1e-3)
    ap.add_argument("--cushion", type=float, default=PAPER_CUSHION)
    ap.add_argument("--safety", type=float, default=1.01)
    args = ap.parse_args()
    coeffs = polar_express_coeffs(args.steps, args.l0, args.cushion, args.safety)
    print(f"# steps={args.steps} l0={args.l0} cushion={args.cushion} safety={args.safety}")
    print("POLAR_EXPRESS_COEFFS = (")
    l = args.l0
    for k, abc in enumerate(coeffs):
        l = quintic(abc, l)  # the schedule's interval after step k: [l, 2 - l]
        print(f"    ({abc[0]!r}, {abc[1]!r}, {abc[2]!r}),  # k={k}: interval after it [{l:.4f}, {2 - l:.4f}]")
    print(")")

if __name__ == "__main__":
    main()
