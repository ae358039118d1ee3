"""The field's techniques as GPTConfig switches (XSA, SmearGate, BigramHash, the attention output gate,
LN scale, sigmoid-gated skips, document-isolated attention): off by default and then bit-identical,
each one's defining property, gradients, causality, the optimizer split, config validation, compile,
artifact and `pgolf eval`."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf_train.model import GPT, GPTConfig, doc_mask, rms_norm
from pgolf_train.muon import split_params

from .arch_helpers import assert_compiled_matches_eager, check_trained_and_scored, randomized, train_export_and_eval

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16)
BOS = 1
OFF = dict(bos_id=1, xsa_layers="", smear_gate=False, bigram_buckets=0, bigram_dim=0, attn_out_gate=False,
           ln_scale=False, skip_gate=False, doc_attention=False)
SWITCHES = {
    "xsa": dict(xsa_layers="1,3"),
    "xsa_all_mha": dict(xsa_layers="all", num_kv_heads=4),
    "smear": dict(smear_gate=True),
    "bigram": dict(bigram_buckets=97),
    "bigram_proj": dict(bigram_buckets=97, bigram_dim=8),
    "attn_gate": dict(attn_out_gate=True),
    "ln_scale": dict(ln_scale=True),
    "skip_gate": dict(skip_gate=True),
    "doc_attention": dict(doc_attention=True),
}
ALL = dict(xsa_layers="all", smear_gate=True, bigram_buckets=97, bigram_dim=8, attn_out_gate=True, ln_scale=True,
           skip_gate=True, doc_attention=True)
NEW_PARAMS = {  # switch -> parameters it adds
    "smear": ["smear_gate"], "bigram": ["bigram.weight", "bigram_scale"],
    "bigram_proj": ["bigram.weight", "bigram_proj.weight", "bigram_scale"],
    "attn_gate": [f"blocks.{i}.attn.gate_w" for i in range(4)], "skip_gate": ["skip_gates"],
}


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**TINY, **kw})


def docs_batch(B: int = 2, T: int = 16, seed: int = 1, starts=(0, 5, 11)) -> torch.Tensor:
    """Random tokens (never BOS) with BOS at ``starts`` (row 1: shifted by one, so it begins mid-document)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, TINY["vocab_size"], (B, T), generator=g)
    for b in range(B):
        for s in starts:
            if s + b < T:
                x[b, s + b] = BOS
    return x


def block_inputs(m: GPT, x: torch.Tensor) -> list[tuple]:
    """The positional arguments of every block call of one forward."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args)) for b in m.blocks]
    with torch.no_grad():
        m.logits(x)
    for h in hooks:
        h.remove()
    return seen


# --- off by default -----------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, dict(num_layers=5, loop_start=1, loop_end=3, loop_times=2, embed_dim=16,
                                            tie_embeddings=False, exit_layers="2", parallel_residual=True)])
def test_off_values_build_the_identical_model(extra):
    """Every new switch written out at its off value: same parameters, same RNG use, same forward."""
    torch.manual_seed(0)
    a = GPT(tiny(**extra))
    rng_a = torch.get_rng_state()
    torch.manual_seed(0)
    b = GPT(tiny(**extra, **OFF))
    assert torch.equal(rng_a, torch.get_rng_state())
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert GPTConfig().to_dict().items() >= OFF.items()  # OFF holds the defaults
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    b.load_state_dict(a.state_dict())
    x = docs_batch()
    assert torch.equal(a(x), b(x))
    a.train(), b.train()
    assert torch.equal(a(x, x), b(x, x))


# --- every switch: shapes, gradients, causality ---------------------------------------------------

@pytest.mark.parametrize("name", [*SWITCHES, "all"])
def test_switch_trains_and_new_parameters_get_gradients(name):
    kw = ALL if name == "all" else SWITCHES[name]
    torch.manual_seed(0)
    m = GPT(tiny(**kw)).train()
    base = {n for n, _ in GPT(tiny(**{k: v for k, v in kw.items() if k == "num_kv_heads"})).named_parameters()}
    new = {n for n, _ in m.named_parameters()} - base
    expect = set(sum(NEW_PARAMS.values(), [])) if name == "all" else set(NEW_PARAMS.get(name, []))
    assert new == expect
    x = docs_batch()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(2):  # the zero-init projections hide some paths until one step has moved them
        opt.zero_grad()
        loss = m(x, x.roll(-1, 1))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if n in new:
            assert p.grad.abs().sum() > 0, f"{n} gets no gradient"
    logits = m(x)
    assert logits.shape == (2, 16, 64) and logits.abs().max() <= m.cfg.logit_softcap


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", [*SWITCHES, "all"])
def test_causal(name, train):
    m = randomized(tiny(**(ALL if name == "all" else SWITCHES[name]))).train(train)
    x = docs_batch()
    for t in (0, 4, 5, 9, 14):
        x2 = x.clone()
        g = torch.Generator().manual_seed(t)
        x2[:, t + 1:] = torch.randint(0, 64, x2[:, t + 1:].shape, generator=g)  # BOS can appear too
        with torch.no_grad():
            a, b = m._run(x)[0], m._run(x2)[0]
        assert torch.equal(a[:, :t + 1], b[:, :t + 1]), t
        assert not torch.equal(a[:, t + 1:], b[:, t + 1:])


# --- defining properties --------------------------------------------------------------------------

def attention_internals(m: GPT, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block i's per-head attention output before the projection [B, H, T, D] and its values [B, kv, T, D]."""
    a = m.blocks[i].attn
    got = {}
    hooks = [a.proj.register_forward_pre_hook(lambda mod, args: got.__setitem__("y", args[0])),
             a.c_v.register_forward_hook(lambda mod, args, out: got.__setitem__("v", out))]
    with torch.no_grad():
        m.logits(x)
    for h in hooks:
        h.remove()
    B, T = x.shape
    return (got["y"].view(B, T, a.h, a.hd).transpose(1, 2), got["v"].view(B, T, a.kv, a.hd).transpose(1, 2))


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_xsa_output_is_orthogonal_to_the_own_value(kv):
    cfg = tiny(num_kv_heads=kv, xsa_layers="1,2")
    m = randomized(cfg)
    plain = GPT(tiny(num_kv_heads=kv))
    plain.load_state_dict(m.state_dict())  # XSA adds no parameters
    x = docs_batch()
    for i in range(4):
        y, v = attention_internals(m, x, i)
        v = v.repeat_interleave(4 // kv, dim=1)  # query head h reads kv head h // (H / kv)
        along = (y * F.normalize(v, dim=-1)).sum(-1).abs()  # position 0 attends to itself alone: y = v - v = 0
        if i in (1, 2):
            assert along.max() < 1e-5 * y.norm(dim=-1).max()
        else:
            assert along.mean() > 1e-2 * y.norm(dim=-1).mean()
    # layer 1 sees the same input in both models: its XSA output is the plain one minus the v-component
    y, v = attention_internals(m, x, 1)
    yp, vp = attention_internals(plain, x, 1)
    assert torch.equal(v, vp)
    vn = F.normalize(vp.repeat_interleave(4 // kv, dim=1), dim=-1)
    torch.testing.assert_close(y, yp - (yp * vn).sum(-1, keepdim=True) * vn, rtol=1e-5, atol=1e-6)


def test_xsa_zero_value_is_finite():
    m = randomized(tiny(xsa_layers="all"))
    with torch.no_grad():
        m.blocks[0].attn.c_v.weight.zero_()
    out = m(docs_batch())
    assert torch.isfinite(out).all()


def test_smear_gate_mixes_the_predecessor_but_never_into_a_bos():
    m = randomized(tiny(smear_gate=True))
    x = docs_batch()
    x0 = block_inputs(m, x)[0][1]
    n = rms_norm(m.tok_emb(x))
    g = torch.sigmoid(m.smear_gate)
    with torch.no_grad():
        expect = n + g * F.pad(n[:, :-1], (0, 0, 1, 0)) * (x != BOS)[..., None]
    torch.testing.assert_close(x0, expect, rtol=0, atol=1e-6)
    assert torch.equal(x0[x == BOS], n[x == BOS]) and torch.equal(x0[:, 0], n[:, 0])
    assert torch.equal(GPT(tiny(smear_gate=True)).smear_gate.detach(), torch.full((32,), -3.0))  # gate 0.047
    # the token before a BOS changes: the BOS row of x0 does not, the row after the changed token does
    x2 = x.clone()
    x2[0, 4] = (x[0, 4] + 1) % 62 + 2
    y0 = block_inputs(m, x2)[0][1]
    assert torch.equal(y0[0, 5], x0[0, 5]) and not torch.equal(y0[0, 4], x0[0, 4])
    x2[0, 7] = (x[0, 7] + 1) % 62 + 2
    assert not torch.equal(block_inputs(m, x2)[0][1][0, 8], x0[0, 8])


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kw", [dict(smear_gate=True, doc_attention=True), ALL])
def test_nothing_crosses_a_document_boundary(kw, train):
    m = randomized(tiny(**kw)).train(train)
    x = docs_batch()
    x2 = x.clone()
    g = torch.Generator().manual_seed(5)
    x2[0, 1:5] = torch.randint(2, 64, (4,), generator=g)  # row 0's first document: positions 0..4
    x2[1, 7:12] = torch.randint(2, 64, (5,), generator=g)  # row 1's second document: positions 6..11
    with torch.no_grad():
        a, b = m._run(x)[0], m._run(x2)[0]
    assert torch.equal(a[0, 5:], b[0, 5:]) and not torch.equal(a[0, 1:5], b[0, 1:5])
    assert torch.equal(a[1, 12:], b[1, 12:]) and torch.equal(a[1, :7], b[1, :7])


def test_smear_alone_leaks_through_attention():
    """Without doc_attention the next document does read the previous one (the test above has teeth)."""
    m = randomized(tiny(smear_gate=True))
    x = docs_batch()
    x2 = x.clone()
    x2[0, 2] = (x[0, 2] + 1) % 62 + 2
    with torch.no_grad():
        assert not torch.equal(m(x)[0, 5:], m(x2)[0, 5:])


def bigram_reference(x: torch.Tensor, buckets: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            cur = int(x[b, t])
            prev = BOS if t == 0 or cur == BOS else int(x[b, t - 1])
            out[b, t] = (prev * 1000003 + cur) % buckets
    return out


@pytest.mark.parametrize("dim", [0, 8])
def test_bigram_hash_uses_the_right_rows(dim):
    buckets = 97
    m = randomized(tiny(bigram_buckets=buckets, bigram_dim=dim))
    x = docs_batch()
    h = m.bigram_hash(x)
    assert h.dtype == torch.long and torch.equal(h, bigram_reference(x, buckets))
    assert int(h.min()) >= 0 and int(h.max()) < buckets
    big = torch.randint(0, 1 << 18, (3, 50))
    hb = GPT(tiny(vocab_size=1 << 18, model_dim=8, num_heads=2, num_kv_heads=1, num_layers=1,
                  bigram_buckets=4099)).bigram_hash(big)
    assert int(hb.min()) >= 0 and int(hb.max()) < 4099
    # the embedding adds exactly gain × table[hash] (through the projection when bigram_dim != model_dim)
    e = m.bigram.weight[h]
    if m.bigram_proj is not None:
        e = e @ m.bigram_proj.weight.t()
    e = m.bigram_scale * e
    with torch.no_grad():
        torch.testing.assert_close(block_inputs(m, x)[0][1], rms_norm(m.tok_emb(x) + e), rtol=0, atol=1e-6)
    # only the hashed rows get a gradient
    m.zero_grad()
    m(x, x.roll(-1, 1)).backward()
    used = torch.zeros(buckets, dtype=torch.bool)
    used[h.flatten()] = True
    rows = m.bigram.weight.grad.abs().sum(1) > 0
    assert torch.equal(rows, used)


@pytest.mark.parametrize("dim", [0, 8])
def test_bigram_starts_as_the_plain_embedding(dim):
    torch.manual_seed(0)
    m = GPT(tiny(bigram_buckets=97, bigram_dim=dim))
    assert torch.all(m.bigram.weight == 0) and (m.bigram_proj is None) == (dim == 0)
    assert m.bigram_scale.shape == () and m.bigram_scale.item() == pytest.approx(0.05)
    torch.manual_seed(0)
    plain = GPT(tiny())
    x = docs_batch()
    with torch.no_grad():  # the bigram table is built after the plain model's parameters: the same draws
        assert torch.equal(m(x), plain(x))


@pytest.mark.parametrize("dim", [0, 8])
def test_bigram_term_starts_small_against_the_token_embedding(dim):
    """The flaw of the gain-1 design (benchmarks/results/bigram_cpu.json): Adam moves every hashed row
    ~lr from its first step, however rare the pair, so the term summed with tok_emb before the norm
    was as large as tok_emb from step 1 on. With the 0.05 gain it starts at a twentieth and grows
    only as far as the gain learns to; and every bigram parameter trains: the table from step 0
    (the projection is random), the gain and the projection once the rows are nonzero."""
    torch.manual_seed(0)
    m = GPT(tiny(bigram_buckets=97, bigram_dim=dim))
    x = docs_batch()
    m(x, x.roll(-1, 1)).backward()
    assert m.bigram.weight.grad.abs().sum() > 0
    torch.optim.Adam([m.tok_emb.weight, m.bigram.weight], lr=0.05).step()  # their group, at tied_embed_lr
    with torch.no_grad():
        h = m.bigram(m.bigram_hash(x))
        h = h if m.bigram_proj is None else m.bigram_proj(h)
        tok = m.tok_emb(x).pow(2).mean().sqrt()
        assert h.pow(2).mean().sqrt() > 0.4 * tok  # what the gain-1 design added
        assert (m.bigram_scale * h).pow(2).mean().sqrt() < 0.1 * tok
    m.zero_grad()
    m(x, x.roll(-1, 1)).backward()
    assert m.bigram_scale.grad.abs() > 0
    assert m.bigram_proj is None or m.bigram_proj.weight.grad.abs().sum() > 0


def test_attn_out_gate_starts_at_one_half():
    torch.manual_seed(0)
    m = randomized(tiny(attn_out_gate=True))
    with torch.no_grad():
        for b in m.blocks:
            b.attn.gate_w.zero_()
    plain = GPT(tiny())
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "gate_w" not in k})
    x = docs_batch()
    y, _ = attention_internals(m, x, 0)
    yp, _ = attention_internals(plain, x, 0)
    torch.testing.assert_close(y, 0.5 * yp, rtol=1e-6, atol=1e-7)
    assert m.blocks[0].attn.gate_w.shape == (4, 32) and m.blocks[0].attn.gate_w.dtype == torch.float32
    # input-dependent and per head: with a random W_g the output is y scaled per (position, head)
    m2 = randomized(tiny(attn_out_gate=True))
    plain.load_state_dict({k: v for k, v in m2.state_dict().items() if "gate_w" not in k})
    seen = []
    hook = m2.blocks[0].attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    y, _ = attention_internals(m2, x, 0)
    hook.remove()
    yp, _ = attention_internals(plain, x, 0)
    gate = torch.sigmoid(F.linear(seen[0], m2.blocks[0].attn.gate_w)).detach()  # [B, T, H]
    torch.testing.assert_close(y, yp * gate.transpose(1, 2)[..., None], rtol=1e-5, atol=1e-6)
    assert gate.std(-1).min() > 1e-3 and gate.std(1).min() > 1e-3


def test_ln_scale_scales_the_block_inputs_per_virtual_layer():
    cfg = tiny(ln_scale=True, loop_start=1, loop_end=3, loop_times=2)  # plan [0, 1, 2, 1, 2, 3]
    m = randomized(cfg)
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for b in m.blocks]
    hooks += [b.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for b in m.blocks]
    with torch.no_grad():
        m.logits(docs_batch())
    for h in hooks:
        h.remove()
    assert len(seen) == 12  # attention then MLP at each of the 6 virtual layers
    for i in range(6):
        for n in seen[2 * i: 2 * i + 2]:
            rms = n.square().mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.full_like(rms, 1 / math.sqrt(i + 1)), rtol=1e-4, atol=1e-5)


def test_skip_gate_starts_as_the_additive_skip_and_lerps():
    torch.manual_seed(0)
    m = GPT(tiny(skip_gate=True))
    torch.manual_seed(0)
    plain = GPT(tiny())
    x = docs_batch()
    with torch.no_grad():  # blocks are the identity at init: the even mix differs only in scale
        torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-6)
    assert m.skip_gates.shape == (2, 32) and torch.all(m.skip_gates == 0)
    # a gate far open takes the weighted skip alone: the first decoder layer (2) reads skip_weights[0]
    # times the last encoder layer's (1) output, a gate far closed ignores the skip
    m = randomized(tiny(skip_gate=True))
    with torch.no_grad():
        m.skip_gates[0].fill_(40.0)
        m.skip_gates[1].fill_(-40.0)
        ins = block_inputs(m, x)
        out1, out2 = m.blocks[1](*ins[1]), m.blocks[2](*ins[2])
        torch.testing.assert_close(ins[2][0], m.skip_weights[0] * out1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ins[3][0], out2, rtol=1e-6, atol=1e-6)


def per_document_logits(m: GPT, row: torch.Tensor) -> torch.Tensor:
    """Each document (from a BOS; before the first one a document too) run alone, concatenated."""
    starts = [0, *[t for t in range(1, len(row)) if int(row[t]) == BOS], len(row)]
    with torch.no_grad():
        return torch.cat([m.logits(row[s:e][None])[0] for s, e in zip(starts, starts[1:]) if e > s])


@pytest.mark.parametrize("kw", [dict(doc_attention=True), dict(doc_attention=True, rope_dims=4),
                                dict(doc_attention=True, num_kv_heads=1), ALL])
def test_doc_attention_equals_each_document_alone(kw):
    m = randomized(tiny(**kw)).eval()
    x = docs_batch(T=16)
    with torch.no_grad():
        full = m.logits(x)
    for b in range(2):
        torch.testing.assert_close(full[b], per_document_logits(m, x[b]), rtol=1e-4, atol=1e-4)
    plain = randomized(tiny(**{**kw, "doc_attention": False})).eval()
    with torch.no_grad():
        assert not torch.allclose(plain.logits(x)[:, 6:], full[:, 6:], atol=1e-3)


def test_doc_mask_is_causal_within_documents():
    x = torch.tensor([[5, 6, BOS, 7, 8, BOS, BOS, 9]])
    mask = doc_mask(x, BOS)
    doc = [0, 0, 1, 1, 1, 2, 3, 3]
    expect = torch.tensor([[q >= k and doc[q] == doc[k] for k in range(8)] for q in range(8)])
    assert mask.shape == (1, 1, 8, 8) and torch.equal(mask[0, 0], expect)


def test_doc_attention_without_bos_is_causal_attention():
    m = randomized(tiny(doc_attention=True))
    plain = GPT(tiny())
    plain.load_state_dict(m.state_dict())
    x = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-5)


# --- optimizer split and config -------------------------------------------------------------------

def test_optimizer_split():
    m = GPT(tiny(**ALL))
    groups = split_params(m)
    names = {id(p): n for n, p in m.named_parameters()}
    by_group = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    assert sum(len(ps) for ps in groups.values()) == len(names)  # each in exactly one group
    assert by_group["embed"] == {"tok_emb.weight", "bigram.weight"}
    assert "bigram_proj.weight" in by_group["matrix"] and all(p.ndim == 2 for p in groups["matrix"])
    assert {"smear_gate", "skip_gates", "bigram_scale", "blocks.0.attn.gate_w", "blocks.3.attn.gate_w"} <= by_group["scalar"]


@pytest.mark.parametrize("field,bad", [
    ("xsa_layers", "x"), ("xsa_layers", "4"), ("xsa_layers", "1,,2"), ("xsa_layers", 1),
    ("smear_gate", 1), ("attn_out_gate", "yes"), ("ln_scale", None), ("skip_gate", 0), ("doc_attention", 1.0),
    ("bigram_buckets", -1), ("bigram_buckets", 1 << 23), ("bigram_buckets", 2.0), ("bigram_dim", -1),
    ("bigram_dim", 16385), ("bos_id", -1), ("bos_id", 64), ("bos_id", True),
])
def test_bad_values_name_the_field(field, bad):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: bad})


def test_huge_bigram_table_is_refused():
    with pytest.raises(ValueError, match="parameters"):
        tiny(bigram_buckets=1 << 22, bigram_dim=16384)


def test_config_roundtrip():
    cfg = tiny(**ALL, bos_id=3)
    d = cfg.to_dict()
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert tiny(xsa_layers=" 3, 1").layer_set("xsa_layers", 4) == [1, 3]
    m = GPT(tiny(xsa_layers="all", ssm_layers="1", ssm_head_dim=16))  # SSM blocks have no attention to exclude
    assert [hasattr(b, "attn") and b.attn.xsa for b in m.blocks] == [True, False, True, True]


# --- compile --------------------------------------------------------------------------------------

def test_compile_fullgraph_all_switches_matches_eager():
    """Forward and backward captured whole (fullgraph: a break raises), the aot_eager backend (the
    graph inductor would get), the SDPA document mask included."""
    m = randomized(tiny(**ALL)).train()
    x = docs_batch()
    y = x.roll(-1, 1)
    _, compiled = assert_compiled_matches_eager(m, x, y)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), m.eval()(x), rtol=1e-5, atol=1e-5)


# --- artifact and `pgolf eval` ----------------------------------------------------------------------

def test_all_switches_train_export_and_evaluate(tiny_data, sp1024, tmp_path, capsys):
    from pgolf_codec.container import read_artifact

    sets = ['xsa_layers="all"', "smear_gate=true", "bigram_buckets=512", "bigram_dim=32", "attn_out_gate=true",
            "ln_scale=true", "skip_gate=true", "doc_attention=true"]
    summary, ev, direct = train_export_and_eval(tiny_data, sp1024, tmp_path / "run", sets, capsys)
    check_trained_and_scored(summary, ev, direct)
    tensors = read_artifact(tmp_path / "run" / "model.pgolf").tensors
    assert {"bigram.weight", "bigram_proj.weight", "bigram_scale", "smear_gate", "skip_gates",
            "blocks.0.attn.gate_w"} <= set(tensors)
