"""BLIP (Li et al., 2022): MED, the multimodal mixture of encoder-decoder, with its heads.

One ViT and ONE set of text layers run in three modes:

  image -> ViT (pool_type 'tok') -> image tokens [B, 1 + n, Wi] ([CLS] first)
        -> img_proj(CLS) -> L2 -> zimg                                 (unimodal image encoder)
  [CLS] ++ tokens -> mode 'text': bidirectional self-attention, MLP
        -> txt_proj(state 0) -> L2 -> ztxt                            (unimodal text encoder)
  [ENC] ++ tokens -> mode 'itm': bidirectional self-attention, cross-attention to every
        image token, MLP -> itm_head(state 0) [B, 2]        (image-grounded text encoder)
  [DEC] ++ tokens[:-1] -> mode 'lm': CAUSAL self-attention, cross-attention, MLP
        -> lm_head [B, L, vocab_size]                       (image-grounded text decoder)

Weight sharing (BLIP's `tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '',
'/attention')`): the decoder shares every text weight with the encoder except its
self-attention. Here a shared weight is ONE parameter: each text block holds one
cross-attention, one MLP and their LayerNorms, used by modes 'itm' and 'lm', and two
self-attention sub-blocks, `enc_attn` (modes 'text' and 'itm': the unimodal and the
image-grounded encoder are the same weights) and `dec_attn` (mode 'lm'). The embedding table,
the position embedding and the final LayerNorm are shared by all modes. The LM head is the
decoder's own (BLIP's BertLMHeadModel.cls).

Special tokens: the embedding table has vocab_size + 3 rows; ids vocab_size, vocab_size + 1,
vocab_size + 2 are [CLS], [ENC], [DEC] (`special_ids`). They are never tokenizer ids, and the
LM head predicts the vocab_size tokenizer ids only, so it cannot produce them.

Choices of this implementation (deliberate differences from BLIP's BERT):
  * every layer is pre-LN (x + f(LN(x)), as the rest of vljax), with one final LayerNorm after
    the stack; BERT is post-LN (LN(x + f(x)), with a LayerNorm after the embeddings). A
    self-attention sub-block (`enc_attn`, `dec_attn`) owns the LayerNorm in front of it, as
    BERT's un-shared '/attention' owns the LayerNorm after it;
  * the special token takes position 0 and the caption positions 1..L (BLIP replaces the
    tokenizer's [CLS] id in place); the decoder is fed [DEC] ++ tokens[:-1] and predicts
    tokens (logits[:, p] is the distribution of tokens[:, p]);
  * the LM head is one Dense(vocab_size) in float32, without BERT's transform layer
    (dense + GELU + LN) and not tied to the embedding;
  * text key padding: pad positions are masked out as keys (each query may attend to itself);
    the decoder's mask is causal and masks pad keys too;
  * config.layers.scan applies to the ViT only (the text blocks, which run in three modes and
    keep per-layer decoding caches, are always unrolled); remat applies to both.

Parameter tree:
  img/...                       VisionTransformer (pool_type 'tok')
  txt/embedding                 [vocab_size + 3, W]   shared by every mode
  txt/pos_embedding             [1, max_len + 1, W]   shared by every mode
  txt/textblock_{i}/enc_attn    {norm, attn}: encoder self-attention ('text', 'itm')
  txt/textblock_{i}/dec_attn    {norm, attn}: decoder causal self-attention ('lm')
  txt/textblock_{i}/cross_norm, cross_attn   shared by 'itm' and 'lm' (key/value from Wi)
  txt/textblock_{i}/mlp_norm, mlp            shared by every mode
  txt/norm                      final LayerNorm, shared by every mode
  img_proj, txt_proj            -> embed_dim (ITC)
  itm_head                      W -> 2;   lm_head   W -> vocab_size (float32 logits)
  temp                          the ITC temperature (not its log), initialised to 0.07

The momentum model of the ITC features needs only part of this tree: `momentum_params`.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models import fusion
from vljax.models import layers
from vljax.models import stacks
from vljax.models import two_towers

Array = jax.Array
Dtype = Any

MODES = ("text", "itm", "lm")
NUM_SPECIAL = 3  # [CLS], [ENC], [DEC]: embedding rows vocab_size .. vocab_size + 2
# Parameters the ITC features never read: left out of the momentum model (BLIP's momentum
# model is the image encoder, the text encoder and the two projections).
NOT_IN_MOMENTUM = ("dec_attn", "cross_norm", "cross_attn", "itm_head", "lm_head")


def special_ids(vocab_size: int) -> dict[str, int]:
  """{'cls', 'enc', 'dec'}: the embedding rows of the special tokens, past the vocabulary."""
  return {"cls": vocab_size, "enc": vocab_size + 1, "dec": vocab_size + 2}


def momentum_params(params: Any) -> Any:
  """The subtree of a Blip parameter tree (boxed or not) that encode_image / encode_text read:
  every key named in NOT_IN_MOMENTUM is dropped, at any depth."""
  if not isinstance(params, Mapping):
    return params
  return {k: momentum_params(v) for k, v in params.items() if k not in NOT_IN_MOMENTUM}


class SelfAttention(nn.Module):
  """A mode's self-attention sub-block: LN, then layers.KVCacheAttention ('norm', 'attn')."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, cache: dict[str, Array] | None,
               position: Array | None, train: bool) -> tuple[Array, dict[str, Array] | None]:
    y = layers.layer_norm(self.dtype, self.param_dtype, name="norm")(x)
    return layers.KVCacheAttention(self.num_heads, dropout=self.dropout, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="attn")(
                                       y, mask, cache, position, train)


class TextBlock(nn.Module):
  """One MED layer (pre-LN) in mode 'text', 'itm' or 'lm':

    x + SelfAttn_mode(LN(x));  [x + CrossAttn(LN(x), context) unless 'text'];  x + MLP(LN(x))

  SelfAttn_mode is `enc_attn` for 'text' / 'itm' and `dec_attn` for 'lm'; everything else is
  one set of weights whatever the mode. The context is what the cross-attention reads: the
  image tokens in pre-training, the image-grounded question states in BLIP's VQA answer
  decoder (BlipVqa). In decoding (`cache` given, mode 'lm') the cache holds dec_attn's
  keys/values so far and the context's cross-attention keys/values (cross_key, cross_value)
  from cross_keys_values, so the context is never projected again, and its key mask
  (cross_mask) when the context has padding.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    sizes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.enc_attn = SelfAttention(self.num_heads, self.dropout, **sizes)
    self.dec_attn = SelfAttention(self.num_heads, self.dropout, **sizes)
    self.cross_norm = layers.layer_norm(**sizes)
    self.cross_attn = layers.MultiHeadAttention(self.num_heads, dropout=self.dropout, **sizes)
    self.mlp_norm = layers.layer_norm(**sizes)
    self.mlp = layers.MlpBlock(self.mlp_dim, dropout=self.dropout, **sizes)
    self.drop = nn.Dropout(rate=self.dropout)

  def __call__(self, x: Array, mode: str, mask: Array | None, context: Array | None,
               context_mask: Array | None, cache: dict[str, Array] | None,
               position: Array | None, train: bool
               ) -> tuple[Array, dict[str, Array] | None]:
    """x [B, T, W]; mask [B, 1, T, T] (None with a cache); context [B, n, Wc] (None in mode
    'text' or with a cache); context_mask [B, 1, 1, n] (True = a real context token) or None
    (every token real; with a cache, the cache's cross_mask if it has one). Returns
    (x [B, T, W], updated cache or None)."""
    if mode not in MODES:
      raise ValueError(f"Unknown MED mode {mode!r}; valid: {MODES}.")
    residual = lambda x, y: layers.constrain(x + self.drop(y, deterministic=not train),
                                             layers.ACT_SEQ)
    x = layers.constrain(x, layers.ACT_SEQ)
    self_cache = None if cache is None else {"key": cache["key"], "value": cache["value"]}
    attention = self.dec_attn if mode == "lm" else self.enc_attn
    y, self_cache = attention(x, mask, self_cache, position, train)
    x = residual(x, y)
    if mode != "text":
      y = self.cross_norm(x)
      if cache is None:
        y = self.cross_attn(y, context, context_mask, train)
      else:
        y = self.cross_attn(y, None, cache.get("cross_mask"), train,
                            keys_values=(cache["cross_key"], cache["cross_value"]))
      x = residual(x, y)
    x = residual(x, self.mlp(self.mlp_norm(x), train))
    return x, (None if cache is None else {**cache, **self_cache})

  def cross_keys_values(self, context: Array, width: int) -> tuple[Array, Array]:
    """The cross-attention's (keys, values) [B, n, heads, head_dim] of context [B, n, Wc]."""
    return self.cross_attn.project_keys_values(context, width)


class BlipText(nn.Module):
  """The MED text side: shared embeddings, `depth` TextBlocks, a final LayerNorm.

  Attributes:
    vocab_size: the tokenizer's; the table adds NUM_SPECIAL rows ([CLS], [ENC], [DEC]).
    max_len: the longest caption; positions 0 .. max_len are embedded.
    pad_id: the tokenizer's pad id (masked out as a key).
    remat: remat policy of each block (vljax.models.stacks.REMAT_NAMES; True = 'full').
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  pad_id: int = 0
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = nn.Embed(
        self.vocab_size + NUM_SPECIAL, self.width, dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")))
    self.pos_embedding = self.param(
        "pos_embedding",
        layers.partitioned(nn.initializers.normal(stddev=0.01), (None, None, "embed")),
        (1, self.max_len + 1, self.width), self.param_dtype)
    # Arguments (self, x, mode, mask, context, context_mask, cache, position, train): mode
    # and train are static.
    block_cls = stacks.block_class(TextBlock, self.remat, False, (2, 8))
    self.blocks = [block_cls(self.mlp_dim, self.num_heads, dropout=self.dropout,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"textblock_{i}") for i in range(self.depth)]
    self.norm = layers.layer_norm(self.dtype, self.param_dtype)
    self.drop = nn.Dropout(rate=self.dropout)

  @property
  def special(self) -> dict[str, int]:
    return special_ids(self.vocab_size)

  def _embed(self, ids: Array, position: Array | int, train: bool) -> Array:
    """Embeddings of ids [B, T] (special ids included) at positions position .. + T - 1."""
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embedding, position, ids.shape[1], axis=1)
    x = layers.constrain(self.embedding(ids) + pos.astype(self.dtype), layers.ACT_SEQ)
    return self.drop(x, deterministic=not train)

  def _run(self, x: Array, mode: str, mask: Array | None, context: Array | None,
           context_valid: Array | None, caches: list | None, position: Array | None,
           train: bool) -> tuple[Array, list | None]:
    context_mask = None if context_valid is None else context_valid[:, None, None, :]
    new_caches = []
    for i, block in enumerate(self.blocks):
      x, cache = block(x, mode, mask, context, context_mask,
                       None if caches is None else caches[i], position, train)
      new_caches.append(cache)
    return self.norm(x), (None if caches is None else new_caches)

  def _inputs(self, first: str, tokens: Array) -> tuple[Array, Array]:
    """(ids [B, L+1] = special ++ tokens, valid [B, L+1] key mask)."""
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds max_len={self.max_len}.")
    ids = jnp.concatenate([jnp.full((batch, 1), self.special[first], tokens.dtype), tokens],
                          axis=1)
    valid = jnp.concatenate([jnp.ones((batch, 1), bool), tokens != self.pad_id], axis=1)
    return ids, valid

  def valid(self, tokens: Array) -> Array:
    """[B, L+1] bool: which states of encode(tokens) are real (the special token and every
    non-pad token), the key mask of a cross-attention that reads them."""
    return self._inputs("cls", tokens)[1]

  def encode(self, tokens: Array, image: Array | None = None, train: bool = False) -> Array:
    """tokens [B, L] -> states [B, L+1, W]: [CLS] ++ tokens in mode 'text' (image None), or
    [ENC] ++ tokens in mode 'itm' cross-attending to image [B, n, Wi]."""
    ids, valid = self._inputs("cls" if image is None else "enc", tokens)
    x = self._embed(ids, 0, train)
    return self._run(x, "text" if image is None else "itm", fusion.padding_mask(valid), image,
                     None, None, None, train)[0]

  def decode(self, tokens: Array, context: Array, train: bool = False,
             context_valid: Array | None = None) -> Array:
    """Teacher forcing: [DEC] ++ tokens[:, :-1] -> states [B, L, W]; state p sees inputs
    0..p only (causal), so it carries the prediction of tokens[:, p]. The cross-attention
    reads context [B, n, Wc] (the image tokens, or BlipVqa's question states), only where
    context_valid [B, n] is True (None: everywhere)."""
    ids, valid = self._inputs("dec", tokens[:, :-1])
    length = ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = (causal[None, None] & valid[:, None, None, :]) | jnp.eye(length, dtype=bool)
    x = self._embed(ids, 0, train)
    return self._run(x, "lm", mask, context, context_valid, None, None, train)[0]

  def init_cache(self, context: Array, length: int,
                 context_valid: Array | None = None) -> list[dict[str, Array]]:
    """Per-block decoding caches for `length` positions: empty self-attention keys/values and
    the context's cross-attention keys/values (computed here, once), with the context's key
    mask (cross_mask [B, 1, 1, n]) when context_valid is given."""
    caches = []
    for block in self.blocks:
      cache = layers.init_kv_cache(context.shape[0], length, self.width, self.num_heads,
                                   self.dtype)
      keys, values = block.cross_keys_values(context, self.width)
      cache.update(cross_key=keys, cross_value=values)
      if context_valid is not None:
        cache["cross_mask"] = context_valid[:, None, None, :]
      caches.append(cache)
    return caches

  def decode_step(self, ids: Array, position: Array,
                  caches: list) -> tuple[Array, list]:
    """ids [B, T] at positions position .. + T - 1 (ids[:, 0] = [DEC] at position 0) through
    the decoder with the caches -> (states [B, T, W], updated caches)."""
    x = self._embed(ids, position, False)
    return self._run(x, "lm", None, None, None, caches, position, False)


class Blip(nn.Module):
  """BLIP's MED and heads; the objective (vljax.objectives.blip) calls the methods.

  Attributes:
    image: VisionTransformer kwargs (may hold 'variant'); pool_type is forced to 'tok'.
    text: width, mlp_dim, num_heads, depth, vocab_size, max_len, pad_id (and optionally
      dropout, remat; a 'scan' key is accepted and ignored: the text blocks are unrolled).
    embed_dim: ITC projection width.
    temperature_init: initial ITC temperature (BLIP: 0.07).
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  embed_dim: int
  temperature_init: float = 0.07
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.img = fusion.cls_vit(self.image, self.dtype, self.param_dtype)
    self.txt = text_stack(self.text, self.dtype, self.param_dtype, "txt")
    sizes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = fusion.dense
    self.img_proj = dense(self.embed_dim, ("embed", None), "img_proj", **sizes)
    self.txt_proj = dense(self.embed_dim, ("embed", None), "txt_proj", **sizes)
    self.itm_head = dense(2, ("embed", None), "itm_head", **sizes)
    # float32 logits: they feed a float32 log-softmax over the vocabulary.
    self.lm_head = dense(self.text["vocab_size"], ("embed", "vocab"), "lm_head", jnp.float32,
                         self.param_dtype, nn.initializers.xavier_uniform())
    self.temp = layers.scalar_param(self, "temp", self.temperature_init, self.param_dtype)

  def encode_image(self, images: Array, train: bool = False) -> tuple[Array, Array]:
    """images [B, H, W, 3] -> (tokens [B, 1 + n, Wi] ([CLS] first), zimg [B, D] unit-norm)."""
    tokens = self.img(images, train)
    return tokens, two_towers.l2_normalize(self.img_proj(tokens[:, 0]))

  def encode_text(self, tokens: Array, train: bool = False) -> tuple[Array, Array]:
    """Unimodal: tokens [B, L] -> (states [B, L+1, W] ([CLS] first), ztxt [B, D] unit-norm)."""
    states = self.txt.encode(tokens, None, train)
    return states, two_towers.l2_normalize(self.txt_proj(states[:, 0]))

  def itm_logits(self, image_tokens: Array, tokens: Array, train: bool = False) -> Array:
    """Image-grounded encoder ([ENC] first) -> [B, 2] float32; column 1 = 'the pair matches'."""
    states = self.txt.encode(tokens, image_tokens, train)
    return self.itm_head(states[:, 0]).astype(jnp.float32)

  def lm_logits(self, image_tokens: Array, tokens: Array, train: bool = False) -> Array:
    """Image-grounded decoder, teacher forcing ([DEC] first) -> [B, L, vocab_size] float32;
    logits[:, p] is the distribution of tokens[:, p] given [DEC] and tokens[:, :p]."""
    return self.lm_head(self.txt.decode(tokens, image_tokens, train)).astype(jnp.float32)

  def init_decode_cache(self, image_tokens: Array, length: int) -> list[dict[str, Array]]:
    """The decoder's KV caches for `length` positions (image keys/values projected once)."""
    return self.txt.init_cache(image_tokens, length)

  def decode_step(self, ids: Array, position: Array, caches: list) -> tuple[Array, list]:
    """ids [B, T] at positions position .. + T - 1 -> (logits [B, T, vocab_size] float32,
    caches); the [DEC] id (special_ids(vocab_size)['dec']) goes in at position 0."""
    states, caches = self.txt.decode_step(ids, position, caches)
    return self.lm_head(states).astype(jnp.float32), caches

  def temperature(self) -> Array:
    return self.temp.astype(jnp.float32)

  def __call__(self, images: Array, tokens: Array, train: bool = False) -> dict[str, Array]:
    """Every part once (what init uses): zimg, ztxt, itm [B, 2], lm [B, L, V], temp."""
    image_tokens, zimg = self.encode_image(images, train)
    _, ztxt = self.encode_text(tokens, train)
    return {"zimg": zimg, "ztxt": ztxt, "itm": self.itm_logits(image_tokens, tokens, train),
            "lm": self.lm_logits(image_tokens, tokens, train), "temp": self.temperature()}


def text_stack(text: Mapping[str, Any], dtype: Dtype, param_dtype: Dtype, name: str) -> BlipText:
  """The BlipText of config.model.text (Blip.text / BlipVqa.text)."""
  t = dict(text)
  return BlipText(t["vocab_size"], t["width"], t["depth"], t["mlp_dim"], t["num_heads"],
                  t["max_len"], pad_id=t.get("pad_id", 0), dropout=t.get("dropout", 0.0),
                  remat=t.get("remat", False), dtype=dtype, param_dtype=param_dtype,
                  name=name)


class BlipVqa(nn.Module):
  """BLIP's VQA model: an answer decoder reading the image-grounded question.

    image -> ViT -> image tokens [B, 1 + n, Wi]
    [ENC] ++ question -> txt, mode 'itm' (cross-attention to the image tokens)
        -> question states [B, Lq + 1, W]
    [DEC] ++ answer[:-1] -> dec, mode 'lm' (causal; cross-attention to the question states,
        their padding masked out) -> lm_head [N, La, vocab_size]

  As BLIP's BLIP_VQA, the question encoder and the answer decoder are two text stacks that
  fine-tuning trains apart; both start from the one pre-trained MED (configs/blip_vqa.py maps
  txt/ to both), so they start equal in every weight but the self-attention. txt/ has no
  dec_attn and dec/ no enc_attn: a mode creates the weights it runs. The decoder's
  cross-attention read image tokens (width Wi) in pre-training and reads question states
  (width W) here; its pre-trained weights fit when Wi == W, as in every BLIP with ViT-B.

  Parameter tree: img/ (VisionTransformer), txt/ (BlipText), dec/ (BlipText), lm_head
  (W -> vocab_size, float32 logits).
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.img = fusion.cls_vit(self.image, self.dtype, self.param_dtype)
    self.txt = text_stack(self.text, self.dtype, self.param_dtype, "txt")
    self.dec = text_stack(self.text, self.dtype, self.param_dtype, "dec")
    self.lm_head = fusion.dense(self.text["vocab_size"], ("embed", "vocab"), "lm_head",
                                jnp.float32, self.param_dtype, nn.initializers.xavier_uniform())

  def encode_question(self, images: Array, question: Array,
                      train: bool = False) -> tuple[Array, Array]:
    """images [B, H, W, 3], question [B, Lq] -> (question states [B, Lq + 1, W] ([ENC]
    first), valid [B, Lq + 1] bool: the states that are not padding)."""
    image_tokens = self.img(images, train)
    return self.txt.encode(question, image_tokens, train), self.txt.valid(question)

  def answer_logits(self, states: Array, valid: Array, answers: Array,
                    train: bool = False) -> Array:
    """Teacher forcing: answers [N, La] given question states [N, Lq + 1, W] (valid
    [N, Lq + 1]) -> [N, La, vocab_size] float32; logits[:, p] is the distribution of
    answers[:, p] given [DEC] and answers[:, :p]."""
    return self.lm_head(self.dec.decode(answers, states, train, valid)).astype(jnp.float32)

  def init_decode_cache(self, states: Array, valid: Array, length: int) -> list:
    """The answer decoder's KV caches for `length` positions (the question states' keys and
    values projected once, their padding masked)."""
    return self.dec.init_cache(states, length, valid)

  def decode_step(self, ids: Array, position: Array, caches: list) -> tuple[Array, list]:
    """ids [B, T] at positions position .. + T - 1 -> (logits [B, T, vocab_size] float32,
    caches); [DEC] (special_ids(vocab_size)['dec']) goes in at position 0."""
    states, caches = self.dec.decode_step(ids, position, caches)
    return self.lm_head(states).astype(jnp.float32), caches

  def __call__(self, images: Array, question: Array, answers: Array,
               train: bool = False) -> Array:
    """Every part once (what init uses): the answer logits [B, La, vocab_size]."""
    states, valid = self.encode_question(images, question, train)
    return self.answer_logits(states, valid, answers, train)
