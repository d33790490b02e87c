"""The run folder keeps its tokenised samples: a resumed run with the same data settings reads them back
instead of making them again; other settings (or a damaged file) make them afresh."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from apb.train import trainer
from apb.train.config import load_config

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _config(tmp_path, **data):
    overrides = {"output_dir": str(tmp_path / "run"), "data.sources[0].num_samples": 6}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    return load_config(TINY, overrides)


def test_samples_are_cached_and_reused(tmp_path, monkeypatch):
    config = _config(tmp_path)
    tokenizer = trainer.build_tokenizer(config)
    made = trainer.cached_tokenized_samples(config, tokenizer, config.output_dir)
    cache = Path(config.output_dir) / trainer.SAMPLES_CACHE
    assert cache.is_file() and len(made) == 6

    def no_making(*args, **kwargs):
        raise AssertionError("samples were made again")

    monkeypatch.setattr(trainer, "load_tokenized_samples", no_making)
    again = trainer.cached_tokenized_samples(config, tokenizer, config.output_dir)
    assert [s.input_ids for s in again] == [s.input_ids for s in made]
    assert [(s.task, s.num_truncated) for s in again] == [(s.task, s.num_truncated) for s in made]
    # `workers` changes nothing in the samples, so it does not invalidate the cache
    with_workers = _config(tmp_path)
    with_workers.data.sources[0]["workers"] = 2
    assert trainer.data_fingerprint(with_workers, tokenizer) == trainer.data_fingerprint(config, tokenizer)


def test_other_settings_or_a_damaged_cache_make_the_samples_again(tmp_path):
    config = _config(tmp_path)
    tokenizer = trainer.build_tokenizer(config)
    first = trainer.cached_tokenized_samples(config, tokenizer, config.output_dir)
    shorter = _config(tmp_path, max_length=384)
    assert trainer.data_fingerprint(shorter, tokenizer) != trainer.data_fingerprint(config, tokenizer)
    remade = trainer.cached_tokenized_samples(shorter, tokenizer, shorter.output_dir)
    assert max(len(s) for s in remade) <= 384 < max(len(s) for s in first)
    cache = Path(config.output_dir) / trainer.SAMPLES_CACHE
    with gzip.open(cache, "rt") as f:
        assert json.load(f)["fingerprint"] == trainer.data_fingerprint(shorter, tokenizer)
    cache.write_bytes(b"not gzip")
    again = trainer.cached_tokenized_samples(shorter, tokenizer, shorter.output_dir)
    assert [s.input_ids for s in again] == [s.input_ids for s in remade]
    with gzip.open(cache, "rt") as f:  # rewritten
        assert len(json.load(f)["samples"]) == 6


def test_ranks_that_do_not_write_leave_no_file(tmp_path):
    config = _config(tmp_path)
    tokenizer = trainer.build_tokenizer(config)
    trainer.cached_tokenized_samples(config, tokenizer, config.output_dir, write=False)
    assert not (Path(config.output_dir) / trainer.SAMPLES_CACHE).exists()


@pytest.mark.parametrize("bad", [{"fingerprint": "x", "samples": []}, {"samples": [{"nope": 1}]}])
def test_foreign_cache_content_is_ignored(tmp_path, bad):
    config = _config(tmp_path)
    tokenizer = trainer.build_tokenizer(config)
    cache = Path(config.output_dir) / trainer.SAMPLES_CACHE
    cache.parent.mkdir(parents=True)
    with gzip.open(cache, "wt") as f:
        json.dump(bad, f)
    assert len(trainer.cached_tokenized_samples(config, tokenizer, config.output_dir)) == 6
