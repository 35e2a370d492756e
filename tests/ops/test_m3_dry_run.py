"""experiment=m3_cpt plans at its 256-H100 layout (TP2 x PP4 x CP2, EP16) and fits 80 GB."""

import io

from msa_train.dry_run import compose, dry_run


def test_m3_cpt_recipe_fits_256_h100(tmp_path):
    cfg = compose(["experiment=m3_cpt", "model=minimax_m3", "attention=m3",
                   f"checkpoint.save={tmp_path / 'ckpt'}", f"checkpoint.init_from={tmp_path / 'm3'}",
                   "data.source=mock"])
    out = io.StringIO()
    report = dry_run(cfg, 256, stream=out)
    text = out.getvalue()
    assert "TP 2 x CP 2 x PP 4 x DP 16" in text and "MoE: EP 16" in text
    assert "sparse  attention=sparse trainable=all" in text
    assert "warmup  attention=dense  trainable=indexer_only 0 tokens" in text  # sparse from step 0
    assert report["params_total"] == 426_174_565_632
    assert report["fits"] and report["memory_total_gib"] < 72, report["memory_total_gib"]
