"""A tiny chat model for export/generate tests: a byte-level BPE with ChatML markers + LLaMA."""

import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fdistill_jax import models as project_models

CORPUS = [
  "hello there how are you today",
  "i am fine thanks and you",
  "what is the capital of france",
  "the capital of france is paris",
  "do you like music or films",
  "i like long walks 123 and 4567",
] * 4
# pad, bos, eos: the ChatML markers are the ids the model uses.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD, BOS, EOS = 0, 1, 2
CHAT_TEXTS = [
  "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
  "the capital of france is paris 42",
  "unseen words: zebra quux!",
]


def write_chat_tokenizer(folder, digits=True) -> dict:
  """A byte-level BPE tokenizer.json in `folder` (SmolLM's digit split if `digits`); its spec."""
  tok = tokenizers.Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if digits
    else byte_level
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=list(SPECIALS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS, trainer)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(str(folder), "tokenizer.json"))
  return {"kind": "hf", "path": str(folder), "eos_id": EOS, "pad_id": PAD, "bos_id": BOS}


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
  """A random 2-layer LLaMA (grouped-query, untied head) with the chat tokenizer's ids."""
  cfg = project_models.get_preset(
    "llama-tiny", vocab_size=vocab_size, pad_id=PAD, eos_id=EOS, **overrides
  )
  return project_models.build_model(cfg, rngs=seed)
