"""tools/plot_pattern.py end to end: a checkpoint in the trainer's layout (torch_dist weights,
tracker file, run_config.yaml) -> one sequence through the model -> selection heatmap PNG."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("megatron.core")

SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    def main(root, out_png):
        from megatron.core import dist_checkpointing
        from msa_train.compat import destroy_parallel, init_parallel
        from msa_train.config.store import MSATrainConfig
        from msa_train.model import build_model, build_transformer_config
        from msa_train.trainer import ckpt_layout

        cfg = OmegaConf.structured(MSATrainConfig)
        cfg.model = OmegaConf.merge(cfg.model, dict(
            name="pattern_test", num_layers=3, hidden_size=64, ffn_hidden_size=128,
            num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=257,
            num_moe_experts=2, moe_router_topk=1, moe_ffn_hidden_size=32, moe_first_k_dense=1))
        cfg.attention = OmegaConf.merge(cfg.attention, dict(
            dense_first_layers=1, block_size=16, topk=3, index_dim=16))
        cfg.train.seq_length = 128
        cfg.train.global_batch_size = 1
        model_cfg, attn_cfg = OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention)

        # What the trainer's checkpointing.save writes (common state included), minus the
        # optimizer and RNG state.
        torch.manual_seed(0)
        init_parallel({})
        model = build_model(build_transformer_config(model_cfg, attn_cfg, {}, torch.float32),
                            vocab_size=384, max_seq_len=128)
        it = ckpt_layout.iteration_dir(root, 20)
        os.makedirs(it)
        dist_checkpointing.save({"model": model.sharded_state_dict(), "progress": {"iteration": 20},
                                 "opt_param_scheduler": {"num_steps": 20}}, it)
        ckpt_layout.write_atomic(os.path.join(it, ckpt_layout.RUN_CONFIG_FILENAME),
                                 OmegaConf.to_yaml(cfg, resolve=True))
        ckpt_layout.write_tracker(root, 20)
        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

        sys.path.insert(0, os.path.join({repo!r}, "tools"))
        import plot_pattern
        freqs = plot_pattern.select_patterns(it, cfg, np.arange(100) % 250, layers=None)
        assert sorted(freqs) == [1, 2], sorted(freqs)
        for f in freqs.values():
            nb = 7  # ceil(100 / 16)
            assert f.shape == (2, nb, nb), f.shape
            # The local block is always selected; nothing above the diagonal (causal).
            assert np.allclose(np.diagonal(f, axis1=1, axis2=2), 1.0)
            assert np.all(np.triu(f, k=1) == 0)
            # top-3: each query picks min(3, visible blocks) blocks
            assert np.allclose(f.sum(-1)[:, 2:], 3.0)
        rc = plot_pattern.main([root, "--random", "96", "--layers", "2", "-o", out_png])
        assert rc == 0

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
""")


@pytest.mark.slow
def test_plot_pattern_from_checkpoint(tmp_path):
    script = tmp_path / "make_and_plot.py"
    script.write_text(SCRIPT.replace("{repo!r}", repr(str(REPO))))
    out = tmp_path / "pattern.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 200
