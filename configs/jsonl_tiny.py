"""A JSONL data set (GSM8K, MATH or MBPP format) on the miniature R1.

  python -m r1jax.main --config=configs/jsonl_tiny.py:runlocal=True --workdir=/tmp/jsonl_quick
  python -m r1jax.main --config=configs/jsonl_tiny.py:format=mbpp,train=DIR/train.jsonl,test=DIR/test.jsonl --workdir=/tmp/mbpp

Reads the records with r1jax.tasks.jsonl (gsm8k: question / answer with '#### final';
math: problem / solution with a \\boxed{} answer; mbpp: text / code / test_list, rewarded by
the tests in the sandbox). The char+words tokenizer makes each part of the R1-Zero template
one token and every character of the files one more. Without train / test paths the run uses
the few records of tests/fixtures/data/{format}_tiny.jsonl, which show the plumbing only.
The lengths fit those files; the full data sets need longer ones (--config.grpo.max_prompt_len,
--config.sft.seq_len, --config.model.max_position_embeddings), and the start-up check names
the field and the example that does not fit.

Arguments: format (gsm8k|math|mbpp), train and test (JSONL paths; default the fixture),
seed (int), runlocal (bool: a much shorter smoke run), mode (pipeline|sft|grpo|eval).
"""
import os

from r1jax.model import presets
from r1jax.run import experiment

FORMATS = ("gsm8k", "math", "mbpp")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tests", "fixtures", "data")


def _records(path: str) -> int:
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def get_config(arg=None):
  a = experiment.parse_arg(arg, format="gsm8k", train="", test="", seed=0, runlocal=False,
                           mode="pipeline")
  if a.format not in FORMATS:
    raise ValueError(f"config argument 'format' must be one of {FORMATS}, got {a.format!r}")
  fixture = os.path.join(FIXTURES, f"{a.format}_tiny.jsonl")
  train, test = a.train or fixture, a.test or fixture
  c = experiment.base_config()
  c.mode = a.mode
  c.seed = a.seed
  c.rollout_mesh.data = -1  # one decode loop per host device (r1jax.main: one per core)

  experiment.set_task(c, a.format, tokenizer="char+words", train_path=train, test_path=test)
  n_train, n_test = _records(train), _records(test)

  c.model = presets.get(
      "tiny", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
      intermediate_size=384, moe_intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
      max_position_embeddings=512, moe_impl="grouped", attention_impl="naive", scan_layers=False)

  c.sft.num_traces = min(2000, n_train)
  c.sft.steps = 300
  c.sft.batch_size = 8
  c.sft.seq_len = 256
  c.sft.checkpoint_every = 100
  c.sft.optimizer.lr = 2e-3

  c.grpo.steps = 40
  c.grpo.prompts_per_step = min(16, n_train)
  c.grpo.G = 4
  c.grpo.max_prompt_len = 160
  c.grpo.max_new_tokens = 128
  c.grpo.optimizer.lr = 3e-4
  c.grpo.checkpoint_every = 20

  c.eval.num_problems = min(256, n_test)
  c.eval.max_new_tokens = 128

  if a.runlocal:
    c.sft.steps, c.grpo.steps = 10, 2
    c.sft.num_traces = min(64, n_train)
    c.grpo.prompts_per_step = min(4, n_train)
  return c
