"""Deferred NAM (models/nam.py): the biaser inside the transducer, its retrieval targets and losses,
the forced alignment they come from, freezing the base model, and NAM in the ASR decoder."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memlm_jax.decoding import kmp
from memlm_jax.decoding.transducer_beam import TransducerFns, beam_search
from memlm_jax.launch import asr_lib
from memlm_jax.launch.biasing import KmpBiasing, NamBiasing
from memlm_jax.layers.conformer import ConformerEncoder
from memlm_jax.losses import rnnt
from memlm_jax.models import nam
from memlm_jax.models.transducer import Transducer
from memlm_jax.models.transducer_parts import JointNetwork, StatelessPredictor
from memlm_jax.runtime import optimizers

VOCAB = 20


def _transducer(seed=0, *, biased=True, strength=1.0, deferred=True, top_k=4, weights=(1.0, 1.0, 1.0)):
  hook = functools.partial(nam.BiasingAttention, context_dim=16, attention_dim=8, strength=strength)
  encoder = functools.partial(ConformerEncoder, model_dim=32, num_layers=2, num_heads=2, conv_kernel=3,
                              context_layers=(0, 1) if biased else (), context_module_factory=hook if biased else None)
  biaser = functools.partial(nam.NamBiaser, context_dim=16, num_heads=2, filter_dim=8, top_k=top_k, deferred=deferred,
                             phrase_attention_weight=weights[0], wordpiece_attention_weight=weights[1],
                             filter_weight=weights[2]) if biased else None
  with nnx.use_eager_sharding(False):
    model = Transducer(VOCAB, num_mel_bins=16, spec_augment=None, encoder=encoder,
                       predictor=functools.partial(StatelessPredictor, embed_dim=8, output_dim=8),
                       joint=functools.partial(JointNetwork, joint_dim=8), biaser=biaser, rngs=nnx.Rngs(seed))
  if biased:  # the output projection starts at zero; make the bias visible
    for i, hook_module in enumerate(model.encoder.context_modules):
      hook_module.out.kernel[...] = jax.random.normal(jax.random.key(100 + i), hook_module.out.kernel.shape)
  return model


def _batch(seed=0, batch=2, phrases=5, phrase_len=3, samples=4000, labels=6):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, phrase_len + 1, (batch, phrases))
  paddings = (np.arange(phrase_len)[None, None] >= lengths[..., None]).astype(np.float32)
  tokens = np.where(paddings == 0, rng.integers(1, VOCAB, (batch, phrases, phrase_len)), 0).astype(np.int32)
  return {"audio": jnp.asarray(rng.normal(size=(batch, samples)).astype(np.float32) * 0.1),
          "audio_paddings": jnp.zeros((batch, samples)),
          "targets": jnp.asarray(rng.integers(1, VOCAB, (batch, labels)), jnp.int32),
          "target_paddings": jnp.zeros((batch, labels)),
          "bias_tokens": jnp.asarray(tokens), "bias_paddings": jnp.asarray(paddings)}


def _encode(model, batch, **bias):
  out = model.encode(batch["audio"], batch["audio_paddings"], **bias)
  nnx.pop(model, nnx.Intermediate)
  return out


def _biased(model, batch):
  return _encode(model, batch, bias_tokens=batch["bias_tokens"], bias_paddings=batch["bias_paddings"])[0]


def test_deferred_equals_full_encoding_when_k_covers_the_list():
  batch = _batch(1, phrases=4)
  deferred = _transducer(3, deferred=True, top_k=4)
  full = _transducer(3, deferred=False, top_k=4)
  assert not np.allclose(_biased(deferred, batch), _encode(deferred, batch)[0], atol=1e-3)  # the bias matters
  np.testing.assert_allclose(_biased(deferred, batch), _biased(full, batch), rtol=1e-5, atol=1e-5)


def test_order_of_the_list_changes_nothing():
  batch = _batch(2, phrases=6)
  model = _transducer(4, top_k=3)
  permutation = np.random.default_rng(0).permutation(6)
  permuted = {**batch, "bias_tokens": batch["bias_tokens"][:, permutation],
              "bias_paddings": batch["bias_paddings"][:, permutation]}
  np.testing.assert_allclose(_biased(model, batch), _biased(model, permuted), rtol=1e-5, atol=1e-5)


def test_padded_phrases_are_never_selected():
  batch = _batch(3, phrases=6)
  paddings = np.asarray(batch["bias_paddings"]).copy()
  paddings[0, [1, 3, 4]] = 1.0  # row 0 has 3 real phrases: 0, 2, 5
  paddings[1, :] = 1.0  # row 1 has none
  batch = {**batch, "bias_paddings": jnp.asarray(paddings),
           "bias_tokens": jnp.where(jnp.asarray(paddings) > 0, 0, batch["bias_tokens"])}
  model = _transducer(5, top_k=4)
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  context = model.biaser(x, jnp.zeros((2, 7)), batch["bias_tokens"], batch["bias_paddings"])
  selected, valid = np.asarray(context.selected), np.asarray(context.phrase_valid)
  assert sorted(selected[0][valid[0, :4]]) == [0, 2, 5]
  assert not valid[1, :4].any() and valid[:, 4].all()  # only the no-bias entry is left
  # An empty list runs (only the no-bias entry) and every frame's phrase attention goes to it.
  out = _biased(model, batch)
  assert np.isfinite(np.asarray(out)).all()
  hook = model.encoder.context_modules[0]
  hook(x, jnp.zeros((2, 7)), context)
  phrase_p = np.exp(np.asarray(hook.phrase_log_attention.get_value()[0]))
  np.testing.assert_allclose(phrase_p[1, :, 4], 1.0, rtol=1e-6)
  assert (phrase_p[0][:, np.flatnonzero(~valid[0])] == 0).all()


def test_a_list_shorter_than_k_is_padded_not_refused():
  batch = _batch(4, phrases=2)
  padded = {**batch, "bias_tokens": jnp.pad(batch["bias_tokens"], ((0, 0), (0, 3), (0, 0))),
            "bias_paddings": jnp.pad(batch["bias_paddings"], ((0, 0), (0, 3), (0, 0)), constant_values=1.0)}
  for deferred in (True, False):
    model = _transducer(6, top_k=4, deferred=deferred)
    np.testing.assert_allclose(_biased(model, batch), _biased(model, padded), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_biased(_transducer(6, top_k=4), batch),
                             _biased(_transducer(6, top_k=4, deferred=False), batch), rtol=1e-5, atol=1e-5)


def _copy_base(biased_model):
  base = _transducer(99, biased=False)
  state = nnx.state(biased_model, nnx.Param)
  base_state = nnx.state(base, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  nnx.update(base, nnx.from_flat_state({path: flat[path] for path, _ in nnx.to_flat_state(base_state)}))
  return base


def test_strength_zero_is_the_base_transducer_bit_for_bit():
  batch = _batch(5)
  model = _transducer(7, strength=0.0, weights=(0.0, 0.0, 0.0))
  base = _copy_base(model)
  np.testing.assert_array_equal(_biased(model, batch), _encode(base, batch)[0])
  assert float(model.loss(batch)["loss_sum"]) == float(base.loss(batch)["loss_sum"])
  # and a biased model with the bias on is not the base model
  strong = _transducer(7)
  assert not np.array_equal(_biased(strong, batch), _encode(_copy_base(strong), batch)[0])


def test_frozen_base_gets_zero_updates_and_the_biaser_learns():
  batch = _batch(6)
  model = _transducer(8)
  graphdef, params = nnx.split(model, nnx.Param)
  frozen = ["^(frontend|encoder/(subsampling|blocks)|predictor|joint)/"]
  tx = optimizers.make_optimizer(schedule=optax.constant_schedule(1e-2), weight_decay=0.1, frozen=frozen)
  opt_state = tx.init(params)

  def loss(p):
    return nnx.merge(graphdef, p).loss(batch)["loss_sum"]

  gradient = jax.jit(jax.grad(loss))
  for _ in range(2):
    grads = gradient(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
  paths = optimizers.param_paths(params)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
  flat = list(zip(jax.tree.leaves(paths), jax.tree.leaves(changed)))
  frozen_paths = [p for p, _ in flat if p.startswith(("frontend", "encoder/subsampling", "encoder/blocks", "predictor",
                                                       "joint"))]
  assert frozen_paths and not any(c for p, c in flat if p in frozen_paths)
  assert any(c for p, c in flat if p.startswith("biaser/")) and any(
      c for p, c in flat if p.startswith("encoder/context_modules/"))
  with pytest.raises(ValueError, match="not a regular expression"):
    optimizers.make_optimizer(frozen=["("])
  with pytest.raises(ValueError, match="'encoder/block/' matches no parameter"):
    optimizers.make_optimizer(frozen=["encoder/block/"]).init(params)
  with pytest.raises(ValueError, match="matches every parameter"):
    optimizers.make_optimizer(frozen=["."]).init(params)
  # Frozen parameters hold no optimizer state: the state is the size of the trainable ones x 2 (Adam).
  trainable = sum(x.size for p, x in zip(jax.tree.leaves(paths), jax.tree.leaves(params)) if p not in frozen_paths)
  assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0) == 2 * trainable


# -- targets on hand-worked examples ----------------------------------------------------------------------------


def test_label_phrases_hand_example():
  # targets: 5 7 8 3 7 8 9 ; phrases: k0 = [7 8], k1 = [7 8 9], k2 = [4] (absent), k3 = padding
  targets = jnp.array([[5, 7, 8, 3, 7, 8, 9, 0]])
  target_paddings = jnp.array([[0, 0, 0, 0, 0, 0, 0, 1.0]])
  tokens = jnp.array([[[7, 8, 0], [7, 8, 9], [4, 0, 0], [0, 0, 0]]])
  valid = tokens > 0
  phrase, position = nam.label_phrases(targets, target_paddings, tokens, valid)
  # labels 1-2: k0 (the only occurrence there); labels 4-6: k1 (longer than k0's occurrence at 4)
  np.testing.assert_array_equal(phrase[0], [-1, 0, 0, -1, 1, 1, 1, -1])
  np.testing.assert_array_equal(position[0], [-1, 0, 1, -1, 0, 1, 2, -1])


def _naive_label_phrases(targets, n_labels, phrases):
  """Per label: (k, l) of the covering occurrence with the longest phrase, then the lowest k, then the
  earliest start; (-1, -1) when none."""
  best = [(-1, -1, None)] * len(targets)
  for k, phrase in enumerate(phrases):
    for a in range(n_labels - len(phrase) + 1 if phrase else 0):
      if list(targets[a:a + len(phrase)]) == list(phrase):
        for l in range(len(phrase)):
          key = (len(phrase), -k, -a)
          if best[a + l][2] is None or key > best[a + l][2]:
            best[a + l] = (k, l, key)
  return [b[0] for b in best], [b[1] for b in best]


def test_label_phrases_against_a_naive_loop_on_random_lists():
  rng = np.random.default_rng()
  for _ in range(20):
    batch, labels, num_phrases, length = 3, 12, 4, 3
    targets = rng.integers(1, 4, (batch, labels))  # a small alphabet: many (overlapping) occurrences
    n_labels = rng.integers(0, labels + 1, batch)
    paddings = (np.arange(labels)[None] >= n_labels[:, None]).astype(np.float32)
    lengths = rng.integers(0, length + 1, (batch, num_phrases))
    valid = np.arange(length)[None, None] < lengths[..., None]
    tokens = np.where(valid, rng.integers(1, 4, (batch, num_phrases, length)), 0)
    phrase, position = map(np.asarray, nam.label_phrases(jnp.asarray(targets), jnp.asarray(paddings),
                                                         jnp.asarray(tokens), jnp.asarray(valid)))
    for b in range(batch):
      lists = [list(tokens[b, k, :lengths[b, k]]) for k in range(num_phrases)]
      want_phrase, want_position = _naive_label_phrases(targets[b], n_labels[b], lists)
      assert list(phrase[b]) == want_phrase and list(position[b]) == want_position, (targets[b], lists)


def test_frame_targets_hand_example():
  # labels emitted at frames 1, 1, 3, 6; labels 1-2 are phrase 2, wordpieces 0-1; K = 4 (entry 4 is
  # no-bias), phrases of 3 wordpieces; 9 frames, the last padded.
  emit = jnp.array([[1, 1, 3, 6]])
  label_phrase = jnp.array([[-1, 2, 2, -1]])
  label_position = jnp.array([[-1, 0, 1, -1]])
  paddings = jnp.array([[0, 0, 0, 0, 0, 0, 0, 0, 1.0]])
  phrase, wordpieces = nam.frame_targets(emit, label_phrase, label_position, paddings, 4, 3)
  no_bias = [0, 0, 0, 0, 1]
  want = [no_bias, [0, 0, 0.5, 0, 0.5], no_bias, [0, 0, 1, 0, 0], no_bias, no_bias, no_bias, no_bias, [0] * 5]
  np.testing.assert_allclose(phrase[0], want)
  want_pieces = np.zeros((9, 5, 3))
  want_pieces[1, 2, 0] = want_pieces[3, 2, 1] = 1
  np.testing.assert_array_equal(wordpieces[0], want_pieces)


def test_filter_targets_hand_example():
  targets = jnp.array([[5, 7, 8, 3], [1, 2, 3, 4]])
  target_paddings = jnp.zeros((2, 4))
  tokens = jnp.array([[[7, 8], [3, 0], [9, 0]], [[9, 9], [6, 0], [0, 0]]])
  paddings = (tokens == 0).astype(jnp.float32)
  target = nam.filter_targets(tokens, paddings, targets, target_paddings)
  np.testing.assert_allclose(target, [[0.5, 0.5, 0, 0], [0, 0, 0, 1]])


def test_attention_losses_hand_example():
  # Labels 5 6 7; the selected phrases are [6 7] (slot 0) and [9] (slot 1); slot 2 is no-bias. Label 5 is
  # emitted at frame 0, labels 6 and 7 (phrase 0, wordpieces 0 and 1) both at frame 2; frames 1, 3 are silent.
  rng = np.random.default_rng(0)
  phrase_log_p = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(1, 4, 3)), jnp.float32))
  wordpiece_log_p = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(1, 4, 3, 2)), jnp.float32))
  intermediates = {"selected_phrases": jnp.array([[0, 1]]), "phrase_log_attention": [phrase_log_p],
                   "wordpiece_log_attention": [wordpiece_log_p]}
  batch = {"targets": jnp.array([[5, 6, 7]]), "target_paddings": jnp.zeros((1, 3)),
           "bias_tokens": jnp.array([[[6, 7], [9, 0]]]), "bias_paddings": jnp.array([[[0, 0], [0, 1.0]]])}
  emit = jnp.array([[0, 2, 2]])
  paddings, valid = jnp.zeros((1, 4)), jnp.array([True])
  p, w = np.asarray(phrase_log_p[0]), np.asarray(wordpiece_log_p[0])
  pa_all = -(p[0, 2] + p[1, 2] + p[2, 0] + p[3, 2]) / 4
  pa_emitting = -(p[0, 2] + p[2, 0]) / 2
  wpa = -(0.5 * w[2, 0, 0] + 0.5 * w[2, 0, 1])
  for frames, want in (("all", pa_all), ("emitting", pa_emitting)):
    losses = nam.attention_losses(intermediates, batch, emit, paddings, valid, frames)
    np.testing.assert_allclose(float(losses["phrase_attention"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(losses["wordpiece_attention"]), wpa, rtol=1e-6)
  # A padded utterance row contributes nothing.
  none = nam.attention_losses(intermediates, batch, emit, paddings, jnp.array([False]))
  assert float(none["phrase_attention"]) == float(none["wordpiece_attention"]) == 0.0


def _brute_force_alignment(blank, label, frames, labels):
  best, best_emit = -np.inf, None
  for positions in itertools.combinations(range(frames - 1 + labels), labels):
    t = u = 0
    score, emit = 0.0, []
    for i in range(frames - 1 + labels):
      if i in positions:
        score, emit, u = score + label[t, u], emit + [t], u + 1
      else:
        score, t = score + blank[t, u], t + 1
    score += blank[frames - 1, labels]
    if score > best:
      best, best_emit = score, emit
  return best_emit


def test_viterbi_alignment_is_the_best_path_by_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(10):
    batch, frames, labels = 3, 6, 4
    blank = rng.normal(size=(batch, frames, labels + 1)).astype(np.float32)
    label = rng.normal(size=(batch, frames, labels + 1)).astype(np.float32)
    t_len, u_len = rng.integers(1, frames + 1, batch), rng.integers(0, labels + 1, batch)
    frame_paddings = (np.arange(frames)[None] >= t_len[:, None]).astype(np.float32)
    label_paddings = (np.arange(labels)[None] >= u_len[:, None]).astype(np.float32)
    got = np.asarray(rnnt.viterbi_alignment(blank, label, frame_paddings, label_paddings))
    for b in range(batch):
      assert list(got[b, :u_len[b]]) == _brute_force_alignment(blank[b], label[b], t_len[b], u_len[b])
      assert (got[b, u_len[b]:] == -1).all()


def test_forced_alignment_of_the_model_matches_the_full_lattice():
  model = _transducer(9)
  batch = _batch(7)
  encoder_out, encoder_paddings = _encode(model, batch)
  logits = model.joint(encoder_out[:, :, None], model.predictor(batch["targets"])[:, None])
  blank, label = rnnt.emission_logprobs(logits, encoder_paddings, batch["targets"], batch["target_paddings"])
  want = rnnt.viterbi_alignment(blank, label, encoder_paddings, batch["target_paddings"])
  for chunk in (None, 3):
    model.loss_frame_chunk = chunk
    got = model.forced_alignment(encoder_out, encoder_paddings, batch["targets"], batch["target_paddings"])
    np.testing.assert_array_equal(got, want)


def test_loss_reports_its_terms_and_trains_every_part():
  model = _transducer(10, top_k=4)
  batch = _batch(8, phrases=4)
  # Phrase 0 of each row has 3 wordpieces and occurs in the targets, so CE-WPA has frames to score.
  tokens, paddings = np.asarray(batch["bias_tokens"]).copy(), np.asarray(batch["bias_paddings"]).copy()
  tokens[:, 0], paddings[:, 0] = [[3, 4, 5], [6, 7, 8]], 0.0
  targets = np.asarray(batch["targets"]).copy()
  targets[:, 2:5] = tokens[:, 0]
  batch = {**batch, "targets": jnp.asarray(targets), "bias_tokens": jnp.asarray(tokens),
           "bias_paddings": jnp.asarray(paddings)}
  sums = model.loss(batch)
  for key in ("rnnt_loss_sum", "phrase_attention_loss_sum", "wordpiece_attention_loss_sum", "filter_loss_sum"):
    assert float(sums[key]) > 0, key
  total = sum(float(sums[k]) for k in ("rnnt_loss_sum", "phrase_attention_loss_sum", "wordpiece_attention_loss_sum",
                                       "filter_loss_sum"))
  np.testing.assert_allclose(float(sums["loss_sum"]), total, rtol=1e-5)
  grads = nnx.grad(lambda m: m.loss(batch)["loss_sum"])(model)
  norms = {name: float(optax.global_norm(nnx.state(grads, nnx.Param)[name])) for name in ("biaser", "encoder")}
  assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms
  filter_grad = optax.global_norm(nnx.state(grads, nnx.Param)["biaser"]["dan_out"])
  assert float(filter_grad) > 0  # the filter learns through its own loss (top-K passes no gradient)


def test_bad_settings_and_inputs_get_one_clear_error():
  with pytest.raises(ValueError, match="context_layers"):
    with nnx.use_eager_sharding(False):
      Transducer(VOCAB, num_mel_bins=16, encoder=functools.partial(ConformerEncoder, model_dim=32, num_layers=2,
                                                                   num_heads=2),
                 biaser=nam.NamBiaser, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="phrase_attention_weight"):
    with nnx.use_eager_sharding(False):
      nam.NamBiaser(VOCAB, 32, phrase_attention_weight=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="strength"):
    with nnx.use_eager_sharding(False):
      nam.BiasingAttention(32, strength=-1.0, rngs=nnx.Rngs(0))
  model = _transducer(11)
  batch = _batch(9)
  with pytest.raises(ValueError, match=r"needs bias_tokens \[batch, phrases, phrase_len\].*got \(5, 3\)"):
    model.encode(batch["audio"], batch["audio_paddings"], bias_tokens=batch["bias_tokens"][0],
                 bias_paddings=batch["bias_paddings"][0])
  with pytest.raises(ValueError, match=r"lists for 1 utterances, the audio \(2, 4000\) for 2"):
    model.encode(batch["audio"], batch["audio_paddings"], bias_tokens=batch["bias_tokens"][:1],
                 bias_paddings=batch["bias_paddings"][:1])
  with pytest.raises(ValueError, match="integer bias_tokens"):
    model.encode(batch["audio"], batch["audio_paddings"], bias_tokens=batch["bias_tokens"].astype(jnp.float32),
                 bias_paddings=batch["bias_paddings"])
  with pytest.raises(ValueError, match="kmp boosts the list NAM reads"):
    NamBiasing(kmp=KmpBiasing(delta=1.0, bias_lists="anti"))
  base = _transducer(12, biased=False)
  with pytest.raises(ValueError, match="no biaser"):
    base.encode(batch["audio"], batch["audio_paddings"], bias_tokens=batch["bias_tokens"],
                bias_paddings=batch["bias_paddings"])
  with pytest.raises(ValueError, match="kmp_phrases"):
    NamBiasing(kmp_phrases="nam_top_k")


# -- decoding ------------------------------------------------------------------------------------------------------


def test_select_phrases_gathers_rows_and_empties_outside_indices():
  table = kmp.make_batched_phrase_table([[[1, 2], [3], [4, 5, 6]], [[7], [8, 9]]], VOCAB)
  picked = kmp.select_phrases(table, jnp.array([[2, 0], [1, 5]]))
  np.testing.assert_array_equal(picked.lengths, [[3, 2], [2, 0]])
  np.testing.assert_array_equal(picked.tokens[0, 0, :3], [4, 5, 6])
  assert (np.asarray(picked.tokens[1, 1]) == -1).all() and (np.asarray(picked.chain_lengths[1, 1]) == 0).all()


def _decoder_inputs(model, batch):
  graphdef, params = nnx.split(model)
  return graphdef, params, batch


def test_nam_decoder_runs_the_biased_encoder_and_kmp_over_its_top_k():
  model = _transducer(13, top_k=2)
  batch = _batch(10, phrases=5)
  graphdef, params = nnx.split(model)
  search = dict(beam_size=2, max_symbols_per_frame=3, max_output_length=8)
  plain = asr_lib.make_decoder(graphdef, **search)(params, batch["audio"], batch["audio_paddings"])
  lists = dict(bias_tokens=batch["bias_tokens"], bias_paddings=batch["bias_paddings"])
  nam_only = asr_lib.make_decoder(graphdef, biasing=NamBiasing(), **search)(
      params, batch["audio"], batch["audio_paddings"], **lists)
  # NAM alone is the beam search over the biased encoding (independent: the search on encode_biased's output).
  encoder_out, encoder_paddings, selected = model.encode_biased(batch["audio"], batch["audio_paddings"],
                                                                batch["bias_tokens"], batch["bias_paddings"])
  want = beam_search(TransducerFns.from_model(model), encoder_out, encoder_paddings, beam_size=2,
                     max_symbols_per_frame=3, max_output_length=8)
  np.testing.assert_array_equal(nam_only[0], want.tokens[:, 0])
  np.testing.assert_array_equal(nam_only[1], want.lengths[:, 0])
  # With s = 0 the NAM decoder is the plain one, bit for bit, inside jit.
  silent = _transducer(13, top_k=2, strength=0.0)
  silent_graphdef, silent_params = nnx.split(silent)
  silent_params = jax.tree.map(lambda a, b: b, silent_params, params)  # the same weights as `model`
  quiet = asr_lib.make_decoder(silent_graphdef, biasing=NamBiasing(), **search)(
      silent_params, batch["audio"], batch["audio_paddings"], **lists)
  np.testing.assert_array_equal(quiet[0], plain[0])
  np.testing.assert_array_equal(quiet[1], plain[1])
  # KMP over NAM's top K equals KMP over a table holding exactly the phrases NAM selected.
  table = kmp.phrase_table_from_padded(np.asarray(batch["bias_tokens"]), np.asarray(batch["bias_paddings"]) == 0,
                                       VOCAB, chain_width=3)
  booster = KmpBiasing(delta=3.0)
  top = asr_lib.make_decoder(graphdef, biasing=NamBiasing(kmp=booster, kmp_phrases="nam_top_k"), **search)(
      params, batch["audio"], batch["audio_paddings"], table, np.float32(3.0), **lists)
  selected = np.asarray(selected)
  tokens = np.take_along_axis(np.asarray(batch["bias_tokens"]), selected[:, :, None], axis=1)
  paddings = np.take_along_axis(np.asarray(batch["bias_paddings"]), selected[:, :, None], axis=1)
  small = kmp.phrase_table_from_padded(tokens, paddings == 0, VOCAB, chain_width=3)
  same = asr_lib.make_decoder(graphdef, biasing=NamBiasing(kmp=booster), **search)(
      params, batch["audio"], batch["audio_paddings"], small, np.float32(3.0), **lists)
  np.testing.assert_array_equal(top[0], same[0])
  np.testing.assert_array_equal(top[1], same[1])


# -- spotting evidence (selection='ctc_spotting', spotting_prior) -----------------------------------------------


def test_spotting_selects_the_best_fitting_phrases_and_puts_its_prior_on_their_windows():
  """A hand-made CTC posterior spells phrase 3 = (5, 6) at frames 2-3 and phrase 1 = (7,) at frame 6; the
  selection keeps them first (against a naive ranking by phrase_spots' gain per token) and the prior is p
  exactly at their windows' frames, on their slots only; a huge prior makes the phrase attention follow it."""
  frames, phrases = 9, 5
  best = [0, 0, 5, 6, 0, 0, 7, 0, 0]
  log_probs = jnp.log(jnp.asarray(np.where(np.eye(VOCAB)[best] > 0, 0.8, 0.2 / (VOCAB - 1)), jnp.float32))[None]
  tokens = np.zeros((1, phrases, 2), np.int32)
  for b, phrase in enumerate([(9, 9), (7,), (11, 12), (5, 6), (5, 13)]):
    tokens[0, b, :len(phrase)] = phrase
  paddings = (tokens == 0).astype(np.float32)
  for prior in (0.0, 2.5, 1e4):
    with nnx.use_eager_sharding(False):
      biaser = nam.NamBiaser(VOCAB, 32, context_dim=16, num_heads=2, filter_dim=8, top_k=3, selection="ctc_spotting",
                             spotting_prior=prior, spotting_threshold=1.0, rngs=nnx.Rngs(0))
      hook = nam.BiasingAttention(32, context_dim=16, attention_dim=8, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1, frames, 32))
    context = biaser(x, jnp.zeros((1, frames)), jnp.asarray(tokens), jnp.asarray(paddings), log_probs)
    spots = nam.ctc_spotting.phrase_spots(log_probs, jnp.zeros((1, frames)), jnp.asarray(tokens), jnp.asarray(paddings))
    per_token = np.asarray(spots.gain[0]) / (tokens[0] > 0).sum(-1)
    assert context.selected[0].tolist() == np.argsort(-per_token, kind="stable")[:3].tolist()
    assert context.selected[0, :2].tolist() == [1, 3]  # both fit exactly (gain 0; ties by index)
    expected = np.zeros((frames, 4), np.float32)
    expected[6, 0] = expected[2:4, 1] = prior  # the third kept phrase loses > 1 nat per token: no prior
    np.testing.assert_array_equal(context.phrase_prior[0], expected)
    if prior == 1e4:
      hook(x, jnp.zeros((1, frames)), context)
      attention = np.exp(np.asarray(nnx.pop(hook, nnx.Intermediate)["phrase_log_attention"][0][0]))
      np.testing.assert_allclose(attention[[6, 2, 3], [0, 1, 1]], 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="needs the base model's CTC log-probs"):
    biaser(x, jnp.zeros((1, frames)), jnp.asarray(tokens), jnp.asarray(paddings))
  with pytest.raises(ValueError, match="selection must be one of"):
    nam.NamBiaser(VOCAB, 32, selection="ctc", rngs=nnx.Rngs(0))


def test_a_spotting_biaser_needs_a_ctc_head_and_reads_the_base_models():
  hook = functools.partial(nam.BiasingAttention, context_dim=16, attention_dim=8)
  encoder = functools.partial(ConformerEncoder, model_dim=32, num_layers=2, num_heads=2, conv_kernel=3,
                              context_layers=(1,), context_module_factory=hook)
  biaser = functools.partial(nam.NamBiaser, context_dim=16, num_heads=2, filter_dim=8, top_k=2,
                             selection="ctc_spotting", spotting_prior=3.0)
  parts = dict(num_mel_bins=16, spec_augment=None, encoder=encoder, biaser=biaser,
               predictor=functools.partial(StatelessPredictor, embed_dim=8, output_dim=8),
               joint=functools.partial(JointNetwork, joint_dim=8))
  with nnx.use_eager_sharding(False):
    with pytest.raises(ValueError, match="has no CTC head"):
      Transducer(VOCAB, **parts, rngs=nnx.Rngs(0))
    early = functools.partial(encoder, context_layers=(0, 1))
    with pytest.raises(ValueError, match=r"context_layers=\[0, 1\] must start at the last block \(1\)"):
      Transducer(VOCAB, **{**parts, "encoder": early}, ctc_weight=0.3, rngs=nnx.Rngs(0))
    model = Transducer(VOCAB, **parts, ctc_weight=0.3, rngs=nnx.Rngs(0))
  batch = _batch(phrases=5)
  losses = model.loss(batch)  # trains through the spotting biaser
  assert np.isfinite(float(losses["loss_sum"]))
  # The selection is the K best phrases by spotting gain on the base model's own CTC posteriors.
  plain, plain_paddings = _encode(model, batch)
  spots = nam.ctc_spotting.phrase_spots(model.ctc_log_probs(plain), plain_paddings, batch["bias_tokens"],
                                        batch["bias_paddings"])
  per_token = np.asarray(spots.gain) / np.asarray((batch["bias_paddings"] == 0).sum(-1))
  _, _, selected = model.encode_biased(batch["audio"], batch["audio_paddings"], batch["bias_tokens"],
                                       batch["bias_paddings"])
  for u in range(2):
    assert sorted(np.asarray(selected[u]).tolist()) == sorted(np.argsort(-per_token[u], kind="stable")[:2].tolist())
