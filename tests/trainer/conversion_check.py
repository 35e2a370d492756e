"""Subprocess body of test_conversion: dense checkpoint -> MSA model, logits compared in dense mode.

    python tests/trainer/conversion_check.py <dense_checkpoint_dir>   -> one JSON line on stdout
"""

import json
import os
import sys

import torch


def build(attention_overrides, runtime):
    from hydra import compose, initialize_config_dir

    from msa_train.config import register_configs
    from msa_train.trainer.setup import build_model_chunks

    register_configs()
    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("config", overrides=["train.seq_length=256", *attention_overrides])
    _, chunks = build_model_chunks(cfg, runtime, vocab_size=384)
    return chunks


def main(dense_dir: str) -> None:
    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.model import set_msa_mode
    from msa_train.trainer.runtime import Runtime
    from msa_train.trainer.init_from import load_weights
    from msa_train.trainer.setup import index_param_predicate

    from msa_train.trainer.ckpt_layout import resolve

    dense_dir = resolve(dense_dir, "dense checkpoint")
    init_parallel({"tp": 1}, seed=7, backend="gloo")
    runtime = Runtime(torch.device("cpu"), torch.float32, False, 0, 1, 0)
    dense = build(["attention.dense_first_layers=4"], runtime)
    msa = build([], runtime)  # attention/tiny: layers 1-3 are MSA layers with an index branch
    dense_report = load_weights(dense_dir, dense, index_param_predicate(dense))
    msa_report = load_weights(dense_dir, msa, index_param_predicate(msa))
    set_msa_mode(msa, "dense")

    torch.manual_seed(0)
    tokens = torch.randint(0, 257, (2, 256))
    positions = torch.arange(256).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        dense[0].eval()
        msa[0].eval()
        logits_dense = dense[0](tokens, positions, None)
        logits_msa = msa[0](tokens, positions, None)
    print(json.dumps({
        "dense_added": dense_report.added,
        "added": msa_report.added,
        "num_loaded": len(msa_report.loaded),
        "msa_index_params": sorted(n for n, _ in msa[0].named_parameters()
                                   if index_param_predicate(msa)(n)),
        "max_abs_diff": float((logits_dense - logits_msa).abs().max()),
        "equal": bool(torch.equal(logits_dense, logits_msa)),
    }))
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
