"""scripts/demo.py's logic on a tiny random Llama (no downloads)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import script_module

from apb.eval.assets import tiny_model_and_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    with script_module(SCRIPT) as module:
        yield module


def test_exact_apb_answers_like_full_attention(demo):
    from apb import build_heads

    model, tokenizer = tiny_model_and_tokenizer()
    result = demo.run_demo(
        model,
        tokenizer,
        build_heads(model, hidden_size=16),
        context_tokens=900,
        num_hosts=3,
        haystack="builtin",
        max_new_tokens=6,
        exact=True,
    )
    assert result.expected.isdigit() and len(result.expected) == 7
    assert 850 < result.num_context_tokens <= 910  # 900 of text plus the chat header
    assert len(result.full_ids) == 6
    assert result.apb_ids == result.full_ids  # exact mode reproduces full attention
    assert len(result.host_prefill_seconds) == 3


def test_main_prints_both_answers_and_times(demo, capsys):
    assert demo.main(["--tiny", "--context-tokens", "1200", "--hosts", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "full attention :" in out
    assert "APB, 2 hosts   :" in out
    assert "per-host prefill:" in out
    # 2 hosts share the context equally; APBConfig.for_length: anchor = block/4, passing = block/8
    context = re.search(r"question \((\d+) tokens of text before it\)", out)
    sizes = re.search(
        r"block (\d+) tokens per host, anchor (\d+) \(question spliced in\), passing (\d+) ", out
    )
    assert context and sizes, out
    block, anchor, passing = map(int, sizes.groups())
    assert 1150 < int(context.group(1)) < 1260 and block == int(context.group(1)) // 2
    assert (anchor, passing) == (block // 4, block // 8)
