"""Two gloo ranks start at once on a cold cache: one corpus build, one index build, same data."""

import multiprocessing as mp
import os
import traceback

import pytest
import torch


def _rank_main(rank, world, tmp, queue):
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
        from msa_train.data import (ByteTokenizer, DataConfig, build_data_loader, build_datasets)

        cfg = DataConfig()
        cfg.stdlib.cache_dir = f"{tmp}/cache"
        cfg.stdlib.max_files = 25
        train, _, _ = build_datasets(cfg, ByteTokenizer(), 64, 11, 32, 4)
        first = torch.stack([train[i]["tokens"] for i in range(8)])
        # forked children must not touch CUDA (pinning would initialize it on a GPU box)
        loader = build_data_loader(train, 0, 2, rank, world, pin_memory=False)
        mine = next(iter(loader))["tokens"]
        # plain lists: torch tensors would travel as shared-memory handles of an exiting process
        queue.put((rank, first.tolist(), mine.tolist(), None))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        queue.put((rank, None, None, traceback.format_exc()))


@pytest.mark.slow
def test_two_ranks_share_one_build(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    world = 2
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(tmp_path), queue))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, _, _, err in results:
        assert err is None, f"rank {rank} failed:\n{err}"
    (_, first0, mine0, _), (_, first1, mine1, _) = [
        (r, torch.tensor(a), torch.tensor(b), e) for r, a, b, e in results]
    assert torch.equal(first0, first1)  # both ranks see the same dataset
    assert torch.equal(mine0, first0[0:2]) and torch.equal(mine1, first0[2:4])  # DP slices
    cache = tmp_path / "cache"
    assert len([d for d in os.listdir(cache) if d.startswith("stdlib_corpus_")
                and not d.endswith(".lock")]) == 1
