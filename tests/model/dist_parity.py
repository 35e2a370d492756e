"""Parity run of a tiny MSA-MoE model: one training step under a parallel layout vs one process.

Run with torchrun (gloo on CPU, NCCL on GPU):
  python -m torch.distributed.run --standalone --nproc-per-node N tests/model/dist_parity.py \
      --tp 2 --sp --ref REF.pt --out RESULT.json
With --make-ref (1 process) it writes the reference instead. Per mode (dense, then sparse) it runs
forward/backward through Megatron's pipeline schedule with DDP and finalize_model_grads, and
compares the loss, the per-layer indexer KL and every gradient (rank shard vs the sliced
reference); after the sparse pass it takes one Adam step (distributed optimizer if --dist-opt) and
compares the updated parameters. Exit code 1 when any relative error exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def parse_args():
    p = argparse.ArgumentParser()
    for name in ("tp", "pp", "cp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--make-ref", action="store_true")
    p.add_argument("--ref", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--gpu-size", action="store_true", help="bigger dims for the GPU check")
    p.add_argument("--dtype", default="fp32")
    return p.parse_args()


def tiny_configs(gpu_size: bool):
    from msa_train.model import AttentionConfig, ModelConfig

    if gpu_size:
        model = ModelConfig(
            name="parity_gpu", num_layers=4, hidden_size=256, ffn_hidden_size=512,
            num_attention_heads=8, num_query_groups=2, kv_channels=64, vocab_size=512,
            num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=256, moe_first_k_dense=1,
        )
        attn = AttentionConfig(block_size=64, topk=4, index_dim=64, dense_first_layers=1,
                               kl_coeff=0.5, index_norm=True, index_rope=True)
    else:
        model = ModelConfig(
            name="parity", num_layers=4, hidden_size=32, ffn_hidden_size=64,
            num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=64,
            num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_first_k_dense=1,
        )
        attn = AttentionConfig(block_size=4, topk=3, index_dim=8, dense_first_layers=1,
                               kl_coeff=0.5, index_norm=True, index_rope=True)
    return model, attn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-6))


def main() -> int:
    args = parse_args()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_batch_on_this_cp_rank

    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.model import (
        build_model, build_transformer_config, kl_loss_scale, kl_tracker, set_kl_loss_scale,
        set_msa_mode,
    )
    from msa_train.model.parity import fill_parameters, local_slice, named_shards

    parallel = dict(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, sequence_parallel=args.sp)
    init_parallel(parallel, seed=1234)
    model_cfg, attn_cfg = tiny_configs(args.gpu_size)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = build_transformer_config(model_cfg, attn_cfg, parallel, params_dtype=dtype)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    model = build_model(
        config, max_seq_len=args.seq,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    ).to(device)
    fill_parameters(model, config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=args.dist_opt, bucket_size=None,
    )
    model = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        # adam_eps well above the tiny gradients keeps the first Adam update linear in them:
        # with eps=1e-8 it is ~lr*sign(g), which float reduction order can flip for g ~ 0.
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=1.0, adam_eps=1e-3,
                        use_distributed_optimizer=args.dist_opt, params_dtype=dtype,
                        bf16=dtype == torch.bfloat16),
        [model], use_gloo_process_groups=False,
    )

    # Global batch: identical on every rank, DP ranks take their slice, CP ranks their zigzag chunks.
    gen = torch.Generator().manual_seed(99)
    data = torch.randint(0, model_cfg.vocab_size, (args.global_batch, args.seq + 1), generator=gen)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_dp = args.global_batch // dp
    local = data[dp_rank * per_dp : (dp_rank + 1) * per_dp]
    num_mb = per_dp // args.micro_batch
    cp = ps.get_context_parallel_world_size()

    def batches():
        for i in range(num_mb):
            chunk = local[i * args.micro_batch : (i + 1) * args.micro_batch]
            batch = {
                "tokens": chunk[:, :-1].contiguous(),
                "labels": chunk[:, 1:].contiguous(),
                "position_ids": torch.arange(args.seq).repeat(args.micro_batch, 1),
            }
            batch = get_batch_on_this_cp_rank(batch)
            yield {k: v.to(device) for k, v in batch.items()}

    def forward_step(data_iter, model):
        batch = next(data_iter)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output):
            # This rank's share of the micro-batch mean (Megatron's legacy 2-tuple contract).
            share = output.float().sum() / (args.micro_batch * args.seq)
            return share, {"share": share.detach().clone()}  # the schedule scales share in place

        return out, loss_func

    fb = get_forward_backward_func()
    results = {}
    ref = None if args.make_ref else torch.load(args.ref)
    errors = {}

    def note(key, err):
        errors[key] = max(errors.get(key, 0.0), err)

    for step, mode in enumerate(("dense", "sparse")):
        set_msa_mode(model, mode)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        set_kl_loss_scale(kl_loss_scale(num_mb, cp))
        losses = fb(
            forward_step_func=forward_step, data_iterator=batches(), model=[model],
            num_microbatches=num_mb, seq_length=args.seq, micro_batch_size=args.micro_batch,  # full length: Megatron divides by CP/TP
            forward_only=False,
        )
        loss = torch.zeros(1, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage():
            loss += sum(float(x["share"]) for x in losses) / num_mb
        torch.distributed.all_reduce(loss, group=ps.get_context_parallel_group())
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
        loss = float(loss) / dp
        kl = kl_tracker.get_kl_metrics(reset=True)
        grads = {}
        for info, param in named_shards(model, config):
            grads[info.global_name] = (info, param.main_grad.detach().float().clone())
        if mode == "sparse":
            ok, _, _ = optimizer.step()
            if not ok:
                raise RuntimeError("optimizer step failed")
        params = {info.global_name: (info, p.detach().float().clone()) for info, p in named_shards(model, config)}

        if args.make_ref:
            results[mode] = {
                "loss": loss, "kl": kl,
                "grads": {k: g.cpu() for k, (i, g) in grads.items()},
                "params": {k: p.cpu() for k, (i, p) in params.items()} if mode == "sparse" else {},
            }
            continue
        r = ref[mode]
        note(f"{mode}/loss", abs(loss - r["loss"]) / abs(r["loss"]))
        if set(kl) != set(r["kl"]):
            raise AssertionError(f"{mode}: KL layers {sorted(kl)} != reference {sorted(r['kl'])}")
        for layer, value in kl.items():
            note(f"{mode}/kl", abs(value - r["kl"][layer]) / max(abs(r["kl"][layer]), 1e-12))
        if not args.dist_opt:  # with the distributed optimizer only the owned grad shard is reduced
            for name, (info, g) in grads.items():
                note(f"{mode}/grads", rel_err(g, local_slice(r["grads"][name], info)))
                if os.environ.get("PARITY_DEBUG"):
                    print(mode, name, rel_err(g, local_slice(r["grads"][name], info)), flush=True)
                if "indexer" in name:
                    note(f"{mode}/index_grads", rel_err(g, local_slice(r["grads"][name], info)))
        if mode == "sparse":
            for name, (info, p) in params.items():
                note("params_after_step", rel_err(p, local_slice(r["params"][name], info)))

    ok = True
    if args.make_ref:
        torch.save(results, args.ref)
        summary = {"reference": args.ref, "loss": {m: results[m]["loss"] for m in results},
                   "kl": {m: results[m]["kl"] for m in results}}
    else:
        keys = sorted(errors)
        vals = torch.tensor([errors[k] for k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(vals, op=torch.distributed.ReduceOp.MAX)
        summary = {k: float(v) for k, v in zip(keys, vals)}
        ok = all(v <= args.tol for v in summary.values())
        summary["ok"] = ok
        summary["layout"] = parallel | {"dist_opt": args.dist_opt, "world": torch.distributed.get_world_size()}
    if torch.distributed.get_rank() == 0:
        print("PARITY " + json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
    destroy_parallel()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
