"""Tests of pre-training on plain task text and of the R1-Zero mode (r1jax/run/pretrain.py,
r1jax/run/r1_zero.py), and of the per-depth MTP NLL and balance loss the SFT step logs.

pretrain_text is checked against hand-written strings, and so are arithmetic's column
working and tagged dialogues (their share is the option's; they never wrap the task's sums);
the plain-text rows carry loss on every token and no template text; the pretrain mode writes
its checkpoint, summary and curve, and latest_params falls back to it; r1_zero stopped inside
GRPO resumes from its stages.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.data import datasets as data_lib
from r1jax.data.tokenizer import for_task
from r1jax.model import decoder as model_lib
from r1jax.run import experiment, pretrain, r1_zero
from r1jax.run import stages as stages_lib
from r1jax.tasks import base
from r1jax.train import evaluate as eval_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim, rl, sft

import tiny_runs


def pretrain_config(template: str = "compact"):
  """configs/test_tiny.py with a 4-step pretrain stage (and, for r1_zero, the R1-Zero
  template and accuracy + format rewards)."""
  cfg = tiny_runs.load_config()
  cfg.pretrain.num_examples, cfg.pretrain.steps, cfg.pretrain.batch_size = 64, 4, 4
  cfg.pretrain.seq_len, cfg.pretrain.checkpoint_every = 64, 2
  cfg.pretrain.optimizer.warmup_steps = 0
  cfg.task.kwargs.template = template
  cfg.grpo.rewards.accuracy, cfg.grpo.rewards.format = 1.0, 0.5
  return cfg


# ------------------------------------------------------------------------- pretrain_text

def test_pretrain_text_of_each_task():
  arith = base.get_task("arithmetic", ops=("+", "-", "*"))
  assert arith.pretrain_text(arith.make_example("+", 123, 45)) == "123+45=168"
  assert arith.pretrain_text(arith.make_example("-", 17, 52)) == "17-52=-35"
  assert arith.pretrain_text(arith.make_example("*", 47, 85)) == "47*85=3995"
  countdown = base.get_task("countdown")
  ex = countdown.make_example([3, 44, 52, 1], 25)
  text = countdown.pretrain_text(ex)
  assert text == f"{ex.answer}=25"
  assert countdown.check_equation(text.split("=")[0], [3, 44, 52, 1], 25)
  code = base.get_task("code", families=("affine",))
  ex = code.examples("train", 1)[0]
  a, b = (int(x) for x in
          ex.question.removeprefix("Write a Python function f(x) that returns ")
          .removesuffix(".").split("*x + "))
  assert code.pretrain_text(ex) == f"def f(x):\n  return {a} * x + {b}"


def test_pretrain_working_and_tagged_documents_by_hand():
  from r1jax.tasks import arithmetic
  assert arithmetic.add_working(47, 85) == "47+85: 7+5=12, 4+8+1=13, so 132"
  assert arithmetic.add_working(999, 1) == "999+1: 9+1=10, 9+0+1=10, 9+0+1=10, so 1000"
  assert arithmetic.compare_question(47, 85) == "larger of 47 and 85"
  assert arithmetic.compare_response(47, 85) == "<think>47 vs 85</think><answer>85</answer>"
  task = base.get_task("arithmetic", template="compact", pretrain_working=True)
  assert task.pretrain_text(task.make_example("+", 147, 85)) == \
      "147+85: 7+5=12, 4+8+1=13, 1+0+1=2, so 232"
  tagged = base.get_task("arithmetic", template="compact", pretrain_tag_rate=1.0)
  assert tagged.pretrain_text(tagged.make_example("+", 3, 60)) == \
      "User: larger of 3 and 60\nAssistant:<think>3 vs 60</think><answer>60</answer>"
  tok = for_task(task, "char+words")   # the compact template's alphabet covers the new text
  assert tok.decode(tok.encode(arithmetic.add_working(47, 85))) == "47+85: 7+5=12, 4+8+1=13, so 132"
  tok = for_task(tagged, "char+words")
  text = tagged.pretrain_text(tagged.make_example("+", 3, 60))
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_pretrain_tag_rate_is_the_tagged_share_and_never_wraps_the_sums(rate):
  from r1jax.tasks import arithmetic
  task = base.get_task("arithmetic", pretrain_working=True, pretrain_tag_rate=rate)
  examples = task.examples("train", 3000)
  texts = [task.pretrain_text(e) for e in examples]
  is_tagged = ["<think>" in t for t in texts]
  assert abs(np.mean(is_tagged) - rate) < 0.025       # 3000 draws: ~3 standard errors at 0.3
  for ex, text, tagged in zip(examples, texts, is_tagged):
    a, b = (int(x) for x in ex.question.split("+"))
    if tagged:   # the template around the other question, never the task's sum
      assert text == (f"User: {arithmetic.compare_question(a, b)}\nAssistant:"
                      f"{arithmetic.compare_response(a, b)}")
      assert "+" not in text
    else:
      assert text == arithmetic.add_working(a, b) and not any(t in text for t in base._TAGS)
  # The choice is a stable hash of the question: the same documents at every call.
  assert texts == [task.pretrain_text(e) for e in examples]


def test_pretrain_options_check_their_values():
  with pytest.raises(ValueError, match="pretrain_tag_rate must be in"):
    base.get_task("arithmetic", pretrain_tag_rate=1.5)
  with pytest.raises(ValueError, match="pretrain_working writes column working for sums only"):
    base.get_task("arithmetic", ops=("+", "-"), pretrain_working=True)


def test_pretrain_text_is_not_implemented_for_file_tasks(tmp_path):
  path = os.path.join(os.path.dirname(__file__), "fixtures", "data", "gsm8k_tiny.jsonl")
  task = base.get_task("gsm8k", train_path=path, test_path=path)
  with pytest.raises(NotImplementedError, match="task 'gsm8k' has no plain-text form"):
    task.pretrain_text(task.examples("train", 1)[0])


def test_plain_text_rows_train_every_token_and_hold_no_template():
  task = base.get_task("arithmetic", template="r1_zero")
  tok = for_task(task, "char+words")
  examples = task.examples("train", 30)
  ds = data_lib.pretrain_dataset(task, examples, tok, seq_len=64, global_batch_size=1, seed=0,
                                 num_epochs=1, process_index=0, process_count=1)
  texts = []
  for batch in ds:
    row = {k: v[0] for k, v in batch.items()}
    seg = row["segment_ids"]
    np.testing.assert_array_equal(row["loss_mask"], (seg > 0).astype(np.int32))
    for s in range(1, seg.max() + 1):
      tokens = row["tokens"][seg == s].tolist()
      assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
      text = tok.decode(tokens)
      assert not any(w in text for w in tok.words)   # no tag, no template part
      texts.append(text)
  assert len(texts) == 30 > len(ds)                    # packed, each example once
  assert sorted(texts) == sorted(f"{e.question}={e.answer}" for e in examples)


# ------------------------------------------------------------------------- pretrain mode

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  summary = pretrain.run(pretrain_config("r1_zero"), workdir)
  return workdir, summary


def test_pretrain_mode_writes_checkpoint_summary_and_curve(pretrained):
  workdir, summary = pretrained
  run_dir = os.path.join(workdir, "pretrain")
  assert os.path.isdir(os.path.join(run_dir, "checkpoints", "4"))
  assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 0
  on_disk = json.load(open(os.path.join(run_dir, "summary.json")))
  rows = metrics_lib.read_metrics(run_dir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert on_disk["steps"] == summary["steps"] == 4
  assert on_disk["final_nll"] == pytest.approx(rows[-1]["nll"])
  assert on_disk["tokens_trained"] == sum(r["tokens"] for r in rows)
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_latest_params_picks_pretrain_when_only_it_exists(pretrained, tmp_path, capsys):
  workdir, _ = pretrained
  cfg = pretrain_config("r1_zero")
  _, _, model_cfg = experiment.build(cfg)
  params = experiment.latest_params(cfg, workdir, model_cfg)
  assert "loaded pretrain checkpoint at step 4" in capsys.readouterr().out
  init = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(init)))
  with pytest.raises(ValueError, match="no grpo, sft or pretrain checkpoint found"):
    experiment.latest_params(cfg, str(tmp_path), model_cfg)


@pytest.mark.parametrize("field, value, message", [
    ("num_examples", 0, "pretrain config field 'num_examples' must be >= 1"),
    ("seq_len", 1, "pretrain config field 'seq_len' must be >= 2"),
    ("seq_len", 65, r"config field 'pretrain.seq_len' \(65\) exceeds"),
    ("optimizer.lr", -1.0, "pretrain.optimizer config field 'lr'"),
])
def test_validate_names_the_pretrain_field(field, value, message):
  cfg = pretrain_config()
  cfg.mode = "pretrain"
  experiment.validate(cfg)
  *parents, name = field.split(".")
  node = cfg.pretrain
  for p in parents:
    node = node[p]
  node[name] = value
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.validate(cfg)  # the config alone
    experiment.build(cfg)     # with the model's positions (validate_run)


# ------------------------------------------------------------------------- r1_zero mode

def test_r1_zero_stopped_in_grpo_resumes_to_a_full_summary(pretrained, tmp_path, monkeypatch):
  cfg = pretrain_config("r1_zero")
  cfg.grpo.steps = 3
  del pretrained  # compiled the pre-training step already (the persistent cache keeps it)
  workdir = str(tmp_path)
  train, evaluate = rl.train, eval_lib.evaluate
  evaluated = []

  def counting_evaluate(*args, **kwargs):
    evaluated.append(1)
    return evaluate(*args, **kwargs)

  def stopped_after_one_step(*args, **kwargs):
    train(*args, stop_after=1, **kwargs)
    raise KeyboardInterrupt("stopped")

  monkeypatch.setattr(eval_lib, "evaluate", counting_evaluate)
  monkeypatch.setattr(rl, "train", stopped_after_one_step)
  with pytest.raises(KeyboardInterrupt):
    r1_zero.run(cfg, workdir)
  assert len(evaluated) == 1                         # the pre-trained model's evaluation
  stages = stages_lib.load_results(workdir)
  assert {"pretrain", "eval_pretrain"} <= set(stages) and "grpo" not in stages
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  monkeypatch.setattr(rl, "train", train)
  summary = r1_zero.run(cfg, workdir)
  assert len(evaluated) == 2                         # only the post-GRPO evaluation is new
  assert [r["step"] for r in metrics_lib.read_metrics(os.path.join(workdir, "pretrain"))] == \
      [1, 2, 3, 4]                                   # pre-training was not redone
  assert not os.path.exists(os.path.join(workdir, "pretrain.stale"))
  assert [r["step"] for r in metrics_lib.read_metrics(os.path.join(workdir, "grpo"))] == [1, 2, 3]
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in ("accuracy_before_grpo", "accuracy_after_grpo", "format_rate_before_grpo",
              "format_rate_after_grpo", "grpo_curves", "pretrain_time_s", "grpo_time_s",
              "wall_time_s", "grpo_steps", "reward_weights"):
    assert key in on_disk, key
  assert on_disk["grpo_steps"] == 3
  assert on_disk["accuracy_before_grpo"] == stages["eval_pretrain"]["pass@1"]
  assert on_disk["reward_weights"]["format"] == 0.5
  for key in ("format_rate", "reward_format", "reward_accuracy", "accuracy"):
    assert [s for s, _ in on_disk["grpo_curves"][key]] == [1, 2, 3], key
  assert summary["format_rate_after_grpo"] == on_disk["format_rate_after_grpo"]
  assert os.path.getsize(os.path.join(workdir, "r1_zero.png")) > 0


# ------------------------------------------------------------------------- SFT metrics

def test_sft_step_logs_mtp_nll_per_depth_and_balance_loss():
  cfg = tiny_runs.load_config()
  cfg.model.mtp_depth = 1
  cfg.model.seq_aux_alpha = 1e-3   # the balance loss is computed when it has a weight
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(1))
  examples = task.examples("train", 8)
  ds = data_lib.pretrain_dataset(task, examples, tokenizer, seq_len=16, global_batch_size=4,
                                 pack=False, process_index=0, process_count=1)
  batch = {k: np.asarray(v) for k, v in ds[0].items()}
  optimizer = optim.make_optimizer(cfg.sft.optimizer, 1)
  step = sft.make_train_step(model_cfg, optimizer)
  p = jax.tree.map(jnp.array, params)
  _, m = step({"params": p, "opt_state": optimizer.init(p), "step": jnp.int32(0)},
              {k: jnp.asarray(v) for k, v in batch.items()})
  m = metrics_lib.to_host(m)
  for k in range(1, model_cfg.mtp_depth + 1):
    assert np.isfinite(m[f"mtp_nll_{k}"])
  assert np.isfinite(m["balance_loss"]) and m["balance_loss"] > 0
  # Independently: MTP module 1 at position t predicts token t + 2 of the same sequence.
  forward = jax.jit(lambda p, t, s, q: model_lib.forward(p, t, model_cfg, segment_ids=s,
                                                        positions=q)[1])
  aux = forward(params, batch["tokens"], batch["segment_ids"], batch["positions"])
  logp = jax.nn.log_softmax(np.asarray(aux["mtp_logits"][0], np.float64), axis=-1)
  nlls = [-logp[b, t, batch["tokens"][b, t + 2]]
          for b in range(len(batch["tokens"])) for t in range(batch["tokens"].shape[1] - 2)
          if batch["segment_ids"][b, t + 2] > 0]
  assert m["mtp_nll_1"] == pytest.approx(float(np.mean(nlls)), rel=1e-4)
  assert m["mtp_nll_1"] != pytest.approx(m["nll"], rel=1e-3)
  assert m["balance_loss"] == pytest.approx(float(aux["balance_loss"]), rel=1e-5)
