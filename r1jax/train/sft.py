"""Supervised fine-tuning: the cold start of DeepSeek-R1 (section 2.3.1) and distillation;
the same loop pre-trains on plain task text (`pretrain_defaults`, the base model of R1-Zero).

Next-token loss on response tokens only (pre-training: on every token), over packed rows with
segment_ids (data/datasets.py), plus the MTP loss when the model has MTP modules. Same
optimizer, checkpoints and metrics as GRPO; logged per step besides the loss: the main NLL,
each MTP depth's NLL (`mtp_nll_<k>`) and the MoE sequence balance loss (`balance_loss`). A run is resumable: killed at any point, `train` picks up from the latest checkpoint
(parameters, optimizer, step, data iterator) and continues.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from r1jax import sharding
from r1jax.data import datasets as data_lib
from r1jax.tasks import base, jsonl
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import losses, metrics as metrics_lib, optim
from r1jax.train.guards import check_finite, check_params_finite, global_norm


def sft_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_traces = 256          # cold-start examples with traces (R1 used thousands)
  c.steps = 300               # optimizer steps
  c.batch_size = 16           # packed rows per step
  c.seq_len = 256             # tokens per packed row; every trace (prompt + trace + <eos>) must fit
  c.checkpoint_every = 100    # steps between checkpoints
  c.max_to_keep = 2           # checkpoints kept
  c.traces_path = ""          # JSONL of traces to train on (rejection_sample writes one): its
                              # first num_traces records; '' = the task's own traces
  c.optimizer = optim.optimizer_defaults()
  return c


def pretrain_defaults() -> ml_collections.ConfigDict:
  """The `pretrain` stage: next-token training on `num_examples` plain task texts."""
  c = ml_collections.ConfigDict()
  c.num_examples = 4096       # distinct training examples, as Task.pretrain_text
  c.steps = 300
  c.batch_size = 16           # packed rows per step
  c.seq_len = 128
  c.checkpoint_every = 100
  c.max_to_keep = 2
  c.optimizer = optim.optimizer_defaults()
  return c


def _validate_loop(scfg, name: str, count_field: str) -> None:
  for field in (count_field, "steps", "batch_size", "checkpoint_every", "max_to_keep"):
    if scfg[field] < 1:
      raise ValueError(f"{name} config field {field!r} must be >= 1, got {scfg[field]}")
  if scfg.seq_len < 2:
    raise ValueError(f"{name} config field 'seq_len' must be >= 2 (a token and its "
                     f"successor), got {scfg.seq_len}")
  if scfg.batch_size % jax.process_count():  # each process loads an equal share
    raise ValueError(f"{name} config field 'batch_size' ({scfg.batch_size}) is the global "
                     f"batch and must be a multiple of the process count "
                     f"({jax.process_count()})")
  optim.validate(scfg.optimizer, f"{name}.optimizer")


def validate(scfg) -> None:
  """ValueError naming the first sft config field that no run could use."""
  _validate_loop(scfg, "sft", "num_traces")
  if not isinstance(scfg.traces_path, str):
    raise ValueError(f"sft config field 'traces_path' must be a path string ('' = the task's "
                     f"own traces), got {scfg.traces_path!r}")


# ============================================================================ trace files
# One JSON object per line: {"question", "answer", "trace", "fields", "uid"}, the Example
# fields (r1jax.tasks.base.Example) of a problem with a worked response.


def trace_record(example: base.Example) -> dict:
  """The JSON record of an example with a trace (`write_traces`)."""
  return {"question": example.question, "answer": example.answer, "trace": example.trace,
          "fields": dict(example.fields), "uid": example.uid}


def parse_trace_record(record: dict, uid: str) -> base.Example:
  """An Example from a trace record; ValueError naming `uid` ('path:line') for a record
  without a question, answer or well-formed trace (<think>...</think><answer>...</answer>)."""
  for key in ("question", "answer", "trace"):
    if not isinstance(record.get(key), str):
      raise ValueError(f"{uid}: field {key!r} must be a string, got "
                       f"{type(record.get(key)).__name__}")
  if base.parse_response(record["trace"]) is None:
    raise ValueError(f"{uid}: field 'trace' is not a well-formed "
                     "<think>...</think><answer>...</answer> response")
  fields = record.get("fields") or {}
  if not isinstance(fields, dict):
    raise ValueError(f"{uid}: field 'fields' must be an object, got {type(fields).__name__}")
  return base.Example(question=record["question"], answer=record["answer"],
                      trace=record["trace"], fields=fields, uid=record.get("uid") or uid)


def read_traces(path: str, n: int | None = None) -> list[base.Example]:
  """The first n (all when None or fewer) trace records of a JSONL file, parsed and checked
  by `jsonl.read_jsonl` (ValueError '<path>:<line>: ...' for any bad line or no record)."""
  examples = jsonl.read_jsonl(path, parse_trace_record)
  return examples if n is None else examples[:n]


def write_traces(path: str, records) -> str:
  """Writes trace records (`trace_record`) as JSONL (atomically); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  os.replace(path + ".tmp", path)
  return path


def validate_pretrain(pcfg) -> None:
  """ValueError naming the first pretrain config field that no run could use."""
  _validate_loop(pcfg, "pretrain", "num_examples")


def make_train_step(model_cfg, optimizer, bias_rate: float = 0.0, extra_loss=None):
  """jit(step(state, batch, extra_args=None) -> (state, metrics)), donating the state.
  bias_rate: the aux-loss-free router bias update speed u (optim.apply_updates).
  extra_loss: None, or fn(params, hidden_BxLxD, batch, extra_args) -> (loss_sum, metrics)
  whose sum is added to the LM loss sum before the division by the response token count
  (distillation's KL term; extra_args, e.g. the teacher's parameters, are a jit argument,
  not constants of the program), its metrics logged beside the others."""

  def step(state, batch, extra_args=None):
    def loss_fn(params):
      s, n, m = losses.lm_loss(params, batch["tokens"], model_cfg, loss_mask=batch["loss_mask"],
                               segment_ids=batch["segment_ids"], positions=batch["positions"],
                               return_hidden=extra_loss is not None)
      if extra_loss is not None:
        extra_sum, extra_m = extra_loss(params, m.pop("hidden"), batch, extra_args)
        s = s + extra_sum
        m = {**m, "extra": extra_m}
      return s / jnp.maximum(n, 1.0), m
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    load = m.get("tokens_per_expert")
    params = optim.apply_updates(state["params"], updates, load, bias_rate)
    out = {"loss": loss, "nll": m["nll_sum"] / jnp.maximum(m["tokens"], 1.0),
           "grad_norm": global_norm(grads), "tokens": m["tokens"]}
    for k in range(1, model_cfg.mtp_depth + 1):
      out[f"mtp_nll_{k}"] = m[f"mtp{k}_nll_sum"] / jnp.maximum(m[f"mtp{k}_tokens"], 1.0)
    out["balance_loss"] = m["balance_loss"]
    out.update(m.get("extra", {}))
    if load is not None:
      out["expert_imbalance"] = jnp.max(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))
      out["dropped_assignments"] = jnp.sum(m["dropped_assignments"])
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, out

  return jax.jit(step, donate_argnums=0)


def train(model_cfg, scfg, workdir: str, *, task, tokenizer, params, examples=None,
          dataset=None, seed: int = 0, steps: int | None = None,
          time_budget_s: float | None = None, name: str = "sft", progress: bool = True,
          mesh=None, param_rules=None, extra_loss=None):
  """Trains on `examples`' traces, or on the batches of `dataset`; returns (params, info).

  dataset: instead of examples, a grain MapDataset of packed row batches (e.g.
  `datasets.pretrain_dataset`, loss on every token). scfg: an sft config (`sft_defaults`)
  or a pretrain one (`pretrain_defaults`, told by its `num_examples` field).
  steps: number of optimizer steps (default scfg.steps). time_budget_s: stop early once this
  much training time is spent (the SFT control arm); training time is wall-clock time in
  the steps less compilation (metrics.WorkClock), so a restarted run is not charged twice.
  The run lives in workdir/name: checkpoints/, metrics.jsonl, tb/. Calling again resumes.
  mesh / param_rules: parameters, optimizer state and batches laid out as in `sharding`;
  None: one device.
  extra_loss: None, or (fn, extra_args): a term added to the loss (make_train_step), e.g.
  distillation's KL (r1jax.train.distill), with the arrays it reads besides the batch.
  """
  if (examples is None) == (dataset is None):
    raise ValueError("sft.train needs exactly one of examples (SFT traces) and dataset")
  (validate_pretrain if "num_examples" in scfg else validate)(scfg)
  if dataset is None:
    dataset = data_lib.sft_dataset(task, examples, tokenizer, seq_len=scfg.seq_len,
                                   global_batch_size=scfg.batch_size, seed=seed)
  total = int(steps if steps is not None else scfg.steps)
  run_dir = os.path.join(workdir, name)
  it = iter(dataset)
  optimizer = optim.make_optimizer(scfg.optimizer, total)
  # a copy: the caller's arrays are never donated
  params = sharding.place_params(jax.tree.map(jnp.array, params), model_cfg, mesh, param_rules)
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
  elapsed = 0.0
  manager = ckpt_lib.CheckpointManager(run_dir, scfg.max_to_keep)
  start_step = 0
  if manager.latest_step() is not None:
    restored = manager.restore(ckpt_lib.abstract_state(state))
    state, start_step = restored.state, restored.step
    it.set_state(restored.data_state["iterator"])
    elapsed = float(restored.data_state["elapsed_s"])
  extra_fn, extra_args = extra_loss if extra_loss is not None else (None, None)
  train_step = sharding.in_mesh(make_train_step(
      model_cfg, optimizer, scfg.optimizer.router_bias_update_rate, extra_fn), mesh)
  writer = metrics_lib.MetricsWriter(run_dir, resume_step=start_step if start_step else None)
  late = metrics_lib.OneStepLate()
  bar = metrics_lib.ProgressBar(total, ("loss", "nll"), initial=start_step, desc=name,
                                disable=not progress)
  step = start_step
  clock = metrics_lib.WorkClock()

  def emit(item):
    if item is not None:
      s, m = item
      check_finite(s, m)
      writer.write(s, m)
      bar.update(s, m)

  try:
    while step < total and (time_budget_s is None or elapsed < time_budget_s):
      clock.start()
      batch = sharding.place_batch(next(it), mesh, param_rules)
      state, m = train_step(state, batch, extra_args)
      jax.block_until_ready(state["step"])
      elapsed += clock.elapsed()
      step += 1
      m = dict(m, elapsed_s=elapsed)
      emit(late.push(step, m))
      if step % scfg.checkpoint_every == 0 or step == total:
        emit(late.flush())
        check_params_finite(step, state["params"])
        manager.save(step, state, data_state={"iterator": it.get_state(), "elapsed_s": elapsed})
    emit(late.flush())
    check_params_finite(step, state["params"])
    manager.save(step, state, data_state={"iterator": it.get_state(), "elapsed_s": elapsed},
                 force=True)
  finally:
    manager.wait()
    manager.close()
    writer.close()
    bar.close()
  return state["params"], {"steps": step, "train_time_s": elapsed}
