"""Where each project parameter lives in a Hugging Face checkpoint, per family.

One table serves both directions (`load_hf` reads through it, `export_hf`
writes through it), so import and export cannot drift apart. An `Entry`
ties one project parameter (dotted path, see the parameter trees in
`fdistill_jax/models/encdec.py` and `decoder.py`) to one HF tensor:

- `transpose`: a PyTorch Linear weight `[out, in]` is the transpose of a
  project kernel `[in, out]`; after it, only a reshape separates the two
  (attention kernels split the head axis out: query/key/value `[D, H, Dh]`,
  out `[H, Dh, D]`). GPT-2's Conv1D weights are already `[in, out]`.
- `part`/`parts`: GPT-2 packs q, k, v into one `c_attn` tensor along its
  last axis; each is one part of three.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fdistill_jax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: str  # dotted project parameter path
  hf: str  # Hugging Face tensor name
  hf_shape: tuple[int, ...]  # the full HF tensor's shape
  ours_shape: tuple[int, ...]  # the project parameter's shape
  transpose: bool = False  # HF holds the transpose (Linear [out, in])
  part: int = 0  # which slice along the last axis when `parts` > 1
  parts: int = 1

  def part_shape(self) -> tuple[int, ...]:
    return self.hf_shape[:-1] + (self.hf_shape[-1] // self.parts,)

  def to_ours(self, hf_tensor: np.ndarray) -> np.ndarray:
    x = hf_tensor
    if self.parts > 1:
      n = self.hf_shape[-1] // self.parts
      x = x[..., self.part * n : (self.part + 1) * n]
    return (x.T if self.transpose else x).reshape(self.ours_shape)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    """This entry's slice of the HF tensor (the whole tensor when `parts == 1`)."""
    shape = self.part_shape()
    if self.transpose:
      return ours.reshape(shape[::-1]).T
    return ours.reshape(shape)


class _Table:
  """Collects entries; helpers name the common HF module shapes."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self.entries: list[Entry] = []

  def for_config(self, cfg: ModelConfig) -> _Table:
    """A table adding to the same entries with another config's sizes (the encoder's)."""
    table = _Table(cfg)
    table.entries = self.entries
    return table

  def add(self, ours, hf, hf_shape, ours_shape=None, transpose=False, part=0, parts=1):
    """`ours_shape` defaults to the HF shape (transposed if `transpose`)."""
    hf_shape = tuple(hf_shape)
    if ours_shape is None:
      ours_shape = hf_shape[::-1] if transpose else hf_shape
    self.entries.append(Entry(ours, hf, hf_shape, tuple(ours_shape), transpose, part, parts))

  def linear(self, ours, hf, d_in, d_out, bias, ours_in=None, ours_out=None):
    """A Linear `[out, in]`; `ours_in`/`ours_out` split the project kernel's axes."""
    ours_in, ours_out = ours_in or (d_in,), ours_out or (d_out,)
    self.add(f"{ours}.kernel", f"{hf}.weight", (d_out, d_in), ours_in + ours_out, transpose=True)
    if bias:
      self.add(f"{ours}.bias", f"{hf}.bias", (d_out,), ours_out)

  def norm(self, ours, hf, bias):
    d = self.cfg.d_model
    self.add(f"{ours}.scale", f"{hf}.weight", (d,))
    if bias:
      self.add(f"{ours}.bias", f"{hf}.bias", (d,))

  def attention(self, ours, hf, names, kv_heads, bias):
    d, h, dh = self.cfg.d_model, self.cfg.num_heads, self.cfg.dim_per_head
    heads_of = (h, kv_heads, kv_heads)
    for slot, name, heads in zip(("query", "key", "value"), names[:3], heads_of, strict=True):
      self.linear(f"{ours}.{slot}", f"{hf}.{name}", d, heads * dh, bias, ours_out=(heads, dh))
    self.linear(f"{ours}.out", f"{hf}.{names[3]}", h * dh, d, bias, ours_in=(h, dh))

  def mlp(self, ours, hf, names, bias):
    d, f = self.cfg.d_model, self.cfg.d_ff
    slots = ("wi_0", "wi_1") if len(names) == 3 else ("wi",)
    for slot, name in zip(slots, names[:-1], strict=True):
      self.linear(f"{ours}.{slot}", f"{hf}.{name}", d, f, bias)
    self.linear(f"{ours}.wo", f"{hf}.{names[-1]}", f, d, bias)


def t5_layout(cfg: ModelConfig, head_from_embedding: bool = False) -> list[Entry]:
  """T5 / T5 v1.1. `head_from_embedding`: an untied project head read from `shared`
  (transformers 5 saves T5 v1.1 tied but unscaled)."""
  t = _Table(cfg)
  d, v = cfg.d_model, cfg.vocab_size
  gated = cfg.activation in ("gated-gelu", "swiglu")
  mlp = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  t.add("embed.embedding", "shared.weight", (v, d))
  for stack, n, c in (
    ("encoder", cfg.encoder_layers, cfg.encoder_config),
    ("decoder", cfg.num_layers, cfg),
  ):
    s, h = t.for_config(c), c.num_heads
    s.add(
      f"{stack}.rel_bias.embedding",
      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      (cfg.relative_attention_num_buckets, h),
    )
    s.norm(f"{stack}.final_norm", f"{stack}.final_layer_norm", False)
    for i in range(n):
      hl, ours = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
      s.attention(f"{ours}.self_attn", f"{hl}.0.SelfAttention", "qkvo", h, False)
      s.norm(f"{ours}.attn_norm", f"{hl}.0.layer_norm", False)
      ff = 1
      if stack == "decoder":
        s.attention(f"{ours}.cross_attn", f"{hl}.1.EncDecAttention", "qkvo", h, False)
        s.norm(f"{ours}.cross_norm", f"{hl}.1.layer_norm", False)
        ff = 2
      s.mlp(f"{ours}.mlp", f"{hl}.{ff}.DenseReluDense", mlp, False)
      s.norm(f"{ours}.mlp_norm", f"{hl}.{ff}.layer_norm", False)
  if not cfg.tie_embeddings:
    head = "shared.weight" if head_from_embedding else "lm_head.weight"
    t.add("lm_head.kernel", head, (v, d), transpose=True)
  return t.entries


def bart_layout(cfg: ModelConfig, prefix: str = "model.") -> list[Entry]:
  """BART / mBART (`normalize_before` adds the final norms)."""
  t = _Table(cfg)
  d, v = cfg.d_model, cfg.vocab_size
  names = ("q_proj", "k_proj", "v_proj", "out_proj")
  t.add("embed.embedding", f"{prefix}shared.weight", (v, d))
  # The encoder's heads and MLP width may differ from the decoder's (cross
  # attention has the decoder's heads).
  for stack, n, c in (
    ("encoder", cfg.encoder_layers, cfg.encoder_config),
    ("decoder", cfg.num_layers, cfg),
  ):
    hs, s = f"{prefix}{stack}", t.for_config(c)
    s.add(
      f"{stack}.positions.embedding", f"{hs}.embed_positions.weight", (cfg.max_positions + 2, d)
    )
    s.norm(f"{stack}.embed_norm", f"{hs}.layernorm_embedding", True)
    if cfg.normalize_before:
      s.norm(f"{stack}.final_norm", f"{hs}.layer_norm", True)
    for i in range(n):
      hl, ours = f"{hs}.layers.{i}", f"{stack}.layers.{i}"
      s.attention(f"{ours}.self_attn", f"{hl}.self_attn", names, c.num_heads, True)
      s.norm(f"{ours}.attn_norm", f"{hl}.self_attn_layer_norm", True)
      if stack == "decoder":
        s.attention(f"{ours}.cross_attn", f"{hl}.encoder_attn", names, c.num_heads, True)
        s.norm(f"{ours}.cross_norm", f"{hl}.encoder_attn_layer_norm", True)
      s.mlp(f"{ours}.mlp", hl, ("fc1", "fc2"), True)
      s.norm(f"{ours}.mlp_norm", f"{hl}.final_layer_norm", True)
  if not cfg.tie_embeddings:
    t.add("lm_head.kernel", "lm_head.weight", (v, d), transpose=True)
  return t.entries


def llama_layout(cfg: ModelConfig) -> list[Entry]:
  t = _Table(cfg)
  d, v = cfg.d_model, cfg.vocab_size
  t.add("embed.embedding", "model.embed_tokens.weight", (v, d))
  t.norm("final_norm", "model.norm", False)
  for i in range(cfg.num_layers):
    hl, ours = f"model.layers.{i}", f"layers.{i}"
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    t.attention(f"{ours}.self_attn", f"{hl}.self_attn", names, cfg.kv_heads, cfg.attention_bias)
    t.norm(f"{ours}.attn_norm", f"{hl}.input_layernorm", False)
    t.mlp(f"{ours}.mlp", f"{hl}.mlp", ("gate_proj", "up_proj", "down_proj"), False)
    t.norm(f"{ours}.mlp_norm", f"{hl}.post_attention_layernorm", False)
  if not cfg.tie_embeddings:
    t.add("lm_head.kernel", "lm_head.weight", (v, d), transpose=True)
  return t.entries


def gpt2_layout(cfg: ModelConfig, prefix: str = "transformer.") -> list[Entry]:
  t = _Table(cfg)
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  h, dh = cfg.num_heads, cfg.dim_per_head
  t.add("embed.embedding", f"{prefix}wte.weight", (v, d))
  t.add("positions.embedding", f"{prefix}wpe.weight", (cfg.max_positions, d))
  t.norm("final_norm", f"{prefix}ln_f", True)
  for i in range(cfg.num_layers):
    hl, ours = f"{prefix}h.{i}", f"layers.{i}"
    for j, slot in enumerate(("query", "key", "value")):
      qkv = f"{hl}.attn.c_attn"
      t.add(
        f"{ours}.self_attn.{slot}.kernel", f"{qkv}.weight", (d, 3 * d), (d, h, dh), part=j, parts=3
      )
      t.add(f"{ours}.self_attn.{slot}.bias", f"{qkv}.bias", (3 * d,), (h, dh), part=j, parts=3)
    t.add(f"{ours}.self_attn.out.kernel", f"{hl}.attn.c_proj.weight", (d, d), (h, dh, d))
    t.add(f"{ours}.self_attn.out.bias", f"{hl}.attn.c_proj.bias", (d,))
    t.add(f"{ours}.mlp.wi.kernel", f"{hl}.mlp.c_fc.weight", (d, f))
    t.add(f"{ours}.mlp.wi.bias", f"{hl}.mlp.c_fc.bias", (f,))
    t.add(f"{ours}.mlp.wo.kernel", f"{hl}.mlp.c_proj.weight", (f, d))
    t.add(f"{ours}.mlp.wo.bias", f"{hl}.mlp.c_proj.bias", (d,))
    t.norm(f"{ours}.attn_norm", f"{hl}.ln_1", True)
    t.norm(f"{ours}.mlp_norm", f"{hl}.ln_2", True)
  return t.entries


def read(entries: list[Entry], take) -> dict[str, np.ndarray]:
  """{ours: array} reading each HF tensor once through `take(name, shape)`."""
  cache: dict[str, np.ndarray] = {}
  out = {}
  for e in entries:
    if e.hf not in cache:
      cache[e.hf] = take(e.hf, e.hf_shape)
    out[e.ours] = e.to_ours(cache[e.hf])
  return out


def write(entries: list[Entry], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{hf name: array} from project params; packed parts are joined in order."""
  parts: dict[str, list] = {}
  for e in entries:
    parts.setdefault(e.hf, [None] * e.parts)[e.part] = e.to_hf(np.asarray(params[e.ours]))
  return {name: p[0] if len(p) == 1 else np.concatenate(p, axis=-1) for name, p in parts.items()}
