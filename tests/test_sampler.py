"""The rollout engine (r1jax/rollout/) against HF, teacher forcing and itself.

Most tests use the tiny seeded HF fixtures (tests/fixtures/hf_tiny_*): their weights are
large enough (init std 0.15) that greedy choices are not near-ties. sampler.generate()
keeps one Sampler (and its jitted programs) per config, shared by every test in this module.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import sharding
from r1jax.model import decoder, hf
from r1jax.rollout import decode, sampler

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PROMPTS = [[17, 200, 31], [5, 9, 250, 77, 3, 140, 66], [101], [42, 43, 44, 45, 46]]
NEW = 6

_LOADED = {}


def _load(name: str):
  if name not in _LOADED:
    cfg, params = hf.load_checkpoint(os.path.join(FIXTURES, f"hf_tiny_{name}"))
    _LOADED[name] = (cfg, jax.tree.map(jnp.asarray, params))
  return _LOADED[name]


def _golden(name: str):
  return np.load(os.path.join(FIXTURES, f"hf_tiny_{name}", "golden.npz"))


_FORWARD = {}


def _forward(name: str):
  """Teacher-forced logits [B, L, V] of the fixture model (naive attention, full sequence)."""
  if name not in _FORWARD:
    cfg, _ = _load(name)
    _FORWARD[name] = jax.jit(lambda p, t: decoder.forward(p, t, cfg)[0])
  return _FORWARD[name]


def _completion(out, b):
  """Row b's completion tokens and log-probs (host numpy)."""
  mask = np.asarray(out.completion_mask[b])
  return np.asarray(out.tokens[b])[mask], np.asarray(out.logprobs[b])[mask]


# ---------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", ["v3", "noq", "yarn"])
def test_greedy_equals_hf_generate(name):
  """HF's greedy `generate` (KV cache on, float32) stored in golden.npz, token for token."""
  cfg, params = _load(name)
  g = _golden(name)
  prompt = g["gen_prompt_BxP"]
  want = g["gen_ids_BxT"]
  out = sampler.generate(params, cfg, list(prompt), jax.random.key(0),
                         max_new_tokens=want.shape[1] - prompt.shape[1], temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  assert np.asarray(out.completion_mask)[:, prompt.shape[1]:].all()


def test_greedy_equals_teacher_forced_argmax():
  cfg, params = _load("v3")
  out = sampler.generate(params, cfg, PROMPTS, jax.random.key(0), max_new_tokens=NEW,
                         temperature=0.0)
  tokens = np.asarray(out.tokens)
  logits = np.asarray(_forward("v3")(params, jnp.asarray(tokens)))
  for b, p in enumerate(PROMPTS):
    n = len(p)
    np.testing.assert_array_equal(tokens[b, :n], p)
    gen = tokens[b, n:n + NEW]
    np.testing.assert_array_equal(gen, logits[b, n - 1:n + NEW - 1].argmax(-1))
    assert np.asarray(out.completion_mask[b]).sum() == NEW
    assert (tokens[b, n + NEW:] == 0).all()  # pad after the completion


def test_prefill_then_decode_equals_full_forward():
  """Mixed prompt lengths: prefill + 5 single-token steps give the full forward's logits.

  Prefill and decode both run decode.decode_layers (the 'capacity' dispatch for the experts,
  whatever cfg.moe_impl), so one configuration covers them.
  """
  cfg, params = _load("v3")
  seq_BxL = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 12)).astype(np.int32)
  lengths = np.array([3, 7], np.int32)
  n_steps = 5
  full = np.asarray(_forward("v3")(params, jnp.asarray(seq_BxL)))
  prompt_BxP, lens = sampler.pad_prompts([seq_BxL[0, :3], seq_BxL[1, :7]], pad_id=0, bucket=8)
  np.testing.assert_array_equal(lens, lengths)
  dparams = jax.jit(lambda p: decode.decode_params(p, cfg))(params)
  prefill = jax.jit(lambda p, t, n: sampler.prefill(p, cfg, t, n, 8 + n_steps))
  step = jax.jit(lambda p, t, pos, c: decode.decode_layers(p, cfg, t[:, None], pos[:, None], c))
  logits, caches = prefill(dparams, jnp.asarray(prompt_BxP), jnp.asarray(lens))
  rows = np.arange(2)
  np.testing.assert_allclose(np.asarray(logits), full[rows, lengths - 1], atol=1e-4, rtol=1e-4)
  for i in range(n_steps):
    pos = lengths + i
    logits, caches = step(dparams, jnp.asarray(seq_BxL[rows, pos]), jnp.asarray(pos), caches)
    np.testing.assert_allclose(np.asarray(logits), full[rows, pos], atol=1e-4, rtol=1e-4)


def test_cache_holds_only_latents():
  cfg, params = _load("v3")
  b, max_len = 3, 20
  prompt, lens = sampler.pad_prompts(PROMPTS[:b], bucket=8)
  _, caches = jax.eval_shape(
      lambda p, t, n: sampler.prefill(decode.decode_params(p, cfg), cfg, t, n, max_len),
      params, prompt, lens)
  c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
  assert len(caches) == cfg.num_hidden_layers
  assert all(kv.shape == (b, max_len, c + r) for kv in caches)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(caches))
  assert total == (c + r) * cfg.num_hidden_layers * max_len * b
  per_token = sampler.cache_bytes_per_token(cfg)
  assert per_token["latent"] == 2 * (32 + 8) * 4  # 2 layers, C 32 + R 8, float32
  assert per_token["mha"] == 2 * 4 * (16 + 8 + 16) * 4  # 4 heads x (N + R keys, A values)


# ---------------------------------------------------------------------------- sampling

def test_top_p_to_zero_equals_greedy():
  cfg, params = _load("v3")
  greedy = sampler.generate(params, cfg, PROMPTS, jax.random.key(0), max_new_tokens=NEW,
                            temperature=0.0)
  for top_p in (0.0, 1e-6):
    nucleus = sampler.generate(params, cfg, PROMPTS, jax.random.key(7), max_new_tokens=NEW,
                               temperature=1.0, top_p=top_p)
    np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))


def test_sampled_logprobs_equal_forward_recompute():
  """Log-probs are under the temperature-1 model whatever T / top-k / top-p drew the token."""
  cfg, params = _load("v3")
  out = sampler.generate(params, cfg, PROMPTS, jax.random.key(3), max_new_tokens=NEW,
                         temperature=0.7, top_k=20, top_p=0.9)
  tokens = np.asarray(out.tokens)
  logp = np.asarray(jax.nn.log_softmax(_forward("v3")(params, jnp.asarray(tokens)), axis=-1))
  mask = np.asarray(out.completion_mask)
  got = np.asarray(out.logprobs)
  for b in range(len(PROMPTS)):
    cols = np.nonzero(mask[b])[0]
    want = logp[b, cols - 1, tokens[b, cols]]
    np.testing.assert_allclose(got[b, cols], want, atol=1e-4)
  assert (got[~mask] == 0).all()
  # Sampled, not greedy: at least one token differs from the argmax of its context.
  argmax = logp.argmax(-1)
  assert any((tokens[b, np.nonzero(mask[b])[0]] != argmax[b, np.nonzero(mask[b])[0] - 1]).any()
             for b in range(len(PROMPTS)))


def test_rows_are_independent_of_the_batch():
  """A mixed-length batch equals each row run alone, greedy and sampled (per-row keys)."""
  cfg, params = _load("v3")
  keys = jax.random.split(jax.random.key(11), len(PROMPTS))
  for temperature in (0.0, 1.0):
    batch = sampler.generate(params, cfg, PROMPTS, keys, max_new_tokens=NEW,
                             temperature=temperature)
    for b, p in enumerate(PROMPTS):
      alone = sampler.generate(params, cfg, [p], keys[b:b + 1], max_new_tokens=NEW,
                               temperature=temperature)
      tok_b, lp_b = _completion(batch, b)
      tok_a, lp_a = _completion(alone, 0)
      np.testing.assert_array_equal(tok_b, tok_a)
      np.testing.assert_allclose(lp_b, lp_a, atol=1e-5)


def test_deterministic_for_a_key():
  cfg, params = _load("v3")
  run = lambda k: np.asarray(sampler.generate(params, cfg, PROMPTS, jax.random.key(k),
                                              max_new_tokens=NEW).tokens)
  np.testing.assert_array_equal(run(5), run(5))
  assert (run(5) != run(6)).any()
  # A raw uint32 key is accepted and means the same as the typed key it wraps.
  raw = sampler.generate(params, cfg, PROMPTS, jax.random.PRNGKey(5), max_new_tokens=NEW)
  typed = sampler.generate(params, cfg, PROMPTS, jax.random.wrap_key_data(jax.random.PRNGKey(5)),
                           max_new_tokens=NEW)
  np.testing.assert_array_equal(np.asarray(raw.tokens), np.asarray(typed.tokens))


def test_eos_stops_rows_and_the_loop():
  cfg, params = _load("v3")
  greedy = sampler.generate(params, cfg, PROMPTS, jax.random.key(0), max_new_tokens=NEW,
                            temperature=0.0)
  gens = [_completion(greedy, b)[0] for b in range(len(PROMPTS))]
  # Row 0 stops at its 2nd token, row 1 at its 3rd; the others never meet an EOS id.
  eos = (int(gens[0][1]), int(gens[1][2]))
  first_hit = [next((i for i, t in enumerate(g) if t in eos), None) for g in gens]
  out = sampler.generate(params, cfg, PROMPTS, jax.random.key(0), max_new_tokens=NEW,
                         temperature=0.0, eos_ids=eos, pad_id=0)
  for b, p in enumerate(PROMPTS):
    tok, _ = _completion(out, b)
    stop = first_hit[b]
    n = NEW if stop is None else stop + 1
    np.testing.assert_array_equal(tok, gens[b][:n])  # EOS itself is in the completion
    assert int(out.lengths[b]) == n
    assert bool(out.truncated[b]) == (stop is None)
    assert (np.asarray(out.tokens[b])[len(p) + n:] == 0).all()
  assert int(out.steps) == NEW
  # When every row hits an EOS id, the loop stops there.
  all_eos = tuple(sorted({int(g[1]) for g in gens}))
  early = sampler.generate(params, cfg, PROMPTS, jax.random.key(0), max_new_tokens=NEW,
                           temperature=0.0, eos_ids=all_eos)
  assert int(early.steps) <= 2 and not np.asarray(early.truncated).any()
  assert (np.asarray(early.lengths) <= 2).all()


def test_filter_logits_by_hand():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
  ninf = -np.inf
  np.testing.assert_allclose(np.asarray(sampler.filter_logits(logits, 1.0, top_k=2)),
                             [[ninf, np.log(0.4), ninf, np.log(0.3)]], rtol=1e-6)
  # Nucleus 0.6: 0.4 + 0.3 reaches it, so {1, 3}; 0.75 needs 0.2 too; 0.7 exactly is reached by two.
  for p, keep in ((0.6, [1, 3]), (0.75, [1, 2, 3]), (0.3, [1]), (1.0, [0, 1, 2, 3])):
    got = np.isfinite(np.asarray(sampler.filter_logits(logits, 1.0, top_p=p)))[0]
    assert np.nonzero(got)[0].tolist() == keep, p
  np.testing.assert_allclose(np.asarray(sampler.filter_logits(logits, 0.5)), 2 * np.asarray(logits),
                             rtol=1e-6)


def test_nucleus_threshold_equals_sorted_reference():
  """The bisection keeps exactly the sorted-cumulative-mass set, ties included."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 50)).astype(np.float32) * 3
  logits[:, 10:20] = logits[:, :10]  # ties
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  for p in (1e-6, 0.1, 0.5, 0.9, 0.99):
    got = np.asarray(sampler.nucleus_threshold(jnp.asarray(probs), p))
    for row, thr in zip(probs, got):
      desc = np.sort(row)[::-1]
      n_keep = max(int(np.sum(np.cumsum(desc, dtype=np.float64) - desc < p)), 1)
      assert thr == desc[n_keep - 1], (p, thr, desc[n_keep - 1])


def test_sample_frequencies_follow_temperature():
  """4000 draws from softmax(logits / 0.5) restricted to the top 3, within 3 sigma."""
  logits = jnp.array([[1.0, 0.5, 0.0, -0.5]])
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.vmap(lambda k: sampler.sample_tokens(logits, k[None], 0.5, top_k=3)[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=4) / n
  p = np.exp(np.array([2.0, 1.0, 0.0]))
  p = np.append(p / p.sum(), 0.0)
  assert np.all(np.abs(freq - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)
  # top-p 0.75 at temperature 1 keeps {0, 1} (0.50 + 0.30 of the mass), renormalised
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: sampler.sample_tokens(logits, k[None], 1.0, top_p=0.75)[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=4) / n
  p = np.array([0.625, 0.375, 0.0, 0.0])
  assert np.all(np.abs(freq - p) <= 3 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)


# ---------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n_prompts,axes,eos", [
    (8, {"data": 2, "fsdp": 2, "expert": 2}, False),  # sharded params: one partitioned program
    (5, {"data": 2, "fsdp": 2, "expert": 2}, False),
    (8, {"data": 8}, False),                          # replicated params: a rollout per shard
    (5, {"data": 8}, True),                           # ... each stopping at its own EOS
    (8, {"expert": 8}, False),                        # experts split: one expert per shard
    (5, {"data": 2, "expert": 4}, True),              # ... shards of an expert group stop together
])
def test_sharded_rollout_equals_unsharded(n_prompts, axes, eos):
  cfg, params = _load("v3")
  mesh = sharding.make_mesh(axes)
  plan = sampler.Sampler(cfg, mesh).plan
  if "fsdp" in axes:
    assert plan is None
  else:  # the per-shard rollout, expert-parallel exactly when the mesh has an expert axis
    assert plan is not None and plan.expert_axis == ("expert" if "expert" in axes else None)
  prompts = (PROMPTS * 2)[:n_prompts]
  keys = jax.random.split(jax.random.key(1), n_prompts)
  eos_ids = tuple(range(0, cfg.vocab_size, 2)) if eos else ()
  ref = sampler.generate(params, cfg, prompts, keys, max_new_tokens=NEW, eos_ids=eos_ids)
  if eos:  # rows (one per shard below) stop at different steps, some before the end
    assert len(set(np.asarray(ref.lengths).tolist())) > 1 and int(np.min(ref.lengths)) < NEW
  out = sampler.generate(params, cfg, prompts, keys, max_new_tokens=NEW, mesh=mesh,
                         prompt_bucket=1, eos_ids=eos_ids)
  for a, b in zip(ref, out):
    if a.dtype == jnp.float32:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if n_prompts == 8:  # no padding rows: the outputs stay split over the 8 devices
    assert {s.data.shape for s in out.tokens.addressable_shards} == {(1, 7 + NEW)}


# ---------------------------------------------------------------------------- inputs

def test_padded_array_input_and_buckets():
  arr = np.array([[4, 5, 6, 0], [7, 8, 9, 10]])
  prompt, lens = sampler.pad_prompts(arr, pad_id=1, bucket=8, lengths=[3, 4])
  assert prompt.shape == (2, 8)
  np.testing.assert_array_equal(lens, [3, 4])
  np.testing.assert_array_equal(prompt[0], [4, 5, 6, 1, 1, 1, 1, 1])
  cfg, params = _load("v3")
  a = sampler.generate(params, cfg, arr, jax.random.key(0), lengths=[3, 4], max_new_tokens=3,
                       temperature=0.0)
  b = sampler.generate(params, cfg, [[4, 5, 6], [7, 8, 9, 10]], jax.random.key(0),
                       max_new_tokens=3, temperature=0.0, prompt_bucket=1)
  assert a.tokens.shape == (2, 4 + 3)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(max_new_tokens=2, top_k=-1), "top_k"),
    (dict(max_new_tokens=2, eos_ids=(256,)), "eos_ids"),
    (dict(max_new_tokens=2, pad_id=-1), "pad_id"),
    (dict(max_new_tokens=300), "max_position_embeddings"),
])
def test_bad_arguments_raise(kwargs, match):
  cfg, params = _load("v3")
  with pytest.raises(ValueError, match=match):
    sampler.generate(params, cfg, PROMPTS, jax.random.key(0), **kwargs)


def test_bad_prompts_raise():
  cfg, params = _load("v3")
  for prompts, match in (([[1, 2], []], "non-empty"), ([[1, 999]], "token ids"), ([], "at least one"),
                         ([[1.5, 2.0]], "integer")):
    with pytest.raises(ValueError, match=match):
      sampler.generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=2)
  with pytest.raises(ValueError, match="one per row"):
    sampler.generate(params, cfg, PROMPTS, jax.random.split(jax.random.key(0), 3), max_new_tokens=2)
