"""R1-Zero at laptop scale: pre-train on plain text, then GRPO with accuracy + format rewards.

  python -m r1jax.main --config=configs/r1_zero_tiny.py --workdir=workdir/r1_zero_tiny
  python -m r1jax.main --config=configs/r1_zero_tiny.py:runlocal=True --workdir=/tmp/r1_zero_quick

The base model (a small DeepSeek-V3-shaped MoE) is pre-trained from random init, next-token,
on plain text: 80% of the documents are sums with their column working and no tags
(`pretrain_working`: `47+85: 7+5=12, 4+8+1=13, so 132`), 20% (`pretrain_tag_rate`) are a
dialogue about OTHER content that uses the tags: the task's template around "larger of 47
and 85", then `<think>47 vs 85</think><answer>85</answer>`. The task's sums never appear
in the template or in tags. GRPO then starts from it, with no SFT, on the sums in the
R1-Zero template (DeepSeek-R1, Table 1); the rewards are the task's accuracy and the binary
rule-based format reward (R1 section 2.2.2). The char+words tokenizer makes every tag and
each of the template's two literal parts one token. Held-out: 3-digit sums never trained on.

Measured (experiments/r1_zero_tiny/README.md, 92 s wall on a shared 2-core CPU): the format
emerges, the accuracy does not. GRPO format rate per step 0.06, 0.15, 0.45, 0.54, 0.78,
0.86, ..., 0.96 at step 10, 1.0 from step 15; held-out greedy format rate 0.08 -> 1.00.
The base model opens with <think> (P 0.65) but does not close the blocks well; GRPO makes
it. The base model does the sums in its own plain working (greedy `a+b: ` right 47%), but
inside the tags it copies the comparison documents, so held-out accuracy stays 0.0 -> 0.0
(reward_accuracy 0 at every step but one, 0.008). With plain equations only
(`pretrain_working=False, pretrain_tag_rate=0`) the format rate is 0.0 at every step.

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
                      test_digits=(3, 3), test_size=1000, template="r1_zero",
                      pretrain_working=True, pretrain_tag_rate=0.2)

  c.model = presets.get(
      "tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
      intermediate_size=192, moe_intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
      max_position_embeddings=64, moe_impl="grouped", attention_impl="naive", scan_layers=False)

  c.pretrain.num_examples = 20000
  c.pretrain.steps = 1500
  c.pretrain.batch_size = 16
  c.pretrain.seq_len = 64
  c.pretrain.checkpoint_every = 500
  c.pretrain.optimizer.lr = 3e-3
  c.pretrain.optimizer.warmup_steps = 20

  c.sft.seq_len = 64   # unused by r1_zero (no cold start); kept valid for the other modes

  c.grpo.steps = 30
  c.grpo.prompts_per_step = 32
  c.grpo.G = 8
  c.grpo.temperature = 1.0
  c.grpo.max_prompt_len = 16
  c.grpo.max_new_tokens = 40
  c.grpo.optimizer.lr = 1e-3
  c.grpo.optimizer.warmup_steps = 0
  c.grpo.checkpoint_every = 10
  c.grpo.rewards.accuracy = 1.0     # the task's verifier: the exact sum inside <answer>
  c.grpo.rewards.format = 1.0       # <think>...</think><answer>...</answer>, R1 sec. 2.2.2
  c.grpo.reward_mode = "sum"

  c.eval.num_problems = 128
  c.eval.max_new_tokens = 40
  c.eval.batch_size = 128

  if a.runlocal:
    c.pretrain.steps, c.pretrain.num_examples, c.pretrain.checkpoint_every = 30, 2000, 30
    c.sft.steps = 30
    c.grpo.steps, c.grpo.prompts_per_step, c.eval.num_problems = 4, 8, 32
  return c
