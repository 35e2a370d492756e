"""experiment=m3_cpt on a tiny imported M3 checkpoint (CPU): the default (sparse from the first
step, the imported indexer live) and with the optional indexer re-warmup (backbone frozen, dense
KL) first; a few steps each."""

import math

import pytest

from msa_train.convert.importer import import_hf
from tests.convert import m3_reference as ref
from tests.trainer.helpers import SMALL, read_metrics, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imported(tmp_path_factory, megatron_1rank):
    tmp = tmp_path_factory.mktemp("m3cpt")
    # vocab 300 >= the byte tokenizer's 257; blocks of 16, top-4: 64 of 256 keys (sparse).
    cfg = ref.vl_config(vocab_size=300, sparse_attention_config=dict(
        sparse_block_size=16, sparse_topk_blocks=4))
    hf_dir = ref.write_checkpoint(str(tmp / "hf"), cfg, ref.random_weights(cfg, seed=2))
    out = tmp / "converted"
    import_hf(hf_dir, str(out), dtype="fp32", progress=False)
    return str(out)


# The recipe with the cluster groups swapped for this machine's.
CPU = ["experiment=m3_cpt", "parallel=single", "train=tiny_cpu", "data=stdlib", "logging=none",
       "checkpoint=default", "cluster=local", "stage.warmup.lr_warmup_steps=1",
       "stage.sparse.lr_warmup_steps=1", *SMALL]


def test_m3_cpt_rewarmup_then_sparse(imported, tmp_path):
    result = run_train([*CPU, f"checkpoint.init_from={imported}",
                        f"checkpoint.save={tmp_path / 'save'}"], str(tmp_path / "run"))
    out = result.stdout
    # Every imported tensor (index branch and expert biases included) loads; nothing is fresh.
    # 79 = the 55 written, with the 6 routed-expert stacks counted per expert (5 x 6 = 30).
    assert f"init_from {imported}/iter_0000000: loaded 79 tensors" in out, out[-3000:]
    assert "added (freshly initialized" not in out
    assert "stage warmup: attention=dense" in out and "stage sparse: attention=sparse" in out
    records = read_metrics(str(tmp_path / "run"))
    stages = [r["stage"] for r in records]
    assert stages.count("dense") == 3 and stages.count("sparse") == 3, stages
    for r in records:
        assert math.isfinite(r["train/lm_loss"]) and math.isfinite(r["train/indexer_kl"])


def test_m3_cpt_default_trains_sparse_from_the_first_step(imported, tmp_path):
    result = run_train([*CPU, "stage.warmup.tokens=0", f"checkpoint.init_from={imported}",
                        f"checkpoint.save={tmp_path / 'save'}"], str(tmp_path / "run"))
    assert "stage warmup" not in result.stdout, result.stdout[-3000:]
    records = read_metrics(str(tmp_path / "run"))
    assert [r["stage"] for r in records] == ["sparse"] * 3
    assert [r["step"] for r in records] == [1, 2, 3]
