"""Rejection sampling and distillation (r1jax/train/distill.py, the `rejection_sample` and
`distill` modes).

The token KL is held to hand-computed numbers, is 0 when teacher == student, and its chunked
value and gradient match a naive full-softmax version. Selection (all / shortest, dedup) and
the trace files are checked in pure Python. The modes run on configs/test_tiny.py: a MoE
teacher trained two SFT steps, rejection sampling from it, then a dense tiny_qwen2-sized
student distilled from its traces with the KL term on and off.
"""
from __future__ import annotations

import copy
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import presets
from r1jax.run import distill as distill_mode
from r1jax.run import experiment
from r1jax.run import rejection_sample as rejection_mode
from r1jax.run import sft as sft_mode
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import distill
from r1jax.train import metrics as metrics_lib
from r1jax.train import sft

import tiny_runs

# ---------------------------------------------------------------------------- the KL term


def test_kl_on_hand_computed_numbers():
  # p_t = [1/2, 1/2] (logits 0, 0); p_s = [1/4, 3/4] (logits 0, ln 3). The second token has
  # weight 0 and must add nothing.
  eye = jnp.eye(2)
  hs = jnp.array([[[0.0, math.log(3.0)], [5.0, -5.0]]])
  ht = jnp.array([[[0.0, 0.0], [-5.0, 5.0]]])
  w = jnp.array([[1.0, 0.0]])
  forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)      # 0.5 ln(4/3)
  reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
  for kind, want in (("forward", forward), ("reverse", reverse)):
    s, n = distill.token_kl(hs, eye, ht, eye, w, kind=kind, chunk_size=1)
    np.testing.assert_allclose([float(s), float(n)], [want, 1.0], rtol=1e-6)
    s, n = distill.reference_token_kl(hs, ht, w, kind=kind)
    np.testing.assert_allclose([float(s), float(n)], [want, 1.0], rtol=1e-6)
  np.testing.assert_allclose(forward, 0.143841036, rtol=1e-8)
  np.testing.assert_allclose(reverse, 0.130812035, rtol=1e-8)


def _random_heads(seed=0, b=2, l=5, d=4, v=7):
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (b, l, d)), jax.random.normal(k[1], (d, v)),
          jax.random.normal(k[2], (b, l, d)), jax.random.normal(k[3], (d, v)),
          (jax.random.uniform(k[0], (b, l)) > 0.3).astype(jnp.float32))


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kl_is_zero_when_teacher_is_student(kind):
  hs, head, _, _, w = _random_heads()
  s, n = distill.token_kl(hs, head, hs, head, w, kind=kind, chunk_size=3)
  assert abs(float(s)) < 1e-5 and float(n) == float(w.sum()) > 0


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_chunked_kl_value_and_gradient_match_the_full_softmax(kind):
  hs, head_s, ht, head_t, w = _random_heads(seed=1)

  def chunked(hs, head_s, ht):
    return distill.token_kl(hs, head_s, ht, head_t, w, kind=kind, chunk_size=3)[0]

  def naive(hs, head_s):  # full [B, L, V] logits, softmaxes written out
    ps = jax.nn.softmax(hs @ head_s, axis=-1)
    pt = jax.nn.softmax(ht @ head_t, axis=-1)
    p, q = (pt, ps) if kind == "forward" else (ps, pt)
    return jnp.sum(jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1) * w)

  np.testing.assert_allclose(float(chunked(hs, head_s, ht)), float(naive(hs, head_s)),
                             rtol=1e-5)
  assert float(chunked(hs, head_s, ht)) > 0
  g_hs, g_head, g_ht = jax.grad(chunked, argnums=(0, 1, 2))(hs, head_s, ht)
  n_hs, n_head = jax.grad(naive, argnums=(0, 1))(hs, head_s)
  np.testing.assert_allclose(g_hs, n_hs, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_head, n_head, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_ht).max()) == 0.0  # the teacher is a constant


def test_kl_needs_one_vocabulary():
  hs, head, ht, _, w = _random_heads()
  with pytest.raises(ValueError, match="one tokenizer"):
    distill.token_kl(hs, head, ht, jnp.zeros((4, 9)), w, kind="forward")


# ---------------------------------------------------------------------------- selection, files


def test_select_keeps_correct_ones_shortest_and_unique():
  S = distill.Sample
  samples = [S(0, "a", 5, False), S(1, "b", 4, True), S(2, "c", 3, True), S(3, "b", 4, True),
             S(4, "d", 3, True)]
  assert [s.index for s in distill.select(samples, "all", dedup=False)] == [1, 2, 3, 4]
  assert [s.index for s in distill.select(samples, "all", dedup=True)] == [1, 2, 4]
  assert [s.index for s in distill.select(samples, "shortest", dedup=True)] == [2]  # tie: first
  assert distill.select(samples[:1], "shortest", dedup=True) == []
  with pytest.raises(ValueError, match="keep"):
    distill.select(samples, "longest", dedup=True)


def test_trace_files_round_trip_and_name_bad_lines(tmp_path):
  cfg = tiny_runs.load_config()
  examples = experiment.trace_task(cfg).examples("train", 3, seed=0)
  path = sft.write_traces(str(tmp_path / "t.jsonl"), [sft.trace_record(e) for e in examples])
  back = sft.read_traces(path)
  assert [(e.question, e.answer, e.trace, e.fields, e.uid) for e in back] == \
      [(e.question, e.answer, e.trace, dict(e.fields), e.uid) for e in examples]
  assert len(sft.read_traces(path, 2)) == 2
  with open(path, "a") as f:
    f.write(json.dumps({"question": "q", "answer": "1", "trace": "no tags"}) + "\n")
  with pytest.raises(ValueError, match=r"t\.jsonl:4: field 'trace' is not a well-formed"):
    sft.read_traces(path)


@pytest.mark.parametrize("field,value,message", [
    ("rejection.k", 0, "'rejection.k' must be an int >= 1"),
    ("rejection.top_p", 0.0, "'rejection.top_p' must lie in"),
    ("rejection.keep", "longest", "'rejection.keep' must be one of"),
    ("distill.kl", "js", "'distill.kl' must be one of"),
    ("distill.kl_weight", -1.0, "'distill.kl_weight' must be finite"),
    ("distill.kl", "forward", "'distill.kl' is 'forward', which needs a teacher"),
    ("sft.traces_path", "/nonexistent.jsonl", "'sft.traces_path': no such file"),
    ("distill.teacher_model.hidden", 8, "'distill.teacher_model.hidden' is not a model field"),
])
def test_bad_fields_stop_naming_them(field, value, message):
  cfg = tiny_runs.load_config("mode=sft")
  *parents, leaf = field.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.validate(cfg)


# ---------------------------------------------------------------------------- the modes


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A workdir with the test config's MoE model after two SFT steps, then rejection-sampled."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  cfg = tiny_runs.load_config("mode=sft")
  cfg.sft.steps = 2
  sft_mode.run(cfg, workdir)
  cfg.mode = "rejection_sample"
  cfg.rejection.update(num_prompts=4, k=2, max_new_tokens=24, batch_size=8, keep="all")
  summary = rejection_mode.run(cfg, workdir)
  return workdir, cfg, summary


def test_rejection_sample_writes_verified_traces_and_yield(teacher_dir):
  workdir, cfg, summary = teacher_dir
  on_disk = json.load(open(os.path.join(workdir, "rejection", "summary.json")))
  assert on_disk["generated"] == summary["generated"] == 8
  assert 0 <= summary["kept"] <= summary["accepted"] <= 8
  assert summary["accept_rate"] == summary["accepted"] / 8
  assert summary["prompts"] == 4 and summary["prompts_with_accepted"] <= 4
  assert json.load(open(os.path.join(workdir, "config.json")))["mode"] == "rejection_sample"
  task, _, _ = experiment.build(cfg)
  lines = [json.loads(x) for x in open(summary["traces_path"]) if x.strip()]
  assert len(lines) == summary["kept"]
  for r in lines:  # every kept trace passes the verifier
    assert task.is_correct(r["trace"], answer=r["answer"], **r["fields"])


def distill_config(teacher_workdir, traces_path, kl):
  cfg = tiny_runs.load_config("mode=distill")
  # The teacher's MoE model comes from teacher_workdir/config.json; the student is dense.
  cfg.model = presets.get("tiny_qwen2", max_position_embeddings=64)
  cfg.distill.update(teacher_workdir=teacher_workdir, kl=kl, kl_weight=0.5, kl_chunk=64)
  cfg.sft.update(steps=2, checkpoint_every=2, traces_path=traces_path)
  return cfg


@pytest.mark.parametrize("kl", ["forward", "none"])
def test_distill_mode_trains_a_dense_student(teacher_dir, tmp_path, kl):
  teacher_workdir, tcfg, _ = teacher_dir
  # The task's own traces stand in for the teacher's (two SFT steps verify almost nothing).
  traces = experiment.trace_task(tcfg).examples("train", 8, seed=0)
  path = sft.write_traces(str(tmp_path / "traces.jsonl"), [sft.trace_record(e) for e in traces])
  cfg = distill_config(teacher_workdir, path, kl)
  params, info = distill_mode.run(cfg, str(tmp_path))
  assert "moe_layers" not in params and info["steps"] == 2
  run_dir = tmp_path / "distill"
  summary = json.load(open(run_dir / "summary.json"))
  assert summary["kl"] == kl and summary["num_traces"] == 8 and summary["steps"] == 2
  assert json.load(open(tmp_path / "config.json"))["mode"] == "distill"
  with ckpt_lib.CheckpointManager(str(run_dir)) as m:
    assert m.latest_step() == 2
  rows = metrics_lib.read_metrics(str(run_dir))
  if kl == "none":
    assert all("kl" not in r for r in rows)
    assert "teacher_params_total" not in summary
  else:
    assert all(r["kl"] > 0 and np.isfinite(r["kl"]) for r in rows)
    # loss = NLL + kl_weight * KL per response token
    np.testing.assert_allclose(rows[0]["loss"], rows[0]["nll"] + 0.5 * rows[0]["kl"], rtol=1e-5)
    assert summary["teacher_params_total"] > 0


class _AcceptAll:
  """The test task with a verifier that accepts every completion (so selection has work)."""

  def __init__(self, task):
    self._task = task

  def __getattr__(self, name):
    return getattr(self._task, name)

  def is_correct(self, completion, **unused):
    del completion, unused
    return True


def test_rejection_sample_selects_per_prompt(teacher_dir):
  workdir, cfg, _ = teacher_dir
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = experiment.latest_params(cfg, workdir, model_cfg)
  examples = task.examples("train", 4, seed=cfg.seed)
  rcfg = copy.deepcopy(cfg.rejection)
  rcfg.update(keep="shortest", dedup=False)
  records, stats = distill.rejection_sample(params, model_cfg, _AcceptAll(task), tokenizer, rcfg,
                                            examples, seed=cfg.seed, progress=False)
  assert stats["accepted"] == stats["generated"] == 8 and stats["prompts_with_accepted"] == 4
  assert stats["kept"] == len(records) == 4  # one per prompt
  assert [r["question"] for r in records] == [e.question for e in examples]
  assert all(r["uid"].rsplit("#", 1)[1] in ("0", "1") for r in records)
  rcfg.keep = "all"
  records, stats = distill.rejection_sample(params, model_cfg, _AcceptAll(task), tokenizer, rcfg,
                                            examples, seed=cfg.seed, progress=False)
  assert len(records) == 8 and stats["mean_kept_length"] > 0
