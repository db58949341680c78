"""Tokenizers shared by the data tests, and a private tokenization cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from peftkit.data.prompting import PLAIN_TEMPLATE

SMOL = Path.home() / ".cache" / "peftkit" / "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def smol():
    """SmolLM2's tokenizer: ChatML template, pad == eos == <|im_end|>."""
    if not (SMOL / "tokenizer.json").is_file():
        pytest.skip("the embedded model has not been converted on this machine")
    return AutoTokenizer.from_pretrained(str(SMOL))


@pytest.fixture(scope="module")
def plain():
    """A tiny byte-level BPE tokenizer with BOS <s>, EOS </s> and no chat template, built offline."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([PLAIN_TEMPLATE.format(prompt="say hello to the world") + "hello world"] * 3, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


