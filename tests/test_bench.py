"""scripts/bench.py's reading of a profiler trace: where the GPU stood idle between its kernels, and its
--src check; and scripts/attention_registers.py's ahead-of-time compile of the attention kernels."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import gpu_gaps, gpu_gaps_report  # noqa: E402


def kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_gaps_are_the_time_no_gpu_work_covers_with_the_work_on_either_side():
    events = [kernel("gemm", 0, 10), kernel("gelu", 5, 20),        # overlapping (two streams): busy 0-25
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 26, "dur": 100},  # host work: not GPU
              kernel("copy", 40, 5, "gpu_memcpy"),                  # gap 25 -> 40
              kernel("ln", 45, 5), kernel("memset", 150, 10, "gpu_memset")]  # gap 50 -> 150
    g = gpu_gaps(events)
    assert g["span_us"] == 160 and g["busy_us"] == 25 + 5 + 5 + 10 and g["gap_us"] == 15 + 100
    assert g["n_gaps"] == 2 and g["gaps"] == [(100, "ln", "memset"), (15, "gelu", "copy")]
    assert g["by_side"] == {"gpu_memset": [1, 100], "gpu_memcpy": [1, 15], "kernel": [0, 0.0]}
    report = gpu_gaps_report(g, steps=2)
    assert "busy 0.04 ms (28.1%)" in report and "idle 0.12 ms in 2 gaps" in report
    assert "next to a memset 1 gaps 0.10 ms, next to a copy 1 gaps 0.01 ms, between kernels 0 gaps 0.00 ms" in report
    assert report.splitlines()[3].split() == ["100.0", "ln", "->", "memset"]


def test_idle_next_to_a_memset_counts_as_the_memsets_even_after_a_copy():
    events = [kernel("a", 0, 1), kernel("set", 3, 1, "gpu_memset"), kernel("gemm", 7, 1),  # gaps 2, 3: memset
              kernel("h2d", 9, 1, "gpu_memcpy"), kernel("set", 14, 1, "gpu_memset"),       # 1: copy, 4: memset
              kernel("b", 15.5, 1), kernel("c", 17, 1)]                                      # 0.5: memset, 0.5: kernels
    assert gpu_gaps(events)["by_side"] == {"gpu_memset": [4, 9.5], "gpu_memcpy": [1, 1], "kernel": [1, 0.5]}


def test_a_kernel_inside_a_longer_one_does_not_end_the_busy_stretch_early():
    g = gpu_gaps([kernel("long", 0, 100), kernel("short", 10, 5), kernel("next", 120, 1)])
    assert g["busy_us"] == 101 and g["gaps"] == [(20, "long", "next")]
    assert gpu_gaps([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}])["busy_us"] == 0
    assert gpu_gaps_report(gpu_gaps([]), steps=5) == "no GPU work in the trace\n"


def test_attention_registers_compiles_with_the_launchers_alignment_so_loads_are_issued_ahead():
    """scripts/attention_registers.py compiles the attention kernels ahead of time for sm_90 with the
    pointer and stride alignment Triton's launcher tells the compiler of real arguments: the 64-row
    forward's query loads, in a loop of 3 pipeline stages, are then issued ahead (without the alignment
    none is), and each line reports registers, spills and shared memory. Triton is a test dependency."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "attention_registers.py"
    done = subprocess.run([sys.executable, str(script), "--tile", "64"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fwd, bwd = done.stdout.strip().splitlines()
    assert fwd.startswith("forward  lengths  33-64") and "3 stages" in fwd and fwd.endswith("3 loads issued ahead"), fwd
    assert bwd.startswith("backward lengths  33-64") and "one block" in bwd, bwd
    for line in (fwd, bwd):
        assert int(line.split("registers")[1].split(",")[0]) > 0 and "spilled stack" in line and "shared" in line


def test_bench_src_without_seqcls_is_one_clear_error(tmp_path):
    """--src names the seqcls to benchmark (another commit's checkout): a folder without one must stop the
    worker, not silently time the installed seqcls."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--model", "minilm", "--src",
                           str(tmp_path), "--worker", "seqcls:none:4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"--src {tmp_path}: no seqcls package there" in proc.stderr.strip().splitlines()[-1]
