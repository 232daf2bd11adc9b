"""The run configs (configs/*.py), the config skeleton, start-up validation, print_config and
init_from_hf (r1jax/run/experiment.py, r1jax/run/print_config.py).

Every config loads, validates and builds (task, tokenizer, model config and the data checks)
with and without runlocal=True and has exactly the skeleton's fields; overrides go through
the real flag parser; each validation rule stops with a message naming its field; an HF
checkpoint directory starts a run with the parameters (and so the logits) of a direct load.
Nothing here trains; only the init_from_hf logits test compiles a forward.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from r1jax import main as main_lib
from r1jax.model import decoder, hf
from r1jax.rollout import sampler as sampler_lib
from r1jax.run import experiment, print_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_V3 = os.path.join(REPO, "tests", "fixtures", "hf_tiny_v3")
# configs/model.py is the `inspect` mode's model config, not a run config.
RUN_CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs",
                                                                             "*.py"))
                     if not p.endswith("model.py"))
NO_RUNLOCAL = ("test_tiny",)  # already the smallest run: it takes no runlocal argument
# Fields whose keys depend on the task: the options of the config's task.
TASK_DEPENDENT = ("task.kwargs", "task.trace_overrides")


def load(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (module.get_config(arg) if arg else module.get_config())


def parse(*overrides, config="configs/test_tiny.py"):
  """The config after absl's own parsing of `--config=... --config.X=...`."""
  argv = ["prog", f"--config={os.path.join(REPO, config)}", *[f"--config.{o}" for o in overrides]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def leaf_paths(cfg, prefix="", skip=()) -> dict[str, bool]:
  """dotted path -> whether it is a sub-config, for every field (not below `skip`)."""
  out = {}
  for k in cfg.keys():
    path = prefix + k
    sub = isinstance(cfg[k], ml_collections.ConfigDict)
    out[path] = sub
    if sub and path not in skip:
      out.update(leaf_paths(cfg[k], path + ".", skip))
  return out


def tiny(**changes):
  """configs/test_tiny.py with dotted-path changes, e.g. tiny(**{'grpo.top_p': 1.5})."""
  _, cfg = load("test_tiny")
  for path, value in changes.items():
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def check_fails(cfg, *fragments):
  """validate + build raise a ConfigError whose message holds every fragment."""
  with pytest.raises(experiment.ConfigError) as e:
    experiment.validate(cfg)
    experiment.build(cfg)
  for f in fragments:
    assert f in str(e.value), str(e.value)
  return str(e.value)


# ---------------------------------------------------------------------------- the configs


def test_there_is_a_config_per_built_in_task():
  tasks = {load(n)[1].task.name for n in RUN_CONFIGS}
  assert {"arithmetic", "countdown", "code", "gsm8k"} <= tasks
  formats = {load("jsonl_tiny", f"format={f}")[1].task.name for f in ("gsm8k", "math", "mbpp")}
  assert formats == {"gsm8k", "math", "mbpp"}


@pytest.mark.parametrize("name,runlocal", [(n, r) for n in RUN_CONFIGS for r in (False, True)
                                            if not (r and n in NO_RUNLOCAL)])
def test_every_config_loads_validates_and_builds(name, runlocal):
  module, cfg = load(name, "runlocal=True" if runlocal else None)
  assert f"python -m r1jax.main --config=configs/{name}.py" in module.__doc__
  experiment.validate(cfg)
  task, tokenizer, model_cfg = experiment.build(cfg)
  assert task.name == cfg.task.name
  assert model_cfg.vocab_size == tokenizer.vocab_size
  if runlocal:
    full = load(name)[1]
    assert cfg.sft.steps < full.sft.steps and cfg.grpo.steps < full.grpo.steps


@pytest.mark.parametrize("fmt", ["math", "mbpp"])
def test_jsonl_config_takes_format_and_paths(fmt, tmp_path):
  fixture = os.path.join(REPO, "tests", "fixtures", "data", f"{fmt}_tiny.jsonl")
  train = tmp_path / "train.jsonl"
  train.write_text(open(fixture).read())
  _, cfg = load("jsonl_tiny", f"format={fmt},train={train},test={fixture}")
  assert cfg.task.name == fmt
  assert cfg.task.kwargs.train_path == str(train) and cfg.task.kwargs.test_path == fixture
  task, _, _ = experiment.build(cfg)
  # Counts follow the files: every record is a trace, every test record a held-out problem.
  assert cfg.sft.num_traces == len(task.examples("train")) == {"math": 3, "mbpp": 2}[fmt]
  assert cfg.eval.num_problems == len(task.examples("test"))
  with pytest.raises(ValueError, match="'format' must be one of"):
    load("jsonl_tiny", "format=csv")


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_config_has_the_skeleton_fields(name):
  """The same fields as experiment.base_config() (below task.kwargs: the task's options)."""
  skeleton = leaf_paths(experiment.base_config(), skip=TASK_DEPENDENT)
  _, cfg = load(name)
  assert leaf_paths(cfg, skip=TASK_DEPENDENT) == skeleton
  # task.kwargs holds every option of the task that has a default.
  options = {k for k, v in experiment.task_options(cfg.task.name).items() if v is not None}
  assert options <= set(cfg.task.kwargs.keys())


# ---------------------------------------------------------------------------- overrides


def test_mesh_axis_override_through_the_flag_parser():
  cfg = parse("mesh.data=2")
  mesh = experiment.mesh_of(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 1}
  assert experiment.mesh_of(parse()) is None  # every axis 1: one device, no mesh
  assert experiment.rollout_mesh_of(parse("mesh.fsdp=2")).shape["fsdp"] == 2
  r1 = parse(config="configs/r1_tiny.py")
  assert experiment.mesh_of(r1) is None  # r1_tiny trains on one device ...
  assert experiment.rollout_mesh_of(r1).shape["data"] == len(jax.devices())  # ... rolls out on all
  check_fails(parse("mesh.data=3", "mesh.fsdp=3"), "config field 'mesh'", "needs 9 devices")


def test_top_p_override_through_the_flag_parser_stops_validation():
  check_fails(parse("grpo.top_p=1.5"), "grpo config field 'top_p' must lie in (0, 1]")


def test_task_name_override_uses_the_new_tasks_defaults(capsys):
  cfg = parse("task.name=countdown", "grpo.max_prompt_len=32", "sft.seq_len=128",
              "model.max_position_embeddings=128")
  task, tokenizer, _ = experiment.build(cfg)
  assert task.name == "countdown" and "note: task.kwargs" in capsys.readouterr().out
  assert dict(cfg.task.kwargs) == dict(experiment.task_kwargs_defaults("countdown"))
  assert not cfg.task.trace_overrides  # arithmetic's train_digits is gone too
  assert len(tokenizer.encode("<think>")) == 1  # char+words kept


def test_an_unknown_task_name():
  check_fails(tiny(**{"task.name": "sudoku"}), "config field 'task.name' is 'sudoku'; registered:")


def test_an_option_no_task_has_is_still_an_error():
  cfg = tiny()
  cfg.task.kwargs.digits = 3
  check_fails(cfg, "config field 'task.kwargs'", "no option(s) ['digits']")


# ---------------------------------------------------------------------------- validation


def test_prompt_longer_than_grpo_max_prompt_len():
  # Countdown prompts reach ~29 tokens; test_tiny allows 16.
  cfg = tiny()
  experiment.set_task(cfg, "countdown", tokenizer="char+words", train_size=64, test_size=16)
  check_fails(cfg, "'grpo.max_prompt_len' (16) is shorter than the train prompt",
              "'countdown/train/")


def test_heldout_prompt_plus_eval_max_new_tokens_past_the_positions():
  check_fails(tiny(**{"eval.max_new_tokens": 60}), "'eval.max_new_tokens' (60) + the held-out "
              "prompt", "exceed model.max_position_embeddings (64)")


def test_cold_start_trace_longer_than_sft_seq_len():
  check_fails(tiny(**{"sft.seq_len": 20}), "'sft.seq_len' (20) is shorter than the cold-start "
              "trace")


def test_sft_seq_len_past_the_positions():
  check_fails(tiny(**{"sft.seq_len": 100}), "'sft.seq_len' (100) exceeds "
              "model.max_position_embeddings (64)")


def test_grpo_width_past_the_positions():
  check_fails(tiny(**{"grpo.max_new_tokens": 60}), "'grpo.max_prompt_len' + "
              "'grpo.max_new_tokens' (76) exceed model.max_position_embeddings (64)")


def test_more_traces_or_problems_than_the_splits_hold():
  cfg = tiny(**{"sft.num_traces": 400})
  cfg.task.kwargs.train_size = 300
  check_fails(cfg, "'sft.num_traces' (400) exceeds the 300 train examples")
  check_fails(tiny(**{"eval.num_problems": 500}), "config field 'eval.num_problems'",
              "asked for 500")


@pytest.mark.parametrize("field,value,message", [
    ("grpo.top_p", 0.0, "grpo config field 'top_p' must lie in (0, 1]"),
    ("grpo.top_k", -1, "grpo config field 'top_k' must be >= 0 and an int"),
    ("grpo.temperature", 0.0, "grpo config field 'temperature' must be > 0"),
    ("eval.temperature", -0.5, "eval config field 'temperature' must be >= 0"),
])
def test_sampling_parameters(field, value, message):
  check_fails(tiny(**{field: value}), message)


@pytest.mark.parametrize("field", ["k", "num_problems", "max_new_tokens", "batch_size"])
def test_eval_counts(field):
  check_fails(tiny(**{f"eval.{field}": 0}), f"eval config field {field!r} must be >= 1")


def test_eval_split():
  check_fails(tiny(**{"eval.split": "validation"}), "eval config field 'split' must be one of")


def test_pallas_dispatch_on_a_cpu_host_names_the_impls_that_can_run():
  msg = check_fails(tiny(**{"model.moe_impl": "pallas"}), "config field 'model.moe_impl' is "
                    "'pallas', which cannot run on 1 cpu device(s)")
  assert "these can: capacity, dense, grouped, ragged, auto" in msg


def test_runnable_impls_follow_the_devices():
  class Fake:
    def __init__(self, platform):
      self.platform = platform
  assert "pallas" in experiment.runnable_impls([Fake("tpu")])
  assert "pallas" in experiment.runnable_impls([Fake("gpu")])
  assert "pallas" not in experiment.runnable_impls([Fake("tpu"), Fake("tpu")])
  assert "pallas" not in experiment.runnable_impls(jax.devices()[:1])


def test_tokenizer_vocab_past_the_checkpoints_vocab():
  # The byte tokenizer's 259 ids against the checkpoint's vocab_size of 256.
  cfg = tiny(**{"init_from_hf": HF_V3, "task.tokenizer": "byte", "model.mtp_depth": 0})
  check_fails(cfg, "config field 'task.tokenizer' ('byte') gives a vocabulary of 259 tokens",
              f"init_from_hf={HF_V3!r} has vocab_size 256")


def test_init_from_hf_needs_a_config_json(tmp_path):
  check_fails(tiny(init_from_hf=str(tmp_path)), "config field 'init_from_hf': no config.json in")


# ---------------------------------------------------------------------------- init_from_hf


def test_a_checkpoint_vocab_past_the_tokenizers_samples_only_the_tokenizers_ids():
  # The checkpoint has 256 ids, the task's tokenizer 43: eval validates, and rollouts draw
  # only ids the tokenizer decodes (without num_ids, 32 uniform-ish draws over 256 ids would
  # land past 43 almost surely, which the second half checks).
  cfg = tiny(init_from_hf=HF_V3, mode="eval", **{"model.mtp_depth": 0})
  experiment.validate(cfg)
  _, tokenizer, model_cfg = experiment.build(cfg)
  params = experiment.params_to_evaluate(cfg, "/nonexistent", model_cfg)
  engine = sampler_lib.Sampler(model_cfg)
  dparams = engine.prepare(params)
  kwargs = dict(max_new_tokens=8, temperature=3.0, pad_id=tokenizer.pad_id)
  out = engine.generate(dparams, [[1, 5, 7]] * 4, jax.random.key(0),
                        num_ids=tokenizer.vocab_size, **kwargs)
  new = np.asarray(out.tokens)[:, 3:][np.asarray(out.completion_mask)[:, 3:]]
  assert new.size == 32 and new.max() < tokenizer.vocab_size
  sampler_lib.completions_text(out, tokenizer)  # every id decodes
  out = engine.generate(dparams, [[1, 5, 7]] * 4, jax.random.key(0), **kwargs)
  assert np.asarray(out.tokens)[:, 3:].max() >= tokenizer.vocab_size


@pytest.fixture(scope="module")
def hf_run():
  cfg = tiny(init_from_hf=HF_V3, mode="sft", **{"model.mtp_depth": 0})
  experiment.validate(cfg)
  return cfg, experiment.build(cfg)


def test_init_from_hf_takes_the_model_from_config_json(hf_run):
  cfg, (_, tokenizer, model_cfg) = hf_run
  want, _ = hf.load_checkpoint(HF_V3, moe_impl="dense", mtp_depth=0)
  assert model_cfg.to_dict() == want.to_dict()
  assert model_cfg.vocab_size == 256 > tokenizer.vocab_size  # fixed by the checkpoint
  assert model_cfg.max_position_embeddings == 256 != cfg.model.max_position_embeddings
  assert model_cfg.moe_impl == cfg.model.moe_impl == "dense"  # a run field: from the config


def test_init_from_hf_params_give_the_direct_loads_logits(hf_run):
  cfg, (_, _, model_cfg) = hf_run
  params = experiment.initial_params(cfg, model_cfg)
  direct_cfg, direct = hf.load_checkpoint(HF_V3, moe_impl="dense", mtp_depth=0)
  golden = np.load(os.path.join(HF_V3, "golden.npz"))
  tokens = jnp.asarray(golden["tokens_BxL"])
  fn = jax.jit(lambda p, t: decoder.forward(p, t, model_cfg)[0])
  logits = np.asarray(fn(params, tokens))
  np.testing.assert_array_equal(logits, np.asarray(fn(direct, tokens)))
  assert np.abs(logits - golden["logits_BxLxV"]).max() <= 1e-4  # and so HF's own logits
  # On a mesh the same values, laid out by the sharding rules.
  mesh = experiment.mesh_of(parse("mesh.data=2"))
  placed = experiment.initial_params(cfg, model_cfg, mesh)
  leaf = placed["embed"] if "embed" in placed else jax.tree.leaves(placed)[0]
  assert leaf.sharding.mesh.shape["data"] == 2
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), b)
  del direct_cfg


def test_eval_without_a_checkpoint_evaluates_the_hf_checkpoint(hf_run, tmp_path):
  cfg, (_, _, model_cfg) = hf_run
  params = experiment.params_to_evaluate(cfg, str(tmp_path), model_cfg)
  _, direct = hf.load_checkpoint(HF_V3, moe_impl="dense", mtp_depth=0)
  np.testing.assert_array_equal(np.asarray(params["final_norm"]), direct["final_norm"])
  with pytest.raises(ValueError, match="no grpo, sft or pretrain checkpoint found"):
    experiment.params_to_evaluate(tiny(), str(tmp_path), model_cfg)


# ---------------------------------------------------------------------------- print_config


def test_print_config_through_main_prints_every_field_with_its_comment(capsys, monkeypatch):
  argv = ["r1jax.main", f"--config={os.path.join(REPO, 'configs/test_tiny.py')}",
          "--config.mode=print_config", "--config.grpo.G=6"]
  monkeypatch.setattr(sys, "argv", argv)  # the config flag finds its overrides in sys.argv
  with pytest.raises(SystemExit) as e:
    main_lib.run_main(argv)
  assert e.value.code in (None, 0)
  out = capsys.readouterr().out.splitlines()
  cfg = parse("mode=print_config", "grpo.G=6")
  rows = {line.split(" = ", 1)[0]: line for line in out}
  fields = [p for p, sub in leaf_paths(cfg).items() if not sub]
  assert sorted(rows) == sorted(fields)
  assert rows["grpo.G"].split("#")[0].rstrip() == "grpo.G = 6"
  assert rows["grpo.G"].endswith("# group size: completions per prompt")
  assert rows["mesh.data"].endswith("# pure data parallel; -1 = the devices the other axes leave")
  assert rows["model.kv_lora_rank"].endswith("# C (d_c in the V2 paper)")
  assert rows["sft.optimizer.lr"].endswith("# peak learning rate")
  # A comment continued on the lines below, and grpo's own comment on an optimizer field.
  assert rows["grpo.optimizer.router_bias_update_rate"].endswith(
      "# u during RL: V3 froze the biases at the end of pre-training; moving them shifts "
      "routing under the policy")
  assert rows["sft.optimizer.router_bias_update_rate"].endswith(
      "# u, aux-loss-free bias update speed (0 = frozen biases)")
  assert rows["task.kwargs.ops"] == "task.kwargs.ops = ('+',)"  # no comment: none printed
  # Tree order: a sub-config's own fields, then its sub-configs.
  names = [line.split(" = ", 1)[0] for line in out]
  assert names.index("grpo.top_p") < names.index("grpo.optimizer.b1")
  assert names[:5] == ["control", "init_from_hf", "mode", "rollout_mesh_devices", "seed"]


def test_print_config_comments_cover_the_skeletons_own_fields():
  comments = print_config.field_comments()
  for field in ("mode", "seed", "control", "init_from_hf", "task.name", "task.tokenizer",
                "rollout_mesh.tensor", "eval.k", "grpo.top_k", "sft.seq_len"):
    assert comments.get(field), field
