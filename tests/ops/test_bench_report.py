"""tools/bench_throughput.py report: speedup column, target verdict, failed runs never get a ratio."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "tools" / "bench_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

META = {"model": "small", "params": "0.77B total", "attention": "paper", "tokens_per_step": 32768,
        "warmup": 2, "steps": 5, "torch": "2.11", "triton": "3.6"}


def _r(variant, seq, tps, ok=True, tflops=100.0):
    return {"variant": variant, "seq_len": seq, "tokens_per_sec": tps, "tflops": tflops,
            "dense_equiv_tflops": 2 * tflops, "max_mem_gib": 10.0, "ok": ok, "final_loss": 7.0}


def test_ratio_and_target_verdict():
    md = bench.markdown([_r("msa", 32768, 30000.0), _r("dense", 32768, 15000.0),
                         _r("msa", 8192, 10000.0), _r("dense", 8192, 10000.0)],
                        "NVIDIA H100 80GB HBM3", 989.4, META)
    assert "NVIDIA H100 80GB HBM3" in md
    row32 = next(l for l in md.splitlines() if l.startswith("| 32K | MSA"))
    assert "**2.00x** (target 1.6x: met)" in row32 and "10.1%" in row32
    row8 = next(l for l in md.splitlines() if l.startswith("| 8K | MSA"))
    assert "**1.00x**" in row8 and "target" not in row8


def test_failed_run_gets_no_speedup_and_unknown_card_no_mfu():
    oom = {"variant": "dense", "seq_len": 8192, "ok": False, "final_loss": None,
           "error": "OutOfMemoryError: CUDA out of memory"}
    md = bench.markdown([_r("msa", 32768, 90000.0, ok=False), _r("dense", 32768, 15000.0),
                         _r("msa", 8192, 5000.0), oom], "Mystery GPU", None, META)
    assert "FAILED" in md and "x**" not in md and "OutOfMemoryError" in md
    assert "n/a (a run failed)" in md
    assert "peak unknown" in md
    dense_row = next(l for l in md.splitlines() if "dense-GQA twin" in l)
    assert "| - |" in dense_row  # no MFU without a known peak


def test_profile_breakdown_sorts_kernels_into_categories_and_reaches_the_table():
    kernels = [("_select_blocks_kernel", 1000.0), ("_kl_sparse_fwd_kernel", 4000.0),
               ("_sparse_bwd_kv_kernel", 3000.0), ("_sparse_fwd_kernel", 1500.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 18000.0),
               ("nvjet_sm90_tst_256x128_64x4", 250.0), ("vectorized_elementwise_kernel", 50.0),
               ("_cross_entropy_kernel", 700.0), ("multi_tensor_apply_kernel<AdamFunctor>", 300.0),
               ("indexSelectLargeIndex", 200.0), ("triton_poi_fused_mul_silu_0", 100.0)]
    b = bench.kernel_breakdown(kernels, wall_ms=40.0)
    assert b == {"msa_select": 1.0, "msa_kl": 4.0, "msa_attention": 4.5, "dense_attention": 18.0,
                 "loss": 0.7, "optimizer": 0.3, "moe_routing": 0.2, "norm_act": 0.1,
                 "gemm": 0.25, "other": 0.05, "total": 29.1, "host_gap": 10.9}
    rows = [dict(_r("msa", 32768, 30000.0), profile_gpu_ms=b), _r("dense", 32768, 15000.0)]
    md = bench.markdown(rows, "NVIDIA H200", 989.4, META)
    assert "| msa_select | msa_kl |" in md and "| 32K | MSA (sparse stage) | 1.0 | 4.0 | 4.5 | 18.0 |" in md
