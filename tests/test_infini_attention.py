"""Infini-attention (arXiv 2404.07143): the memory ops, one layer and the segment-wise LM against slow,
obviously-correct NumPy references and the dense model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.layers.attention import causal_segment_mask
from memlm_jax.layers.infini_attention import InfiniAttention, memory_retrieve, memory_update
from memlm_jax.models.infini_lm import InfiniTransformerLM
from memlm_jax.models.transformer_lm import TransformerLM

TINY = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64, segment_length=4)
SEG = TINY["segment_length"]


def tiny_infini(seed: int = 0, **overrides) -> InfiniTransformerLM:
  with nnx.use_eager_sharding(False):
    return InfiniTransformerLM(**{**TINY, **overrides}, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, memory, mask):
  return nnx.merge(graphdef, state)(tokens, memory=memory, mask=mask)


def run(model, tokens, memory=None, mask=None):
  """Jitted model(tokens, memory, mask) -> (logits, memory) as NumPy (models of one structure share a compile)."""
  graphdef, state = nnx.split(model)
  mask = None if mask is None else jnp.asarray(mask, jnp.int32)
  logits, memory = _apply(graphdef, state, jnp.asarray(tokens, jnp.int32), memory, mask)
  return np.asarray(logits), memory


@functools.partial(jax.jit, static_argnums=0)
def _apply_dense(graphdef, state, tokens, segment_ids, positions):
  return nnx.merge(graphdef, state)(tokens, segment_ids, positions)


def run_dense(model, tokens, segment_ids, positions) -> np.ndarray:
  """Jitted dense TransformerLM logits as NumPy."""
  args = (jnp.asarray(a, jnp.int32) for a in (tokens, segment_ids, positions))
  return np.asarray(_apply_dense(*nnx.split(model), *args))


def memory_arrays(memory) -> list[np.ndarray]:
  """[M_0, z_0, M_1, z_1, ...] of a model memory tuple, as NumPy."""
  return [np.asarray(a) for layer in memory for a in (layer.mem, layer.z)]


def assert_memories_close(got, want, atol=1e-5, rtol=1e-5, msg=""):
  assert len(got) == len(want)
  for i, (a, b) in enumerate(zip(memory_arrays(got), memory_arrays(want))):
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=f"{msg} (memory leaf {i})")


def copy_params_without_gates(src: nnx.Module, dst: nnx.Module) -> None:
  """dst's parameters := src's (same names; src's Infini gates, if any, are dropped)."""
  pure = nnx.state(src, nnx.Param).to_pure_dict()
  for layer in pure["layers"].values():
    layer["attention"].pop("gate", None)
  state = nnx.state(dst, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dst, state)


def set_gates(model: InfiniTransformerLM, value: float) -> None:
  for layer in model.layers:
    layer.attention.gate[...] = jnp.full((model.num_heads,), value, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# NumPy float64 references.


def np_sigma(x: np.ndarray) -> np.ndarray:
  """elu(x) + 1: x + 1 for x > 0, exp(x) otherwise."""
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def np_retrieve_one(q_vec: np.ndarray, mem: np.ndarray, z: np.ndarray) -> np.ndarray:
  """sigma(q) M / (sigma(q) z) for one query vector; zeros when sigma(q) z == 0 (empty memory)."""
  s = np_sigma(q_vec)
  denominator = float(s @ z)
  return np.zeros(mem.shape[1]) if denominator == 0 else (s @ mem) / denominator


def np_retrieve(q, mem, z):
  """q [b, h, n, dk], mem [b, h, dk, dv], z [b, h, dk] -> [b, h, n, dv], one query at a time."""
  q, mem, z = (np.asarray(a, np.float64) for a in (q, mem, z))
  batch, heads, seq, _ = q.shape
  out = np.zeros((batch, heads, seq, mem.shape[-1]))
  for b in range(batch):
    for h in range(heads):
      for n in range(seq):
        out[b, h, n] = np_retrieve_one(q[b, h, n], mem[b, h], z[b, h])
  return out


def np_update(k, v, mem, z, delta, mask=None):
  """Writes token by token: M += sigma(k_t)^T (v_t [- retrieval of k_t from the OLD memory]), z += sigma(k_t);
  masked tokens are skipped."""
  k, v, mem, z = (np.asarray(a, np.float64) for a in (k, v, mem, z))
  batch, heads, seq, _ = k.shape
  new_mem, new_z = mem.copy(), z.copy()
  for b in range(batch):
    for h in range(heads):
      for t in range(seq):
        if mask is not None and mask[b, t] == 0:
          continue
        s = np_sigma(k[b, h, t])
        value = v[b, h, t] - (np_retrieve_one(k[b, h, t], mem[b, h], z[b, h]) if delta else 0.0)
        new_mem[b, h] += np.outer(s, value)
        new_z[b, h] += s
  return new_mem, new_z


def np_rope(x: np.ndarray, max_wavelength: float = 10_000.0) -> np.ndarray:
  """Half-split RoPE of x [time, dim] at positions 0..time-1: pair (j, j + half) turns by t * w**(-j / half)."""
  time, dim = x.shape
  half = dim // 2
  out = np.zeros_like(x)
  for t in range(time):
    for j in range(half):
      theta = t * max_wavelength ** (-j / half)
      c, s = np.cos(theta), np.sin(theta)
      out[t, j] = x[t, j] * c - x[t, j + half] * s
      out[t, j + half] = x[t, j + half] * c + x[t, j] * s
  return out


def np_infini_layer(layer: InfiniAttention, x: np.ndarray, mask: np.ndarray, seg_len: int):
  """One Infini-attention layer over a multi-segment sequence, segment by segment and head by head.

  x [batch, time, embed], mask [batch, time]. Returns (outputs [batch, time, embed], [(M, z) after each segment]).
  """
  wq, wk, wv, wo = (np.asarray(p.kernel[...], np.float64) for p in (layer.query, layer.key, layer.value, layer.out))
  gate = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(layer.gate[...], np.float64)))  # sigmoid, overflow-free
  heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
  group = heads // kv_heads
  x = np.asarray(x, np.float64)
  batch, time, _ = x.shape
  mem = np.zeros((batch, kv_heads, dim, dim))
  z = np.zeros((batch, kv_heads, dim))
  outputs = np.zeros_like(x)
  memories = []
  for start in range(0, time, seg_len):
    xs, ms = x[:, start:start + seg_len], mask[:, start:start + seg_len]
    q = np.einsum("bte,ehd->bthd", xs, wq)  # raw (pre-RoPE)
    k = np.einsum("bte,ehd->bthd", xs, wk)
    v = np.einsum("bte,ehd->bthd", xs, wv)
    attended = np.zeros((batch, seg_len, heads, dim))
    for b in range(batch):
      for h in range(heads):
        g = h // group
        rq, rk = np_rope(q[b, :, h]), np_rope(k[b, :, g])  # positions restart at 0 in every segment
        for i in range(seg_len):
          local = np.zeros(dim)
          if ms[b, i]:
            visible = [j for j in range(i + 1) if ms[b, j]]
            scores = np.array([rq[i] @ rk[j] / np.sqrt(dim) for j in visible])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            local = sum(p * v[b, j, g] for p, j in zip(probs, visible))
          from_memory = np_retrieve_one(q[b, i, h], mem[b, g], z[b, g])
          attended[b, i, h] = gate[h] * from_memory + (1.0 - gate[h]) * local
    outputs[:, start:start + seg_len] = np.einsum("bthd,hde->bte", attended, wo)
    new_mem, new_z = mem.copy(), z.copy()
    for b in range(batch):
      for g in range(kv_heads):
        for t in range(seg_len):
          if not ms[b, t]:
            continue
          s = np_sigma(k[b, t, g])
          value = v[b, t, g]
          if layer.update_rule == "delta":
            value = value - np_retrieve_one(k[b, t, g], mem[b, g], z[b, g])
          new_mem[b, g] += np.outer(s, value)
          new_z[b, g] += s
    mem, z = new_mem, new_z
    memories.append((mem, z))
  return outputs, memories


def segment_mask_and_positions(mask):
  """A segment's 0/1 token mask [batch, seg_len] -> (InfiniAttention's mask [batch, 1, seg_len, seg_len],
  positions [batch, seg_len] from 0), as the LM passes them."""
  mask = jnp.asarray(mask, jnp.int32)
  return causal_segment_mask(mask), jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)


def random_memory(rng, batch, heads, dk, dv, kind):
  """'empty': zeros; 'filled': random M, positive z; 'mixed': row 0 filled, the other rows empty."""
  mem = rng.standard_normal((batch, heads, dk, dv)).astype(np.float32)
  z = rng.uniform(0.5, 4.0, size=(batch, heads, dk)).astype(np.float32)
  if kind == "empty":
    mem[:], z[:] = 0.0, 0.0
  elif kind == "mixed":
    mem[1:], z[1:] = 0.0, 0.0
  return mem, z


# ----------------------------------------------------------------------------------------------------------------
# memory_retrieve / memory_update.


@pytest.mark.parametrize("kind", ["empty", "filled", "mixed"])
def test_memory_retrieve_matches_numpy(kind):
  """memory_retrieve == sigma(q) M / (sigma(q) z) (zeros for empty rows), per query, in float64 NumPy."""
  rng = np.random.default_rng({"empty": 0, "filled": 1, "mixed": 2}[kind])
  q = (rng.standard_normal((3, 2, 5, 8)) * 1.5).astype(np.float32)
  mem, z = random_memory(rng, 3, 2, 8, 6, kind)
  got = memory_retrieve(jnp.asarray(q), jnp.asarray(mem), jnp.asarray(z))
  assert got.shape == (3, 2, 5, 6) and got.dtype == jnp.float32
  want = np_retrieve(q, mem, z)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)
  if kind != "empty":
    assert np.abs(want[0]).max() > 0.1  # not a vacuous all-zero comparison


@pytest.mark.parametrize("kind", ["empty", "filled", "mixed"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("delta", [False, True])
def test_memory_update_matches_numpy(delta, masked, kind):
  """memory_update (linear and delta rule, with and without a padding mask) == token-by-token NumPy writes."""
  rng = np.random.default_rng(10 + 4 * delta + 2 * masked + ["empty", "filled", "mixed"].index(kind) * 8)
  batch, heads, seq, dk, dv = 3, 2, 6, 8, 5
  k = (rng.standard_normal((batch, heads, seq, dk)) * 1.5).astype(np.float32)
  v = rng.standard_normal((batch, heads, seq, dv)).astype(np.float32)
  mem, z = random_memory(rng, batch, heads, dk, dv, kind)
  mask = None
  if masked:
    mask = np.ones((batch, seq), np.int32)
    mask[0, 4:] = 0  # padded tail
    mask[1, :] = 0  # all padding: writes nothing
    mask[2, 2] = 0
  new_mem, new_z = memory_update(jnp.asarray(k), jnp.asarray(v), jnp.asarray(mem), jnp.asarray(z), delta=delta,
                                 mask=None if mask is None else jnp.asarray(mask))
  assert new_mem.dtype == new_z.dtype == jnp.float32
  want_mem, want_z = np_update(k, v, mem, z, delta, mask)
  np.testing.assert_allclose(np.asarray(new_mem), want_mem, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new_z), want_z, atol=1e-4, rtol=1e-5)
  if masked:
    np.testing.assert_array_equal(np.asarray(new_mem)[1], mem[1])  # an all-padding row is untouched
    np.testing.assert_array_equal(np.asarray(new_z)[1], z[1])


def test_delta_rule_writes_nothing_memory_already_retrieves():
  """Delta rule: V = retrieve(K, M, z) leaves M unchanged (z still grows by sum sigma(K)); linear rule still adds."""
  rng = np.random.default_rng(20)
  batch, heads, seq, dim = 2, 3, 7, 8
  empty = jnp.zeros((batch, heads, dim, dim)), jnp.zeros((batch, heads, dim))
  k0, v0 = (jnp.asarray(rng.standard_normal((batch, heads, 12, dim)), jnp.float32) for _ in range(2))
  mem, z = memory_update(k0, v0, *empty, delta=False)
  k = jnp.asarray(rng.standard_normal((batch, heads, seq, dim)), jnp.float32)
  v = memory_retrieve(k, mem, z)
  assert float(jnp.abs(v).max()) > 0.1

  new_mem, new_z = memory_update(k, v, mem, z, delta=True)
  np.testing.assert_allclose(np.asarray(new_mem), np.asarray(mem), atol=2e-5, rtol=1e-5)
  want_z = np.asarray(z, np.float64) + np_sigma(np.asarray(k)).sum(axis=2)
  np.testing.assert_allclose(np.asarray(new_z), want_z, atol=1e-4, rtol=1e-5)
  assert np.all(np.asarray(new_z) > np.asarray(z))

  linear_mem, _ = memory_update(k, v, mem, z, delta=False)
  assert np.abs(np.asarray(linear_mem) - np.asarray(mem)).max() > 0.1


def test_empty_memory_retrieves_zeros_with_finite_gradients():
  """At M = 0, z = 0: retrieval is exactly zero, and grads through retrieve + update (both rules) are finite."""
  rng = np.random.default_rng(30)
  batch, heads, seq, dim = 2, 2, 5, 8
  q, k, v = (jnp.asarray(rng.standard_normal((batch, heads, seq, dim)) * 2, jnp.float32) for _ in range(3))
  mem0, z0 = jnp.zeros((batch, heads, dim, dim)), jnp.zeros((batch, heads, dim))
  assert np.all(np.asarray(memory_retrieve(q, mem0, z0)) == 0.0)

  def loss(q, k, v, mem, z, delta):
    first = memory_retrieve(q, mem, z)  # empty memory: the 0/0 branch
    new_mem, new_z = memory_update(k, v, mem, z, delta=delta)  # delta retrieves k from the empty memory
    second = memory_retrieve(q, new_mem, new_z)
    return jnp.sum(first ** 2) + jnp.sum(second ** 2) + jnp.sum(new_mem) + jnp.sum(new_z)

  for delta in (False, True):
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, mem0, z0, delta)
    for name, g in zip("q k v mem z".split(), grads):
      assert np.all(np.isfinite(np.asarray(g))), f"delta={delta}: NaN/inf gradient w.r.t. {name} at z = 0"
    for name, g in zip("q k v".split(), grads):
      assert np.abs(np.asarray(g)).max() > 1e-6, f"delta={delta}: zero gradient w.r.t. {name}"


# ----------------------------------------------------------------------------------------------------------------
# One layer against a slow reference.


@pytest.mark.parametrize("num_kv_heads,update_rule", [(4, "delta"), (4, "linear"), (2, "delta"), (2, "linear"),
                                                      (1, "delta")])
def test_infini_attention_layer_matches_slow_reference(num_kv_heads, update_rule):
  """InfiniAttention called segment by segment == per-head NumPy loop (RoPE from 0 per segment, pre-RoPE sigma(Q)
  retrieval before the update, per-head gate, GQA head j -> kv head j // group, padding not attended/written)."""
  seed = 40 + num_kv_heads + 10 * (update_rule == "linear")
  rng = np.random.default_rng(seed)
  embed, heads, dim, seg_len, segments, batch = 16, 4, 8, 4, 3, 2
  with nnx.use_eager_sharding(False):
    layer = InfiniAttention(embed, heads, dim, num_kv_heads=num_kv_heads, update_rule=update_rule,
                            rngs=nnx.Rngs(seed))
  layer.gate[...] = jnp.asarray(rng.uniform(-2.0, 2.0, size=heads), jnp.float32)  # a different mix per head
  time = seg_len * segments
  x = rng.standard_normal((batch, time, embed)).astype(np.float32)
  mask = np.ones((batch, time), np.int32)
  mask[1, 6:] = 0  # row 1: segment 1 half padded, segment 2 all padding
  mask[0, 5] = 0  # row 0: a hole, neither attended to nor written
  want_out, want_memories = np_infini_layer(layer, x, mask, seg_len)

  memory = layer.init_memory(batch)
  assert memory.mem.shape == (batch, num_kv_heads, dim, dim) and memory.z.shape == (batch, num_kv_heads, dim)
  for s in range(segments):
    span = slice(s * seg_len, (s + 1) * seg_len)
    out, memory = layer(jnp.asarray(x[:, span]), *segment_mask_and_positions(mask[:, span]), memory)
    real = mask[:, span].astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], want_out[:, span][real], atol=1e-4, rtol=1e-4,
                               err_msg=f"segment {s} outputs")
    np.testing.assert_allclose(np.asarray(memory.mem), want_memories[s][0], atol=1e-4, rtol=1e-5,
                               err_msg=f"M after segment {s}")
    np.testing.assert_allclose(np.asarray(memory.z), want_memories[s][1], atol=1e-4, rtol=1e-5,
                               err_msg=f"z after segment {s}")
  # The memory really contributed: a memory-less reference (gate -> 0) differs in the later segments.
  layer.gate[...] = jnp.full((heads,), -1e4, jnp.float32)
  local_only, _ = np_infini_layer(layer, x, mask, seg_len)
  assert np.abs(local_only[0, seg_len:] - want_out[0, seg_len:]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The LM: streaming, causality, gate, gradients, isolation, padding, dtypes, bad input.


def test_streaming_segments_equals_one_call():
  """Calling the LM on chunks (passing memory along) == one call over the whole sequence: logits and memory."""
  model = tiny_infini(num_kv_heads=2)
  rng = np.random.default_rng(50)
  tokens = rng.integers(1, 64, size=(2, 4 * SEG))
  whole_logits, whole_memory = run(model, tokens)
  assert whole_logits.shape == (2, 4 * SEG, 64)

  for chunks in ([SEG] * 4, [SEG, 2 * SEG, SEG]):
    memory, pieces, start = None, [], 0
    for length in chunks:
      logits, memory = run(model, tokens[:, start:start + length], memory=memory)
      pieces.append(logits)
      start += length
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole_logits, atol=1e-5, rtol=1e-5,
                               err_msg=f"chunks {chunks}")
    assert_memories_close(memory, whole_memory, msg=f"chunks {chunks}")
  # Guard: restarting from an empty memory on the last segment gives different logits.
  fresh, _ = run(model, tokens[:, 3 * SEG:])
  assert np.abs(fresh - whole_logits[:, 3 * SEG:]).max() > 1e-3


def test_future_tokens_never_change_earlier_logits_and_memory_carries_information():
  """Editing tokens after t leaves logits <= t unchanged (t on/around segment boundaries); editing segment 0
  changes every later segment's logits with memory, and none without it."""
  model = tiny_infini(num_kv_heads=2)
  rng = np.random.default_rng(60)
  time = 4 * SEG
  tokens = rng.integers(1, 64, size=(2, time))
  base, _ = run(model, tokens)
  for t in (1, SEG - 1, SEG, 2 * SEG - 1, 2 * SEG, 2 * SEG + 1, 3 * SEG - 1):
    edited = tokens.copy()
    edited[:, t + 1:] = (tokens[:, t + 1:] - 1 + rng.integers(1, 63, size=(2, time - t - 1))) % 63 + 1
    assert np.all(edited[:, t + 1:] != tokens[:, t + 1:])
    logits, _ = run(model, edited)
    np.testing.assert_allclose(logits[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0, err_msg=f"t={t}")
    assert np.abs(logits[:, t + 1] - base[:, t + 1]).max() > 1e-3  # the edit itself is visible

  edited = tokens.copy()
  edited[:, 1] = tokens[:, 1] % 63 + 1
  logits, _ = run(model, edited)
  for s in range(1, 4):
    span = slice(s * SEG, (s + 1) * SEG)
    assert np.abs(logits[:, span] - base[:, span]).max() > 1e-4, f"segment 0 edit did not reach segment {s}"

  no_memory = tiny_infini(num_kv_heads=2, use_memory=False)
  copy_params_without_gates(model, no_memory)
  base, _ = run(no_memory, tokens)
  logits, _ = run(no_memory, edited)
  np.testing.assert_allclose(logits[:, SEG:], base[:, SEG:], atol=1e-6, rtol=0)


def test_closed_gate_equals_memoryless_model_equals_dense_lm_per_segment():
  """sigmoid(gate) = 0 gives the use_memory=False model; that equals TransformerLM (same params) run on each
  segment alone with positions 0..seg_len-1."""
  rng = np.random.default_rng(70)
  time = 3 * SEG
  tokens = rng.integers(1, 64, size=(2, time))
  infini = tiny_infini(seed=1)
  no_memory = tiny_infini(seed=2, use_memory=False)
  copy_params_without_gates(infini, no_memory)
  with nnx.use_eager_sharding(False):
    dense = TransformerLM(**{k: v for k, v in TINY.items() if k != "segment_length"}, rngs=nnx.Rngs(3))
  copy_params_without_gates(infini, dense)

  open_logits, _ = run(infini, tokens)  # gate_init 0: half memory
  set_gates(infini, -1e4)
  closed_logits, _ = run(infini, tokens)
  no_memory_logits, _ = run(no_memory, tokens)
  np.testing.assert_allclose(closed_logits, no_memory_logits, atol=1e-5, rtol=1e-5)
  assert np.abs(open_logits - no_memory_logits).max() > 1e-3  # the gate mattered at sigmoid(0) = 0.5

  segment_ids = np.ones((2, SEG))
  positions = np.broadcast_to(np.arange(SEG), (2, SEG))
  dense_logits = np.concatenate([run_dense(dense, tokens[:, s:s + SEG], segment_ids, positions)
                                 for s in range(0, time, SEG)], axis=1)
  np.testing.assert_allclose(no_memory_logits, dense_logits, atol=1e-5, rtol=1e-5)
  whole = run_dense(dense, tokens, np.ones((2, time)), np.broadcast_to(np.arange(time), (2, time)))
  assert np.abs(whole[:, SEG:] - dense_logits[:, SEG:]).max() > 1e-3  # segments really are cut


def test_last_segment_loss_reaches_first_segment_only_through_memory():
  """A loss on the last of 3 segments: finite, non-zero grads into embeddings used only in segment 0 (exactly
  zero with use_memory=False), and non-zero grads for every layer's gate."""
  rng = np.random.default_rng(80)
  tokens = np.concatenate([rng.integers(1, 16, size=(2, SEG)),  # rows 1..15 appear only in segment 0
                           rng.integers(16, 64, size=(2, 2 * SEG))], axis=1)
  weights = jnp.asarray(rng.standard_normal((2, SEG, 64)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def param_grads(graphdef, params):
    def loss(p):
      logits, _ = nnx.merge(graphdef, p)(jnp.asarray(tokens, jnp.int32))
      return jnp.sum(logits[:, -SEG:] * weights)
    return jax.grad(loss)(params)

  def grads_of(model):
    return param_grads(*nnx.split(model, nnx.Param))

  model = tiny_infini(num_kv_heads=2)  # delta rule
  grads = grads_of(model)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  first_segment_rows = np.asarray(grads["embedding"]["embedding"][...])[1:16]
  assert np.abs(first_segment_rows).max() > 1e-6, "segment-0 embeddings get no gradient through memory"
  for i in range(TINY["num_layers"]):
    gate_grad = np.asarray(grads["layers"][i]["attention"]["gate"][...])
    assert np.all(np.abs(gate_grad) > 1e-8), f"layer {i} gate gradient {gate_grad}"
    for name in ("key", "value"):
      assert np.abs(np.asarray(grads["layers"][i]["attention"][name]["kernel"][...])).max() > 1e-6

  no_memory = tiny_infini(num_kv_heads=2, use_memory=False)
  copy_params_without_gates(model, no_memory)
  rows = np.asarray(grads_of(no_memory)["embedding"]["embedding"][...])
  assert np.all(rows[1:16] == 0.0)
  assert np.abs(rows[16:]).max() > 1e-6


def test_batch_rows_and_layers_have_separate_memories():
  """Editing row 0 never changes row 1's logits or memory; each layer returns its own (different) memory."""
  model = tiny_infini(num_kv_heads=2)
  rng = np.random.default_rng(90)
  tokens = rng.integers(1, 64, size=(2, 3 * SEG))
  edited = tokens.copy()
  edited[0] = rng.integers(1, 64, size=3 * SEG)
  base_logits, base_memory = run(model, tokens)
  logits, memory = run(model, edited)
  np.testing.assert_array_equal(logits[1], base_logits[1])
  assert np.abs(logits[0] - base_logits[0]).max() > 1e-3
  assert len(memory) == TINY["num_layers"]
  for layer, (got, want) in enumerate(zip(memory, base_memory)):
    assert got.mem.shape == (2, 2, 8, 8) and got.z.shape == (2, 2, 8)
    assert got.mem.dtype == got.z.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got.mem)[1], np.asarray(want.mem)[1], err_msg=f"layer {layer}")
    np.testing.assert_array_equal(np.asarray(got.z)[1], np.asarray(want.z)[1], err_msg=f"layer {layer}")
    assert np.abs(np.asarray(got.mem)[0] - np.asarray(want.mem)[0]).max() > 1e-3
  assert np.abs(np.asarray(base_memory[0].mem) - np.asarray(base_memory[1].mem)).max() > 1e-2
  assert np.abs(np.asarray(base_memory[0].z) - np.asarray(base_memory[1].z)).max() > 1e-2

  # Layer l reads and writes memory[l] only: perturbing layer 1's incoming memory leaves layer 0's untouched
  # and changes layer 1's (and the logits).
  _, start = run(model, tokens[:, :SEG])
  perturbed = (start[0], type(start[1])(start[1].mem * 0.5 + 1.0, start[1].z * 1.5))
  logits, memory = run(model, tokens[:, SEG:2 * SEG], memory=start)
  perturbed_logits, perturbed_memory = run(model, tokens[:, SEG:2 * SEG], memory=perturbed)
  np.testing.assert_array_equal(np.asarray(perturbed_memory[0].mem), np.asarray(memory[0].mem))
  np.testing.assert_array_equal(np.asarray(perturbed_memory[0].z), np.asarray(memory[0].z))
  assert np.abs(np.asarray(perturbed_memory[1].mem) - np.asarray(memory[1].mem)).max() > 1e-2
  assert np.abs(perturbed_logits - logits).max() > 1e-3


def test_padding_writes_nothing_to_memory():
  """Masked tail tokens: memory independent of their values; equal to running only the unmasked part (padded
  to a segment multiple / unpadded when it is one); the masked positions would have written if unmasked."""
  model = tiny_infini(num_kv_heads=2)
  rng = np.random.default_rng(100)
  time = 4 * SEG
  lengths = np.array([2 * SEG + 2, 2 * SEG])  # row 0 ends mid segment 2; row 1 at the end of segment 1
  mask = (np.arange(time)[None] < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(1, 64, size=(2, time))
  other = np.where(mask == 1, tokens, tokens % 63 + 1)
  logits, memory = run(model, tokens, mask=mask)
  other_logits, other_memory = run(model, other, mask=mask)
  assert_memories_close(other_memory, memory, atol=0, rtol=0, msg="masked tokens changed memory")
  np.testing.assert_array_equal(other_logits[mask == 1], logits[mask == 1])

  # Only the unmasked part, padded to 3 segments (row 0 keeps its 2 masked tokens in segment 2).
  _, short_memory = run(model, tokens[:, :3 * SEG], mask=mask[:, :3 * SEG])
  assert_memories_close(short_memory, memory, msg="masked tail segment wrote into memory")
  # Row 1 alone, unpadded: exactly 2 full segments.
  _, row1_memory = run(model, tokens[1:, :2 * SEG])
  for layer, (got, want) in enumerate(zip(memory, row1_memory)):
    np.testing.assert_allclose(np.asarray(got.mem)[1], np.asarray(want.mem)[0], atol=1e-5, rtol=1e-5,
                               err_msg=f"layer {layer}")
    np.testing.assert_allclose(np.asarray(got.z)[1], np.asarray(want.z)[0], atol=1e-5, rtol=1e-5,
                               err_msg=f"layer {layer}")
  # Guard: unmasked, those tokens do write.
  _, unmasked_memory = run(model, tokens)
  assert np.abs(np.asarray(unmasked_memory[0].z) - np.asarray(memory[0].z)).max() > 1e-2


def test_bfloat16_keeps_float32_finite_memory():
  """dtype='bfloat16': memory M, z stay float32 and finite; logits close to the float32 model's."""
  model32 = tiny_infini(num_kv_heads=2)
  model16 = tiny_infini(num_kv_heads=2, dtype="bfloat16")
  nnx.update(model16, nnx.state(model32, nnx.Param))
  rng = np.random.default_rng(110)
  tokens = rng.integers(1, 64, size=(2, 4 * SEG))
  logits32, memory32 = run(model32, tokens)
  logits16, memory16 = run(model16, tokens)
  assert logits16.dtype == np.float32
  for layer in memory16:
    assert layer.mem.dtype == layer.z.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(layer.mem))) and np.all(np.isfinite(np.asarray(layer.z)))
  rel = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert rel < 0.1, rel
  assert np.abs(logits16 - logits32).max() > 0  # bfloat16 really was used
  for a, b in zip(memory_arrays(memory16), memory_arrays(memory32)):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1

  # A large (long-context) memory still takes small increments exactly: the sums are float32, not bfloat16
  # (bfloat16 spacing at 1000 is 8). Reference: memory_update in float32 on the layer's own bf16 K, V.
  layer = model16.layers[0].attention
  x = jnp.asarray(rng.standard_normal((2, SEG, TINY["embed_dim"])), jnp.bfloat16)
  mem = jnp.asarray(1000.0 + rng.standard_normal((2, 2, 8, 8)), jnp.float32)
  z = jnp.asarray(1000.0 + rng.uniform(0, 1, size=(2, 2, 8)), jnp.float32)
  ones = jnp.ones((2, SEG), jnp.int32)
  _, new = layer(x, *segment_mask_and_positions(ones), type(memory16[0])(mem, z))
  assert new.mem.dtype == new.z.dtype == jnp.float32
  _, k, v = layer.project_raw_qkv(x)
  heads_first = lambda t: jnp.swapaxes(t, 1, 2).astype(jnp.float32)  # noqa: E731
  want_mem, want_z = memory_update(heads_first(k), heads_first(v), mem, z, delta=True)
  np.testing.assert_allclose(np.asarray(new.mem - mem), np.asarray(want_mem - mem), atol=2e-3, rtol=0)
  np.testing.assert_allclose(np.asarray(new.z - z), np.asarray(want_z - z), atol=2e-3, rtol=0)


def test_bad_inputs_raise_clear_errors():
  """time % segment_length != 0, an unknown update_rule and a packed batch raise ValueErrors naming the issue."""
  model = tiny_infini()
  with pytest.raises(ValueError, match="segment_length"):
    model(jnp.ones((1, SEG + 1), jnp.int32))
  with pytest.raises(ValueError, match="foo"):
    tiny_infini(update_rule="foo")
  with pytest.raises(ValueError, match="foo"):
    with nnx.use_eager_sharding(False):
      InfiniAttention(16, 2, 8, update_rule="foo", rngs=nnx.Rngs(0))

  rng = np.random.default_rng(120)
  targets = jnp.asarray(rng.integers(1, 64, size=(2, 2 * SEG)), jnp.int32)
  batch = dict(decoder_input_tokens=jnp.pad(targets[:, :-1], ((0, 0), (1, 0))), decoder_target_tokens=targets,
               decoder_loss_weights=jnp.ones((2, 2 * SEG), jnp.float32))
  sums = model.loss(batch)  # unpacked: fine
  assert np.isfinite(float(sums["loss_sum"])) and float(sums["weight_sum"]) == 2 * 2 * SEG
  packed = dict(batch, decoder_segment_ids=jnp.ones((2, 2 * SEG), jnp.int32),
                decoder_positions=jnp.broadcast_to(jnp.arange(2 * SEG, dtype=jnp.int32), (2, 2 * SEG)))
  with pytest.raises(ValueError, match="pack"):
    model.loss(packed)
