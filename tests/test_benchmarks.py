"""benchmarks/bench_sampling.py and profile_sampling.py end to end on the CPU with tiny settings: a GPU
session has minutes, and must not spend them on an error in a script (their CUDA-only rows are the GPU
check's to run)."""

import json
import sys
from pathlib import Path

import pytest
import torch

import ddpm_fast

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

pytestmark = [pytest.mark.skipif(ddpm_fast.build_info()["backends"]["cpu"] != "available",
                                 reason="the C++ extension is not built"),
              pytest.mark.usefixtures("one_thread")]


# diffusers' upsampling calls an lru_cache'd function that dynamo warns about: theirs, not ours to fix.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`:UserWarning")
def test_bench_sampling_runs_every_row(capsys):
    import bench_sampling

    # The "eager" backend (dynamo, no code generation): the compiled variants' code paths in seconds.
    assert bench_sampling.main(["--device", "cpu", "--preset", "tiny", "--batches", "1", "--steps", "1",
                                "--compile", "--compile-backend", "eager", "--drift-steps", "2",
                                "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "failed:" not in out and "skipped: --max-seconds" not in out
    for row in ("sampling  bf16", "sampling  fp32", "bf16 drift, ours", "training  bf16 autocast"):
        assert row in out
    for variant in ("ours eager", "ours compile", "ours Trainer", "diffusers compile default",
                    "diffusers compile reduce-overhead"):
        assert variant in out


# Kernel names as the CUDA profiler reports them (H200, torch 2.11), each with the kind it must land in:
# the kinds share words ("xmma", "cudnn", "copy", "gemm"), so their order is what is under test.
KERNELS = {
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel("
    "at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda(c10::BFloat16)#1}>": "elementwise",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1"
    "_execute_segment_k_off_kernel__5x_cudnn": "convolution",
    "sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
    "_kernel__5x_cublas": "gemm",
    "nvjet_tst_192x128_64x4_2x1_v_bz_coopB_TNT": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t>, false, false, false>(pytorch_flash::Flash_fwd_params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>(long, float, "
    "c10::BFloat16 const*, float*, float*)": "group norm",
    "void ddpm_fast::cuda::(anonymous namespace)::gn_forward_kernel<__nv_bfloat16>(ddpm_fast::cuda::gn::"
    "FwdArgs<__nv_bfloat16>, ddpm_fast::cuda::gn::Geo)": "group norm",
    "_backward_stats_kernel": "group norm",
    "void ddpm_fast::cuda::flat_kernel<ddpm_fast::cuda::(anonymous namespace)::StepOp<float> >("
    "ddpm_fast::cuda::(anonymous namespace)::StepOp<float>, long, long)": "step, q_sample, noise",
    "_q_sample_kernel": "step, q_sample, noise",
    "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4>":
    "step, q_sample, noise",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy_contig<at::native::(anonymous namespace)::"
    "OpaqueType<2u>, unsigned int, 4, 64, 64>": "concat",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
    "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda(float)#1}> >(int, ...)": "copy, cast",
    "void at::native::(anonymous namespace)::upsample_nearest2d_nhwc_out_frame<c10::BFloat16>": "upsample, pad",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()>, unsigned int, float, 4, 4> >": "reduction",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::BinaryOpListAlphaFunctor<float, 4, 2, 0>>":
    "optimizer",
    "some_kernel_nobody_named": "other",
}


def test_profile_kinds_of_cuda_kernel_names():
    import profile_sampling

    assert {name: profile_sampling.kind_of(name) for name in KERNELS} == KERNELS


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    """GPU busy time (what span minus busy calls the host's share) counts overlapping kernels once."""
    import profile_sampling

    assert profile_sampling._busy_us([(0, 10), (5, 12), (20, 25), (21, 22), (30, 30)]) == 17
    assert profile_sampling._busy_us([]) == 0


def test_profile_sampling_runs_every_workload(capsys, tmp_path, monkeypatch):
    import bench_sampling
    import profile_sampling

    monkeypatch.setattr(profile_sampling.harness, "RESULTS", tmp_path)
    assert profile_sampling.main(["--device", "cpu", "--steps", "1", "--record"]) == 0
    rows = json.loads(next(tmp_path.glob("profile-cpu-*.json")).read_text())["rows"]
    sides = ("ours eager", "diffusers eager") if bench_sampling.diffusers is not None else ("ours eager",)
    assert [(r["kind"], r["batch"], r["variant"]) for r in rows] == [
        (kind, batch, side) for kind, batch in (("sampling", 4), ("sampling", 1), ("training", 4)) for side in sides]
    for row in rows:
        p = row["profile"]
        # One thread: the ops' self times and the untraced rest add up to the wall time, convolutions lead.
        assert sum(e["ms"] for e in p["kinds"].values()) == pytest.approx(max(p["span_ms"], p["device_ms"]))
        assert p["launches"] > 50 and p["kinds"]["convolution"]["ms"] > 0
        assert ("optimizer" in p["kinds"]) == (row["kind"] == "training")
    assert "ms per step" in capsys.readouterr().out


def test_op_table_reports_a_failing_implementation_and_times_the_rest():
    """A GPU run is one shot: one kernel that fails must cost its own column, not the whole table."""
    import table

    x = torch.randn(1000)

    def broken():
        raise RuntimeError("no kernel image for this device")
    times, errors = table._time_case({"cpu": lambda: x * 2, "triton": broken, "eager": lambda: x + 1},
                                     torch.device("cpu"))
    assert set(times) == {"cpu", "eager"} and all(len(t) == 3 and t[0] > 0 for t in times.values())
    assert errors == {"triton": "RuntimeError: no kernel image for this device"}


def test_op_table_warm_shards_cover_every_case_once(capsys):
    import table

    assert all(table.main(["--device", "cpu", "--no-compile", "--warm-only", "--shard", f"{k}/3"]) == 0
               for k in range(3))
    calls = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warm ")]
    cases = list(table._cases(torch.device("cpu"), False))
    expected = sum(len([n for n in c.impls if n != "compile"]) for c in cases)
    assert len(calls) == expected and all(": ok (" in line for line in calls)
    assert len({line.split(":")[0].split(" ", 2)[2] for line in calls}) == expected  # each call once


def test_preference_orders_each_op_by_the_geometric_mean_of_its_cases(tmp_path, capsys):
    import preference

    def row(op, shape, cuda_us, triton_us=None):
        r = {"op": op, "shape": list(shape), "dtype": "torch.float32", "layout": "NCHW",
             "cuda_ms": {"median": cuda_us / 1e3}}
        if triton_us is not None:
            r["triton_ms"] = {"median": triton_us / 1e3}
        return r
    rows = [row("q_sample (noise drawn)", (256, 3, 32, 32), 5.0, 4.0),
            row("q_sample (noise drawn)", (128, 3, 256, 256), 80.0, 72.0),
            row("DDPM step (eps, clip, fixed_small)", (256, 3, 32, 32), 5.0, 6.0),
            row("DDPM step (eps, clip, fixed_small)", (128, 3, 256, 256), 80.0, 80.0),
            row("DDPM step (eps, thresholding)", (128, 3, 256, 256), 400.0, 200.0),  # its own entry
            row("group_norm_silu fwd (scale/shift)", (128, 128, 32, 32), 30.0)]  # no triton time: no verdict
    prefs = preference.preference(rows)
    assert set(prefs) == {"q_sample", "step", "step_thresholding"}
    assert prefs["q_sample"]["order"] == ("triton", "cuda") and prefs["q_sample"]["geomean"] == pytest.approx(
        (0.8 * 0.9) ** 0.5)
    assert prefs["step"]["order"] == ("cuda", "triton") and prefs["step"]["worst"] == pytest.approx(1.2)
    assert "(256, 3, 32, 32)" in prefs["step"]["worst_case"]
    assert prefs["step_thresholding"]["order"] == ("triton", "cuda") and prefs["step_thresholding"]["cases"] == 1

    path = tmp_path / "ops-cuda-x.json"
    path.write_text(json.dumps({"rows": rows}))
    assert preference.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "worst 1.20 OVER" in out and "worst 0.90 ok" in out
    assert ("CUDA_PREFERENCE = {\"q_sample\": ('triton', 'cuda'), \"step\": ('cuda', 'triton'), "
            "\"step_thresholding\": ('triton', 'cuda')}") in out



def test_cuda_preference_is_what_the_newest_gpu_record_supports():
    """ops/backend.py's CUDA_PREFERENCE, entry by entry, is the order preference.py derives from the newest GPU op
    record; an entry that no record compares keeps the compiled kernels first, as the table's comment says."""
    import preference

    from ddpm_fast.ops.backend import CUDA_PREFERENCE

    records = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("ops-cuda-*.json"))
    prefs = preference.preference(json.loads(records[-1].read_text())["rows"]) if records else {}
    for op, order in CUDA_PREFERENCE.items():
        assert order == prefs.get(op, {"order": ("cuda", "triton")})["order"], op

def test_eager_baselines_do_the_op_s_work():
    """The baselines the speed-ups are measured against compute the op (on fresh inputs, equal to the reference
    given the same noise): a cheaper or wrong baseline would flatter the kernels."""
    import bench_q_sample
    import bench_step

    from ddpm_fast import reference

    cpu = torch.device("cpu")
    shape = (int(torch.randint(1, 5, ())), 3, int(torch.randint(4, 17, ())), int(torch.randint(4, 17, ())))
    x, m = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    seed = int(torch.randint(0, 2**31, ()))

    q_sample = next(iter(bench_q_sample.cases(cpu))).impls["eager"]
    got, noise = q_sample(x0=x, t=t)
    torch.testing.assert_close(got, reference.q_sample(x, t, ddpm_fast.NoiseSchedule(), noise=noise)[0])

    step = next(iter(bench_step.cases(cpu))).impls["eager"]
    torch.manual_seed(seed)
    got = step(x=x, mo=m, t=t)
    torch.manual_seed(seed)
    noise = torch.randn_like(x)
    table = ddpm_fast.ddpm_table(ddpm_fast.NoiseSchedule(), prediction_type="epsilon", variance_type="fixed_small")
    torch.testing.assert_close(got, reference.step(m, t, x, table, noise=noise, clip_range=1.0)[0])


def test_gpu_check_selections_collect_tests():
    """Every -k selection in scripts/gpu_check.sh's sanitizer stage selects tests of each file it names (one once
    matched none, so racecheck never ran, and the stage failed with pytest's exit code 5)."""
    import re
    import subprocess

    root = Path(__file__).parents[1]
    script = (root / "scripts" / "gpu_check.sh").read_text()
    selections = re.findall(r"-k '([^']+)'", script)
    assert len(selections) == 2, selections
    for name, value in re.findall(r'(\w+_CUDA)="([^"]+)"', script):
        selections = [k.replace(f"${name}", value) for k in selections]
    files = re.findall(r"tests/\w+\.py", re.search(r'SANITIZE_TESTS="([^"]+)"', script).group(1))
    assert len(files) == 3, files
    for selection in selections:
        named = {f for f in files if Path(f).name in selection}
        assert named and "$" not in selection, selection
        run = subprocess.run([sys.executable, "-m", "pytest", *files, "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-k", selection], cwd=root, capture_output=True, text=True)
        assert run.returncode == 0, (selection, run.stdout[-500:], run.stderr[-500:])
        collected = {line.split("::")[0] for line in run.stdout.splitlines() if "::" in line}
        assert collected == named, (selection, collected)


def test_op_table_record_holds_every_finished_row_as_it_goes(tmp_path, monkeypatch):
    """The record is rewritten after every case: a run killed at its time limit keeps what it measured."""
    import harness
    import table

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    seen = []
    record = harness.record

    def spy(name, device, rows, extra, env=None):
        path = record(name, device, rows, extra, env)
        seen.append((len(json.loads(path.read_text())["rows"]), extra["cases_not_run"], path))
        return path
    monkeypatch.setattr(table, "record", spy)
    assert table.main(["--device", "cpu", "--no-compile", "--targets-only", "--record"]) == 0
    cases = len(table._cases(torch.device("cpu"), True))
    assert [(rows, left) for rows, left, _ in seen] == [(n, cases - n) for n in range(1, cases + 1)] + [(cases, 0)]
    assert len({path for _, _, path in seen}) == 1 and list(tmp_path.iterdir()) == [seen[0][2]]  # one file, no .tmp
