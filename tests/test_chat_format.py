"""Chat-formatted text: `decode_all` shows a prompt as written; tasks open with a system turn."""

import io
import json

import pytest
import sentencepiece as spm

from configs import tasks as task_configs
from fdistill_jax.convert import export_gguf
from fdistill_jax.data import synthetic, tasks
from fdistill_jax.data.tokenizers import SentencePieceTokenizer, load_tokenizer
from tests import _tiny_chat as chat

PROMPT = "<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
PROMPT += "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
  """The chat BPE from its tokenizer.json and from a GGUF written with it."""
  folder = tmp_path_factory.mktemp("chat")
  spec = chat.write_chat_tokenizer(folder / "tok")
  hf = load_tokenizer(spec)
  path = export_gguf(chat.tiny_llama(hf.vocab_size), folder / "m.gguf", tokenizer=spec)
  return hf, load_tokenizer({"kind": "gguf", "path": path})


@pytest.mark.parametrize("which", [0, 1], ids=["hf", "gguf"])
def test_decode_all_shows_a_chat_prompt_as_written(chat_tokenizers, which):
  tok = chat_tokenizers[which]
  ids = tok.encode(PROMPT)
  assert ids.count(chat.BOS) == 3 and ids.count(chat.EOS) == 2  # <|im_start|> is BOS here
  padded = [chat.PAD] * 2 + ids + [chat.PAD] * 3
  assert tok.decode_all(padded) == PROMPT
  # decode (for generated text) still stops at EOS, and drops only a leading BOS.
  reply = tok.encode("hi<|im_end|>more")
  assert tok.decode([chat.BOS] + reply) == "hi"
  assert tok.decode(tok.encode("a<|im_start|>b")) == "a<|im_start|>b"


def test_decode_all_sentencepiece_and_word(tmp_path):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(chat.CORPUS),
    model_writer=buf,
    vocab_size=40,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
  )
  path = tmp_path / "sp.model"
  path.write_bytes(buf.getvalue())
  tok = SentencePieceTokenizer(str(path), extra_ids=2)
  ids = tok.encode("hello there")
  sentinel0 = tok.vocab_size - 1  # T5: <extra_id_0> is the highest id
  assert tok.decode_all([0, *ids, sentinel0, 1, 0]) == "hello there<extra_id_0></s>"
  assert tok.decode_all([*ids, 1, *ids]) == "hello there</s> hello there"
  word = synthetic.WordTokenizer(["hello", "there"])
  assert word.decode_all(word.encode("hello there") + [word.eos_id, word.pad_id]) == (
    "hello there </s>"
  )


def _jsonl_task(tmp_path, tok_spec, **overrides):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"source": "hello there", "target": "hi"}) + "\n")
  config = task_configs.task_config(
    "jsonl",
    files={"train": str(path)},
    tokenizer=tok_spec,
    source_template=task_configs._PRESETS["chitchat_chatml"]["source_template"],
    input_eos=False,
    **overrides,
  )
  return tasks.get_task(config)


def test_task_system_prompt(tmp_path):
  spec = chat.write_chat_tokenizer(tmp_path / "tok")
  system = task_configs._PRESETS["chitchat_chatml"]["system_template"]
  task = _jsonl_task(tmp_path, spec, system_prompt="be kind", system_template=system)
  example = next(task.examples("train"))
  assert example["source_text"] == PROMPT
  assert task.tokenizer.decode_all(example["inputs"]) == PROMPT
  assert task.unwrap_source(example["source_text"]) == "hello there"
  # No system prompt: no system turn, whatever the template.
  bare = _jsonl_task(tmp_path, spec, system_template=system)
  assert (
    next(bare.examples("train"))["source_text"]
    == PROMPT[len("<|im_start|>system\nbe kind<|im_end|>\n") :]
  )
  with pytest.raises(ValueError, match=r"system_prompt is set, so system_template must say"):
    _jsonl_task(tmp_path, spec, system_prompt="be kind")


def test_presets_keep_their_own_values():
  assert task_configs.task_config("wmt16_en_ro").source_prefix == "translate English to Romanian: "
  chatml = task_configs.task_config("chitchat_chatml", system_prompt="chat")
  assert chatml.system_template.startswith("<|im_start|>system\n")
  assert task_configs.task_config("synthetic").system_prompt == ""
