"""GRPO, written top to bottom (DeepSeekMath section 4.1; DeepSeek-R1 section 2.2).

One step:
  1. take B prompts from the grain iterator and sample G completions each with the sampler
     (its log-probs are pi_old, the policy that sampled);
  2. score them (Scorer): the task's verifiable reward ('accuracy': in-process, or in a
     VerifierPool of worker processes) plus the rule-based components of
     r1jax/verify/rewards.py, composed as grpo.rewards / grpo.reward_mode say;
  3. group-normalised advantages; optionally drop groups whose rewards are all equal and
     refill from new prompts (DAPO's dynamic sampling);
  4. mu epochs over `minibatches` minibatches of the clipped policy loss (grpo.py), AdamW with
     warmup + cosine and global-norm clipping;
  5. optionally (optimizer.router_bias_update_rate > 0) the router's correction biases follow
     the observed expert loads; the default keeps them frozen, as V3 did late in pre-training.
A frozen reference model anchors the KL term (beta > 0), optionally reset to the policy
every `ref_reset_every` steps.

Departures from the paper:
  - Rewards are a config: grpo.rewards weights 'accuracy' (the task's verifier), 'format',
    'language' (R1 sec. 2.3's language consistency) and 'overlong' (DAPO's soft overlong
    punishment, not in R1); unset weights come from the task's `default_rewards`, which is
    {'accuracy': 1.0} for every built-in task, so by default there is no separate format
    reward (R1-Zero used accuracy + format rewards). reward_mode='gated' counts accuracy only
    in a well-formed response.
  - The MTP modules are not trained during RL (the policy is the main head only; train()
    says so when the model has them).
  - Dynamic sampling: whether to refill depends on the previous batch's rewards. With a
    VerifierPool, a refill that the last step needed is sampled ahead, while the pool scores
    the batch before it (metric refills_ahead); if it proves unneeded, it is dropped and the
    prompt iterator restored (refills_discarded), so the rows, rewards and parameters are
    those of sampling one batch at a time (each try's key is fold_in(step key, try)).
    In-process rewards run on the host between batches. Without refills the reference
    forward pass (beta > 0) runs on the device while the rewards are computed.

Time split per step: time_sample_s is sampling only (weights' decode layout, generation,
detokenising), time_verify_s the seconds the step spends on rewards after sampling (computed
in-process, or waiting for the pool), time_reward_compute_s what the rewards cost (the pool's
workers' seconds summed plus the main side), time_train_s the updates.

Every random draw derives from (seed, step), so a run killed at any point and resumed from
its latest checkpoint ends with exactly the parameters and metrics of an uninterrupted run.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import sharding
from r1jax.data import datasets as data_lib
from r1jax.model import decoder
from r1jax.rollout import sampler as sampler_lib
from r1jax.tasks import base as task_base
from r1jax.tasks import remote
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import grpo, optim
from r1jax.train import metrics as metrics_lib
from r1jax.train.guards import check_finite, check_params_finite, global_norm
from r1jax.verify import rewards as rewards_lib

# ============================================================================ config

# The reward components a config can weight (grpo.rewards.<name>). 'accuracy' is the task's
# own verifiable reward (Task.reward); the others are the rule-based functions of
# r1jax/verify/rewards.py.
REWARD_COMPONENTS = ("accuracy", "format", "language", "overlong")
_RULE_BASED = REWARD_COMPONENTS[1:]


def grpo_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 100
  c.prompts_per_step = 32      # B, distinct prompts per step
  c.G = 8                      # group size: completions per prompt
  c.temperature = 1.0          # sampling temperature for rollouts
  c.top_p = 1.0                # nucleus sampling mass kept, in (0, 1] (1 = off)
  c.top_k = 0                  # sample among the k likeliest tokens (0 = off)
  c.max_prompt_len = 32        # prompt tokens with <bos>; every train prompt must fit
  c.max_new_tokens = 64        # completion tokens per rollout
  c.mu = 1                     # update epochs over each batch (1 = on-policy)
  c.minibatches = 1            # gradient steps per epoch
  c.loss = "grpo"              # 'grpo' | 'dapo' | 'dr_grpo' | 'gspo' (grpo.POLICY_LOSSES)
  c.epsilon_low = 0.2          # clip range below 1 (epsilon)
  c.epsilon_high = 0.2         # clip range above 1 (DAPO's clip-higher: 0.28)
  c.beta = 0.0                 # KL weight to the reference policy (beta)
  c.kl = "k3"                  # KL estimator: k1 | k2 | k3
  c.adv_scale = "group"        # 'group' (GRPO) | 'batch' | 'none' (Dr. GRPO)
  c.dynamic_sampling = False   # drop all-equal groups and refill (DAPO)
  c.max_refills = 2            # extra prompt batches per step for dynamic sampling
  c.ref_reset_every = 0        # copy the policy into the reference every N steps (0 = never)
  c.logprob_chunk = 2048       # tokens per chunk for log-probs (never [B, L, V] logits)
  # One weight per reward component (REWARD_COMPONENTS); None = the task's default_rewards.
  weight = lambda: ml_collections.config_dict.placeholder(float)
  c.rewards = ml_collections.ConfigDict()
  c.rewards.accuracy = weight()  # the task's verifier; None = task default (1.0 built-in)
  c.rewards.format = weight()    # <think>..</think><answer>..</answer>; None = task default (0)
  c.rewards.language = weight()  # CoT share in the target script (R1 2.3); None = task default
  c.rewards.overlong = weight()  # DAPO soft overlong penalty (needs overlong_cache_len)
  c.reward_mode = "sum"        # 'sum' (weighted sum) | 'gated' (accuracy only if format == 1)
  c.overlong_cache_len = 0     # DAPO's L_cache (L_max = max_new_tokens); > 0 for 'overlong'
  c.reward_workers = 0         # 0 = score in-process; > 0 = VerifierPool processes
  c.reward_timeout_s = 10.0    # per-item deadline in the pool
  c.checkpoint_every = 25      # steps between checkpoints
  c.max_to_keep = 2            # checkpoints kept
  c.optimizer = optim.optimizer_defaults()
  c.optimizer.lr = 3e-5
  c.optimizer.warmup_steps = 5
  c.optimizer.weight_decay = 0.0
  c.optimizer.router_bias_update_rate = 0.0  # u during RL: V3 froze the biases at the end of
                                             # pre-training; moving them shifts routing under
                                             # the policy
  return c


def validate(gcfg) -> None:
  """ValueError naming the first grpo config field that no run could use."""
  for field in ("steps", "prompts_per_step", "G", "max_new_tokens", "mu", "minibatches",
                "max_prompt_len", "logprob_chunk", "checkpoint_every"):
    if gcfg[field] < 1:
      raise ValueError(f"grpo config field {field!r} must be >= 1, got {gcfg[field]}")
  if gcfg.G < 2:
    raise ValueError("grpo config field 'G' must be >= 2 (advantages compare within a group)")
  if gcfg.prompts_per_step % jax.process_count():  # each process rolls out an equal share
    raise ValueError(f"grpo config field 'prompts_per_step' ({gcfg.prompts_per_step}) is the "
                     f"global batch and must be a multiple of the process count "
                     f"({jax.process_count()})")
  if jax.process_count() > 1 and (gcfg.dynamic_sampling or gcfg.adv_scale == "batch"):
    raise ValueError("grpo.dynamic_sampling and grpo.adv_scale='batch' need the rewards of "
                     "every process; with several processes use neither")
  if (gcfg.prompts_per_step * gcfg.G) % gcfg.minibatches:
    raise ValueError("grpo config field 'minibatches' must divide prompts_per_step * G "
                     f"({gcfg.prompts_per_step * gcfg.G})")
  if gcfg.loss not in grpo.POLICY_LOSSES:
    raise ValueError(f"grpo config field 'loss' must be one of {sorted(grpo.POLICY_LOSSES)}")
  if gcfg.adv_scale not in grpo.ADVANTAGE_SCALES:
    raise ValueError(f"grpo config field 'adv_scale' must be one of {grpo.ADVANTAGE_SCALES}")
  if gcfg.kl not in grpo.KL_ESTIMATORS:
    raise ValueError(f"grpo config field 'kl' must be one of {sorted(grpo.KL_ESTIMATORS)}, "
                     f"got {gcfg.kl!r}")
  if not gcfg.temperature > 0:
    raise ValueError(f"grpo config field 'temperature' must be > 0 (GRPO samples), "
                     f"got {gcfg.temperature}")
  for field in ("beta", "epsilon_low", "epsilon_high", "max_refills", "ref_reset_every",
                "reward_workers"):
    if gcfg[field] < 0:
      raise ValueError(f"grpo config field {field!r} must be >= 0, got {gcfg[field]}")
  if not 0 < gcfg.top_p <= 1:
    raise ValueError(f"grpo config field 'top_p' must lie in (0, 1] (1 = off), got {gcfg.top_p}")
  if not isinstance(gcfg.top_k, int) or gcfg.top_k < 0:
    raise ValueError(f"grpo config field 'top_k' must be >= 0 and an int (0 = off), "
                     f"got {gcfg.top_k!r}")
  if not gcfg.reward_timeout_s > 0:
    raise ValueError(f"grpo config field 'reward_timeout_s' must be > 0, "
                     f"got {gcfg.reward_timeout_s}")
  if gcfg.max_to_keep < 1:
    raise ValueError(f"grpo config field 'max_to_keep' must be >= 1, got {gcfg.max_to_keep}")
  optim.validate(gcfg.optimizer, "grpo.optimizer")
  _validate_rewards(gcfg)


def _validate_rewards(gcfg) -> None:
  if gcfg.reward_mode not in rewards_lib.MODES:
    raise ValueError(f"grpo config field 'reward_mode' must be one of {rewards_lib.MODES}, "
                     f"got {gcfg.reward_mode!r}")
  unknown = sorted(set(gcfg.rewards.keys()) - set(REWARD_COMPONENTS))
  if unknown:
    raise ValueError(f"grpo.rewards.{unknown[0]} is not a reward component; known: "
                     f"{list(REWARD_COMPONENTS)}")
  for name in REWARD_COMPONENTS:
    w = gcfg.rewards[name]
    if w is not None and not (math.isfinite(w) and w >= 0):
      raise ValueError(f"grpo.rewards.{name} must be a finite weight >= 0 (None = the task's "
                       f"default), got {w}")
  if gcfg.overlong_cache_len < 0:
    raise ValueError(f"grpo.overlong_cache_len must be >= 0, got {gcfg.overlong_cache_len}")
  if gcfg.overlong_cache_len > gcfg.max_new_tokens:
    raise ValueError(f"grpo.overlong_cache_len ({gcfg.overlong_cache_len}) must be <= "
                     f"grpo.max_new_tokens ({gcfg.max_new_tokens}), DAPO's L_max")
  set_weights = {n: gcfg.rewards[n] for n in REWARD_COMPONENTS if gcfg.rewards[n] is not None}
  _check_weights(gcfg, set_weights, complete=len(set_weights) == len(REWARD_COMPONENTS))


def _check_weights(gcfg, weights, *, complete: bool, source: str = "") -> None:
  """The checks that need the weights: not all zero (when every weight is known), and
  an overlong weight needs L_cache."""
  if complete and not any(weights.values()):
    raise ValueError(f"grpo.rewards: every weight is 0{source}, so every reward would be 0; "
                     f"give one of {list(REWARD_COMPONENTS)} a weight > 0")
  if weights.get("overlong") and gcfg.overlong_cache_len < 1:
    raise ValueError(f"grpo.rewards.overlong > 0{source} needs grpo.overlong_cache_len > 0 "
                     "(DAPO's L_cache, e.g. max_new_tokens // 4)")


def reward_weights(gcfg, task) -> dict[str, float]:
  """Every component's weight: grpo.rewards.<name>, else task.default_rewards[name], else 0."""
  defaults = dict(task.default_rewards)
  unknown = sorted(set(defaults) - set(REWARD_COMPONENTS))
  if unknown:
    raise ValueError(f"task {task.name!r} default_rewards names unknown components {unknown}; "
                     f"known: {list(REWARD_COMPONENTS)}")
  weights = {n: float(defaults.get(n, 0.0) if gcfg.rewards[n] is None else gcfg.rewards[n])
             for n in REWARD_COMPONENTS}
  _check_weights(gcfg, weights, complete=True,
                 source=f" (with task {task.name!r}'s default_rewards {defaults})")
  return weights


# ============================================================================ jitted pieces


def _train_cfg(model_cfg):
  cfg = copy.deepcopy(model_cfg)
  cfg.mtp_depth = 0  # MTP is a pre-training objective; RL trains the main head only
  return cfg


def _token_logprobs(params, tokens_BxW, cfg, chunk):
  """log pi(token_{t+1} | tokens_<=t) for t < W-1, entropies, and expert loads."""
  _, aux = decoder.forward(params, tokens_BxW, cfg, return_hidden=True, compute_logits=False)
  logp, ent = grpo.token_logprobs_and_entropy(
      aux["hidden"][:, :-1], decoder.output_head(params, cfg), tokens_BxW[:, 1:],
      chunk_size=chunk)
  return logp, ent, aux.get("tokens_per_expert")


def make_ref_logprobs(model_cfg, gcfg):
  cfg = _train_cfg(model_cfg)
  return jax.jit(lambda p, t: _token_logprobs(p, t, cfg, gcfg.logprob_chunk)[0])


def make_update_step(model_cfg, gcfg, optimizer):
  """jit(update(state, minibatch) -> (state, metrics)); one optimizer step on one minibatch."""
  cfg = _train_cfg(model_cfg)

  def loss_fn(params, mb):
    logp, ent, load = _token_logprobs(params, mb["tokens"], cfg, gcfg.logprob_chunk)
    mask = mb["mask"][:, 1:]
    loss_sum, denom, m = grpo.policy_loss(
        gcfg.loss, logp, mb["old_logp"][:, 1:], mb["advantages"], mask,
        ref_logp=mb["ref_logp"][:, 1:] if gcfg.beta > 0 else None,
        epsilon_low=gcfg.epsilon_low, epsilon_high=gcfg.epsilon_high, beta=gcfg.beta,
        kl=gcfg.kl, max_len=gcfg.max_new_tokens)
    m = dict(m, entropy=jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1))
    return loss_sum / jnp.maximum(denom, 1e-9), (m, load)

  def update(state, mb):
    (loss, (m, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], mb)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optim.apply_updates(state["params"], updates, load,
                                 gcfg.optimizer.router_bias_update_rate)
    m = dict(m, loss=loss, grad_norm=global_norm(grads))
    if load is not None:
      m["expert_imbalance"] = jnp.max(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))
    return dict(state, params=params, opt_state=opt_state), m

  return jax.jit(update, donate_argnums=0)


# ============================================================================ rollouts


@dataclasses.dataclass
class Scores:
  """The rewards of one rollout batch.

  total: [N] the composed reward (grpo.reward_mode over the weights) that the advantages use.
  components: name -> [N] raw (unweighted) values: 'accuracy' always (the task's verifier),
    each rule-based component with a nonzero weight, and 'format' whenever it gates.
  compute_s: seconds spent computing them (the pool's workers summed, plus the main side).
  """
  total: np.ndarray
  components: dict
  compute_s: float


@dataclasses.dataclass
class _Pending:
  prompts: list
  completions: list
  fields: list
  num_tokens: np.ndarray
  future: object = None  # the pool's, for 'accuracy'


class Scorer:
  """The composed GRPO reward of grpo.rewards / grpo.reward_mode; never raises on a bad item.

  'accuracy' is the task's reward, in-process or in a VerifierPool (workers rebuild the task
  from (name, kwargs): r1jax.tasks.remote). The rule-based components (format, language,
  overlong) are cheap regexes and always run here, while the pool works, so both paths give
  the same per-component values. `submit` only starts the pool; `result` does the rest, so
  everything a reward costs is spent (and timed) there. An item whose component raises or
  is not finite scores 0 for that component and counts in `failures`.
  """

  def __init__(self, task_name: str, task_kwargs: dict, task, gcfg):
    self.task = task
    self.weights = reward_weights(gcfg, task)
    self.mode = gcfg.reward_mode
    self.active = {n: w for n, w in self.weights.items() if w}
    gate = rewards_lib.needs_gate(self.active, self.mode)
    self.rule_based = tuple(n for n in _RULE_BASED if n in self.active or
                            (n == "format" and gate))
    self.options = {"max_len": gcfg.max_new_tokens, "cache_len": gcfg.overlong_cache_len}
    self._local_failures = 0
    self._pool_seconds = 0.0
    self.pool = None
    if gcfg.reward_workers > 0:
      from r1jax.verify.pool import VerifierPool
      fn = functools.partial(remote.task_reward, task_name, remote.freeze(task_kwargs))
      self.pool = VerifierPool(fn, num_workers=gcfg.reward_workers,
                               item_timeout_s=gcfg.reward_timeout_s)

  def submit(self, prompts, completions, examples, num_tokens) -> _Pending:
    """Starts scoring one batch (num_tokens: each completion's length in tokens)."""
    pending = _Pending(list(prompts), list(completions), [e.reward_kwargs() for e in examples],
                       np.asarray(num_tokens))
    if self.pool is not None:
      pending.future = self.pool.submit(
          [dict(prompt=p, completion=c, **f)
           for p, c, f in zip(pending.prompts, pending.completions, pending.fields)])
    return pending

  def _value(self, fn, *args, **kwargs) -> float:
    try:
      r = float(fn(*args, **kwargs))
    except Exception:  # a reward failure never stops training: scored 0 and counted
      self._local_failures += 1
      return 0.0
    if not math.isfinite(r):
      self._local_failures += 1
      return 0.0
    return r

  def result(self, pending: _Pending) -> Scores:
    """Waits for (or computes) the batch's rewards."""
    t0 = time.perf_counter()
    n = len(pending.completions)
    values = {name: np.zeros(n, np.float64) for name in ("accuracy",) + self.rule_based}
    items = list(zip(pending.prompts, pending.completions, pending.fields, pending.num_tokens))
    for name in self.rule_based:
      fn = rewards_lib.REWARDS[name]
      for i, (p, c, f, length) in enumerate(items):
        values[name][i] = self._value(fn, p, c, **{**self.options, **f, "num_tokens": int(length)})
    if self.pool is None:
      for i, (p, c, f, _) in enumerate(items):
        values["accuracy"][i] = self._value(self.task.reward, p, c, **f)
      compute_s = time.perf_counter() - t0
    else:
      compute_s = time.perf_counter() - t0  # the rule-based part, while the workers work
      values["accuracy"][:] = pending.future.result()
      seconds = self.pool.compute_seconds()
      compute_s += seconds - self._pool_seconds
      self._pool_seconds = seconds
    total = np.array([rewards_lib.combine({k: v[i] for k, v in values.items()}, self.active,
                                          self.mode) for i in range(n)], np.float64)
    return Scores(total, values, compute_s)

  @property
  def failures(self) -> int:
    """Items scored 0 so far because the reward raised (or, in the pool, timed out or died)."""
    n = self._local_failures
    if self.pool is not None:
      n += sum(v for reason, v in self.pool.stats().items() if reason != "ok")
    return n

  def close(self):
    if self.pool is not None:
      self.pool.close()


def rollout(sampler: sampler_lib.Sampler, dparams, gcfg, batch: data_lib.PromptBatch, key,
            tokenizer, row_offset: int = 0):
  """G completions per prompt of the padded batch; returns (SampleOutput [B*G, W], texts).

  W = max_prompt_len + max_new_tokens, the width of the GRPO training rows. Row r samples
  with fold_in(key, row_offset + r): a process holding global rows from row_offset on draws
  what a one-process run draws for them.
  """
  n = len(batch.lengths_B) * gcfg.G
  key = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_offset + jnp.arange(n))
  out = sampler.generate(dparams, np.repeat(batch.tokens_BxL, gcfg.G, axis=0), key,
                         lengths=np.repeat(batch.lengths_B, gcfg.G),
                         max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature,
                         top_p=gcfg.top_p, top_k=gcfg.top_k, eos_ids=(tokenizer.eos_id,),
                         pad_id=tokenizer.pad_id, prompt_bucket=gcfg.max_prompt_len,
                         num_ids=tokenizer.vocab_size)
  return out, sampler_lib.completions_text(out, tokenizer)


def _group_std(rewards, g):
  return np.asarray(rewards, np.float64).reshape(-1, g).std(axis=1)


# ============================================================================ the loop


def train(model_cfg, gcfg, workdir: str, *, task, tokenizer, params, task_name: str = "",
          task_kwargs: dict | None = None, seed: int = 0, name: str = "grpo",
          progress: bool = True, stop_after: int | None = None, mesh=None, param_rules=None,
          rollout_mesh=None):
  """Runs gcfg.steps GRPO steps from `params`; returns (params, info). Resumes if possible.

  stop_after: return after this many steps of this call (tests use it to interrupt a run).
  info's sample_s / verify_s / train_s sum each phase's seconds over all steps, restarts
  included, less compilation (metrics.WorkClock): what the steps cost, not the restarts.
  mesh / param_rules: parameters, optimizer state and minibatches laid out as in
  `sharding` (batch over the batch axes), rollouts sharded likewise; None: one device.
  rollout_mesh: the rollouts' own mesh instead, on the same or on other devices (after each
  step's update the weights are resharded there device to device, `Sampler.prepare`).
  """
  validate(gcfg)
  reward_weights(gcfg, task)  # the task's defaults must make a usable reward: fail early
  if getattr(model_cfg, "mtp_depth", 0) > 0:
    print(f"GRPO: the model's {model_cfg.mtp_depth} MTP module(s) are not trained during RL "
          "(mtp_depth is set to 0 for the policy loss); they keep their SFT/pre-trained weights",
          flush=True)
  run_dir = os.path.join(workdir, name)
  ds = data_lib.prompt_dataset(task, "train", tokenizer, global_batch_size=gcfg.prompts_per_step,
                               max_prompt_len=gcfg.max_prompt_len, seed=seed)
  it = iter(ds)
  optimizer = optim.make_optimizer(gcfg.optimizer, gcfg.steps)
  # a copy: the caller's arrays are never donated
  params = sharding.place_params(jax.tree.map(jnp.array, params), model_cfg, mesh, param_rules)
  state = {"params": params, "opt_state": optimizer.init(params),
           "ref_params": jax.tree.map(jnp.copy, params),  # own buffers: the state is donated
           "step": jnp.int32(0)}
  manager = ckpt_lib.CheckpointManager(run_dir, gcfg.max_to_keep)
  start = 0
  times = {"sample_s": 0.0, "verify_s": 0.0, "train_s": 0.0}
  steps_no_rows = 0  # steps whose advantages were all 0 (nothing to learn), cumulative
  prev_tries = 0  # prompt batches the last step sampled (when to sample a refill ahead)
  if manager.latest_step() is not None:
    restored = manager.restore(ckpt_lib.abstract_state(state))
    state, start = restored.state, restored.step
    it.set_state(restored.data_state["iterator"])
    times = dict(restored.data_state["times"])
    steps_no_rows = int(restored.data_state.get("steps_no_rows", 0))
    prev_tries = int(restored.data_state.get("prev_tries", 0))
  update = sharding.in_mesh(make_update_step(model_cfg, gcfg, optimizer), mesh)
  ref_logprobs = sharding.in_mesh(make_ref_logprobs(model_cfg, gcfg), mesh)
  multi = jax.process_count() > 1
  if multi:  # each process rolls out its own prompts on its own devices
    if mesh is None:
      raise ValueError("GRPO with several processes needs a training mesh (config field mesh)")
    rollout_mesh = sharding.make_mesh({"data": -1}, jax.local_devices())
  sampler = sampler_lib.Sampler(model_cfg, mesh if rollout_mesh is None else rollout_mesh,
                                param_rules)
  scorer = Scorer(task_name, task_kwargs or {}, task, gcfg)
  writer = metrics_lib.MetricsWriter(run_dir, resume_step=start if start else None)
  bar = metrics_lib.ProgressBar(gcfg.steps, ("reward_mean", "accuracy", "kl_ref"),
                                initial=start, desc=name, disable=not progress)
  base_key = jax.random.key(seed)
  n_rows = gcfg.prompts_per_step * gcfg.G  # global; this process holds n_local from row_offset
  n_local = n_rows // jax.process_count()
  row_offset = jax.process_index() * n_local
  steps_no_rows_warned = False
  step = start
  try:
    while step < gcfg.steps and (stop_after is None or step - start < stop_after):
      step_key = jax.random.fold_in(base_key, step)
      failures_before = scorer.failures
      # ---------------------------------------------------------------- sample + score
      t0 = time.perf_counter()
      compile_before = metrics_lib.compile_seconds()
      groups, first_scores, tries = [], None, 0
      verify_s = compute_s = 0.0
      n_sampled = n_tokens = 0
      ref_logp = None
      clock = metrics_lib.WorkClock()
      dparams = sampler.prepare(sharding.process_local_copy(state["params"], mesh) if multi
                                else state["params"])  # the decode layout, once per step's weights
      sample_s = clock.elapsed()
      ahead = None  # (iterator state before it, batch, out, texts): the next refill
      n_ahead = n_discarded = 0
      while True:
        if ahead is None:
          batch = next(it)
          clock.start()
          out, texts = rollout(sampler, dparams, gcfg, batch,
                               jax.random.fold_in(step_key, tries), tokenizer, row_offset)
          sample_s += clock.elapsed()
        else:
          _, batch, out, texts = ahead
          ahead = None
        pending = scorer.submit([p for p in batch.prompts for _ in range(gcfg.G)], texts,
                                [e for e in batch.examples for _ in range(gcfg.G)], out.lengths)
        if gcfg.beta > 0 and not gcfg.dynamic_sampling:
          # Without refills the training rows are exactly this batch: the reference pass
          # is dispatched now and runs on the device while the rewards are computed.
          ref_logp = ref_logprobs(state["ref_params"], _place_tokens(out.tokens, mesh, param_rules))
        if (scorer.pool is not None and gcfg.dynamic_sampling and tries < gcfg.max_refills
            and prev_tries > tries + 1):
          # The last step needed this refill: sample it while the pool scores this batch. If
          # it turns out unneeded, the iterator goes back, so nothing of it stays.
          it_state = it.get_state()
          next_batch = next(it)
          clock.start()
          ahead = (it_state, next_batch) + rollout(
              sampler, dparams, gcfg, next_batch, jax.random.fold_in(step_key, tries + 1),
              tokenizer)
          sample_s += clock.elapsed()
          n_ahead += 1
        clock.start()
        scores = scorer.result(pending)
        verify_s += clock.elapsed()
        compute_s += scores.compute_s
        if first_scores is None:
          first_scores = scores
        n_sampled += len(texts)
        n_tokens += int(np.asarray(out.lengths).sum())
        groups.append((out, texts, scores.total))
        tries += 1
        if not gcfg.dynamic_sampling or tries > gcfg.max_refills or sum(
            int((_group_std(r, gcfg.G) > 0).sum()) for _, _, r in groups) >= gcfg.prompts_per_step:
          if ahead is not None:
            it.set_state(ahead[0])
            n_discarded += 1
          break
      prev_tries = tries
      del dparams
      # ---------------------------------------------------------------- build the batch
      rows = _assemble(groups, gcfg, n_local)
      if gcfg.beta > 0:
        if ref_logp is None:
          ref_logp = ref_logprobs(state["ref_params"],
                                  _place_tokens(rows["tokens"], mesh, param_rules))
        ref_logp = sharding.local_rows(ref_logp)
        rows["ref_logp"] = np.concatenate([np.zeros_like(ref_logp[:, :1]), ref_logp], 1)
      else:
        rows["ref_logp"] = np.zeros_like(rows["old_logp"])
      learns_nothing = not np.any(rows["advantages"])
      if learns_nothing:
        if not steps_no_rows_warned:
          _warn_no_rows(step + 1, first_scores, gcfg)
          steps_no_rows_warned = True
        steps_no_rows += 1
      # ---------------------------------------------------------------- mu epochs of updates
      clock.start()
      mb_size = n_rows // gcfg.minibatches
      ms = []
      if multi:  # the global rows, minibatches gathered from them on the devices
        rows_dev = sharding.place_batch({k: v for k, v in rows.items() if k != "info"}, mesh,
                                        param_rules)
      for epoch in range(gcfg.mu):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(step_key, 1000 + epoch), n_rows))
        for j in range(gcfg.minibatches):
          idx = perm[j * mb_size:(j + 1) * mb_size]
          mb = _take_rows(rows_dev, idx, mesh, param_rules) if multi else sharding.place_batch(
              {k: v[idx] for k, v in rows.items() if k != "info"}, mesh, param_rules)
          state, m = update(state, mb)
          ms.append(m)
      state["step"] = state["step"] + 1
      if gcfg.ref_reset_every and (step + 1) % gcfg.ref_reset_every == 0:
        state["ref_params"] = jax.tree.map(jnp.copy, state["params"])
      m_host = {k: float(np.mean([float(x[k]) for x in ms])) for k in ms[0]}
      train_s = clock.elapsed()
      step += 1
      # ---------------------------------------------------------------- metrics
      times["sample_s"] += sample_s
      times["verify_s"] += verify_s
      times["train_s"] += train_s
      info = dict(rows["info"])
      info["accuracy"] = float((first_scores.components["accuracy"] >= 1.0).mean())
      for comp in REWARD_COMPONENTS:
        if scorer.weights[comp]:
          info[f"reward_{comp}"] = float(first_scores.components[comp].mean())
      m_host.update(_global_info(info, first_scores.total) if multi else info)
      m_host.update(
          sample_tokens_per_s=n_tokens / max(sample_s, 1e-9),
          train_tokens_per_s=gcfg.mu * int(rows["mask"].sum()) / max(train_s, 1e-9),
          time_sample_s=sample_s, time_verify_s=verify_s, time_train_s=train_s,
          time_reward_compute_s=compute_s, steps_no_rows=steps_no_rows,
          refills_ahead=n_ahead, refills_discarded=n_discarded,
          step_time_s=time.perf_counter() - t0, sampled=n_sampled,
          time_compile_s=metrics_lib.compile_seconds() - compile_before,
          reward_failures=scorer.failures - failures_before,
          **{f"total_{k}": v for k, v in times.items()})
      check_finite(step, m_host)
      writer.write(step, m_host)
      bar.update(step, m_host)
      if step % gcfg.checkpoint_every == 0 or step == gcfg.steps:
        check_params_finite(step, state["params"])
        manager.save(step, state, data_state={"iterator": it.get_state(), "times": times,
                                              "steps_no_rows": steps_no_rows,
                                              "prev_tries": prev_tries})
  finally:
    manager.wait()
    manager.close()
    writer.close()
    bar.close()
    scorer.close()
  return state["params"], {"steps": step, **times}


def _assemble(groups, gcfg, n_rows):
  """Rollout groups -> fixed-size training rows (static shapes: one compile per config).

  Every rollout is max_prompt_len + max_new_tokens wide (`rollout`), so groups of refills
  concatenate as they are.
  """
  width = gcfg.max_prompt_len + gcfg.max_new_tokens
  def rows(x):
    x = np.asarray(x)
    if x.shape[1] != width:
      raise ValueError(f"rollout width {x.shape[1]} is not max_prompt_len + max_new_tokens "
                       f"({width})")
    return x
  toks, masks, olds, advs, rewards_all, lengths, trunc = [], [], [], [], [], [], []
  for out, _, rewards in groups:
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.float32), gcfg.G,
                                           scale=gcfg.adv_scale))
    keep = np.repeat(_group_std(rewards, gcfg.G) > 0, gcfg.G) if gcfg.dynamic_sampling else \
        np.ones(len(rewards), bool)
    toks.append(rows(out.tokens)[keep])
    masks.append(rows(out.completion_mask)[keep])
    olds.append(rows(out.logprobs)[keep])
    advs.append(adv[keep])
    rewards_all.append(rewards)
    lengths.append(np.asarray(out.lengths))
    trunc.append(np.asarray(out.truncated))
  first_rewards = groups[0][2]
  first_texts = groups[0][1]
  tokens = np.concatenate(toks)[:n_rows]
  kept_rows = len(tokens)
  pad = n_rows - kept_rows
  def fill(x, value=0):
    x = np.concatenate(x)[:n_rows]
    return np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)]) if pad else x
  rows = {"tokens": fill(toks), "mask": fill(masks, False).astype(np.float32),
          "old_logp": fill(olds).astype(np.float32), "advantages": fill(advs).astype(np.float32)}
  all_rewards = np.concatenate(rewards_all)
  rows["info"] = {
      "reward_mean": float(first_rewards.mean()), "reward_std": float(first_rewards.std()),
      "format_rate": format_rate(first_texts),
      "groups_all_equal": float((_group_std(first_rewards, gcfg.G) == 0).mean()),
      "completion_length": float(np.concatenate(lengths).mean()),
      "truncation_rate": float(np.concatenate(trunc).mean()),
      "rows_trained": float(kept_rows), "reward_mean_all_samples": float(all_rewards.mean())}
  return rows


def _take_rows(rows, idx, mesh, param_rules):
  """rows[idx] of global row arrays, laid out as place_batch lays out a minibatch."""
  out = {k: sharding.batch_sharding(mesh, v.ndim, len(idx), param_rules) for k, v in rows.items()}
  return _gather_rows(rows, jnp.asarray(idx), tuple(sorted(out.items())))


@functools.partial(jax.jit, static_argnums=2)
def _gather_rows(rows, idx, shardings):
  return jax.lax.with_sharding_constraint({k: v[idx] for k, v in rows.items()}, dict(shardings))


def _global_info(info, rewards):
  """The step's host metrics over every process's equal share of the rows: means averaged,
  rows_trained summed, reward_std of all the rewards."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  keys = sorted(info)
  values = multihost_utils.process_allgather(np.array([info[k] for k in keys], np.float64))
  out = dict(zip(keys, np.asarray(values).mean(0).tolist()))
  out["rows_trained"] = float(np.asarray(values)[:, keys.index("rows_trained")].sum())
  all_rewards = np.asarray(multihost_utils.process_allgather(np.asarray(rewards), tiled=True))
  out["reward_std"] = float(all_rewards.std())
  return out


def _place_tokens(tokens, mesh, param_rules):
  return sharding.place_batch({"tokens": np.asarray(tokens)}, mesh, param_rules)["tokens"]


def _warn_no_rows(step: int, scores: Scores, gcfg) -> None:
  """Printed once per run: the first step whose advantages are all 0."""
  values = np.unique(scores.total)
  seen = f"reward {values[0]:g} for every completion" if len(values) == 1 else \
      f"rewards {values[:4].tolist()} but equal within every group"
  print(f"GRPO step {step}: every group of {gcfg.G} completions got the same reward ({seen}), "
        "so every advantage is 0 and this step learns nothing (grad_norm 0 when beta = 0). "
        "A policy that never earns the reward stays there: cold-start it with SFT first, add "
        "a denser reward (e.g. --config.grpo.rewards.format=0.5), or sample more per prompt "
        "(grpo.G, grpo.temperature; grpo.dynamic_sampling refills such groups). Such steps "
        "are counted in the metric steps_no_rows; this is not printed again.", flush=True)


def format_rate(texts) -> float:
  return float(np.mean([task_base.parse_response(t) is not None for t in texts]))
