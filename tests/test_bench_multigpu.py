"""The multi-GPU scripts run with 2 gloo ranks on the CPU (torchrun from a temp cwd, free port).

scripts/bench_prefill_dist.py --tiny (`apb.bench.dist`): APB and Star rows with times > 0, measured comm, speedup = full /
total, and the simulated columns when a simulated JSON is given; scripts/oracle_dist.py --cpu: exact-mode
APB over 2 processes equals the one-process model (fp32) and sampled generation stops together.
scripts/bench_multigpu.sh needs N GPUs: here it is syntax-checked, and its arguments and output folder
are checked against a stand-in `nvidia-smi` that reports one GPU (it must stop with a message).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, free_port, run_or_fail

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _torchrun(script: str, *args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = clean_env(OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "scripts" / script),
        *args,
    ]
    # from a temp cwd: at the repo root, kernels/ would be importable as a top-level `kernels`
    done = run_or_fail(command, cwd=cwd, env=env, timeout_s=300)  # ~20 s each on 2 cores
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _simulated(path: Path) -> None:
    """An `apb.bench.prefill` results JSON for the same setting (tiny, 1024 tokens, 2 hosts)."""
    runs = [
        {"method": "full", "length": 1024, "hosts": 1, "status": "ok", "compute_ms": 10.0, "comm_ms": 0.0,
         "query_ms": 0.0, "total_ms": 10.0},
        {"method": "apb", "length": 1024, "hosts": 2, "status": "ok", "compute_ms": 4.0, "comm_ms": 0.5,
         "query_ms": 0.5, "total_ms": 5.0},
        {"method": "star", "length": 1024, "hosts": 2, "status": "ok", "compute_ms": 7.0, "comm_ms": 0.0,
         "query_ms": 1.0, "total_ms": 8.0},
    ]  # fmt: skip
    meta = {"query_len": 8, "config": {"primary_length": 1024}}
    path.write_text(json.dumps({"meta": meta, "runs": runs, "breakdown": []}))


def test_distributed_prefill_bench_two_gloo_ranks(tmp_path):
    sim = tmp_path / "sim.json"
    _simulated(sim)
    out = tmp_path / "dist.json"
    args = ["--tiny", "--lengths", "1024", "--simulated-json", str(sim), "--out", str(out)]
    _torchrun("bench_prefill_dist.py", *args, "--markdown", str(tmp_path / "dist.md"), cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["meta"]["world_size"] == 2 and results["meta"]["simulated_hosts"] is False
    assert "{" not in results["meta"]["timing"]  # every placeholder filled in
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"full", "star", "exact", "apb-paper", "apb-balanced", "apb"}
    full = runs["full"]
    assert full["status"] == "ok" and full["hosts"] == 1 and full["total_ms"] > 0
    assert full["full_attention"] == "sdpa, CPU"  # on a GPU: the first of cuDNN, FlashAttention-2, ...
    for method in ("apb", "apb-balanced", "apb-paper", "exact", "star"):
        run = runs[method]
        assert run["status"] == "ok" and run["hosts"] == 2 and run["finite"]
        assert len(run["rank_context_ms"]) == 2 and min(run["rank_context_ms"]) > 0
        assert run["total_ms"] > 0 and run["query_ms"] > 0
        # total comes from an unrecorded run of its own; the recorded run holds the per-rank split
        assert run["recorded_total_ms"] >= run["compute_ms"]
        assert run["speedup_vs_full"] == pytest.approx(full["total_ms"] / run["total_ms"])
        assert run["tokens_per_s"] == pytest.approx((1024 + 8) / (run["total_ms"] / 1000))
        # APB: one all-gather of passing blocks per layer but the last (2 layers) in the timed run (the
        # warm-up is not recorded); Star passes nothing, so no all-gather
        assert run["comm_calls"] == (0 if method == "star" else 1)
        assert len(run["rank_busy_ms"]) == 2 and sum(run["blocks"]) == 1024
        assert len(run["rank_flop_bound_ms"]) == 2 and min(run["rank_flop_bound_ms"]) > 0
        assert run["rank_busy_over_bound"] == pytest.approx(
            [b / x for b, x in zip(run["rank_busy_ms"], run["rank_flop_bound_ms"], strict=True)]
        )
        sim_total = {"apb": 5.0, "star": 8.0}.get(method)
        if sim_total is None:
            assert run["simulated"] is None
            continue
        assert run["simulated"]["total_ms"] == sim_total
        assert run["real_over_sim_total"] == pytest.approx(run["total_ms"] / sim_total)
    assert runs["apb"]["comm_ms"] > 0  # APB passes blocks: the all-gather moved data and took time
    assert runs["apb"]["passing_counts"][0] > 0 and runs["star"]["passing_counts"] == [0, 0]
    assert runs["apb"]["blocks"] == [512, 512] and runs["apb-balanced"]["split"] == "balanced"
    # host 0 sends the anchor (the default); as published, every host runs its own
    assert runs["apb"]["shared_anchor"] and not runs["apb-paper"]["shared_anchor"]
    assert runs["apb-paper"]["blocks"] == [512, 512] and not runs["star"]["shared_anchor"]
    assert runs["exact"]["split"] == "balanced" and runs["apb"]["split"] == "equal"
    assert runs["apb"]["speedup_vs_exact"] == pytest.approx(
        runs["exact"]["total_ms"] / runs["apb"]["total_ms"]
    )
    rates = results["meta"]["rates_tflops"]
    assert set(rates) == {"matmul", "attention"} and min(rates.values()) > 0
    table = (tmp_path / "dist.md").read_text()
    assert "busy / FLOP bound" in table and "matmul" in table
    assert "Real multi-process run" in table and "| apb | 1K | " in table and "| exact | 1K | " in table
    assert "| full (1 GPU, sdpa, CPU) | 1K | 1024 |" in table


def test_distributed_bench_resumes_its_results_file(tmp_path):
    """--resume keeps the runs an earlier run measured and times only what it lacks; a file measured with
    other settings is refused, not mixed in."""
    out = tmp_path / "dist.json"
    _torchrun("bench_prefill_dist.py", "--tiny", "--methods", "full", "apb", "--out", str(out), cwd=tmp_path)
    first = {(r["method"], r["length"]): r for r in json.loads(out.read_text())["runs"]}
    assert set(first) == {("full", 1024), ("apb", 1024)}
    more = ["--tiny", "--lengths", "1024", "2048", "--methods", "full", "apb", "star", "--out", str(out)]
    done = _torchrun("bench_prefill_dist.py", *more, "--resume", cwd=tmp_path)
    assert "--resume: 2 runs" in done.stdout
    results = json.loads(out.read_text())
    runs = {(r["method"], r["length"]): r for r in results["runs"]}
    assert set(runs) == {(m, n) for m in ("full", "apb", "star") for n in (1024, 2048)}
    for key, run in first.items():  # kept as they were, not timed again
        assert runs[key]["total_ms"] == run["total_ms"] and runs[key]["compute_ms"] == run["compute_ms"]
    assert runs[("star", 1024)]["speedup_vs_full"] == pytest.approx(
        runs[("full", 1024)]["total_ms"] / runs[("star", 1024)]["total_ms"]
    )
    assert len(results["meta"]["resumed_from"]) == 1
    refused = _torchrun(
        "bench_prefill_dist.py",
        *more,
        "--query-len",
        "4",
        "--calibrate",
        "4096",
        "--resume",
        cwd=tmp_path,
        ok=False,
    )
    # a calibrated split is another split: not added to a file measured without (or at another length)
    said = refused.stdout + refused.stderr
    assert (
        "measured with other settings (query_len 8 there, 4 now; calibrate_length 0 there, 4096 now)" in said
    )
    refused = _torchrun(
        "bench_prefill_dist.py", *more, "--backends", "sdpa", "--resume", cwd=tmp_path, ok=False
    )
    assert "measured on the 'reference' backend, this run picked 'sdpa'" in refused.stdout + refused.stderr
    assert json.loads(out.read_text())["runs"] == results["runs"]  # the file is left as it was


def test_oracle_two_gloo_ranks_fp32(tmp_path):
    out = tmp_path / "oracle.json"
    _torchrun("oracle_dist.py", "--cpu", "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["dtype"] == "float32"
    assert report["prefill"]["passed"] and report["prefill"]["max_abs_diff_vs_single_device"] <= 1e-4
    assert report["prefill"]["same_on_all_ranks"]
    generate = report["generate"]
    assert generate["same_on_all_ranks"] and generate["eos_same_on_all_ranks"]
    assert generate["eos_stopped_early"] and generate["eos_steps"] < generate["steps"]
    anchor = report["shared_anchor"]  # rank 0 broadcasting the anchor == every rank running its own
    assert anchor["shared"] and anchor["max_abs_diff_shared_vs_own"] <= 1e-4 and anchor["passed"]
    assert report["passed_all_ranks"]


def test_bench_multigpu_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.fail("bash not found")
    done = subprocess.run(
        [bash, "-n", str(ROOT / "scripts" / "bench_multigpu.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    text = (ROOT / "scripts" / "bench_multigpu.sh").read_text()
    assert "export NCCL_NVLS_ENABLE=0" in text


def _bench_multigpu(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The script with a stand-in nvidia-smi on PATH that reports one GPU."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *query-gpu*) echo "Stand-in GPU";; *) echo "topology";; esac\n')
    smi.chmod(0o755)
    path = f"{fake}:{clean_env()['PATH']}"
    command = ["bash", str(ROOT / "scripts" / "bench_multigpu.sh"), *args]
    return run_or_fail(command, cwd=tmp_path, env=clean_env(PATH=path, **env), timeout_s=60)


def test_bench_multigpu_arguments_and_output_folder(tmp_path):
    if shutil.which("bash") is None:
        pytest.fail("bash not found")
    usage = _bench_multigpu("--help", tmp_path=tmp_path)
    assert usage.returncode == 0 and "bash scripts/bench_multigpu.sh" in usage.stdout
    wrong = _bench_multigpu("benchmark", tmp_path=tmp_path)
    assert wrong.returncode == 2 and "unknown argument: benchmark" in wrong.stderr

    # --out DIR, relative to the caller's folder; one GPU is refused with a message in the summary
    done = _bench_multigpu("--out", "results", "bench", tmp_path=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    summary = (tmp_path / "results" / "summary.txt").read_text()
    assert (
        "machine: 1 x Stand-in GPU, steps: bench" in summary and "needs at least 2 GPUs, found 1" in summary
    )
    assert (tmp_path / "results" / "topo.txt").read_text() == "topology\n"

    # OUT_DIR from the environment; all four steps by default
    done = _bench_multigpu(tmp_path=tmp_path, OUT_DIR=str(tmp_path / "from_env"))
    assert done.returncode == 2
    assert "steps: bench oracle generate train" in (tmp_path / "from_env" / "summary.txt").read_text()


def test_generation_bench_under_torchrun_times_apb_over_the_ranks(tmp_path):
    """scripts/bench_generate.py under torchrun (2 gloo ranks, --tiny): one host per rank, APB's eager steps
    timed, transformers' methods skipped (the whole model in one process), graphed steps skipped on the CPU;
    rank 0 writes the JSON with the torchrun command."""
    out = tmp_path / "gen.json"
    methods = ["--methods", "full", "apb-eager", "apb-graphs"]
    _torchrun("bench_generate.py", "--tiny", "--repeats", "1", *methods, "--json", str(out), cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["ranks"] == 2 and results["device"] == "2 x cpu" and results["settings"]["hosts"] == 2
    assert results[
        "command"
    ] == "torchrun --nproc-per-node 2 scripts/bench_generate.py --tiny --repeats 1 " + (" ".join(methods))
    runs = {run["method"]: run for run in results["runs"]}
    assert runs["full"]["status"].startswith("skipped: the unmodified model runs in one process")
    assert runs["apb-graphs"]["status"] == "skipped: CUDA graphs need a GPU"
    eager = runs["apb-eager"]
    assert eager["tokens"] == 8 and eager["step_ms_median"] > 0 and eager["first_token_s"] > 0


def test_generation_bench_refuses_hosts_other_than_the_ranks(tmp_path):
    done = _torchrun("bench_generate.py", "--tiny", "--hosts", "3", cwd=tmp_path, ok=False)
    assert "every rank is one host: --hosts 3 != 2 ranks" in done.stderr


def test_exit_rank_flushes_and_leaves_with_the_code(tmp_path):
    """Under torchrun (RANK set) a script leaves through os._exit: its buffered output still arrives and
    its code is the exit status; without RANK it is sys.exit."""
    import apb.comm

    code = "import sys; from apb.comm import exit_rank; sys.stdout.write('report'); exit_rank(3)"
    for rank in ("0", None):
        env = clean_env(**({"RANK": rank} if rank else {}))
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert done.returncode == 3 and done.stdout == "report", (rank, done.stderr)
    with pytest.raises(SystemExit) as leaving:
        apb.comm.exit_rank(0)  # no RANK in this process
    assert leaving.value.code == 0
