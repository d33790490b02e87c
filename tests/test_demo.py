"""scripts/demo.py's logic on a tiny random Llama (no downloads)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import clean_env, free_port, run_or_fail, script_module

from apb.eval.assets import tiny_model_and_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    with script_module(SCRIPT) as module:
        yield module


def test_exact_apb_answers_like_full_attention(demo):
    from apb import build_heads

    model, tokenizer = tiny_model_and_tokenizer()
    lines = []
    result = demo.run_demo(
        model,
        tokenizer,
        build_heads(model, hidden_size=16),
        context_tokens=900,
        num_hosts=3,
        haystack="builtin",
        max_new_tokens=6,
        exact=True,
        progress=lines.append,
    )
    assert result.expected.isdigit() and len(result.expected) == 7
    assert 850 < result.num_context_tokens <= 910  # 900 of text plus the chat header
    assert len(result.full_ids) == 6
    assert result.apb_ids == result.full_ids  # exact mode reproduces full attention
    assert len(result.host_prefill_seconds) == 3 and min(result.host_prefill_seconds) > 0
    assert result.full_prefill_seconds > 0 and result.query_pass_seconds > 0
    slowest = max(result.host_prefill_seconds)
    assert result.parallel_estimate_seconds == pytest.approx(slowest + result.query_pass_seconds)
    assert [line.split(":")[0] for line in lines] == ["full attention", "APB"]  # one line before each step


def test_main_prints_answers_prefill_times_and_the_parallel_estimate(demo, capsys):
    assert demo.main(["--tiny", "--context-tokens", "1200", "--hosts", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^full attention : .+ (right|wrong)$", out, re.M), out
    assert re.search(r"^APB, 2 hosts   : .+ (right|wrong)$", out, re.M), out
    # progress: a line before each step, and each simulated host as it finishes, before the results
    steps = [out.index("full attention: prefill of"), out.index("APB: 2 hosts simulated one after another")]
    hosts = [out.index(f"host {h} prefill:") for h in (0, 1)]
    assert steps[0] < steps[1] < hosts[0] < hosts[1] < out.index("\nquestion (")
    # prefill times: full attention's one forward, each host's, the query pass, and the estimate from them
    full = re.search(r"full attention, one forward\s*:\s*([\d.]+)s", out)
    each = re.search(
        r"APB, each simulated host\s*:\s*([\d.]+)s, ([\d.]+)s\s+\(run one after another here\)", out
    )
    query = re.search(r"APB, query pass on the last host\s*:\s*([\d.]+)s", out)
    estimate = re.search(
        r"APB with one device per host\s*:\s*([\d.]+)s\s+= slowest host ([\d.]+)s \+ query pass ([\d.]+)s",
        out,
    )
    assert full and each and query and estimate, out
    total, slowest, query_pass = map(float, estimate.groups())
    assert slowest == max(map(float, each.groups())) and query_pass == float(query.group(1))
    assert abs(total - (slowest + query_pass)) <= 0.11  # each printed to 0.1 s
    assert "an estimate from this simulation, not a measurement" in out
    assert "benchmarks/RESULTS.md" in out
    # the plan APB ran: the balanced split's blocks cover the context; APBConfig.for_length's sizes from
    # the nominal block n/2: anchor = block/4, passing = block/8
    context = re.search(r"question \((\d+) tokens of text before it\)", out)
    sizes = re.search(
        r"blocks (\d+) / (\d+) tokens \(balanced split\), anchor (\d+) \(question spliced in\), "
        r"passing (\d+) tokens per KV head",
        out,
    )
    assert context and sizes, out
    first, second, anchor, passing = map(int, sizes.groups())
    n = int(context.group(1))
    assert 1150 < n < 1260 and first + second == n and first != second
    assert (anchor, passing) == ((n // 2) // 4, (n // 2) // 8)


def test_exact_run_describes_its_plan(demo):
    from apb import build_heads

    model, tokenizer = tiny_model_and_tokenizer()
    result = demo.run_demo(
        model, tokenizer, build_heads(model, hidden_size=16), context_tokens=600, num_hosts=3,
        haystack="builtin", max_new_tokens=2, exact=True, progress=lambda line: None,
    )  # fmt: skip
    blocks = [v.block_len for v in result.plan.hosts]
    assert sum(blocks) == result.num_context_tokens
    expected = f"blocks {' / '.join(map(str, blocks))} tokens (balanced split), no anchor, every earlier"
    assert result.plan_line().startswith(expected), result.plan_line()


@pytest.mark.slow
def test_one_process_per_host_under_torchrun(tmp_path):
    """torchrun --nproc-per-node 2 scripts/demo.py --tiny --distributed: two gloo processes, one host each,
    and the measured time instead of the simulation's estimate (from a temp cwd, free port)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(SCRIPT), "--tiny", "--distributed", "--context-tokens", "1200",
        "--max-new-tokens", "4",
    ]  # fmt: skip
    done = run_or_fail(command, cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"), timeout_s=300)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert out.count("2 processes, one host each, on cpu (gloo)") == 1  # process 0 alone prints
    assert re.search(r"^full attention : .+ (right|wrong)$", out, re.M), out
    assert re.search(r"^APB, 2 hosts   : .+ (right|wrong)$", out, re.M), out
    assert "APB: 2 hosts at once, one per process" in out and "simulated" not in out
    each = re.search(r"APB, each host\s*:\s*([\d.]+)s, ([\d.]+)s\s+\(one process each, at once", out)
    measured = re.search(r"APB with one process per host\s*:\s*([\d.]+)s\s+measured: the slowest of 2", out)
    assert each and measured, out
    assert float(measured.group(1)) + 0.11 >= max(map(float, each.groups()))  # each printed to 0.1 s


def test_distributed_flag_needs_torchrun(demo):
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node N scripts/demo.py"):
        demo.main(["--tiny", "--distributed"])
