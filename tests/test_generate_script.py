"""scripts/generate.py: chat prompts through `apb.chat_inputs`, plain ones otherwise, and a --tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from apb.data import build_tiny_tokenizer
from conftest import dear_attention_host_times, script_module

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "generate.py"


@pytest.fixture(scope="module")
def generate():
    with script_module(SCRIPT) as module:
        yield module


def test_chat_prompt_is_the_chat_template_cut_by_chat_inputs(generate):
    tokenizer = build_tiny_tokenizer()
    document, question = "The secret word is apple. " * 20, "What is the secret word?"
    context, query, used = generate.prompt_ids(tokenizer, document, question)
    assert used == "chat"
    message = {"role": "user", "content": f"{document.strip()}\n\n{question}"}
    whole = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True)
    whole = whole["input_ids"] if isinstance(whole, dict) or hasattr(whole, "keys") else whole
    assert context + query == list(whole)
    assert question in tokenizer.decode(query) and question not in tokenizer.decode(context)
    # plain on request: the document, then "Question: ... Answer:"
    context, query, used = generate.prompt_ids(tokenizer, document, question, "plain")
    assert used == "plain" and tokenizer.decode(query).strip().endswith("Answer:")


def test_chat_format_needs_a_chat_template(generate):
    tokenizer = generate.ByteTokenizer()
    assert generate.prompt_ids(tokenizer, "doc", "q?")[2] == "plain"  # auto: no template, plain
    with pytest.raises(ValueError, match="no chat template"):
        generate.prompt_ids(tokenizer, "doc", "q?", "chat")


def test_tiny_run_prints_the_answer_and_host_times(generate, capsys):
    generate.main(["--tiny", "--hosts", "2", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "(plain prompt), mode apb, 2 hosts" in out
    assert "prefill host 0:" in out and "prefill host 1:" in out and "answer (" in out
    # the time to the first token and the decoding rate after it, for APB and for the unmodified model
    for argv in ([], ["--mode", "full"]):
        generate.main(["--tiny", "--max-new-tokens", "3", *argv])
        out = capsys.readouterr().out
        num_tokens = int(out.split("answer (", 1)[1].split(" tokens", 1)[0])  # fewer at an early EOS
        assert "first token after " in out, out
        assert (f", then {num_tokens - 1} tokens at " in out) == (num_tokens > 1), out


def test_token_clock_reads_the_streamer_calls(generate, monkeypatch):
    ticks = iter([10.0, 10.5, 11.0, 11.5])  # the clock's start, then one tick per token (none for the prompt)
    monkeypatch.setattr(generate.time, "perf_counter", lambda: next(ticks))
    clock = generate.TokenClock()
    assert clock.summary() is None
    clock.put("prompt")
    clock.put([1])
    assert clock.summary() == "first token after 0.50 s (prefill and query)"
    clock.put([2])
    clock.put([3])
    clock.end()
    assert clock.summary() == "first token after 0.50 s (prefill and query), then 2 tokens at 2.0 tokens/s"


def test_split_flag_picks_the_host_blocks(generate, capsys):
    def blocks(argv):
        generate.main(["--tiny", "--hosts", "3", "--max-new-tokens", "1", *argv])
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.startswith("host blocks: "))
        context = int(out.split("context ", 1)[1].split(" tokens", 1)[0])
        sizes = [int(b) for b in line.removeprefix("host blocks: ").split(" tokens")[0].split(" / ")]
        assert sum(sizes) == context, out
        return sizes, line

    balanced, line = blocks([])  # the library's default
    assert "(balanced split)" in line and len(set(balanced)) > 1
    equal, line = blocks(["--split", "equal"])
    assert "(equal split)" in line and max(equal) - min(equal) <= 1
    exact, line = blocks(["--mode", "exact", "--split", "equal"])
    assert "(equal split)" in line and exact == equal
    with pytest.raises(SystemExit):
        generate.parse_args(["--tiny", "--split", "zigzag"])


def test_compiled_layers_give_the_same_answer(generate, capsys):
    """--compile-layers compiles every layer's norms, MLP and attention module before generating; the tokens are the same
    (aot_eager here: no C++ compiler needed, the same graphs as inductor would compile)."""
    argv = ["--tiny", "--hosts", "2", "--max-new-tokens", "3"]
    generate.main(argv)
    eager = capsys.readouterr().out
    generate.main([*argv, "--compile-layers", "aot_eager"])
    compiled = capsys.readouterr().out

    def answers(out):  # "answer (3 tokens, 0.25s total): '...'" -> the text, without the time
        return [line.split("): ", 1)[1] for line in out.splitlines() if line.startswith("answer (")]

    # 4 layers x (2 norms, attention, MLP) + the final norm
    assert "compile_layers: 17 modules (aot_eager)" in compiled
    assert "compile_layers" not in eager
    assert answers(eager) and answers(eager) == answers(compiled)
    with pytest.raises(SystemExit):
        generate.parse_args([*argv, "--compile-layers", "no-such-backend"])


def test_calibrate_fits_the_split_and_prints_the_weight_to_reuse(generate, capsys, monkeypatch):
    """--calibrate TOKENS fits the balanced split on this machine before generating (the host times stand in
    fixed here: a tiny model's CPU times are refused as noise) and prints the --attention-weight to pass next
    time, which gives the same blocks without calibrating."""
    from apb import APBModel

    calls = []
    slow_attention_times = dear_attention_host_times(calls)  # attention 3x dearer per FLOP than linear work

    def blocks(out: str) -> str:
        return next(x for x in out.splitlines() if x.startswith("host blocks: "))

    argv = ["--tiny", "--hosts", "3", "--max-new-tokens", "1", "--backend", "reference"]
    generate.main(argv)
    default = blocks(capsys.readouterr().out)
    monkeypatch.setattr(APBModel, "host_times", slow_attention_times)
    generate.main([*argv, "--calibrate", "4096"])
    out = capsys.readouterr().out
    assert [(n, h, backend) for n, h, _, backend in calls] == [(4096, 3, "reference")]
    assert "calibrated: attention weight 3.000" in out and "pass --attention-weight 3.000" in out
    assert blocks(out) != default  # dearer attention: the early hosts take more of the context
    generate.main([*argv, "--attention-weight", "3.0"])
    assert blocks(capsys.readouterr().out) == blocks(out) and len(calls) == 1

    def noise(self, *args, **kwargs):  # times that fall as the work grows: fixed costs and noise dominate
        return [(t, p, 1.0 / (1.0 + p / 1e6)) for t, p, _ in slow_attention_times(self, *args, **kwargs)]

    monkeypatch.setattr(APBModel, "host_times", noise)
    with pytest.raises(SystemExit, match="--calibrate 4096: .*time a longer context"):
        generate.main([*argv, "--calibrate", "4096"])
    for bad in (
        ["--calibrate", "4096", "--attention-weight", "1"],
        ["--calibrate", "4096", "--mode", "star"],
    ):
        with pytest.raises(SystemExit):
            generate.parse_args(["--tiny", *bad])
    with pytest.raises(SystemExit):
        generate.parse_args(["--tiny", "--attention-weight", "0"])


def test_cuda_graphs_option(generate, capsys):
    """--cuda-graphs off runs eager steps anywhere; on runs graphed steps on a GPU and is refused for a model
    on the CPU (by generate itself)."""
    generate.main(["--tiny", "--hosts", "2", "--max-new-tokens", "3", "--cuda-graphs", "off"])
    assert "answer (" in capsys.readouterr().out
    on = ["--tiny", "--hosts", "2", "--max-new-tokens", "3", "--cuda-graphs", "on"]
    if torch.cuda.is_available():  # the script puts the model on the GPU: graphed steps run
        generate.main(on)
        assert "answer (" in capsys.readouterr().out
    else:
        with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a GPU"):
            generate.main(on)
    with pytest.raises(SystemExit):
        generate.main(["--tiny", "--cuda-graphs", "sometimes"])
