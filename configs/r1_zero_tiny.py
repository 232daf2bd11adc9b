"""R1-Zero at laptop scale: pre-train on plain sums, then GRPO with accuracy + format rewards.

  python -m r1jax.main --config=configs/r1_zero_tiny.py --workdir=/tmp/r1_zero_tiny
  python -m r1jax.main --config=configs/r1_zero_tiny.py:runlocal=True --workdir=/tmp/r1_zero_quick

The base model (a small DeepSeek-V3-shaped MoE) is pre-trained from random init on bare
equations such as `47+85=132`: no template, no <think>/<answer> tags, no worked traces.
GRPO then starts from it, with no SFT, on prompts in the R1-Zero template (DeepSeek-R1,
Table 1), which states the tag format in words; the rewards are the task's accuracy and
the rule-based format reward (R1 section 2.2.2). The char+words tokenizer makes every tag
one token. Held-out: 3-digit sums never seen in training.

Measured (experiments/r1_zero_tiny/README.md): at this scale the format does NOT emerge.
Format rate and both rewards stay 0.0 at all 30 GRPO steps (140 s wall on a 2-core CPU):
the base model never saw the tags, cannot read the template's instruction, and gives a
first `<think>` token probability ~6e-5, so no group ever holds a well-formed sample and
with binary rewards every advantage is 0. Raising the temperature to 2 or the base model
to 1.3M parameters and 2,000 pre-training steps does not change that.

Arguments: seed (int), runlocal (bool: a much shorter smoke run), mode (r1_zero|pretrain|grpo|eval).
"""
from r1jax.model import presets
from r1jax.run import experiment


def get_config(arg=None):
  a = experiment.parse_arg(arg, seed=0, runlocal=False, mode="r1_zero")
  c = experiment.base_config()
  c.mode = a.mode
  c.seed = a.seed
  c.control = False                 # the SFT control arm belongs to the cold-start pipeline
  c.rollout_mesh.data = -1          # one decode loop per CPU core (r1jax.main)
  # The R1-Zero template states the tag format in words; char+words keeps tags one token.
  experiment.set_task(c, "arithmetic", tokenizer="char+words", ops=("+",), train_digits=(2, 3),
                      test_digits=(3, 3), test_size=1000, template="r1_zero")

  c.model = presets.get(
      "tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
      intermediate_size=192, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
      max_position_embeddings=64, moe_impl="grouped", attention_impl="naive", scan_layers=False)

  c.pretrain.num_examples = 20000
  c.pretrain.steps = 300
  c.pretrain.batch_size = 16
  c.pretrain.seq_len = 64
  c.pretrain.checkpoint_every = 150
  c.pretrain.optimizer.lr = 3e-3
  c.pretrain.optimizer.warmup_steps = 20

  c.sft.seq_len = 64   # unused by r1_zero (no cold start); kept valid for the other modes

  c.grpo.steps = 30
  c.grpo.prompts_per_step = 32
  c.grpo.G = 8
  c.grpo.temperature = 1.0
  c.grpo.max_prompt_len = 16
  c.grpo.max_new_tokens = 16
  c.grpo.optimizer.lr = 1e-3
  c.grpo.optimizer.warmup_steps = 0
  c.grpo.checkpoint_every = 10
  c.grpo.rewards.accuracy = 1.0     # the task's verifier: the exact sum inside <answer>
  c.grpo.rewards.format = 1.0       # <think>...</think><answer>...</answer>, R1 sec. 2.2.2
  c.grpo.reward_mode = "sum"

  c.eval.num_problems = 128
  c.eval.max_new_tokens = 16
  c.eval.batch_size = 128

  if a.runlocal:
    c.pretrain.steps, c.pretrain.num_examples, c.pretrain.checkpoint_every = 30, 2000, 30
    c.sft.steps = 30
    c.grpo.steps, c.grpo.prompts_per_step, c.eval.num_problems = 4, 8, 32
  return c
