"""Dry run: check a recipe against a target world size and print what one GPU will hold, no GPU needed.

    msa-train experiment=msa_109b_pt checkpoint.save=/tmp/x dry_run=true      (trainer entry point)
    python -m msa_train.dry_run experiment=msa_109b_pt checkpoint.save=/tmp/x [--world-size 256]

Prints the parallel layout (TP/PP/VPP/CP/EP/DP, expert DP, which groups stay inside a node), the
token schedule, parameter counts (total, active per token, per GPU), a per-GPU memory estimate and
the training FLOPs per token of both stages. ``dry_run(cfg, world_size)`` returns the numbers too.

Parameter counts are exact: one prototype layer of every (dense/MoE FFN, full/MSA attention)
combination the model uses is built with the model package's own ``build_model`` (a single-rank
process group, weights never initialized or touched), and its parameters are multiplied out over
the layer map. Each parameter is then sharded the way Megatron shards it: tensor-parallel linears
and the vocabulary by TP, routed experts by EP x expert-TP, norms / router / the shared index key
replicated.

The memory figure is an ESTIMATE (+-25%): weights, fp32 grad buffers, Adam state (sharded over the
data-parallel group by the distributed optimizer), activations (Korthikanti et al. 2022 accounting
with sequence parallelism and flash attention, widened for SwiGLU/MoE, the MSA index tensors, full
recompute if configured, 1F1B in-flight micro-batches), fp32 logits and a fixed framework overhead.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Dict, List, Optional, TextIO, Tuple
from msa_train.cfg_access import cfg_get as _get

GIB = 2**30
FRAMEWORK_OVERHEAD_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_GPU_MEMORY_GIB = 80.0


# -- layout ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    world: int
    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    ep: int
    etp: int
    gpus_per_node: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard."""
        return self.world // (self.pp * self.ep * self.etp)

    @property
    def nodes(self) -> int:
        return math.ceil(self.world / self.gpus_per_node)

    @classmethod
    def from_config(cls, parallel: Any, world: int, gpus_per_node: int) -> "ParallelLayout":
        tp = int(_get(parallel, "tp", 1))
        etp = _get(parallel, "etp", None)
        return cls(world=world, tp=tp, pp=int(_get(parallel, "pp", 1)), vpp=_get(parallel, "vpp"),
                   cp=int(_get(parallel, "cp", 1)), ep=int(_get(parallel, "ep", 1)),
                   etp=int(etp) if etp else tp, gpus_per_node=gpus_per_node)

    def lines(self) -> List[str]:
        g = self.gpus_per_node

        def where(span: int) -> str:
            return "inside a node" if span <= g else f"spans {math.ceil(span / g)} nodes"

        # Megatron's default rank order is tp-cp-ep-dp-pp (tp fastest): a group's rank span is the
        # product of the sizes ordered before it and its own size.
        return [
            f"world {self.world} GPUs = {self.nodes} nodes x {g}",
            f"TP {self.tp} x CP {self.cp} x PP {self.pp}"
            + (f" (VPP {self.vpp})" if self.vpp else "") + f" x DP {self.dp}",
            f"MoE: EP {self.ep} x expert-TP {self.etp} x PP {self.pp} x expert-DP {self.edp}",
            f"TP group {where(self.tp)}; TPxCP group {where(self.tp * self.cp)}; "
            f"EP group {where(self.etp * self.ep)}; DP gradient reduce {where(self.world // self.pp)}",
        ]


# -- parameters -----------------------------------------------------------------------------------
KINDS = ("embedding", "output", "attention", "index_branch", "dense_ffn", "shared_expert",
         "routed_experts", "router", "norm")


def param_kind(name: str) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_expert"
    if ".mlp.router." in name:
        return "router"
    if ".indexer." in name:
        return "index_branch"
    if ".self_attention." in name and "layernorm" not in name:
        return "attention"
    if ".mlp." in name and "layernorm" not in name:
        return "dense_ffn"
    return "norm"


@dataclasses.dataclass
class ParamCounts:
    by_kind: Dict[str, int]  # whole model
    active: int  # per token: routed experts count topk / num_experts
    # Per pipeline stage, one GPU of it: (non-expert params after TP, expert params after EP x ETP)
    per_stage_gpu: List[Tuple[int, int]]

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def _layer_types(model_cfg, attn_cfg) -> List[Tuple[int, int]]:
    moe = model_cfg.moe_layout()
    msa = attn_cfg.layer_mask(model_cfg.num_layers)
    return list(zip(moe, msa))


def _prototype_params(model_cfg, attn_cfg, combos: List[Tuple[int, int]], vocab: int,
                      seq_len: int) -> Dict[str, Tuple[int, bool]]:
    """name -> (numel, tp_sharded) of a model with one layer per (moe, msa) combination."""
    import torch
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)

    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.model import build_model, build_transformer_config

    proto_model = dataclasses.replace(
        model_cfg, num_layers=len(combos), moe_first_k_dense=0,
        moe_layer_freq=[c[0] for c in combos] if model_cfg.num_moe_experts is not None else None)
    proto_attn = dataclasses.replace(attn_cfg, layer_map=[c[1] for c in combos], layer_ids=None,
                                     dense_first_layers=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("dry_run builds its prototypes in a private 1-rank group: call it "
                           "before torch.distributed is initialized")
    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                 "LOCAL_RANK")}
    init_parallel({})
    try:
        config = build_transformer_config(proto_model, proto_attn, {}, torch.bfloat16,
                                          use_cpu_initialization=True, perform_initialization=False)
        model = build_model(config, vocab_size=vocab, max_seq_len=seq_len)
        sharded = set()
        for mod_name, mod in model.named_modules():
            if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                w = getattr(mod, "weight", None)
                if w is not None:
                    sharded.add(f"{mod_name}.weight")
        out = {n: (p.numel(), n in sharded) for n, p in model.named_parameters()}
        del model
        return out
    finally:
        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stage_of_layer(layer: int, num_layers: int, pp: int, vpp: Optional[int]) -> int:
    chunks = pp * (vpp or 1)
    per_chunk = num_layers // chunks
    return (layer // per_chunk) % pp


def count_parameters(model_cfg, attn_cfg, layout: ParallelLayout, vocab: int,
                     seq_len: int) -> ParamCounts:
    types = _layer_types(model_cfg, attn_cfg)
    combos = sorted(set(types))
    proto = _prototype_params(model_cfg, attn_cfg, combos, vocab, seq_len)
    per_combo: Dict[Tuple[int, int], List[Tuple[str, int, bool]]] = {c: [] for c in combos}
    globals_: List[Tuple[str, int, bool]] = []
    for name, (numel, sharded) in proto.items():
        if name.startswith("decoder.layers."):
            idx = int(name.split(".")[2])
            per_combo[combos[idx]].append((name, numel, sharded))
        else:
            globals_.append((name, numel, sharded))

    by_kind = {k: 0 for k in KINDS}
    stage_dense = [0] * layout.pp
    stage_expert = [0] * layout.pp
    for layer, combo in enumerate(types):
        stage = _stage_of_layer(layer, model_cfg.num_layers, layout.pp, layout.vpp)
        for name, numel, sharded in per_combo[combo]:
            kind = param_kind(name)
            by_kind[kind] += numel
            if kind == "routed_experts":
                stage_expert[stage] += numel // (layout.ep * layout.etp)
            else:
                stage_dense[stage] += numel // layout.tp if sharded else numel
    for name, numel, sharded in globals_:
        kind = param_kind(name)
        by_kind[kind] += numel
        # Embedding on the first stage, output layer and final norm on the last.
        stage = 0 if kind == "embedding" else layout.pp - 1
        stage_dense[stage] += numel // layout.tp if sharded else numel
    experts = by_kind["routed_experts"]
    active = sum(by_kind.values()) - experts
    if model_cfg.num_moe_experts:
        active += experts * model_cfg.moe_router_topk // model_cfg.num_moe_experts
    return ParamCounts(by_kind=by_kind, active=active,
                       per_stage_gpu=list(zip(stage_dense, stage_expert)))


# -- memory ---------------------------------------------------------------------------------------
def _activation_bytes_per_layer(model_cfg, attn_cfg, moe: bool, msa: bool, s: int, b: int,
                                tp: int) -> float:
    """Bytes one layer keeps for backward for one micro-batch of s local tokens (no recompute)."""
    h, d = model_cfg.hidden_size, model_cfg.kv_channels
    hq, hkv = model_cfg.num_attention_heads, model_cfg.num_query_groups
    sb = s * b
    # Attention block: 2 norms' inputs/outputs, QKV, attention output (+ fp32 LSE), projection input.
    attn = 2 * sb * (4 * h + (hq + 2 * hkv) * d + 2 * hq * d) + 4 * sb * hq
    if msa:
        k = attn_cfg.topk
        attn += 2 * sb * (hkv + 1) * attn_cfg.index_dim + 4 * sb * hkv * k + 4 * sb * hkv

    def ffn(width: int, tokens_per_token: float) -> float:
        gate = 2 if model_cfg.gated_linear_unit else 1
        # input, fc1 output (gate + up), activation output (= fc2 input)
        return tokens_per_token * 2 * sb * (h + gate * width + width)

    if moe:
        e, topk = model_cfg.num_moe_experts, model_cfg.moe_router_topk
        mlp = ffn(model_cfg.moe_ffn_hidden_size, topk) + 4 * sb * e  # + fp32 router probs
        if model_cfg.moe_shared_expert_intermediate_size:
            mlp += ffn(model_cfg.moe_shared_expert_intermediate_size, 1)
    else:
        mlp = ffn(model_cfg.ffn_hidden_size, 1)
    return (attn + mlp) / tp


@dataclasses.dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.overhead)


def estimate_memory(model_cfg, attn_cfg, train_cfg, parallel_cfg, layout: ParallelLayout,
                    params: ParamCounts, stage: int, bf16: bool) -> MemoryEstimate:
    dense, expert = params.per_stage_gpu[stage]
    n = dense + expert
    weights = n * (2 if bf16 else 4)
    grads = n * 4  # the trainer reduces gradients in fp32 (grad_reduce_in_fp32)
    state = 12 if bf16 else 8  # fp32 master copy (bf16 only) + Adam m and v
    if bool(_get(parallel_cfg, "use_distributed_optimizer", True)):
        optimizer = state * (dense / (layout.dp * layout.cp) + expert / layout.edp)
    else:
        optimizer = state * n
    s = int(train_cfg.seq_length) // layout.cp
    b = int(train_cfg.micro_batch_size)
    types = _layer_types(model_cfg, attn_cfg)
    mine = [t for i, t in enumerate(types)
            if _stage_of_layer(i, model_cfg.num_layers, layout.pp, layout.vpp) == stage]
    per_layer = [_activation_bytes_per_layer(model_cfg, attn_cfg, bool(m), bool(a), s, b, layout.tp)
                 for m, a in mine]
    if _get(train_cfg, "recompute_granularity") == "full":
        # Only each layer's input survives the forward; one layer is recomputed at a time.
        acts = len(mine) * 2 * s * b * model_cfg.hidden_size / layout.tp + max(per_layer, default=0)
    else:
        acts = sum(per_layer)
    gbs, mbs = int(train_cfg.global_batch_size), int(train_cfg.micro_batch_size)
    microbatches = max(1, gbs // (mbs * layout.dp))
    if layout.pp > 1:
        # 1F1B: the first stage holds pp micro-batches in flight (interleaving adds a fraction).
        in_flight = layout.pp - stage
        if layout.vpp:
            in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
        acts *= min(in_flight, microbatches)
    logits = 0.0
    if stage == layout.pp - 1:
        logits = s * b * model_cfg.vocab_size / layout.tp * 6  # bf16 logits + fp32 loss copy
    return MemoryEstimate(weights, grads, optimizer, acts, logits, FRAMEWORK_OVERHEAD_GIB * GIB)


# -- report ---------------------------------------------------------------------------------------
def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _resolve_world(cfg, world_size: Optional[int]) -> int:
    declared = _get(cfg.parallel, "world_size")
    if declared is not None and world_size is not None and int(declared) != int(world_size) \
            and int(world_size) != 1:
        raise ValueError(f"parallel.world_size={declared} but the dry run was asked for "
                         f"{world_size} GPUs: drop one of them or make them agree")
    # WORLD_SIZE=1 is what a plain `msa-train ... dry_run=true` sees: the layout's own target wins.
    target = declared if declared is not None else world_size
    if target is None or int(target) < 1:
        raise ValueError("dry run needs a target world size: set parallel.world_size or pass "
                         "--world-size")
    return int(target)


def dry_run(cfg, world_size: Optional[int] = None, stream: TextIO = sys.stdout,
            validate: bool = True) -> Dict[str, Any]:
    """Print the summary for ``cfg`` (a composed msa-train DictConfig) at ``world_size`` GPUs
    (default / WORLD_SIZE=1: parallel.world_size). Returns the numbers as a dict."""
    from omegaconf import OmegaConf

    world = _resolve_world(cfg, world_size)
    if validate:
        from msa_train.config.validate import validate_config

        validate_config(cfg, world, check_paths=False)  # planning host need not see the storage
    model_cfg = OmegaConf.to_object(cfg.model)
    attn_cfg = OmegaConf.to_object(cfg.attention)
    cluster = cfg.get("cluster") or {}
    gpus_per_node = int(_get(cluster, "gpus_per_node", 8))
    gpu_mem = float(_get(cluster, "gpu_memory_gib", None) or DEFAULT_GPU_MEMORY_GIB)
    layout = ParallelLayout.from_config(cfg.parallel, world, gpus_per_node)
    train = cfg.train
    seq = int(train.seq_length)
    bf16 = str(_get(train, "precision", "auto")) in ("bf16", "auto") and \
        str(_get(train, "device", "auto")) != "cpu"

    from msa_train.trainer.schedule import build_plan

    plan = build_plan(cfg.stage, train)
    params = count_parameters(model_cfg, attn_cfg, layout, int(model_cfg.vocab_size), seq)
    mems = [estimate_memory(model_cfg, attn_cfg, train, cfg.parallel, layout, params, st, bf16)
            for st in range(layout.pp)]
    worst = max(range(layout.pp), key=lambda st: mems[st].total)
    mem = mems[worst]

    flops = {}
    try:
        from msa_train.metrics.throughput import FlopsPerToken

        for stage in plan.job_stages:
            flops[stage.name] = FlopsPerToken.for_model(model_cfg, attn_cfg, seq, stage.mode)
    except ImportError as e:
        flops_error = str(e)
    else:
        flops_error = None

    p = lambda *a: print(*a, file=stream)  # noqa: E731
    msa_layers = sum(attn_cfg.layer_mask(model_cfg.num_layers))
    moe_layers = sum(model_cfg.moe_layout())
    p(f"== msa-train dry run: {cfg.name} on {world} GPUs ==")
    p(f"model {model_cfg.name}: {model_cfg.num_layers} layers ({msa_layers} MSA, {moe_layers} MoE), "
      f"hidden {model_cfg.hidden_size}, GQA {model_cfg.num_attention_heads}/"
      f"{model_cfg.num_query_groups}x{model_cfg.kv_channels}, vocab {model_cfg.vocab_size}"
      + (f", {model_cfg.num_moe_experts} experts top-{model_cfg.moe_router_topk}"
         if model_cfg.num_moe_experts else ""))
    p(f"MSA: block {attn_cfg.block_size}, top-{attn_cfg.topk}, index dim {attn_cfg.index_dim}")
    p("-- parallel layout")
    for line in layout.lines():
        p("  " + line)
    p("-- schedule")
    gbs, mbs = int(train.global_batch_size), int(train.micro_batch_size)
    p(f"  {gbs} x {seq} tokens = {_fmt(plan.tokens_per_step)} tokens/step; micro-batch {mbs}, "
      f"{gbs // (mbs * layout.dp)} micro-batches per step per DP rank")
    for st in plan.stages:
        run = "" if st in plan.job_stages else "  (not run by this job)"
        p(f"  {st.name:<7} attention={st.mode:<6} trainable={st.trainable:<12} "
          f"{_fmt(st.tokens)} tokens = {st.steps} steps{run}")
    p("-- parameters")
    for kind in KINDS:
        if params.by_kind[kind]:
            p(f"  {kind:<15} {_fmt(params.by_kind[kind]):>9}")
    p(f"  {'total':<15} {_fmt(params.total):>9}    active per token {_fmt(params.active)}")
    for st, (dense, expert) in enumerate(params.per_stage_gpu):
        p(f"  per GPU, PP stage {st}: {_fmt(dense + expert)} ({_fmt(dense)} dense after TP, "
          f"{_fmt(expert)} expert after EP x ETP)")
    p(f"-- memory per GPU (estimate, PP stage {worst}, "
      f"{'bf16' if bf16 else 'fp32'}, recompute={_get(train, 'recompute_granularity')})")
    for field in ("weights", "grads", "optimizer", "activations", "logits", "overhead"):
        p(f"  {field:<12} {getattr(mem, field) / GIB:8.1f} GiB")
    verdict = "fits" if mem.total <= 0.9 * gpu_mem * GIB else "DOES NOT FIT (keep 10% headroom)"
    p(f"  {'total':<12} {mem.total / GIB:8.1f} GiB of {gpu_mem:.0f} GiB: {verdict}")
    p("-- training FLOPs per token (fwd + bwd; MoE on active params, attention on computed pairs)")
    if flops_error:
        p(f"  n/a: {flops_error}")
    for name, f in flops.items():
        p(f"  {name:<7} {f.actual / 1e9:9.2f} GFLOP   (dense-attention equivalent "
          f"{f.dense_equiv / 1e9:.2f} GFLOP, x{f.dense_equiv / f.actual:.2f})")
    return {"world_size": world, "layout": dataclasses.asdict(layout), "dp": layout.dp,
            "edp": layout.edp, "params": dataclasses.asdict(params), "params_total": params.total,
            "params_active": params.active, "memory_gib": {k: v / GIB for k, v in
                                                           dataclasses.asdict(mem).items()},
            "memory_total_gib": mem.total / GIB, "fits": mem.total <= 0.9 * gpu_mem * GIB,
            "flops_per_token": {k: dataclasses.asdict(v) for k, v in flops.items()}}


def compose(overrides: List[str]):
    """Compose the msa-train config exactly as `msa-train` does, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from msa_train.config import CONFIG_PATH, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msa_train.dry_run",
                                 description="Print layout, parameters, memory and FLOPs of a recipe.")
    ap.add_argument("--world-size", type=int, default=None,
                    help="target GPUs (default: parallel.world_size of the recipe)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=msa_109b_pt")
    a = ap.parse_args(argv)
    try:
        cfg = compose(a.overrides)
        dry_run(cfg, a.world_size)
    except ValueError as e:  # config errors name their field
        print(f"dry run: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
