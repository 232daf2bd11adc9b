"""Tests of supervised fine-tuning (r1jax/train/sft.py) on configs/test_tiny.py.

The loss is checked against an independent computation: each packed sequence run through
the model on its own, -log p summed over its response tokens only. A NaN stops the run
naming the step, with no checkpoint of the poisoned state, and a run SIGKILLed past a
checkpoint and resumed ends bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.data import datasets as data_lib
from r1jax.model import decoder as model_lib
from r1jax.run import experiment
from r1jax.run import pipeline
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim, sft

import tiny_runs


@pytest.fixture(scope="module")
def built():
  cfg = tiny_runs.load_config()
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  traces = experiment.trace_task(cfg).examples("train", cfg.sft.num_traces, seed=cfg.seed)
  return cfg, task, tokenizer, model_cfg, params, traces


@pytest.fixture(scope="module")
def step_fn(built):
  cfg, _, _, model_cfg, params, _ = built
  optimizer = optim.make_optimizer(cfg.sft.optimizer, cfg.sft.steps)
  train_step = sft.make_train_step(model_cfg, optimizer)

  def run(batch):
    p = jax.tree.map(jnp.array, params)  # fresh buffers: the step donates its state
    state = {"params": p, "opt_state": optimizer.init(p), "step": jnp.int32(0)}
    _, m = train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return {k: float(v) for k, v in m.items()}

  return run


@pytest.fixture(scope="module")
def packed_batch(built):
  cfg, task, tokenizer, _, _, traces = built
  ds = data_lib.sft_dataset(task, traces, tokenizer, seq_len=cfg.sft.seq_len,
                            global_batch_size=cfg.sft.batch_size, seed=cfg.seed)
  return {k: np.asarray(v) for k, v in ds[0].items()}


def test_loss_is_the_mean_nll_of_response_tokens_only(built, step_fn, packed_batch):
  _, task, tokenizer, model_cfg, params, traces = built
  batch = packed_batch
  assert (batch["segment_ids"].max(axis=1) >= 2).any(), "the batch should pack several sequences"
  traces_by_tokens = {}
  for ex in traces:
    tokens, _ = data_lib.sft_sequence(task, ex, tokenizer)
    traces_by_tokens[tuple(tokens)] = ex
  # Each sequence alone at positions 0.., right-padded: the model is causal, so the padding
  # cannot change the logits of the real tokens.
  seqs = []
  for r in range(len(batch["tokens"])):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      sel = batch["segment_ids"][r] == s
      seqs.append((batch["tokens"][r][sel], batch["loss_mask"][r][sel]))
  width = batch["tokens"].shape[1]
  alone_SxL = np.full((len(seqs), width), tokenizer.pad_id, np.int32)
  for i, (tokens, _) in enumerate(seqs):
    alone_SxL[i, :len(tokens)] = tokens
  logits, _ = jax.jit(lambda p, t: model_lib.forward(p, t, model_cfg))(params, alone_SxL)
  logp_SxLxV = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  nll_sum, count, expected_count = 0.0, 0, 0
  for i, (tokens, mask) in enumerate(seqs):
    ex = traces_by_tokens[tuple(tokens.tolist())]
    # Independently of the mask: the response is the trace and <eos>, nothing of the prompt.
    expected_count += len(tokenizer.encode(ex.trace)) + 1
    for t in range(1, len(tokens)):
      if mask[t]:
        nll_sum -= float(logp_SxLxV[i, t - 1, tokens[t]])
        count += 1
  m = step_fn(batch)
  assert count == expected_count
  assert m["tokens"] == count
  assert m["nll"] == pytest.approx(nll_sum / count, rel=2e-5)
  assert m["loss"] == pytest.approx(nll_sum / count, rel=2e-5)  # no MTP, no balance loss


def test_prompt_tokens_carry_no_loss(step_fn, packed_batch):
  m_full = step_fn(packed_batch)
  # Every token as a target: the mean changes, so the mask is what excluded the prompts.
  every = dict(packed_batch, loss_mask=(packed_batch["segment_ids"] > 0).astype(np.int32))
  assert step_fn(every)["tokens"] > m_full["tokens"]
  none = dict(packed_batch, loss_mask=np.zeros_like(packed_batch["loss_mask"]))
  m_none = step_fn(none)
  assert m_none["tokens"] == 0 and m_none["loss"] == 0.0 and m_none["grad_norm"] == 0.0


def test_nan_parameters_stop_at_step_1_without_a_checkpoint(built, tmp_path):
  cfg, task, tokenizer, model_cfg, params, traces = built
  bad = dict(params, final_norm=params["final_norm"] * np.nan)
  with pytest.raises(FloatingPointError, match=r"step 1: loss is nan"):
    sft.train(model_cfg, cfg.sft, str(tmp_path), task=task, tokenizer=tokenizer, params=bad,
              examples=traces, progress=False)
  with ckpt_lib.CheckpointManager(os.path.join(tmp_path, "sft")) as m:
    assert m.latest_step() is None
  assert metrics_lib.read_metrics(os.path.join(tmp_path, "sft")) == []


def test_diverging_run_stops_naming_the_step_and_keeps_older_checkpoints(built, tmp_path):
  cfg, task, tokenizer, model_cfg, params, traces = built
  scfg = copy.deepcopy(cfg.sft)
  scfg.steps, scfg.checkpoint_every = 6, 1
  scfg.optimizer.lr, scfg.optimizer.grad_clip = 1e30, 0.0
  with pytest.raises(FloatingPointError,
                     match=r"step (\d+): (loss is (nan|inf|-inf)|the parameters contain NaN)") as err:
    sft.train(model_cfg, scfg, str(tmp_path), task=task, tokenizer=tokenizer, params=params,
              examples=traces, progress=False)
  bad_step = int(str(err.value).split(":")[0].split()[1])
  assert bad_step >= 2  # step 1's loss is computed on the finite initial parameters
  with ckpt_lib.CheckpointManager(os.path.join(tmp_path, "sft")) as m:
    assert m.latest_step() is not None and m.latest_step() < bad_step
  rows = metrics_lib.read_metrics(os.path.join(tmp_path, "sft"))
  assert rows and max(r["step"] for r in rows) <= bad_step  # a row holds the loss of the step before
  assert all(np.isfinite(r["loss"]) for r in rows)


def test_sft_killed_and_resumed_equals_uninterrupted(tmp_path):
  params_a, info_a = tiny_runs.run_sft(str(tmp_path / "a"))
  params_b, info_b = tiny_runs.run_killed_then_resumed("sft", tmp_path / "b")
  assert info_a["steps"] == info_b["steps"] == 4
  tiny_runs.assert_same_run("sft", tmp_path / "a", params_a, tmp_path / "b", params_b)
  rows = metrics_lib.read_metrics(os.path.join(tmp_path / "b", "sft"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_sharded_sft_equals_one_device(tmp_path):
  """Two SFT steps with parameters, optimizer state and packed batches over a data x fsdp x
  expert mesh end where the one-device run does (up to float reduction order)."""
  from r1jax import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
  want, _ = tiny_runs.run_sft(str(tmp_path / "one"), steps=2)
  got, _ = tiny_runs.run_sft(str(tmp_path / "mesh"), steps=2, mesh=mesh)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(got))
  got, want = tiny_runs.leaves(got), tiny_runs.leaves(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("field, value, message", [
    ("num_traces", 0, "sft config field 'num_traces' must be >= 1"),
    ("seq_len", 1, "sft config field 'seq_len' must be >= 2"),
    ("optimizer.b2", 1.0, r"sft.optimizer config field 'b2' must lie in \[0, 1\)"),
    ("optimizer.warmup_steps", -1, "sft.optimizer config field 'warmup_steps' must be >= 0"),
])
def test_validate_names_the_field(field, value, message):
  scfg = tiny_runs.load_config().sft
  sft.validate(scfg)  # the test config itself is valid
  *parents, name = field.split(".")
  node = scfg
  for p in parents:
    node = node[p]
  node[name] = value
  with pytest.raises(ValueError, match=message):
    sft.validate(scfg)
