"""moe_impl='pallas' (kernels interpreted on CPU) against the float64 oracle and the dense
model, and moe_impl='auto' resolved from devices."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_runs
from r1jax.model import decoder, moe, moe_pallas, presets
from r1jax.run import experiment
from r1jax.train import losses
from test_moe import _experts, _oracle, _router_cfg


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_dispatch_equals_the_oracle(backend):
  """Both kernels (interpreted), tiles smaller than the 74 assignments so row tiles hold two
  experts: empty experts, a token choosing one expert twice, and dropped assignments
  (expert index E, another shard's expert) that must contribute nothing."""
  tm = {"tpu": 8, "gpu": 16}[backend]
  cfg = _router_cfg(hidden_size=16, moe_intermediate_size=12, pallas_backend=backend,
                    pallas_tile_m=tm)
  experts, stored = _experts()
  t = 37
  x = jax.random.normal(jax.random.key(10 + t), (t, 16))
  idx = jax.random.randint(jax.random.key(t), (t, 2), 0, 3)  # experts 3..7 get nothing
  idx = idx.at[0].set(jnp.array([2, 2]))
  idx = idx.at[1:, 1].set(jnp.where(jnp.arange(t - 1) % 3 == 0, 8, idx[1:, 1]))  # dropped
  w = jax.random.uniform(jax.random.key(t + 1), (t, 2))
  run = jax.jit(functools.partial(moe.dispatch_fn("pallas"), cfg=cfg))
  got = np.asarray(run(experts, x, idx, w))
  np.testing.assert_allclose(got, _oracle(stored, x, idx, w), rtol=1e-4, atol=1e-3)
  # Every assignment dropped: zeros, not whatever the kernel's tail rows held.
  none = np.asarray(run(experts, x, jnp.full_like(idx, 8), w))
  np.testing.assert_array_equal(none, np.zeros_like(none))


@pytest.fixture(scope="module")
def model():
  """tiny_v3 parameters drawn with numpy (compiling init_params costs more than this test's
  point), norm scales around 1, and non-zero router biases."""
  cfg = presets.get("tiny_v3")
  shapes = jax.eval_shape(functools.partial(decoder.init_params, cfg), jax.random.key(0))
  rng = np.random.default_rng(0)
  def draw(path, a):
    base = 1.0 if jax.tree_util.keystr(path).endswith("norm']") else 0.0
    return jnp.asarray(base + 0.02 * rng.standard_normal(a.shape), a.dtype)
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  bias = 0.05 * jax.random.normal(jax.random.key(7), decoder.router_biases(params).shape)
  params = decoder.with_router_biases(params, bias)  # selection differs from the weights
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  return params, tokens


def test_tiny_model_pallas_equals_dense_in_logits_and_gradients(model):
  """tiny_v3 (two MoE layers and an MoE MTP block): logits, MTP logits, expert loads and
  the gradient of the training loss under 'pallas' equal those under 'dense'."""
  params, tokens = model
  mask = jnp.arange(16)[None, :] >= 4  # a prompt/response split, as in SFT

  def loss_and_grad(moe_impl):
    """One compile per dispatch: the loss gradient, with the forward outputs as aux."""
    cfg = presets.get("tiny_v3", moe_impl=moe_impl)
    def loss(p):
      s, n, _ = losses.lm_loss(p, tokens, cfg, loss_mask=mask)
      logits, aux = decoder.forward(p, tokens, cfg)  # the same forward, deduplicated by XLA
      return s / n, (logits, aux["mtp_logits"], aux["tokens_per_expert"])
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (ref_loss, ref_out), ref_g = loss_and_grad("dense")
  (loss, out), g = loss_and_grad("pallas")
  for name, a, b in zip(("logits", "mtp_logits"), ref_out, out):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref_out[2]))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert float(jnp.abs(ref_g["moe_layers"]["moe"]["experts"]["w_down"]).max()) > 0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_g)[0], jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))

class FakeDevice:
  def __init__(self, platform):
    self.platform = platform


def test_auto_resolves_from_the_devices():
  cfg = presets.get("tiny_v3", moe_impl="auto")
  assert moe.resolve_impl(cfg, jax.devices()) == "grouped"
  assert moe.resolve_impl(cfg) == "grouped"  # default: jax.devices(), CPU in tests
  assert moe.resolve_impl(presets.get("tiny_v3", moe_impl="ragged"), jax.devices()) == "ragged"
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  assert moe.resolve_impl(cfg, mesh) == "grouped"
  with pytest.raises(ValueError, match="one platform"):
    moe.resolve_impl(cfg, [jax.devices()[0], FakeDevice("tpu")])
  # experiment.build resolves it once, for the config's mesh (or jax.devices()).
  run_cfg = tiny_runs.load_config()
  run_cfg.model.moe_impl = "auto"
  assert experiment.build(run_cfg)[2].moe_impl == "grouped"
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install '.[tpu]'): "
                      "no TPU topology to resolve 'auto' for")
  from jax.experimental import topologies
  tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  assert moe.resolve_impl(cfg, tpu[:1]) == "pallas"
  assert moe.resolve_impl(cfg, tpu[0]) == "pallas"
  # Several chips: a jit over the mesh cannot partition the Mosaic kernel, ragged_dot it can.
  assert moe.resolve_impl(cfg, jax.sharding.Mesh(np.asarray(tpu), ("data",))) == "ragged"


def test_config_fields_are_validated_by_name():
  for kw, field in ((dict(pallas_backend="cuda"), "pallas_backend"),
                    (dict(moe_impl="palas"), "moe_impl"),
                    (dict(pallas_tile_m=-8), "pallas_tile_m"),
                    (dict(pallas_tile_k=100), "pallas_tile_k"),   # TPU: multiple of 128
                    (dict(pallas_tile_n=384, pallas_backend="gpu"), "pallas_tile_n"),  # 2^k
                    (dict(pallas_tile_m=8, dtype="bfloat16", pallas_backend="tpu"),
                     "pallas_tile_m")):                         # 16-bit rows: multiple of 16
    with pytest.raises(ValueError, match=f"'{field}'"):
      presets.get("tiny_v3", **kw)
  cfg = presets.get("tiny_v3", pallas_tile_n=384, pallas_backend="tpu")  # legal on TPU only
  assert moe_pallas.tiling(cfg, "tpu", jnp.float32) == moe_pallas.pallas_kernels.Tiling(
      512, 512, 384)
  assert moe_pallas.tiling(cfg, "tpu", jnp.bfloat16).tk == 1024  # per-dtype defaults
