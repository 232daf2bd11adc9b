"""Rollouts for GRPO: one prefill pass, then a jitted decode loop over the latent cache.

Why a dedicated engine: GRPO (DeepSeek-R1 section 2.2.1) samples G completions per prompt
and needs, for each sampled token, its log-probability under the sampling ("old") policy.
`Sampler` turns a batch of prompts into completions, masks and those log-probs, with the
whole decode loop inside one `jax.jit`. Build it once per stage (it validates the config
and picks the layout), `prepare` the weights once per set of weights (the decode layout of
`decode.decode_params`), then `generate` as often as needed.

Layout. Prompts are left-aligned, as the data pipeline's PromptBatch holds them: row b
holds its prompt at positions 0..n_b-1 of a [B, P] array (P rounded up to a bucket), and
its completion is written right after the prompt (from column n_b), so a row's computation
never depends on other rows' lengths. Outputs are [B, W]: W = the prompt array's width (or
the longest listed prompt) + max_new_tokens.
Prefill runs the padded [B, P] batch once (positions 0..P-1) and fills preallocated caches
that hold only the MLA latent entries [c_kv | k_rope] per token per layer (DeepSeek-V2
section 2.1.3: Z = C + R numbers, never per-head keys and values); a GQA model (Qwen2,
Llama) caches keys and values per KV head instead ([B, S, 2, Hkv, Dh] per layer). The next-token logits
of row b are read at index n_b - 1. Decode step t feeds row b's previous token at position
n_b + t - 1; latents are written at slot = position and a query at q sees slots <= q, so
the prefill's padding slots are overwritten before anything reads them. Prefill and decode
both run `decode.decode_layers` (the model's own block over the cache), the decode steps
inside a `lax.while_loop` that stops as soon as every row has emitted an end-of-sequence
id. Tests hold prefill + decode to the full forward and to HF's generate.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k
(keep the k largest), then top-p (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration": keep the smallest set of most likely tokens whose probability reaches p;
ties with the last kept value are kept too), then a draw by inverting the CDF. Keys: row b
uses its own key k_b (the given per-row keys, or fold_in(key, b)); step t draws with
fold_in(k_b, t). So a row's samples depend only on its key, never on the other rows in
the batch. `num_ids` > 0 draws only ids below it (greedy included): a checkpoint whose
vocabulary is larger than the run's tokenizer (init_from_hf) never samples an id the
tokenizer cannot decode.

Log-probs are log_softmax of the raw (temperature 1) logits at the sampled token, whatever
temperature / top-k / top-p drew it: these are GRPO's pi_old(o_t | q, o_<t) when rollouts
use the training policy unchanged. (They are the log-probs the sampler computed in decode
order; a teacher-forced forward over the same tokens gives the same values up to float
rounding, which the tests check.)

Sharded rollouts: give the Sampler a `mesh` (from `sharding.make_mesh`); the batch is split over the
mesh's batch axes (rows are padded up to a multiple of that split and dropped afterwards),
the parameters are placed with `sharding.param_shardings(cfg, mesh, param_rules)` (the
training layout, or a rollout-specific rules override) and the cache is split like the
batch. Two layouts run one rollout per batch shard under shard_map: all parameters
replicated (shards never communicate, each stops at its own EOS), and replicated except
the routed experts split over batch axes such as 'expert' (DeepSeek-V3 section 3.4's
deployment: attention data-parallel, MoE expert-parallel, tokens exchanged at each MoE
layer by expert_parallel's 'gather' exchange, the code expert-parallel training uses, so
each shard reads only its share of the expert weights). Other layouts run as
one jit-partitioned program.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from r1jax import sharding
from r1jax.model import config as config_lib
from r1jax.model import decoder
from r1jax.model.layers import is_spec
from r1jax.rollout import decode


class SampleOutput(NamedTuple):
  """What `generate` returns (jax arrays; W = the prompt array's width, or the longest prompt
  of a list, + max_new_tokens).

  tokens:          [B, W] int32, row b: its prompt, then its completion, then pad_id.
  completion_mask: [B, W] bool, True exactly at the completion tokens (EOS included; the
                   pad emitted after EOS and the prompt are False).
  lengths:         [B] int32, number of completion tokens (the True count of the mask row).
  logprobs:        [B, W] float32, at completion tokens the log-prob of that token under
                   the temperature-1 model, 0 elsewhere.
  truncated:       [B] bool, no EOS id within max_new_tokens (always True without eos_ids).
  prompt_lengths:  [B] int32, n_b; row b's completion starts at column n_b.
  steps:           [] int32, decode steps run (< max_new_tokens when every row stopped early;
                   the most over batch shards when each shard runs its own rollout).
  """
  tokens: jax.Array
  completion_mask: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  truncated: jax.Array
  prompt_lengths: jax.Array
  steps: jax.Array


# ---------------------------------------------------------------------------- inputs

def pad_prompts(prompts, pad_id: int = 0, bucket: int = 1, lengths=None):
  """Left-aligned padded prompts: returns (prompt_BxP int32, lengths_B int32), host numpy.

  `prompts` is a [B, L] array plus `lengths` (row b's prompt is its first lengths[b]
  entries; the rest is set to pad_id), or a list of token-id lists. P is the array's width
  (or the longest prompt) rounded up to a multiple of `bucket`, so batches of similar
  lengths share one compiled program.
  """
  if bucket < 1:
    raise ValueError(f"bucket must be >= 1, got {bucket}")
  if lengths is not None or (isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"a padded prompt array must be [batch, length], got shape {arr.shape}")
    if arr.shape[0] == 0:
      raise ValueError("prompts must hold at least one prompt")
    if arr.dtype.kind not in "iu":
      raise ValueError(f"prompts must hold integer token ids, got dtype {arr.dtype}")
    lens = (np.full((arr.shape[0],), arr.shape[1], np.int64) if lengths is None
            else np.asarray(lengths).astype(np.int64))
    if lens.shape != (arr.shape[0],):
      raise ValueError(f"lengths must have shape ({arr.shape[0]},), got {lens.shape}")
    if lens.min() < 1 or lens.max() > arr.shape[1]:
      raise ValueError(f"prompt lengths must lie in [1, {arr.shape[1]}], got {lens.tolist()}")
    width = -(-arr.shape[1] // bucket) * bucket
    out = np.full((arr.shape[0], width), pad_id, np.int32)
    inside = np.arange(arr.shape[1])[None, :] < lens[:, None]
    out[:, :arr.shape[1]] = np.where(inside, arr, pad_id)
    return out, lens.astype(np.int32)
  rows = [np.asarray(p) for p in prompts]
  if not rows:
    raise ValueError("prompts must hold at least one prompt")
  for b, r in enumerate(rows):
    if r.ndim != 1 or r.size == 0:
      raise ValueError(f"prompt {b} must be a non-empty 1-D list of token ids, got shape {r.shape}")
    if r.dtype.kind not in "iu":
      raise ValueError(f"prompt {b} must hold integer token ids, got dtype {r.dtype}")
  lens = np.array([r.size for r in rows], np.int32)
  width = -(-int(lens.max()) // bucket) * bucket
  out = np.full((len(rows), width), pad_id, np.int32)
  for b, r in enumerate(rows):
    out[b, :r.size] = r
  return out, lens


def _row_keys(key, batch: int):
  """Per-row typed keys [B]: a single key is split as fold_in(key, b); [B] keys are used as is."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
      raise ValueError(f"key must be a jax.random key or a raw uint32[..., 2] key, got "
                       f"{key.dtype}{list(key.shape)}")
    key = jax.random.wrap_key_data(key)
  if key.shape == ():
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
  if key.shape == (batch,):
    return key
  raise ValueError(f"key must be one key or one per row ({batch}), got shape {key.shape}")


# ---------------------------------------------------------------------------- sampling

def nucleus_threshold(probs_BxV, top_p: float):
  """Per row, the smallest probability kept by top-p sampling, without sorting.

  The kept set is the smallest set of most likely tokens whose mass reaches p (ties with
  its least likely member kept too), i.e. every token with probability >= v*, where v* is
  the largest v with mass(probs >= v) >= p. mass(probs >= v) only falls as v grows, and
  non-negative floats order like their int32 bit patterns, so 31 bisection steps over the
  bit patterns find v* exactly; on CPU this is several times faster than a sort of the
  vocabulary at every decode step.
  """
  bits_BxV = jax.lax.bitcast_convert_type(probs_BxV.astype(jnp.float32), jnp.int32)
  b = probs_BxV.shape[0]

  def mass_at_least(v_B):
    return jnp.sum(jnp.where(bits_BxV >= v_B[:, None], probs_BxV, 0.0), axis=-1)

  def step(_, lo_hi):  # invariant: mass(>= lo) >= p > mass(>= hi)
    lo_B, hi_B = lo_hi
    mid_B = lo_B + (hi_B - lo_B) // 2
    ok_B = mass_at_least(mid_B) >= top_p
    return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B)

  lo_hi = (jnp.zeros((b,), jnp.int32), jnp.max(bits_BxV, axis=-1) + 1)
  lo_B, _ = jax.lax.fori_loop(0, 31, step, lo_hi)
  return jax.lax.bitcast_convert_type(lo_B, jnp.float32)


def filter_logits(logits_BxV, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Scaled logits with every token outside top-k / top-p set to -inf (temperature > 0)."""
  x_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(x_BxV, top_k)[0][:, -1:]
    x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
  if top_p < 1.0:
    probs_BxV = jax.nn.softmax(x_BxV, axis=-1)
    keep_BxV = probs_BxV >= nucleus_threshold(probs_BxV, top_p)[:, None]
    x_BxV = jnp.where(keep_BxV, x_BxV, -jnp.inf)
  return x_BxV


def sample_tokens(logits_BxV, keys_B, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """One token per row: argmax at temperature 0, else a draw with row b's key.

  The draw inverts the CDF of softmax(filtered logits) at one uniform per row: the first
  token whose cumulative probability reaches (1 - u) * total (> 0, so a token of
  probability 0 is never drawn). One random number per row instead of one per vocabulary
  entry (Gumbel-max) keeps the step cheap.
  """
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x_BxV = filter_logits(logits_BxV, temperature, top_k, top_p)
  cdf_BxV = jnp.cumsum(jax.nn.softmax(x_BxV, axis=-1), axis=-1)
  u_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)
  target_Bx1 = ((1.0 - u_B) * cdf_BxV[:, -1])[:, None]
  tok_B = jnp.sum(cdf_BxV < target_Bx1, axis=-1)
  return jnp.minimum(tok_B, logits_BxV.shape[-1] - 1).astype(jnp.int32)


def _check_sampling(cfg, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_id):
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not np.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
  if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k must be an int in [0, vocab_size={cfg.vocab_size}] (0 = off), got {top_k!r}")
  for name, ids in (("eos_ids", tuple(eos_ids)), ("pad_id", (pad_id,))):
    for i in ids:
      if not isinstance(i, (int, np.integer)) or not 0 <= i < cfg.vocab_size:
        raise ValueError(f"{name} must be token ids in [0, {cfg.vocab_size}), got {i!r}")


# ---------------------------------------------------------------------------- model steps

def prefill(dparams, cfg, prompt_BxP, lengths_B, max_len: int, cache_sharding=None,
            expert_axis=None):
  """Runs the padded prompts once into fresh latent caches of `max_len` slots.

  Returns (next-token logits [B, V] float32 read at index lengths_B - 1, caches: per layer
  kv [B, max_len, Z], see `decode.init_caches`). dparams: `decode.decode_params`;
  expert_axis as in `moe.moe_ffn`.
  """
  b, p = prompt_BxP.shape
  if max_len < p:
    raise ValueError(f"max_len ({max_len}) must hold the {p} prompt positions")
  caches = _constrain(decode.init_caches(cfg, b, max_len), cache_sharding)
  positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
  return decode.decode_layers(dparams, cfg, prompt_BxP, positions_BxP, caches,
                              read_B=lengths_B - 1, fresh=True, expert_axis=expert_axis)


def _constrain(caches: list, cache_sharding):
  if cache_sharding is None:
    return caches
  return jax.lax.with_sharding_constraint(caches, [cache_sharding] * len(caches))


class _State(NamedTuple):
  t: jax.Array             # [] completion index of the token emitted next
  caches: list             # per layer kv [B, S, Z] (decode.init_caches)
  last_B: jax.Array        # the token emitted at step t - 1
  done_B: jax.Array        # the row has emitted an EOS id
  tokens_BxW: jax.Array
  mask_BxW: jax.Array
  logprobs_BxW: jax.Array
  finished: jax.Array      # [] every row has emitted an EOS id (in every expert shard)


def _rollout(dparams, prompt_BxP, lengths_B, keys_B, *, cfg, max_new_tokens, temperature,
             top_p, top_k, eos_ids, pad_id, cache_sharding, expert_axis=None, num_ids=0):
  """The jitted body of `Sampler.generate` (see the module docstring for the layout).

  expert_axis: run inside shard_map with the routed experts split over this mesh axis; the
  shards along it exchange tokens at every MoE layer, so they stop together.
  """
  b, p = prompt_BxP.shape
  w = p + max_new_tokens
  rows_B = jnp.arange(b)
  logits_BxV, caches = prefill(dparams, cfg, prompt_BxP, lengths_B, w, cache_sharding,
                               expert_axis)
  constrain = lambda caches: _constrain(caches, cache_sharding)
  eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None

  def emit(st: _State, logits_BxV) -> _State:
    step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, st.t)
    drawn_BxV = logits_BxV
    if num_ids:  # ids the tokenizer has (see the module docstring)
      drawn_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < num_ids, logits_BxV, -jnp.inf)
    tok_B = sample_tokens(drawn_BxV, step_keys_B, temperature, top_k, top_p)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1),
                                 tok_B[:, None], axis=-1)[:, 0]
    active_B = ~st.done_B
    tok_B = jnp.where(active_B, tok_B, pad_id)
    col_B = lengths_B + st.t
    hit_B = jnp.isin(tok_B, eos) if eos is not None else jnp.zeros((b,), bool)
    done_B = st.done_B | (active_B & hit_B)
    finished = jnp.all(done_B)
    if expert_axis is not None:
      finished = jax.lax.pmin(finished.astype(jnp.int32), expert_axis) > 0
    return st._replace(
        last_B=tok_B, done_B=done_B, finished=finished,
        tokens_BxW=st.tokens_BxW.at[rows_B, col_B].set(tok_B),
        mask_BxW=st.mask_BxW.at[rows_B, col_B].set(active_B),
        logprobs_BxW=st.logprobs_BxW.at[rows_B, col_B].set(jnp.where(active_B, logp_B, 0.0)))

  tokens_BxW = jnp.concatenate(
      [prompt_BxP, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
  st = _State(t=jnp.int32(0), caches=constrain(caches), last_B=jnp.zeros((b,), jnp.int32),
              done_B=jnp.zeros((b,), bool), tokens_BxW=tokens_BxW,
              mask_BxW=jnp.zeros((b, w), bool), logprobs_BxW=jnp.zeros((b, w), jnp.float32),
              finished=jnp.bool_(False))
  st = emit(st, logits_BxV)._replace(t=jnp.int32(1))

  def cond(st: _State):
    return (st.t < max_new_tokens) & ~st.finished

  def body(st: _State) -> _State:
    logits_BxV, caches = decode.decode_layers(dparams, cfg, st.last_B[:, None],
                                              (lengths_B + st.t - 1)[:, None], st.caches,
                                              expert_axis=expert_axis)
    st = emit(st._replace(caches=constrain(caches)), logits_BxV)
    return st._replace(t=st.t + 1)

  st = jax.lax.while_loop(cond, body, st)
  n_gen_B = jnp.sum(st.mask_BxW, axis=1).astype(jnp.int32)
  return SampleOutput(tokens=st.tokens_BxW, completion_mask=st.mask_BxW, lengths=n_gen_B,
                      logprobs=st.logprobs_BxW, truncated=~st.done_B,
                      prompt_lengths=lengths_B, steps=st.t)


# ---------------------------------------------------------------------------- layouts

class _ShardPlan(NamedTuple):
  """A rollout per batch shard under shard_map."""
  rows: object             # the batch mesh axis / axes (a PartitionSpec entry)
  expert_axis: object      # the mesh axis / axes splitting the routed experts, or None


def _shard_plan(cfg, param_shardings, rows):
  """The per-shard plan when the parameter layout allows one, else None.

  Allowed: every parameter replicated (pure data parallel: shards never communicate), or
  replicated except the routed experts, split on their expert dim over batch axes only
  (data-parallel attention, expert-parallel MoE; see `moe.moe_ffn`). Any other layout
  (fsdp, tensor) runs as one jit-partitioned program instead.
  """
  row_axes = {rows} if isinstance(rows, str) else set(rows)
  specs = jax.tree.leaves(decoder.param_specs(cfg), is_leaf=is_spec)
  expert_axes = set()
  for spec, shd in zip(specs, jax.tree.leaves(param_shardings)):
    for logical, entry in zip(spec.axes, tuple(shd.spec)):
      if entry is None:
        continue
      if logical != "exp":
        return None
      expert_axes.add(entry)
  if len(expert_axes) > 1:
    return None
  expert_axis = expert_axes.pop() if expert_axes else None
  if expert_axis is not None:
    names = {expert_axis} if isinstance(expert_axis, str) else set(expert_axis)
    if not names <= row_axes:
      return None
  return _ShardPlan(rows, expert_axis)


def _decode_param_specs(dparams_shape, expert_axis):
  """PartitionSpecs of `decode_params` under a shard plan: the routed experts (leading dim)
  split over expert_axis, everything else replicated."""
  def spec(path, _):
    in_experts = any(getattr(k, "key", None) == "experts" for k in path)
    return P(expert_axis) if (in_experts and expert_axis is not None) else P()
  return jax.tree_util.tree_map_with_path(spec, dparams_shape)


class Sampler:
  """The rollout engine for one model config on one device layout.

  Build it once per stage: it validates the config, decides the layout and keeps the
  jitted programs (one per sampling setting; jit then caches per shape).
    sampler = Sampler(cfg, mesh=None)
    dparams = sampler.prepare(params)      # once per set of weights
    out = sampler.generate(dparams, prompt_BxP, key, lengths=lengths_B, max_new_tokens=64)

  mesh / param_rules: shard rollouts (the batch over the batch axes of `mesh`, parameters
  as `sharding.param_shardings(cfg, mesh, param_rules)` places them); None: one device.
  `plan` is the per-shard plan (see the module docstring), or None for one program.
  """

  def __init__(self, cfg, mesh=None, param_rules=None):
    config_lib.validate_model_config(cfg)
    self.cfg, self.mesh, self.param_rules = cfg, mesh, param_rules
    self._programs: dict = {}
    self.plan = None
    self._split = 1
    dparams_sharding = None
    if mesh is not None:
      self.param_shardings = sharding.param_shardings(cfg, mesh, param_rules)
      b1 = sharding.batch_sharding(mesh, 1, None, param_rules)
      self._split = _batch_split(mesh, b1)
      if self._split > 1:
        self.plan = _shard_plan(cfg, self.param_shardings, tuple(b1.spec)[0])
      if self.plan is not None:
        shapes = jax.eval_shape(lambda p: decode.decode_params(p, cfg),
                                jax.eval_shape(lambda k: decoder.init_params(cfg, k),
                                               jax.random.key(0)))
        self._dparams_specs = _decode_param_specs(shapes, self.plan.expert_axis)
        dparams_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), self._dparams_specs)
    self._prepare = jax.jit(lambda p: decode.decode_params(p, cfg),
                            out_shardings=dparams_sharding)

  def prepare(self, params):
    """The weights in the decode layout (`decode.decode_params`), on this sampler's devices.

    Call it once per set of weights (a GRPO step, an evaluation) and pass the result to
    every `generate` with those weights. Parameters already in this sampler's layout are used
    where they are; others (e.g. the training mesh's, on the same or on other devices) are
    resharded device to device first (`sharding.transfer`: no copy through host memory).
    """
    if self.mesh is not None:
      params = sharding.transfer(params, self.param_shardings)
    return self._prepare(params)

  def _program(self, **static):
    key = tuple(sorted(static.items()))
    if key not in self._programs:
      plan = self.plan
      cache_sharding = None
      if self.mesh is not None and plan is None:
        bs = sharding.batch_sharding(self.mesh, 2, self._split, self.param_rules)
        cache_sharding = NamedSharding(self.mesh, P(*tuple(bs.spec)[:1], None, None))
      expert_axis = plan.expert_axis if plan is not None else None

      def fn(dparams, prompt_BxP, lengths_B, keys_B):
        out = _rollout(dparams, prompt_BxP, lengths_B, keys_B, cfg=self.cfg,
                       cache_sharding=cache_sharding, expert_axis=expert_axis, **static)
        return out if plan is None else out._replace(steps=out.steps[None])
      if plan is not None:
        rows = P(plan.rows)
        fn = jax.shard_map(fn, mesh=self.mesh, in_specs=(self._dparams_specs, rows, rows, rows),
                           out_specs=rows, check_vma=False)
      self._programs[key] = jax.jit(fn)
    return self._programs[key]

  def generate(self, dparams, prompts, key, *, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
               pad_id: int = 0, lengths=None, prompt_bucket: int = 16,
               num_ids: int = 0) -> SampleOutput:
    """Samples a completion for every prompt; see SampleOutput and the module docstring.

    dparams: `prepare(params)`. prompts: a [B, P] array of left-aligned prompts with
      `lengths` (as the data pipeline's PromptBatch holds them), or a list of token-id lists.
    key: one jax.random key, or one per row ([B] typed keys / [B, 2] raw) to pin each row's
      randomness independently of the batch it is in.
    prompt_bucket: the padded prompt width is rounded up to a multiple of this, so the
      program compiles once per (batch, bucket, max_new_tokens) rather than per prompt length.
    num_ids: sample only ids < num_ids (0 = the whole vocabulary), e.g. the tokenizer's size.
    """
    cfg = self.cfg
    _check_sampling(cfg, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_id)
    if not 0 <= num_ids <= cfg.vocab_size:
      raise ValueError(f"num_ids must lie in [0, vocab_size={cfg.vocab_size}], got {num_ids}")
    if top_k > num_ids > 0:
      raise ValueError(f"top_k ({top_k}) exceeds num_ids ({num_ids})")
    prompt_BxP, lengths_B = pad_prompts(prompts, pad_id, prompt_bucket, lengths)
    is_array = lengths is not None or (isinstance(prompts, (np.ndarray, jax.Array))
                                       and np.ndim(prompts) == 2)
    width = (np.shape(prompts)[1] if is_array else int(lengths_B.max())) + max_new_tokens
    decoder.check_tokens(prompt_BxP, cfg)
    b = prompt_BxP.shape[0]
    longest = int(lengths_B.max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
      raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_position_embeddings ({cfg.max_position_embeddings})")
    keys_B = _row_keys(key, b)
    extra = -b % self._split
    if extra:  # rows padded to a multiple of the batch split, dropped below
      prompt_BxP = np.concatenate([prompt_BxP, np.full((extra, prompt_BxP.shape[1]), pad_id,
                                                       np.int32)])
      lengths_B = np.concatenate([lengths_B, np.ones((extra,), np.int32)])
      keys_B = jnp.concatenate([keys_B, _row_keys(jax.random.key(0), extra)])
    if self.mesh is not None:
      bs = sharding.batch_sharding(self.mesh, 2, b + extra, self.param_rules)
      b1 = sharding.batch_sharding(self.mesh, 1, b + extra, self.param_rules)
      prompt_BxP, lengths_B, keys_B = (jax.device_put(prompt_BxP, bs),
                                       jax.device_put(lengths_B, b1), jax.device_put(keys_B, b1))
    fn = self._program(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                       top_p=float(top_p), top_k=int(top_k),
                       eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id),
                       num_ids=int(num_ids) if num_ids < cfg.vocab_size else 0)
    out = fn(dparams, prompt_BxP, lengths_B, keys_B)
    if self.plan is not None:
      out = out._replace(steps=jnp.max(out.steps))
    if extra or out.tokens.shape[1] != width:  # the batch-split rows, the bucket's columns
      out = SampleOutput(*(x if x.ndim == 0 else (x[:b, :width] if x.ndim == 2 else x[:b])
                           for x in out))
    return out


_SAMPLERS: dict = {}


def generate(params, cfg, prompts, key, *, mesh=None, param_rules=None, **kwargs) -> SampleOutput:
  """Rollouts in one call: `Sampler(cfg, mesh, param_rules)` (kept per config and layout, so
  its programs are reused), prepare(params), then generate(**kwargs).

  Loops that sample repeatedly hold their own Sampler and prepare once per set of weights.
  """
  key_ = (ml_collections.FrozenConfigDict(cfg), mesh,
          tuple(sorted((param_rules or {}).items())))
  if key_ not in _SAMPLERS:
    _SAMPLERS[key_] = Sampler(cfg, mesh, param_rules)
  s = _SAMPLERS[key_]
  return s.generate(s.prepare(params), prompts, key, **kwargs)


def completions_text(out: SampleOutput, tokenizer) -> list[str]:
  """Decodes each row's completion (EOS and what follows excluded)."""
  tokens = np.asarray(out.tokens)
  starts = np.asarray(out.prompt_lengths)
  lengths = np.asarray(out.lengths)
  return [tokenizer.decode(tokens[i, starts[i]:starts[i] + lengths[i]]) for i in range(len(tokens))]


def _batch_split(mesh, batch_sharding_1d) -> int:
  """How many ways the batch mesh axes split the leading dim."""
  spec = tuple(batch_sharding_1d.spec)
  if not spec or spec[0] is None:
    return 1
  axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
  return int(np.prod([mesh.shape[a] for a in axes]))


def cache_bytes_per_token(cfg, dtype_bytes: int | None = None) -> dict:
  """Bytes one token occupies in the rollout cache vs a per-head MHA cache of the same model.

  'cache': what `decode.init_caches` holds. MLA: layers * Z (= C + R), also returned as
  'latent'; GQA: layers * 2 * Hkv * Dh. 'mha': layers * H * (key + value head sizes)
  (MLA: (N + R) + A; GQA: 2 Dh). 'ratio' = mha / cache.
  """
  nbytes = dtype_bytes or jnp.dtype(cfg.dtype).itemsize
  layers, h = cfg.num_hidden_layers, cfg.num_attention_heads
  if cfg.attention_type == "gqa":
    cache = layers * 2 * config_lib.num_kv_heads(cfg) * cfg.head_dim * nbytes
    mha = layers * h * 2 * cfg.head_dim * nbytes
    return {"cache": int(cache), "mha": int(mha), "ratio": mha / cache}
  latent = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * nbytes
  mha = layers * h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * nbytes
  return {"cache": int(latent), "latent": int(latent), "mha": int(mha), "ratio": mha / latent}
