"""A tiny byte-level BPE tokenizer (512 ids) with a ChatML chat template, built offline in a second.

For tests and for ``configs/tiny.yaml``: no downloads, any text encodes (byte-level: no unknown
token), and the vocabulary is small enough for a tiny model's embedding. The merges are learned from
a fixed corpus: built-in haystack text generated with seed 0, the synthetic tasks' words and digits,
so the result is the same in every process.
"""

from __future__ import annotations

import functools
import random

from apb.data import vocab
from apb.data.haystack import generate_text
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 512
"""len(build_tiny_tokenizer()): ids are 0..511."""

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
"""Ids 0..3. EOS is ``<|im_end|>`` (the end of an assistant turn, as in ChatML instruct models)."""

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as SmolLM2-Instruct and Qwen2.5-Instruct use it (without a default system prompt)."""


def _training_corpus() -> list[str]:
    rng = random.Random(0)
    lines = generate_text(rng, 200_000).split("\n\n")
    words = list(
        vocab.KEY_ADJECTIVES
        + vocab.KEY_NOUNS
        + vocab.FIRST_NAMES
        + vocab.SURNAMES
        + vocab.CITIES
        + vocab.TEMPLATE_WORDS
    )
    lines += [" ".join(words)] * 20
    lines += [" ".join(str(rng.randrange(10**7)) for _ in range(50)) for _ in range(20)]
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh 512-id byte-level BPE tokenizer with a ChatML chat template.

    ``eos_token = "<|im_end|>"``, ``pad_token = "<|pad|>"``, no BOS. Save it with
    ``save_pretrained(dir)`` to ship it beside a tiny model.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>"]})
    assert len(tokenizer) == TINY_VOCAB_SIZE, len(tokenizer)
    return tokenizer
