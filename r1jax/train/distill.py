"""Rejection sampling and distillation: DeepSeek-R1 section 2.3.3 (stage 3) and section 2.4.

Rejection sampling (`rejection_sample`): k completions of each training prompt from a
checkpoint, kept when the task's verifier accepts them (`Task.is_correct`, in-process),
optionally only the shortest correct one per prompt, duplicates dropped; the kept ones are
SFT traces (r1jax.train.sft.write_traces / read_traces). R1 also filtered mixed languages,
long paragraphs and code blocks with a generative judge; here the verifier alone decides.

Distillation (`train`): R1 distils sequence-level, by SFT of a smaller dense model on the
teacher's curated traces; that is `sft.train` on those traces. Optionally a token-level KL
term to the teacher's next-token distribution is added on the response tokens (Hinton et al.
2015, "Distilling the Knowledge in a Neural Network"; the reverse direction as in Gu et al.
2024, "MiniLLM"), which needs teacher and student to share the tokenizer:

  forward  KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))   (mean-seeking)
  reverse  KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))   (mode-seeking)

The loss per step is (NLL sum + kl_weight * KL sum) / response tokens, as `sft.train`
normalises its loss; R1 used no such term (it reports SFT only).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections

from r1jax import sharding
from r1jax.model import config as config_lib
from r1jax.model import decoder
from r1jax.train import evaluate as eval_lib
from r1jax.train import losses
from r1jax.train import metrics as metrics_lib
from r1jax.train import sft

KL_KINDS = ("none", "forward", "reverse")
KEEP = ("all", "shortest")


# ============================================================================ configs


def rejection_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_prompts = 256      # training prompts: the first of the train split drawn with `seed`
  c.k = 4                  # completions sampled per prompt
  c.temperature = 0.6      # sampling temperature (R1's evaluation setting)
  c.top_p = 0.95           # nucleus threshold (1 = off)
  c.max_new_tokens = 64    # completion tokens per sample
  c.batch_size = 256       # rows per generate call
  c.keep = "all"           # 'all' correct completions | 'shortest' correct one per prompt
  c.dedup = True           # drop a correct completion equal to one already kept for its prompt
  c.output = ""            # JSONL of the kept traces ('' = workdir/rejection/traces.jsonl)
  return c


def distill_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.teacher_workdir = ""   # workdir whose latest grpo/sft/pretrain checkpoint is the teacher
  c.teacher_from_hf = ""   # or an HF checkpoint dir as the teacher ('' = teacher_workdir)
  c.teacher_model = ml_collections.ConfigDict()  # fields over teacher_workdir/config.json's model
  c.kl = "none"            # token KL to the teacher: none | forward | reverse
  c.kl_weight = 1.0        # weight of the KL term beside the NLL (both per response token)
  c.kl_chunk = 1024        # tokens per chunk of vocabulary-sized logits in the KL
  return c


def validate_rejection(rcfg) -> None:
  """ValueError naming the first rejection config field that no run could use."""
  for field in ("num_prompts", "k", "max_new_tokens", "batch_size"):
    if not isinstance(rcfg[field], int) or rcfg[field] < 1:
      raise ValueError(f"config field 'rejection.{field}' must be an int >= 1, "
                       f"got {rcfg[field]!r}")
  if not rcfg.temperature >= 0:
    raise ValueError(f"config field 'rejection.temperature' must be >= 0 (0 = greedy), "
                     f"got {rcfg.temperature}")
  if not 0 < rcfg.top_p <= 1:
    raise ValueError(f"config field 'rejection.top_p' must lie in (0, 1] (1 = off), "
                     f"got {rcfg.top_p}")
  if rcfg.keep not in KEEP:
    raise ValueError(f"config field 'rejection.keep' must be one of {KEEP}, got {rcfg.keep!r}")
  if not isinstance(rcfg.dedup, bool):
    raise ValueError(f"config field 'rejection.dedup' must be a bool, got {rcfg.dedup!r}")


def validate_distill(dcfg) -> None:
  """ValueError naming the first distill config field that no run could use."""
  if dcfg.kl not in KL_KINDS:
    raise ValueError(f"config field 'distill.kl' must be one of {KL_KINDS}, got {dcfg.kl!r}")
  if not (math.isfinite(dcfg.kl_weight) and dcfg.kl_weight >= 0):
    raise ValueError(f"config field 'distill.kl_weight' must be finite and >= 0, "
                     f"got {dcfg.kl_weight}")
  if not isinstance(dcfg.kl_chunk, int) or dcfg.kl_chunk < 1:
    raise ValueError(f"config field 'distill.kl_chunk' must be an int >= 1, "
                     f"got {dcfg.kl_chunk!r}")
  unknown = sorted(set(dcfg.teacher_model.keys()) - set(config_lib.model_defaults().keys()))
  if unknown:
    raise ValueError(f"config field 'distill.teacher_model.{unknown[0]}' is not a model field")
  if dcfg.teacher_workdir and dcfg.teacher_from_hf:
    raise ValueError("config fields 'distill.teacher_workdir' and 'distill.teacher_from_hf' "
                     "are both set; the teacher comes from one of them")
  if dcfg.teacher_from_hf and not os.path.isfile(os.path.join(dcfg.teacher_from_hf,
                                                              "config.json")):
    raise ValueError(f"config field 'distill.teacher_from_hf': no config.json in "
                     f"{dcfg.teacher_from_hf!r}")
  if dcfg.kl != "none" and not (dcfg.teacher_workdir or dcfg.teacher_from_hf):
    raise ValueError(f"config field 'distill.kl' is {dcfg.kl!r}, which needs a teacher: set "
                     "distill.teacher_workdir or distill.teacher_from_hf")


# ============================================================================ rejection sampling


@dataclasses.dataclass(frozen=True)
class Sample:
  """One completion of a prompt: its sample index, text, token count and verdict."""
  index: int
  text: str
  length: int
  correct: bool


def select(samples: list[Sample], keep: str, dedup: bool) -> list[Sample]:
  """The correct samples of one prompt to keep, in sample order: all of them ('all') or the
  one with the fewest tokens ('shortest'; ties: the first drawn); with dedup, a text equal
  to an earlier kept one is dropped."""
  if keep not in KEEP:
    raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
  correct = sorted((s for s in samples if s.correct), key=lambda s: s.index)
  if dedup:
    seen, unique = set(), []
    for s in correct:
      if s.text not in seen:
        seen.add(s.text)
        unique.append(s)
    correct = unique
  if keep == "shortest" and correct:
    correct = [min(correct, key=lambda s: (s.length, s.index))]
  return correct


def rejection_sample(params, model_cfg, task, tokenizer, rcfg, examples, *, seed: int = 0,
                     mesh=None, progress: bool = True) -> tuple[list[dict], dict]:
  """rcfg.k completions of each example, verified, selected (`select`).

  Returns (trace records, stats): records as `sft.trace_record` (uid: the example's uid
  with '#<sample index>'), in example order; stats: generated, accepted (before selection),
  kept, accept_rate (accepted / generated), prompts, prompts_with_accepted,
  mean_kept_length (tokens, EOS included) and truncation_rate.
  """
  ecfg = ml_collections.ConfigDict({k: rcfg[k] for k in (
      "k", "temperature", "top_p", "max_new_tokens", "batch_size")})
  per_prompt: list[list[Sample]] = [[] for _ in examples]
  accepted = truncated = 0
  total = len(examples) * rcfg.k
  bar = metrics_lib.ProgressBar(total, ("accepted",), desc="rejection_sample",
                                disable=not progress)
  try:
    for n, (i, s, text, length, trunc) in enumerate(eval_lib.sample_completions(
        params, model_cfg, task, tokenizer, ecfg, examples, seed=seed, mesh=mesh), start=1):
      ok = bool(task.is_correct(text, **examples[i].reward_kwargs()))
      per_prompt[i].append(Sample(s, text, length, ok))
      accepted += ok
      truncated += trunc
      bar.update(n, {"accepted": accepted})
  finally:
    bar.close()
  records, kept_lengths = [], []
  for i, (ex, samples) in enumerate(zip(examples, per_prompt)):
    uid = ex.uid or f"{task.name}/train/{i}"
    for s in select(samples, rcfg.keep, rcfg.dedup):
      records.append(sft.trace_record(dataclasses.replace(ex, trace=s.text,
                                                          uid=f"{uid}#{s.index}")))
      kept_lengths.append(s.length)
  stats = {"generated": total, "accepted": accepted, "kept": len(records),
           "accept_rate": accepted / max(total, 1), "prompts": len(examples),
           "prompts_with_accepted": sum(any(s.correct for s in p) for p in per_prompt),
           "mean_kept_length": sum(kept_lengths) / len(kept_lengths) if kept_lengths else 0.0,
           "truncation_rate": truncated / max(total, 1)}
  return records, stats


# ============================================================================ the KL term


def _kl_from_logits(student_logits_CxV, teacher_logits_CxV, kind: str):
  """Per-row KL of the two softmaxes ('forward': KL(t || s), 'reverse': KL(s || t))."""
  logp_s = jax.nn.log_softmax(student_logits_CxV.astype(jnp.float32), axis=-1)
  logp_t = jax.nn.log_softmax(teacher_logits_CxV.astype(jnp.float32), axis=-1)
  if kind == "forward":
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
  if kind == "reverse":
    return jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
  raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")


def reference_token_kl(student_logits_BxLxV, teacher_logits_BxLxV, weights_BxL, *, kind: str):
  """Unchunked oracle of `token_kl` from full logits: (sum of weighted KL, sum of weights)."""
  kl_BxL = _kl_from_logits(student_logits_BxLxV, teacher_logits_BxLxV, kind)
  w = weights_BxL.astype(jnp.float32)
  return jnp.sum(kl_BxL * w), jnp.sum(w)


def token_kl(student_hidden_BxLxD, student_head_DxV, teacher_hidden_BxLxD, teacher_head_DxV,
             weights_BxL, *, kind: str, chunk_size: int = 1024):
  """(sum over tokens of weights * KL(teacher, student), sum of weights), chunk by chunk.

  The logits of both models are projected from their final-normed hidden states chunk_size
  tokens at a time, under lax.map over a jax.checkpoint-ed chunk function (as
  grpo.token_logprobs_and_entropy), so neither pass holds more than [chunk_size, V] logits
  per model. The gradient flows into the student's hidden state and head only; the teacher
  is held constant (stop_gradient). Rows of weight 0 (prompt, padding) add nothing.
  """
  if kind not in ("forward", "reverse"):
    raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")
  if student_head_DxV.shape[1] != teacher_head_DxV.shape[1]:
    raise ValueError(f"student vocab {student_head_DxV.shape[1]} != teacher vocab "
                     f"{teacher_head_DxV.shape[1]}: the KL needs one tokenizer")
  if student_hidden_BxLxD.shape[:2] != teacher_hidden_BxLxD.shape[:2] or \
      weights_BxL.shape != student_hidden_BxLxD.shape[:2]:
    raise ValueError(f"hidden states {student_hidden_BxLxD.shape}, {teacher_hidden_BxLxD.shape} "
                     f"and weights {weights_BxL.shape} must share [B, L]")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  teacher_hidden_BxLxD = jax.lax.stop_gradient(teacher_hidden_BxLxD)
  teacher_head_DxV = jax.lax.stop_gradient(teacher_head_DxV)
  b, l, ds = student_hidden_BxLxD.shape
  dt = teacher_hidden_BxLxD.shape[2]
  t = b * l
  chunk = min(chunk_size, t)
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  hs = jnp.pad(student_hidden_BxLxD.reshape(t, ds), ((0, pad), (0, 0)))
  ht = jnp.pad(teacher_hidden_BxLxD.reshape(t, dt), ((0, pad), (0, 0)))
  w = jnp.pad(weights_BxL.reshape(t).astype(jnp.float32), (0, pad))

  @jax.checkpoint
  def one_chunk(args):
    hs_CxD, ht_CxD, w_C = args
    logits_s = jnp.dot(hs_CxD, student_head_DxV, preferred_element_type=jnp.float32)
    logits_t = jnp.dot(ht_CxD, teacher_head_DxV, preferred_element_type=jnp.float32)
    return jnp.sum(_kl_from_logits(logits_s, logits_t, kind) * w_C)

  sums = jax.lax.map(one_chunk, (hs.reshape(n_chunks, chunk, ds), ht.reshape(n_chunks, chunk, dt),
                                 w.reshape(n_chunks, chunk)))
  return jnp.sum(sums), jnp.sum(w)


def make_kl_loss(student_cfg, teacher_cfg, kind: str, weight: float, chunk_size: int):
  """The `extra_loss` of sft.train: (params, student hidden, batch, teacher params) ->
  (weight * KL sum over the response targets, {'kl': KL per response token}). The teacher's
  MTP modules, if any, are not run: only its next-token distribution counts."""
  teacher_cfg = copy.deepcopy(teacher_cfg)
  teacher_cfg.mtp_depth = 0

  def kl_loss(params, hidden_BxLxD, batch, teacher_params):
    _, aux = decoder.forward(teacher_params, batch["tokens"], teacher_cfg,
                             positions=batch["positions"], segment_ids=batch["segment_ids"],
                             return_hidden=True, compute_logits=False)
    w = losses.target_weights(batch["loss_mask"].astype(bool), batch["segment_ids"], 1)
    s, n = token_kl(hidden_BxLxD[:, :-1], decoder.output_head(params, student_cfg),
                    aux["hidden"][:, :-1], decoder.output_head(teacher_params, teacher_cfg),
                    w, kind=kind, chunk_size=chunk_size)
    return weight * s, {"kl": s / jnp.maximum(n, 1.0)}

  return kl_loss


def train(student_cfg, scfg, dcfg, workdir: str, *, task, tokenizer, params, traces,
          teacher_params=None, teacher_cfg=None, seed: int = 0, mesh=None,
          progress: bool = True):
  """Distils into the student (`params`, `student_cfg`): SFT on `traces` (the teacher's
  rejection-sampled traces) with scfg's loop settings, plus the KL term of dcfg.kl when it
  is not 'none' (then teacher_params / teacher_cfg are the teacher). The run lives in
  workdir/distill and resumes like sft.train; returns (params, info)."""
  validate_distill(dcfg)
  extra = None
  if dcfg.kl != "none":
    if teacher_params is None or teacher_cfg is None:
      raise ValueError(f"distill.kl={dcfg.kl!r} needs teacher_params and teacher_cfg")
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
      raise ValueError(f"config field 'distill.kl' is {dcfg.kl!r}, but the teacher's vocab "
                       f"({teacher_cfg.vocab_size}) differs from the student's "
                       f"({student_cfg.vocab_size}): the KL needs one tokenizer")
    if mesh is not None:
      teacher_params = sharding.place_params(teacher_params, teacher_cfg, mesh)
    extra = (make_kl_loss(student_cfg, teacher_cfg, dcfg.kl, dcfg.kl_weight, dcfg.kl_chunk),
             teacher_params)
  return sft.train(student_cfg, scfg, workdir, task=task, tokenizer=tokenizer, params=params,
                   examples=traces, seed=seed, name="distill", mesh=mesh, progress=progress,
                   extra_loss=extra)
