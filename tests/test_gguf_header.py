"""The GGUF header reader: the `gguf` package's reader as reference; tensor data never read."""

import gguf
import numpy as np
import pytest

from fdistill_jax import convert
from fdistill_jax.data import gguf_header
from fdistill_jax.data.gguf_tokenizer import gguf_tokenizer
from fdistill_jax.data.tokenizers import load_tokenizer
from tests import _tiny_chat as chat


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
  base = tmp_path_factory.mktemp("gguf")
  spec = chat.write_chat_tokenizer(base / "tok")
  model = chat.tiny_llama(load_tokenizer(spec).vocab_size)
  return convert.export_gguf(model, str(base / "tiny.gguf"), tokenizer=spec, dtype="q8_0")


def test_header_matches_the_gguf_packages_reader(gguf_file):
  header = gguf_header.read_header(gguf_file)
  reader = gguf.GGUFReader(gguf_file)
  # GGUFReader also lists the file's own GGUF.* fields (version, counts).
  expected = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  assert sorted(header.fields) == sorted(expected)
  for key, field in expected.items():
    value = field.contents()
    if isinstance(value, float):
      assert header.fields[key] == pytest.approx(value, rel=1e-7), key
    else:
      assert header.fields[key] == value, key
    main = field.types[0]
    sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
    assert header.types[key] == (main, sub), key
  assert list(header.tensors) == [t.name for t in reader.tensors]
  for t in reader.tensors:
    info = header.tensors[t.name]
    assert info.shape == tuple(int(n) for n in reversed(t.shape.tolist())), t.name
    assert info.type == t.tensor_type
    assert header.data_offset + info.offset == t.data_offset, t.name


def test_config_and_tokenizer_come_from_a_file_cut_after_its_header(gguf_file, tmp_path):
  header = gguf_header.read_header(gguf_file)
  with open(gguf_file, "rb") as f:
    head = f.read(header.data_offset)
  cut = tmp_path / "header-only.gguf"
  cut.write_bytes(head)
  # The cut file has no tensor data: anything that reads tensors fails on it.
  with pytest.raises((ValueError, OSError, IndexError)):
    convert.load_pretrained({"kind": "gguf", "path": str(cut)})
  full = convert.pretrained_config({"kind": "gguf", "path": gguf_file})
  assert convert.pretrained_config({"kind": "gguf", "path": str(cut)}) == full
  text = chat.CHAT_TEXTS[0]
  assert gguf_tokenizer(str(cut)).encode(text) == gguf_tokenizer(gguf_file).encode(text)


def test_a_cut_header_is_named(gguf_file, tmp_path):
  with open(gguf_file, "rb") as f:
    head = f.read(200)
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(head)
  with pytest.raises(convert.ConversionError, match=r"cut\.gguf.*header ends early"):
    convert.pretrained_config({"kind": "gguf", "path": str(cut)})
  cut.write_bytes(b"GGML" + np.zeros(20, np.uint8).tobytes())
  with pytest.raises(convert.ConversionError, match=r"expected a GGUF file"):
    convert.pretrained_config({"kind": "gguf", "path": str(cut)})
