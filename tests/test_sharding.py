"""Sharded forward equals the unsharded one; the rules table splits what it says."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from r1jax.model import decoder, presets

from r1jax import sharding


def test_logical_to_spec_rules_and_fallbacks():
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  assert sharding.logical_to_spec(("layers", "exp", "embed", "expert_mlp"), (3, 8, 64, 32), mesh) == \
      P(None, "expert", "fsdp", "tensor")
  # 7 does not divide by the tensor axis: that dim is replicated instead of failing.
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 7), mesh) == P("fsdp", None)
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_make_mesh_validation():
  assert sharding.make_mesh({"data": -1, "tensor": 2}).shape["data"] == 4
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"data": 3, "tensor": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"pipeline": 8})


def test_sharded_forward_equals_unsharded():
  cfg = presets.get("tiny_v3", moe_impl="ragged")
  params = decoder.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
  ref, _ = jax.jit(lambda p, t: decoder.forward(p, t, cfg))(params, tokens)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
  p_shard = sharding.param_shardings(cfg, mesh)
  sharded = sharding.init_sharded_params(cfg, jax.random.key(0), mesh)
  w = sharded["moe_layers"]["moe"]["experts"]["w_gate"]
  assert w.sharding.spec == P(None, "expert", "fsdp", None)
  np.testing.assert_allclose(np.asarray(w), np.asarray(params["moe_layers"]["moe"]["experts"]["w_gate"]), rtol=1e-6)
  fn = jax.jit(lambda p, t: decoder.forward(p, t, cfg)[0],
               in_shardings=(p_shard, sharding.batch_sharding(mesh, 2, 8)))
  out = fn(sharded, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
