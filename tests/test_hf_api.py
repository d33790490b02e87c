"""The Hugging Face–shaped surface of `apb`: `chat_inputs`, `generate`'s EOS / streamer / return value,
rows of different lengths, and `APBModel.save_pretrained` / `from_pretrained` / `push_to_hub`."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stdout

import huggingface_hub
import pytest
import torch
from apb.data import Sample, build_tiny_tokenizer, tokenize_sample
from conftest import tiny_model
from test_hub import RecordingHfApi

import apb
from apb import APBConfig, APBModel, build_heads, chat_inputs
from apb.adapter import CONFIG_NAME, WEIGHTS_NAME

DOCUMENT = (
    "The harbour was quiet that morning. " * 12 + "\n\nThe magic number is 4417.\n\nBoats left at noon."
)
QUESTION = "What is the magic number?"

LLAMA3_STYLE = (  # trims the content and starts with a BOS-like token, as Llama 3's template does
    "{{ '<|endoftext|>' }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _conversation(question: str = QUESTION, document: str = DOCUMENT) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi. Send the document."},
        {"role": "user", "content": f"{document}\n\n{question}"},
    ]


# ---------------------------------------------------------------------------------------------- chat_inputs


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["chatml", "trimming-with-bos"])
@pytest.mark.parametrize("give_question", [False, True])
def test_chat_inputs_concatenate_to_the_chat_template(tokenizer, template, give_question):
    messages = _conversation()
    kwargs = {"chat_template": template} if template else {}
    context, query = chat_inputs(tokenizer, messages, question=QUESTION if give_question else None, **kwargs)
    assert context + query == _template_ids(tokenizer, messages, **kwargs)
    # the cut: the document (with the earlier turns) is context; the question and what follows is query
    assert tokenizer.decode(context).rstrip().endswith("Boats left at noon.")
    assert "Hello." in tokenizer.decode(context)
    assert tokenizer.decode(query).lstrip().startswith(QUESTION)
    assert tokenizer.decode(query).rstrip().endswith("assistant")


def test_chat_inputs_cut_where_training_cuts(tokenizer):
    sample = Sample(context=DOCUMENT, question=QUESTION, answer="4417")
    tokenized = tokenize_sample(sample, tokenizer)
    message = {"role": "user", "content": f"{DOCUMENT.strip()}\n\n{QUESTION}"}
    assert chat_inputs(tokenizer, [message]) == (tokenized.context_ids, tokenized.question_ids)


def test_chat_inputs_batch_and_tensors(tokenizer):
    batch = [_conversation(), _conversation("Which number is magic?", document=DOCUMENT + " More.")]
    contexts, queries = chat_inputs(tokenizer, batch)
    assert len(contexts) == len(queries) == 2
    for messages, context, query in zip(batch, contexts, queries, strict=True):
        assert context + query == _template_ids(tokenizer, messages)
    with pytest.raises(ValueError, match="return_tensors='pt' needs equal lengths"):
        chat_inputs(tokenizer, batch, return_tensors="pt")
    context, query = chat_inputs(tokenizer, _conversation(), return_tensors="pt")
    assert context.dtype == query.dtype == torch.long and context.shape[0] == query.shape[0] == 1
    assert context[0].tolist() + query[0].tolist() == _template_ids(tokenizer, _conversation())


def test_chat_inputs_refusals(tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        no_template = copy.deepcopy(tokenizer)
        no_template.chat_template = None
        chat_inputs(no_template, _conversation())
    with pytest.raises(ValueError, match="last message must be the user's"):
        chat_inputs(tokenizer, [*_conversation(), {"role": "assistant", "content": "4417"}])
    with pytest.raises(ValueError, match="does not end the last user message"):
        chat_inputs(tokenizer, _conversation(), question="Who?")
    with pytest.raises(ValueError, match="no blank line"):
        chat_inputs(tokenizer, [{"role": "user", "content": "one paragraph only"}])
    with pytest.raises(ValueError, match="no document before the question"):
        chat_inputs(tokenizer, [{"role": "user", "content": QUESTION}], question=QUESTION)
    with pytest.raises(ValueError, match="list of .* dicts"):
        chat_inputs(tokenizer, "text")


# ---------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    """A tiny random Llama over the tiny tokenizer's vocabulary, with APB and a chat prompt."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    context, query = chat_inputs(tokenizer, _conversation())
    return APBModel(model), context, query


SPARSE = APBConfig(
    anchor_len=40,
    passing_len=12,
    split="equal",
    selector="query_attention",
    query_in_anchor=True,
    query_offset=4,
)


def test_generate_returns_only_new_ids_and_takes_eos_from_generation_config(chat_model):
    apbm, context, query = chat_model
    free = apbm.generate(context, query, config=SPARSE, num_hosts=2, max_new_tokens=6, eos_token_id=[])
    assert free.shape == (1, 6)  # the new ids only, not the prompt
    stop_at = int(free[0, 2])
    first = free[0].tolist().index(stop_at)
    saved = apbm.model.generation_config.eos_token_id
    try:
        apbm.model.generation_config.eos_token_id = [stop_at]
        ids = apbm.generate(context, query, config=SPARSE, num_hosts=2, max_new_tokens=6)
        assert ids[0].tolist() == free[0, : first + 1].tolist()  # stopped at the config's EOS
        apbm.model.generation_config.eos_token_id = None
        assert apbm.generate(context, query, config=SPARSE, num_hosts=2, max_new_tokens=6).shape == (1, 6)
    finally:
        apbm.model.generation_config.eos_token_id = saved


class RecordingStreamer:
    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value)

    def end(self):
        self.ended += 1


def test_streamer_gets_the_prompt_then_each_token_then_end(chat_model):
    apbm, context, query = chat_model
    streamer = RecordingStreamer()
    ids = apbm.generate(
        context, query, config=SPARSE, num_hosts=2, max_new_tokens=5, eos_token_id=[], streamer=streamer
    )
    assert streamer.ended == 1
    assert streamer.puts[0].tolist() == [context + query]  # the prompt first, as transformers does
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), ids)
    assert all(p.device.type == "cpu" for p in streamer.puts)


def test_streamer_ends_when_generation_fails(chat_model):
    """A consumer iterating a TextIteratorStreamer in another thread must not wait for ever."""

    class Failing(RecordingStreamer):
        def put(self, value):
            super().put(value)
            if len(self.puts) == 3:
                raise RuntimeError("consumer gone")

    apbm, context, query = chat_model
    streamer = Failing()
    with pytest.raises(RuntimeError, match="consumer gone"):
        apbm.generate(context, query, config=SPARSE, num_hosts=2, max_new_tokens=5, streamer=streamer)
    assert streamer.ended == 1


def test_transformers_text_streamer_prints_the_answer(chat_model, tokenizer):
    from transformers import TextStreamer

    apbm, context, query = chat_model
    printed = io.StringIO()
    with redirect_stdout(printed):
        ids = apbm.generate(
            context,
            query,
            config=SPARSE,
            num_hosts=2,
            max_new_tokens=8,
            eos_token_id=[],
            streamer=TextStreamer(tokenizer, skip_prompt=True),
        )
    assert printed.getvalue().strip() == tokenizer.decode(ids[0]).strip()
    assert "harbour" not in printed.getvalue()  # the prompt was skipped


def test_streamer_refusals(chat_model):
    apbm, context, query = chat_model
    with pytest.raises(TypeError, match="streamer must have put"):
        apbm.generate(context, query, max_new_tokens=2, streamer=object())
    with pytest.raises(ValueError, match="cannot be streamed together"):
        apbm.generate([context, context[:-3]], [query, query], max_new_tokens=2, streamer=RecordingStreamer())


# ---------------------------------------------------------------------------------------------- ragged rows


def _ragged(context, query):
    """Three rows: contexts and queries of different lengths."""
    contexts = [context, context[: len(context) - 17], context[5:]]
    queries = [query, query[2:], query]
    return contexts, queries


def test_prefill_rows_of_different_lengths_left_padded(chat_model):
    apbm, context, query = chat_model
    contexts, queries = _ragged(context, query)
    logits = apbm.prefill(contexts, queries, config=SPARSE, num_hosts=2)
    longest = max(len(q) for q in queries)
    assert logits.shape == (3, longest, apbm.vocab_size)
    for row, (c, q) in enumerate(zip(contexts, queries, strict=True)):
        alone = apbm.prefill(c, q, config=SPARSE, num_hosts=2)[0]
        assert torch.equal(logits[row, longest - len(q) :], alone)
        assert not logits[row, : longest - len(q)].any()  # zeros on the left


def test_generate_rows_of_different_lengths_padded_with_eos(chat_model):
    apbm, context, query = chat_model
    contexts, queries = _ragged(context, query)
    kwargs = dict(config=SPARSE, num_hosts=2, max_new_tokens=6)
    free = [
        apbm.generate(c, q, eos_token_id=[], **kwargs)[0].tolist()
        for c, q in zip(contexts, queries, strict=True)
    ]
    eos = next(token for token in free[0] if token not in free[1])  # row 0 stops early, row 1 does not
    ids, logits = apbm.generate(contexts, queries, eos_token_id=[eos, 7], return_logits=True, **kwargs)
    lengths = []
    for row, (c, q) in enumerate(zip(contexts, queries, strict=True)):
        alone, alone_logits = apbm.generate(c, q, eos_token_id=[eos, 7], return_logits=True, **kwargs)
        steps = alone.shape[1]
        lengths.append(steps)
        assert ids[row, :steps].tolist() == alone[0].tolist()
        assert (ids[row, steps:] == eos).all()  # padded with the first EOS id
        assert torch.equal(logits[row, :steps], alone_logits[0]) and not logits[row, steps:].any()
    assert ids.shape[1] == lengths[1] == 6 > lengths[0]
    padded = apbm.generate(contexts, queries, eos_token_id=[eos], pad_token_id=3, **kwargs)
    assert (padded[0, lengths[0] :] == 3).all()


def test_rows_of_different_lengths_refusals(chat_model):
    apbm, context, query = chat_model
    with pytest.raises(ValueError, match="batch sizes differ"):
        apbm.prefill([context, context[1:]], [query])
    with pytest.raises(ValueError, match="row 1: .*outside the model's vocabulary"):
        apbm.generate([context, [*context[2:], 10**6]], [query, query], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------- save / load / push


@pytest.fixture(scope="module")
def with_heads():
    model = tiny_model("llama")
    torch.manual_seed(1)
    return APBModel(model, build_heads(model, hidden_size=16))


def _sparse_logits(apbm) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, 128, (2, 96), generator=generator)
    query = torch.randint(0, 128, (2, 4), generator=generator)
    return apbm.prefill(context, query, config=APBConfig(anchor_len=8, passing_len=4), num_hosts=3)


def test_save_pretrained_then_load_gives_identical_logits(with_heads, tmp_path):
    folder = with_heads.save_pretrained(tmp_path / "adapter", training={"steps": 7})
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
    model = tiny_model("llama")  # a fresh copy of the same base model
    loaded = apb.load(model, folder)
    assert torch.equal(_sparse_logits(loaded), _sparse_logits(with_heads))
    assert loaded.adapter_config.training == {"steps": 7}
    # from_pretrained is apb.load; a second save keeps what the first adapter recorded
    again = APBModel.from_pretrained(tiny_model("llama"), folder)
    assert torch.equal(_sparse_logits(again), _sparse_logits(with_heads))
    second = again.save_pretrained(tmp_path / "second")
    assert (second / CONFIG_NAME).read_text() == (folder / CONFIG_NAME).read_text()


def test_save_pretrained_keeps_the_trained_layout(with_heads, tmp_path):
    layout = {"query_in_anchor": True, "query_offset": 2, "pool_kernel": 3}
    first = with_heads.save_pretrained(tmp_path / "a", apb_defaults=layout)
    loaded = apb.load(tiny_model("llama"), first)
    assert loaded.default_config(4096, 4).query_offset == 2
    saved = apb.load(tiny_model("llama"), loaded.save_pretrained(tmp_path / "b"))
    assert saved.adapter_config.apb == layout == loaded.adapter_config.apb


def test_save_pretrained_without_heads_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no retaining heads to save"):
        apb.load(tiny_model("llama")).save_pretrained(tmp_path / "x")


@pytest.fixture
def recording_api(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


def test_push_to_hub_on_the_model(with_heads, recording_api, tmp_path):
    result = with_heads.push_to_hub("user/heads", private=True, token="hf_x", training={"steps": 7})
    assert result == "commit-info"
    assert [name for name, _ in recording_api] == ["init", "create_repo", "upload_folder"]
    assert recording_api[1][1]["private"] is True and recording_api[0][1] == {"token": "hf_x"}
    files = recording_api[2][1]["files"]
    assert sorted(files) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    # the same bytes save_pretrained writes: one writer for both
    folder = with_heads.save_pretrained(tmp_path / "adapter", training={"steps": 7})
    assert files[WEIGHTS_NAME] == (folder / WEIGHTS_NAME).read_bytes()
    assert files[CONFIG_NAME] == (folder / CONFIG_NAME).read_bytes()
