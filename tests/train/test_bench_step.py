"""The GPU step benchmarks' shared setup (benchmarks/_step.py) and their loops, run on the CPU with
the tiny config: a typo there would otherwise first show on a lent GPU. Also the profile's
kernel table: categories, idle time, and the backward's kernels found between ranges."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import fused_loss_check  # noqa: E402
import profile_step  # noqa: E402
import train_bench  # noqa: E402

CPU = torch.device("cpu")


def test_train_bench_and_the_loss_check_run_the_trainers_step(tiny_data, one_thread):
    row = train_bench.bench("fused_ce_rope", ["fused=ce,rope"], str(tiny_data), steps=2, warmup=1, config="tiny",
                            device=CPU)
    assert row["ms_per_step"] > 0 and np.isfinite(row["loss"]) and row["peak_mem_mib"] is None
    ref = fused_loss_check.run("tiny", [], str(tiny_data), steps=7, device=CPU)
    fz = fused_loss_check.run("tiny", ["fused=ce,rope"], str(tiny_data), steps=7, device=CPU)
    assert len(ref["losses"]) == 7 and ref["ms_per_step"] > 0
    assert np.abs(np.array(ref["losses"]) - np.array(fz["losses"])).max() < 1e-3  # fp32 on the CPU: rounding


def test_profile_phases_and_kernel_table(tiny_data, one_thread):
    st = profile_step.setup_step("tiny", [], str(tiny_data), CPU)
    loss = profile_step.step_phased(st.compiled, st.optimizers, st.loader, st.cfg, st.accum, CPU, st.params)
    assert torch.isfinite(loss)
    trace = {"traceEvents": [
        {"cat": "gpu_user_annotation", "name": "pgolf.forward", "ts": 0, "dur": 100},
        {"cat": "gpu_user_annotation", "name": "pgolf.backward", "ts": 165, "dur": 2},  # the seed's fill only
        {"cat": "gpu_user_annotation", "name": "pgolf.optimizer.muon", "ts": 300, "dur": 50},
        {"cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 1, "dur": 30},
        {"cat": "kernel", "name": "triton_red_fused_rms_norm_0", "ts": 140, "dur": 20},  # backward: after forward
        {"cat": "kernel", "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "ts": 170, "dur": 20},  # after it
        {"cat": "kernel", "name": "multi_tensor_apply_kernel", "ts": 310, "dur": 10},
        {"cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel", "ts": 400, "dur": 10},
    ]}
    t = profile_step.trace_tables(trace, steps=1)
    assert t["by_phase_ms"]["forward"] == {"matmul": 0.03}
    assert t["by_phase_ms"]["backward"] == {"compiled_triton": 0.02, "attention": 0.02}
    assert t["by_phase_ms"]["optimizer.muon"] == {"optimizer_fused": 0.01}
    assert t["by_phase_ms"]["unattributed"] == {"copy_cast": 0.01}
    assert abs(t["kernel_ms_per_step"] - 0.09) < 1e-9 and abs(t["idle_ms_per_step"] - 0.319) < 1e-9  # 1..410 µs, 90 busy
    assert t["attention_kernels"] == ["cudnn_generated_fort_native_sdpa_sm90_flash_bprop"]


def test_train_bench_times_an_ablation_arms_model_with_and_without_qat(tiny_data, one_thread):
    """`--arm` takes the arm's model and recipe and leaves QAT to the variant (`baseline` off, `qat`
    from step 0); the arm's own low-bit recipe runs through the timed step."""
    import pytest

    from pgolf_train.config import load_config

    sets = train_bench.arm_overrides("lowbit_int2")
    assert [kv for kv in sets if kv.startswith("qat_start=")] == ["qat_start=1.0"] and "model_dim=896" in sets
    # h200 trains under QAT from step 0: an arm that does not set it (13 layers) must still time baseline off
    l13 = train_bench.arm_overrides("lowbit_int4_l13")
    assert load_config("h200", l13 + train_bench.VARIANTS["baseline"]).qat_start >= 1.0
    assert load_config("h200", l13 + train_bench.VARIANTS["qat"]).qat_start == 0.0
    with pytest.raises(SystemExit, match="unknown arm 'nope'"):
        train_bench.arm_overrides("nope")
    recipe = [kv for kv in sets if kv.startswith("recipe=")]  # the tiny model keeps its shape on the CPU
    row = train_bench.bench("qat", recipe + train_bench.VARIANTS["qat"], str(tiny_data), steps=1, warmup=1,
                            config="tiny", device=CPU)
    assert row["ms_per_step"] > 0 and np.isfinite(row["loss"]) and "qat_start=0" in row["overrides"]
