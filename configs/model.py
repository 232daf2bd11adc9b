"""Model inspection config: parameter counts, FLOPs, shape-only init and a tiny forward.

  python -m r1jax.main --config=configs/model.py:variant=deepseek_v3
  python -m r1jax.main --config=configs/model.py:variant=small --config.model.moe_impl=ragged

variant: tiny | small | deepseek_v3 | deepseek_v2_lite | moonlight_16b_a3b | tiny_v3 | tiny_v2_lite.
The large variants are never materialised: counts and shapes come from jax.eval_shape, and
the forward pass runs on the variant's tiny twin (`smoke_variant`).
"""
import ml_collections

from r1jax.model import presets
from r1jax.run import experiment

TINY_TWIN = {"deepseek_v3": "tiny_v3", "deepseek_v2_lite": "tiny_v2_lite",
             "moonlight_16b_a3b": "tiny"}


def get_config(arg=None):
  a = experiment.parse_arg(arg, variant="deepseek_v3", seq_len=4096)
  c = ml_collections.ConfigDict()
  c.mode = "inspect"
  c.variant = a.variant
  c.model = presets.get(a.variant)
  c.seq_len = a.seq_len
  c.smoke_variant = TINY_TWIN.get(a.variant, a.variant)
  c.smoke_model = presets.get(c.smoke_variant)
  c.seed = 0
  return c
