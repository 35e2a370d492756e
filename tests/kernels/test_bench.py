"""python -m msa_kernels.bench's CPU-checkable parts: selection families and their union statistics,
the packed / context-parallel workloads, the FlexAttention masks (eager Flex on CPU equals the exact
reference), the work plan and one whole measurement through the reference backend."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch

import msa_kernels as mk
from msa_kernels.attention.naive import sparse_attention_ref
from msa_kernels.bench import run, selections, workloads
from msa_kernels.bench.flex import approx_block_mask, exact_block_mask
from msa_kernels.bench.selections import Family, parse_family

from .reference_utils import cu_seqlens_of


def _layout(lens):
    cu = cu_seqlens_of(lens)
    return cu, mk.make_layout(cu, total_keys=sum(lens))


@pytest.mark.parametrize("spec,name", [("random", "random"), ("smooth", "smooth:256:0.5"),
                                       ("smooth:64:0.1", "smooth:64:0.1"), ("recorded", "recorded")])
def test_family_specs(spec, name):
    assert parse_family(spec).name == name


@pytest.mark.parametrize("spec,match", [("smooth:x", "smooth:WINDOW:NOISE"), ("smooth:0:1", "WINDOW must be"),
                                        ("mix", "unknown selection family"), ("random:3", "unknown")])
def test_bad_family_spec_says_what_to_write(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_family(spec)


def _brute_union(topk, lens, bs, tile):
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    frag = [f for f, n in enumerate(lens) for _ in range(n)]
    out = []
    for r in range(topk.shape[0]):
        row = []
        for t0 in range(0, topk.shape[1], tile):
            s = {(frag[i], int(b)) for i in range(t0, min(t0 + tile, topk.shape[1])) for b in topk[r, i] if b >= 0}
            row.append(len(s))
        out.append(row)
    return torch.tensor(out)


def _brute_pairs(topk, lens, bs):
    pos = [p for n in lens for p in range(n)]
    out = torch.zeros(topk.shape[:2], dtype=torch.float64)
    for r in range(topk.shape[0]):
        for i in range(topk.shape[1]):
            out[r, i] = sum(min(bs, pos[i] - b * bs + 1) for b in set(topk[r, i].tolist()) if 0 <= b * bs <= pos[i])
    return out


def test_union_sizes_and_pairs_match_brute_force():
    lens, bs = [45, 70, 13], 8
    cu, lay = _layout(lens)
    g = torch.Generator().manual_seed(0)
    qi, ki = torch.randn(sum(lens), 2, 8, generator=g), torch.randn(sum(lens), 8, generator=g)
    topk = mk.select_blocks(qi, ki, cu, bs, 3)
    topk[0, 5, 0] = topk[0, 5, 1]  # a duplicate id counts once
    for tile in (16, 32):
        assert torch.equal(selections.union_sizes(topk, lay, bs, tile=tile), _brute_union(topk, lens, bs, tile))
    assert torch.allclose(selections.visible_pairs(topk, lay, bs), _brute_pairs(topk, lens, bs))
    assert selections.causal_pairs(lay) == sum(n * (n + 1) / 2 for n in lens)


def test_locality_knob_controls_the_union():
    """Queries sharing an index query over a window pick shared blocks: the union per tile shrinks
    as the window grows and the noise falls; i.i.d. index vectors give the largest union."""
    t, bs, k = 1024, 16, 4
    cu, lay = _layout([t])

    def mean_union(spec):
        qi, ki = selections.index_vectors(parse_family(spec), t, 2, 16, "cpu", seed=3, dtype=torch.float32)
        return selections.union_summary(selections.union_sizes(mk.select_blocks(qi, ki, cu, bs, k), lay, bs,
                                                               tile=64))["mean"]

    random, loose, tight = mean_union("random"), mean_union("smooth:64:1.0"), mean_union("smooth:256:0.05")
    assert tight < loose < random, (tight, loose, random)
    # One shared index query per tile: its k - 1 ranked blocks plus the local blocks of the tile's
    # 64 / 16 = 4 own blocks (one more where a tile straddles a window edge).
    assert tight <= (k - 1) + 64 // bs + 1


def test_recorded_family_replays_the_recorded_index_vectors(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "rec.pt"
    torch.save({"q_idx": torch.randn(40, 2, 8, generator=g).half(), "k_idx": torch.randn(40, 8, generator=g).half()},
               path)
    fam = parse_family(f"recorded:{path}")
    qi, ki = selections.index_vectors(fam, 160, 3, 16, "cpu", dtype=torch.float32)
    assert qi.shape == (160, 3, 16) and ki.shape == (160, 16)
    assert torch.all(qi[..., 8:] == 0) and torch.all(ki[:, 8:] == 0)  # Di zero-padded
    rec = torch.load(path)
    # Bench token 4 * j + 1 replays recorded token j (time stretch x4), head 2 replays head 0.
    assert torch.allclose(qi[41, 2, :8], rec["q_idx"][10, 0].float(), atol=1e-2)
    with pytest.raises(ValueError, match="--index-dim"):
        selections.index_vectors(fam, 160, 3, 4, "cpu")
    with pytest.raises(FileNotFoundError, match="record_selection.py"):
        selections.index_vectors(parse_family(f"recorded:{tmp_path / 'missing.pt'}"), 10, 1, 8, "cpu")


def test_the_repository_keeps_a_recorded_sample():
    rec = selections.load_recorded(selections.RECORDED_DEFAULT)
    t, h, di = rec["q_idx"].shape
    assert rec["k_idx"].shape == (t, di) and rec["topk_idx"].shape[:2] == (h, t)
    assert rec["block_size"] >= 1 and rec["topk"] >= 1 and rec["checkpoint"]


def test_packs_and_cp16_shares():
    packs = workloads.load_packs()
    assert len(packs) >= 3 and all(p.total == 196608 for p in packs)
    assert {p.num_docs for p in packs} >= {2, 206}
    for p in packs:
        parts = workloads.partition_chunks(p.cu_seqlens, 16, 1024)
        assert sorted(c for part in parts for c in part) == list(range(192))
        assert all(len(part) == 12 for part in parts)
        work = workloads.chunk_work(p.cu_seqlens, 1024)
        loads = [sum(work[c] for c in part) for part in parts]
        assert max(loads) <= 1.5 * (sum(work) / 16) + max(work)
        share = workloads.cp_share(p)
        assert share.q_rows.numel() == 12 * 1024 and share.work == max(loads)
        lay = mk.make_layout(share.cu_seqlens, share.key_starts, share.key_lens, total_keys=share.k_rows.numel(),
                             total_queries=share.q_rows.numel())
        # Each query's own key row is itself, and its keys are its document's prefix.
        own = share.k_rows[lay.k_starts[lay.token_fragment().long()] + lay.token_positions().long()]
        assert torch.equal(own, share.q_rows)
        doc = torch.searchsorted(torch.tensor(p.cu_seqlens), share.q_rows, right=True) - 1
        assert torch.equal(share.k_rows[lay.k_starts[lay.token_fragment().long()]],
                           torch.tensor(p.cu_seqlens)[doc])


def test_flex_exact_mask_is_the_msa_op_and_approx_builds():
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    t, hq, hkv, d, bs = 96, 4, 2, 16, 16
    cu, lay = _layout([t])
    g = torch.Generator().manual_seed(0)
    topk = mk.select_blocks(torch.randn(t, hkv, 8, generator=g), torch.randn(t, 8, generator=g), cu, bs, 3)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    ref, _ = sparse_attention_ref(q, k, v, topk, lay, block_size=bs, scale=d ** -0.5)
    heads_first = [x.transpose(0, 1)[None] for x in (q, k, v)]
    mask, _ = exact_block_mask(topk, t, bs, hq // hkv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager Flex on CPU warns that it is unfused
        out = flex_attention(*heads_first, block_mask=mask, enable_gqa=True, scale=d ** -0.5)[0].transpose(0, 1)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    amask, pairs = approx_block_mask(topk, t, bs, hq // hkv)
    assert amask.shape[-2:] == (t, t) and pairs > 0


def _args(**kw):
    base = dict(heads="64/4,64/8", seqlens="32768,131072,8192,262144", families="random,smooth:256:0.5,recorded",
                pack_families="smooth:256:0.5", packs="", dim=128, index_dim=128, block_size=128, topk=16,
                flex=True, flex_max_len=131072)
    base.update(kw)
    return argparse.Namespace(**base)


def test_plan_puts_the_headline_first_and_the_long_tail_last():
    items = run.plan(_args())
    first = items[0]
    assert (first.shape.heads, first.case.name, first.flex) == ("64/4", "32K", "approx,exact")
    assert [f.name for f in first.families] == ["random", "smooth:256:0.5", "recorded"]
    assert (items[2].shape.heads, items[2].flex) == ("64/8", "")
    assert any(it.case.kind == "cp" for it in items) and any(it.case.kind == "pack" for it in items)
    assert items[-1].case.name == "256K"


def test_one_measurement_runs_every_path_on_the_reference():
    shape = run.Shape(4, 2, 16, 16, 16, 4)
    row = run.measure(shape, run.single_case(96), Family("smooth", 32, 0.3), "cpu", budget_ms=1.0,
                      flex="approx,exact", dense={"cudnn": 10.0})
    assert set(row.ms) >= {"select", "attention", "kl", "layer", "flex_approx", "flex_exact"}, row.note
    assert row.check["flex_exact_rel_err"] < 1e-4
    assert 0 < row.union_mean <= row.union_p90 + 1e-9 and 0 <= row.share["kl"] <= 1
    assert row.vs["cudnn"] == pytest.approx(10.0 / row.ms["layer"])
    md = run.markdown("cpu", [row], {"4/2 96 tokens": {}}, "python -m msa_kernels.bench")
    assert "| smooth:32:0.3 |" in md


def test_one_cp_share_measurement_on_the_reference():
    pack = workloads.Pack(0, (0, 700, 1536, 2048))
    case = run.cp_case(pack, cp=4, chunk=128)
    row = run.measure(run.Shape(4, 2, 16, 16, 16, 4), case, Family("random"), "cpu", budget_ms=1.0)
    assert row.tokens_q == 512 and row.tokens_k > 512 and row.ms["layer"] > 0


def test_targets_are_judged_per_selection_kind():
    def row(case, family, layer, cudnn, **kw):
        r = run.Row("64/4", case, family, 1, 1, ms={"select": 1.0, "attention": 10.0, "layer": layer, **kw},
                    share={"select": 1.0 / layer, "kl": (layer - 11.0) / layer}, vs={"cudnn": cudnn / layer},
                    peak_gib=12.0)
        return r

    got = run.targets([row("32K", "random", 40.0, 100.0, flex_exact=30.0, flex_approx=9.0),
                       row("128K", "smooth:256:0.5", 100.0, 900.0), row("8K", "random", 5.0, 10.0)])
    by = {(g["where"], g["target"]): g["met"] for g in got}
    assert by[("64/4 32K random", "layer vs dense cuDNN")]  # 2.5x >= 2.2x on random
    assert not by[("64/4 128K smooth:256:0.5", "layer vs dense cuDNN")]  # 9x < 10x on structured
    assert by[("64/4 32K random", "attention vs Flex, same exact op")]
    assert by[("64/4 32K random", "attention vs Flex, same budget")]  # 10 / 9 = 1.11x
    assert not by[("64/4 32K random", "KL share of the layer")]  # 29 / 40
    assert by[("64/4 128K smooth:256:0.5", "layer peak memory")]
    assert all(g["where"].split()[1] != "8K" for g in got)  # only the 32K and 128K targets
    assert "| NO |" in run.targets_markdown(got)
