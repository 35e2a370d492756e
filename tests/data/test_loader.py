import itertools

import pytest
import torch

from .conftest import write_prefix
from msa_train.data import (BatchCollator, ByteTokenizer, ResumableBatchSampler, build_data_loader,
                            build_datasets, collator_for, cycle, document_cu_seqlens)


def _flatten(sampler):
    return [i for batch in sampler for i in batch]


def test_sampler_partitions_each_step_across_dp_ranks():
    mbs, dp = 3, 4
    per_rank = [list(ResumableBatchSampler(100, 0, mbs, r, dp)) for r in range(dp)]
    assert all(len(b) == 100 // (mbs * dp) for b in per_rank)
    for step in range(len(per_rank[0])):
        together = sum((per_rank[r][step] for r in range(dp)), [])
        assert together == list(range(step * mbs * dp, (step + 1) * mbs * dp))


@pytest.mark.parametrize("mbs,dp,stop", [(2, 1, 5), (2, 3, 4), (1, 2, 7)])
def test_sampler_resume_equals_continuous(mbs, dp, stop):
    total = 97
    for rank in range(dp):
        continuous = list(ResumableBatchSampler(total, 0, mbs, rank, dp))
        resumed = list(ResumableBatchSampler(total, stop * mbs * dp, mbs, rank, dp))
        assert continuous[stop:] == resumed


def test_sampler_rejects_bad_positions():
    with pytest.raises(ValueError, match="not a multiple"):
        ResumableBatchSampler(100, 5, 2, 0, 2)
    with pytest.raises(ValueError, match="already used every sample"):
        ResumableBatchSampler(100, 100, 2, 0, 2)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        ResumableBatchSampler(100, 0, 2, 2, 2)


def test_loader_resume_is_bitwise_exact(tmp_path, numbered_docs, data_cfg_factory):
    prefix = write_prefix(tmp_path / "d", numbered_docs)
    cfg = data_cfg_factory(source="indexed", paths=[prefix], split="1,0,0")
    tok = ByteTokenizer()
    train, _, _ = build_datasets(cfg, tok, 24, 5, 64, 0)
    mbs, dp, k = 2, 2, 3
    for rank in range(dp):
        full = list(build_data_loader(train, 0, mbs, rank, dp, collator=collator_for(cfg, tok)))
        # a "restarted job": datasets rebuilt from the cache, loader from the saved position
        train2, _, _ = build_datasets(cfg, tok, 24, 5, 64, 0)
        resumed = list(build_data_loader(train2, k * mbs * dp, mbs, rank, dp, num_workers=1))
        assert len(resumed) == len(full) - k
        for a, b in zip(full[k:], resumed):
            assert a["attention_mask"] is None and b["attention_mask"] is None
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert a[key].shape == (mbs, 24)
                assert torch.equal(a[key], b[key])


def test_document_cu_seqlens():
    eod = 9
    tokens = torch.tensor([[1, 2, eod, 3, 4, 5],
                           [6, eod, eod, 7, 8, eod]])
    cu = document_cu_seqlens(tokens, eod)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 6, 8, 9, 12]
    batch = BatchCollator(eod, with_cu_seqlens=True)(
        [{"tokens": t, "labels": t, "loss_mask": t.float(), "position_ids": t} for t in tokens])
    assert torch.equal(batch["cu_seqlens"], cu) and batch["tokens"].shape == (2, 6)
    assert "cu_seqlens" not in BatchCollator()([{"tokens": t, "labels": t, "loss_mask": t,
                                                  "position_ids": t} for t in tokens])


def test_cycle_restarts_and_refuses_empty():
    batches = list(itertools.islice(cycle([1, 2]), 5))
    assert batches == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="empty"):
        next(cycle([]))


def test_bench_reports_throughput(tmp_path, capsys, numbered_docs):
    from msa_train.data.bench import main

    prefix = write_prefix(tmp_path / "d", numbered_docs)
    main(["--paths", prefix, "--seq-length", "16", "--micro-batch-size", "2", "--batches", "3",
          "--workers", "0"])
    out = capsys.readouterr().out
    assert "workers=0:" in out and "M tokens/s" in out and "2 batches" in out
