"""Optimizer construction, schedules and gradient accumulation against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memlm_jax.models.transformer_lm import TransformerLM
from memlm_jax.runtime import partitioning
from memlm_jax.runtime import train_state as train_state_lib
from memlm_jax.runtime.optimizers import make_optimizer, param_paths, warmup_cosine_schedule
from memlm_jax.runtime.trainer import Trainer
from tests import lm_runs

TINY = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64)


def random_tree(seed: int, scale: float = 1.0) -> dict:
  """A small parameter-like tree whose '/'-joined paths end in kernel / bias / scale / embedding."""
  rng = np.random.default_rng(seed)
  shapes = {
      "embedding": {"embedding": (10, 4)},
      "layers": {"0": {"attention": {"query": {"kernel": (4, 2, 3)}, "key": {"kernel": (4, 2, 3)}},
                       "attention_norm": {"scale": (4,)},
                       "mlp": {"wi": {"kernel": (4, 6), "bias": (6,)}}}},
      "final_norm": {"scale": (4,)},
  }
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def one_update(tx, grads, params, state=None):
  state = jax.jit(tx.init)(params) if state is None else state
  return jax.jit(tx.update)(grads, state, params)


def flat(tree) -> dict:
  return dict(zip(jax.tree.leaves(param_paths(tree)), (np.asarray(x, np.float64) for x in jax.tree.leaves(tree))))


# ----------------------------------------------------------------------------------------------------------------
# Weight decay mask.


@pytest.mark.parametrize("seed", [0, 1])
def test_adamw_weight_decay_skips_masked_params(seed):
  lr, wd = 0.01, 0.3
  params = random_tree(seed)
  tx = make_optimizer("adamw", optax.constant_schedule(lr), weight_decay=wd)  # default: no decay on scale$, bias$
  updates, _ = one_update(tx, jax.tree.map(jnp.zeros_like, params), params)
  new = flat(optax.apply_updates(params, updates))
  old = flat(params)
  decayed = 0
  for path, p in old.items():
    if path.endswith("scale") or path.endswith("bias"):
      np.testing.assert_array_equal(new[path], p, err_msg=path)
    else:
      np.testing.assert_allclose(new[path], p - lr * wd * p, rtol=1e-6, atol=1e-8, err_msg=path)
      decayed += 1
  assert decayed == 4


def test_adamw_weight_decay_custom_patterns():
  lr, wd = 0.02, 0.1
  params = random_tree(7)
  tx = make_optimizer("adamw", optax.constant_schedule(lr), weight_decay=wd, no_weight_decay=("^embedding/",
                                                                                              "attention/key"))
  updates, _ = one_update(tx, jax.tree.map(jnp.zeros_like, params), params)
  new, old = flat(optax.apply_updates(params, updates)), flat(params)
  frozen = {"embedding/embedding", "layers/0/attention/key/kernel"}
  for path, p in old.items():
    want = p if path in frozen else p - lr * wd * p
    np.testing.assert_allclose(new[path], want, rtol=1e-6, atol=1e-8, err_msg=path)


def test_weight_decay_mask_on_real_model_paths():
  """The default patterns exclude exactly the RMSNorm scales of TransformerLM."""
  with nnx.use_eager_sharding(False):
    model = TransformerLM(**TINY, rngs=nnx.Rngs(1))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  lr, wd = 0.05, 0.2
  tx = make_optimizer("adamw", optax.constant_schedule(lr), weight_decay=wd)
  updates, _ = one_update(tx, jax.tree.map(jnp.zeros_like, params), params)
  new, old = flat(optax.apply_updates(params, updates)), flat(params)
  scales = [p for p in old if p.endswith("/scale")]
  assert len(scales) == 2 * TINY["num_layers"] + 1
  for path, p in old.items():
    want = p if path in scales else p - lr * wd * p
    np.testing.assert_allclose(new[path], want, rtol=1e-6, atol=1e-8, err_msg=path)


def test_adafactor_weight_decay_mask():
  params = random_tree(3)
  tx = make_optimizer("adafactor", optax.constant_schedule(0.01), weight_decay=0.1)
  updates, _ = one_update(tx, jax.tree.map(jnp.zeros_like, params), params)
  new, old = flat(optax.apply_updates(params, updates)), flat(params)
  for path, p in old.items():
    if path.endswith("scale") or path.endswith("bias"):
      np.testing.assert_array_equal(new[path], p, err_msg=path)
    else:  # decoupled decay scaled by the learning rate, as for adamw
      np.testing.assert_allclose(new[path], p - 0.01 * 0.1 * p, rtol=1e-6, err_msg=path)


# ----------------------------------------------------------------------------------------------------------------
# Per-group learning-rate multipliers.


def test_lr_multipliers_scale_matching_updates_exactly():
  params = random_tree(11)
  grads = [random_tree(12), random_tree(13)]
  kwargs = dict(weight_decay=0.05, clip_grad_norm=1.0)
  plain = make_optimizer("adamw", optax.constant_schedule(0.01), **kwargs)
  scaled = make_optimizer("adamw", optax.constant_schedule(0.01), lr_multipliers={"attention/": 0.1, "query": 3.0,
                                                                                   "^embedding": 0.0}, **kwargs)
  factors = {"layers/0/attention/query/kernel": 0.3, "layers/0/attention/key/kernel": 0.1,
             "embedding/embedding": 0.0}
  plain_state, scaled_state, p_plain = None, None, params
  for g in grads:  # two steps: the multipliers must not leak into the optimizer state
    u_plain, plain_state = one_update(plain, g, p_plain, plain_state)
    u_scaled, scaled_state = one_update(scaled, g, p_plain, scaled_state)
    u_plain, u_scaled = flat(u_plain), flat(u_scaled)
    for path, u in u_plain.items():
      assert np.abs(u).max() > 0, path
      np.testing.assert_allclose(u_scaled[path], factors.get(path, 1.0) * u, rtol=1e-6, atol=0, err_msg=path)
    p_plain = optax.apply_updates(p_plain, jax.tree.map(jnp.asarray, dict_from_flat(u_plain, params)))


def dict_from_flat(flat_values: dict, like) -> dict:
  return jax.tree.map(lambda path: flat_values[path], param_paths(like))


# ----------------------------------------------------------------------------------------------------------------
# Gradient clipping.


def test_clipping_rescales_huge_gradient_to_clip_norm():
  lr, clip, eps = 0.1, 0.5, 1.0  # eps ~ |g| so Adam's first step is not scale-invariant (sign(g))
  params = random_tree(21)
  huge = random_tree(22, scale=1e4)
  norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(huge)))
  assert norm > 1e4
  rescaled = jax.tree.map(lambda g: g * (clip / norm), huge)
  tx = make_optimizer("adamw", optax.constant_schedule(lr), weight_decay=0.0, clip_grad_norm=clip, eps=eps)
  u_huge, _ = one_update(tx, huge, params)
  u_rescaled, _ = one_update(tx, rescaled, params)
  u_huge, u_rescaled, g_c = flat(u_huge), flat(u_rescaled), flat(rescaled)
  for path in u_huge:
    np.testing.assert_allclose(u_huge[path], u_rescaled[path], rtol=1e-5, atol=1e-9, err_msg=path)
    # Adam's first step by hand: bias-corrected m = g, v = g^2.
    np.testing.assert_allclose(u_huge[path], -lr * g_c[path] / (np.abs(g_c[path]) + eps), rtol=1e-5, atol=1e-9,
                               err_msg=path)
  # Without clipping the same gradient gives a visibly different update (so the check above can fail).
  no_clip = make_optimizer("adamw", optax.constant_schedule(lr), weight_decay=0.0, clip_grad_norm=None, eps=eps)
  u_unclipped = flat(one_update(no_clip, huge, params)[0])
  assert max(np.abs(u_unclipped[p] - u_huge[p]).max() for p in u_huge) > 1e-2
  # A gradient already inside the ball is left alone.
  small = jax.tree.map(lambda g: g * 0.5, rescaled)
  u_small, u_small_no_clip = flat(one_update(tx, small, params)[0]), flat(one_update(no_clip, small, params)[0])
  for path in u_small:
    np.testing.assert_allclose(u_small[path], u_small_no_clip[path], rtol=1e-6, err_msg=path)


def test_make_optimizer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="sgd"):
    make_optimizer("sgd", optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match="clip_grad_norm"):
    make_optimizer("adamw", optax.constant_schedule(0.1), clip_grad_norm=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Adafactor.


def test_adafactor_reduces_a_quadratic():
  rng = np.random.default_rng(31)
  target = {"dense": {"kernel": jnp.asarray(rng.standard_normal((160, 136)), jnp.float32),  # factored 2nd moment
                      "bias": jnp.asarray(rng.standard_normal(136), jnp.float32)},
            "small": {"kernel": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)}}
  params = jax.tree.map(jnp.zeros_like, target)

  def loss_fn(p):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  tx = make_optimizer("adafactor", optax.constant_schedule(0.05))
  state = tx.init(params)
  assert any(x.ndim == 1 and x.shape[0] in (160, 136) for x in jax.tree.leaves(state))  # factored row/col stats

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  initial = float(loss_fn(params))
  for _ in range(60):
    params, state, _ = step(params, state)
  final = float(loss_fn(params))
  assert np.isfinite(final) and final < 0.05 * initial, (initial, final)


# ----------------------------------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("peak,warmup,decay,ratio,init", [(1e-3, 10, 110, 0.1, 0.0), (3e-4, 0, 50, 0.0, 0.0),
                                                          (2.0, 7, 20, 0.25, 0.5)])
def test_warmup_cosine_schedule_closed_form(peak, warmup, decay, ratio, init):
  schedule = warmup_cosine_schedule(peak_value=peak, warmup_steps=warmup, decay_steps=decay,
                                    end_value_ratio=ratio, init_value=init)
  end = peak * ratio

  def want(step):
    if step < warmup:
      return init + (peak - init) * step / warmup
    t = min(step - warmup, decay - warmup) / (decay - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))

  assert float(schedule(0)) == pytest.approx(init if warmup else peak, rel=1e-6, abs=1e-12)
  assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
  assert float(schedule(decay)) == pytest.approx(end, rel=1e-5, abs=1e-9)
  assert float(schedule(decay + 100)) == pytest.approx(end, rel=1e-5, abs=1e-9)
  for step in range(0, decay + 3):
    assert float(schedule(step)) == pytest.approx(want(step), rel=1e-5, abs=1e-9), step


@pytest.mark.parametrize("warmup,decay", [(-1, 100), (100, 100), (200, 100)])
def test_warmup_cosine_schedule_rejects_bad_steps(warmup, decay):
  with pytest.raises(ValueError, match="warmup_steps"):
    warmup_cosine_schedule(warmup_steps=warmup, decay_steps=decay)


# ----------------------------------------------------------------------------------------------------------------
# Gradient accumulation in the Trainer.


def make_trainer_and_state(tx, accum_steps):
  model_fn = lambda rngs: TransformerLM(**TINY, rngs=rngs)  # noqa: E731
  parts = lm_runs.partitioner(partitioning.make_mesh(num_devices=1))
  graphdef, abstract_params = train_state_lib.abstract_model(model_fn, seed=0)
  _, shardings = parts.train_state_shardings(abstract_params, tx)
  trainer = Trainer(graphdef, tx, optax.constant_schedule(0.0), parts, shardings, accum_steps=accum_steps)
  with parts.context():
    state = train_state_lib.init_train_state(model_fn, tx, shardings, seed=0)
  return trainer, state


def test_gradient_accumulation_matches_one_big_batch():
  rng = np.random.default_rng(41)
  batch, time = 8, 16
  tokens = rng.integers(1, TINY["vocab_size"], size=(batch, time + 1))
  weights = np.ones((batch, time), np.float32)
  # Uneven token counts per microbatch (microbatch i holds rows i and i + 4), so averaging per-microbatch
  # means instead of normalising by the global weight would give a different loss and gradient.
  weights[1, 3:] = 0.0
  weights[5, 10:] = 0.0
  weights[2, :] = 0.0
  weights[6, 1:] = 0.0
  weights[3, rng.random(time) < 0.5] = 0.0
  local = {"decoder_input_tokens": tokens[:, :-1].astype(np.int32),
           "decoder_target_tokens": tokens[:, 1:].astype(np.int32),
           "decoder_loss_weights": weights}

  # SGD: the update is proportional to the gradient, so a mis-scaled accumulation cannot hide behind Adam's
  # scale invariance.
  tx = optax.sgd(0.5)
  results = {}
  for accum in (1, 4):
    trainer, state = make_trainer_and_state(tx, accum)
    initial = jax.device_get(state.params)
    state, metrics = trainer.train_step(state, trainer.partitioner.global_batch(local))
    results[accum] = (jax.device_get(state.params), jax.device_get(metrics), int(state.step))

  params1, metrics1, step1 = results[1]
  params4, metrics4, step4 = results[4]
  assert step1 == step4 == 1
  assert float(metrics1["tokens"]) == float(metrics4["tokens"]) == float(weights.sum())
  np.testing.assert_allclose(float(metrics4["loss"]), float(metrics1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics4["grad_norm"]), float(metrics1["grad_norm"]), rtol=1e-5)
  assert float(metrics1["grad_norm"]) > 1e-2
  moved = 0.0
  for a, b, p0 in zip(jax.tree.leaves(params1), jax.tree.leaves(params4), jax.tree.leaves(initial)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    moved = max(moved, float(np.abs(a - p0).max()))
  assert moved > 1e-3  # the step really changed the parameters

  # The loss is the token-weighted mean over the whole global batch, computed here independently.
  with nnx.use_eager_sharding(False):
    model = TransformerLM(**TINY, rngs=nnx.Rngs(0))
  logits = np.asarray(model(jnp.asarray(local["decoder_input_tokens"]),
                            jnp.asarray((local["decoder_target_tokens"] != 0).astype(np.int32)),
                            jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))), np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_probs, local["decoder_target_tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(metrics1["loss"]), (nll * weights).sum() / weights.sum(), rtol=1e-5)
