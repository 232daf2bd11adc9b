"""AOT-compiles the TPU grouped matmul kernels for real TPU generations from this CPU host.

libtpu compiles for a topology's devices without any TPU attached: the Mosaic kernels
go through Pallas's TPU lowering and the Mosaic compiler, so a block shape, layout or
op Mosaic rejects fails here. Nothing runs; memory_analysis() is recorded per compile.
Besides the kernels: the tiny model's SFT train step with moe_impl='pallas' (one chip,
XLA cannot partition a Mosaic kernel) and the expert-parallel MoE layer under shard_map
over all chips.
Skipped only where libtpu is not importable (install the `tpu` extra).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Tiling, backend_for, gmm, tgmm
from pallas_kernels.gmm_tpu import gmm_tpu
from pallas_kernels.group_metadata import make_group_metadata

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install '.[tpu]')")
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

TOPOLOGIES = ["v5e:2x2", "v5p:2x2x1"]
# T tokens x K assignments sorted by expert; D model dim, F expert hidden, E experts.
M, D, F, E = 1024, 512, 256, 8
TILING = Tiling(256, 256, 256)
BF16 = jnp.bfloat16


@pytest.fixture(autouse=True)
def _no_persistent_cache():
  """Compile for real every time: a cached TPU executable would skip Mosaic (and this
  CPU client cannot load one back anyway)."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", before)


@functools.cache
def _mesh(topology, one_device=False):
  """All chips of the topology, or its first chip: a Mosaic kernel outside shard_map
  must see a single device (Pallas refuses to partition it automatically)."""
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  return Mesh(np.array(devices[:1] if one_device else devices), ("data",))


def _struct(mesh, shape, dtype=BF16, spec=P()):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _compile(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  stats = {k: getattr(mem, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                        "temp_size_in_bytes", "generated_code_size_in_bytes")}
  assert "tpu_custom_call" in compiled.as_text(), "the Mosaic kernel is not in the program"
  return stats


def _nbytes(*shapes_dtypes):
  return sum(int(np.prod(s)) * jnp.dtype(d).itemsize for s, d in shapes_dtypes)


def _swiglu(x_MxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, group_sizes):
  mm = functools.partial(gmm, group_sizes=group_sizes, tiling=TILING, backend="tpu")
  h_MxF = jax.nn.silu(mm(x_MxD, w_gate_ExDxF)) * mm(x_MxD, w_up_ExDxF)
  return mm(h_MxF, w_down_ExFxD)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_tpu_kernels_compile(topology, record_property):
  mesh, chip = _mesh(topology), _mesh(topology, one_device=True)
  assert backend_for(mesh) == "tpu" and backend_for(mesh.devices.flat[0]) == "tpu"
  s = functools.partial(_struct, chip)
  sizes = s((E,), jnp.int32)
  stats = {}

  stats["gmm"] = _compile(functools.partial(gmm, tiling=TILING, backend="tpu"),
                          s((M, D)), s((E, D, F)), sizes)
  assert stats["gmm"]["argument_size_in_bytes"] >= _nbytes(((M, D), BF16), ((E, D, F), BF16))
  assert stats["gmm"]["output_size_in_bytes"] == _nbytes(((M, F), BF16))

  stats["tgmm"] = _compile(functools.partial(tgmm, tiling=TILING, backend="tpu"),
                           s((M, D)), s((M, F)), sizes)
  assert stats["tgmm"]["output_size_in_bytes"] == _nbytes(((E, D, F), BF16))

  # Gradient of a grouped SwiGLU expert layer, tokens sharded over the mesh: each
  # device runs the kernels on its rows and group sizes. Under check_vma the weights
  # are cast to varying inside gmm, so their gradients come back already psum'd.
  n = mesh.devices.size

  def local_grads(x, wg, wu, wd, gs):
    loss = lambda *a: jnp.sum(_swiglu(*a, gs[0]).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

  grad_fn = jax.shard_map(local_grads, mesh=mesh,
                          in_specs=(P("data"), P(), P(), P(), P("data")),
                          out_specs=(P("data"), P(), P(), P()))
  weights = _nbytes(((E, D, F), BF16)) * 3
  s = functools.partial(_struct, mesh)
  stats["swiglu_grad"] = _compile(
      grad_fn, s((M * n, D), spec=P("data")), s((E, D, F)), s((E, D, F)), s((E, F, D)),
      s((n, E), jnp.int32, P("data")))
  # Per device: the three weight gradients and its own rows' d x (plus a small table).
  expected = weights + _nbytes(((M, D), BF16))
  assert expected <= stats["swiglu_grad"]["output_size_in_bytes"] <= expected * 1.01

  record_property("memory_analysis", json.dumps(stats))
  print(topology, json.dumps(stats))


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_default_tiles_fit_vmem_at_deepseek_v3_width(topology, record_property):
  """tiling=None at D=7168, F=2048: the default tiles must fit the chip's scoped VMEM.

  Too large a tile is a compile-time VMEM OOM, so compiling is the check (few experts
  and rows: the tiles, not the array sizes, decide VMEM).
  """
  s = functools.partial(_struct, _mesh(topology, one_device=True))
  m, d, f, e = 2048, 7168, 2048, 4
  stats = {}
  for dtype in (BF16, jnp.float32):
    name = jnp.dtype(dtype).name
    sizes = s((e,), jnp.int32)
    stats[f"gmm/{name}"] = _compile(functools.partial(gmm, backend="tpu"),
                                    s((m, d), dtype), s((e, d, f), dtype), sizes)
    stats[f"gmm_transposed/{name}"] = _compile(
        functools.partial(gmm, backend="tpu", transpose_rhs=True),
        s((m, f), dtype), s((e, d, f), dtype), sizes)
    stats[f"tgmm/{name}"] = _compile(functools.partial(tgmm, backend="tpu"),
                                     s((m, d), dtype), s((m, f), dtype), sizes)
  record_property("memory_analysis", json.dumps(stats))


def test_mosaic_rejection_fails_the_compile():
  """A block Mosaic cannot tile (64 lanes) must raise, so the test above can fail."""
  s = functools.partial(_struct, _mesh(TOPOLOGIES[0], one_device=True))

  def bad(x, w, gs):
    meta = make_group_metadata(gs, 512, 16, with_tail=True, visit_empty_groups=False)
    return gmm_tpu(x, w, meta, num_experts=4, tiling=Tiling(16, 64, 64), out_dtype=BF16)
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    jax.jit(bad).lower(s((512, 512)), s((4, 512, 512)), s((4,), jnp.int32)).compile()


def _tiny_sft_step_structs(mesh, batch=4, seq_len=64):
  """Abstract (state, batch) of the tiny model's SFT step, placed on `mesh`."""
  from r1jax.model import decoder, presets
  from r1jax.train import optim
  cfg = presets.get("tiny_v3", moe_impl="pallas", pallas_backend="tpu")
  optimizer = optim.make_optimizer(optim.optimizer_defaults(), 100)
  params = jax.eval_shape(functools.partial(decoder.init_params, cfg), jax.random.key(0))
  state = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state = jax.tree.map(lambda a: _struct(mesh, a.shape, a.dtype), state)
  rows = {name: _struct(mesh, (batch, seq_len), dtype, P("data")) for name, dtype in (
      ("tokens", jnp.int32), ("loss_mask", jnp.bool_), ("segment_ids", jnp.int32),
      ("positions", jnp.int32))}
  return cfg, optimizer, state, rows


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_tiny_model_sft_step_compiles_with_pallas_moe(topology, record_property):
  """The whole SFT train step of tiny_v3 with moe_impl='pallas' (forward, backward through
  gmm/tgmm, AdamW, router-bias update), AOT-compiled for one chip of the topology.

  One chip, because XLA cannot partition a Mosaic kernel: over all chips of the topology
  the same step fails with "Mosaic kernels cannot be automatically partitioned" (asserted
  below). Multi-chip runs put the dispatch inside shard_map (moe_ffn(expert_axis=...),
  compiled over the whole topology in the next test).
  """
  from r1jax.train import sft
  cfg, optimizer, state, rows = _tiny_sft_step_structs(_mesh(topology, one_device=True))
  stats = _compile(sft.make_train_step(cfg, optimizer), state, rows)
  params_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                     for a in jax.tree.leaves(state["params"]))
  assert stats["argument_size_in_bytes"] >= 3 * params_bytes  # params + Adam's two moments
  record_property("memory_analysis", json.dumps(stats))
  print(topology, "tiny_v3 sft step", json.dumps(stats))
  cfg, optimizer, state, rows = _tiny_sft_step_structs(_mesh(topology))
  with pytest.raises(Exception, match="cannot be automatically partitioned"):
    sft.make_train_step(cfg, optimizer).lower(state, rows).compile()


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_expert_parallel_pallas_moe_compiles_over_the_topology(topology, record_property):
  """moe_ffn with moe_impl='pallas' and the routed experts split over every chip
  (shard_map, expert_axis), forward and gradient: the multi-chip form of the dispatch."""
  from r1jax.model import decoder, moe, presets
  mesh = _mesh(topology)
  n = mesh.devices.size
  cfg = presets.get("tiny_v3", moe_impl="pallas", pallas_backend="tpu", dtype="bfloat16",
                    param_dtype="bfloat16", hidden_size=256, moe_intermediate_size=256)
  layer = jax.eval_shape(lambda k: moe.compute_layout(jax.tree.map(
      lambda a: a[0], decoder.init_params(cfg, k)["moe_layers"]["moe"])), jax.random.key(0))
  specs = jax.tree.map(lambda _: P(), layer)
  specs["experts"] = jax.tree.map(lambda _: P("data"), layer["experts"])
  p = jax.tree.map(lambda a, s: _struct(mesh, a.shape, a.dtype, s), layer, specs)
  x = _struct(mesh, (4 * n, 64, cfg.hidden_size), BF16, P("data"))
  valid = _struct(mesh, (4 * n, 64), jnp.bool_, P("data"))

  def local(p, x, valid):
    loss = lambda p, x: jnp.sum(moe.moe_ffn(p, x, valid, cfg, expert_axis="data")[0]
                                .astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(p, x)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, P("data"), P("data")),
                     out_specs=(specs, P("data")))
  stats = _compile(fn, p, x, valid)
  record_property("memory_analysis", json.dumps(stats))
  print(topology, "expert-parallel moe_ffn grad", json.dumps(stats))


def test_expert_parallel_train_step_compiles_with_ragged_exchange(record_property):
  """The tiny model's whole SFT step (loss, gradient, AdamW) over v5p:2x2x2 as a training
  run lays it out (sharding.RULES on an fsdp=2 x expert=4 mesh), traced under
  sharding.use_mesh with moe_exchange='ragged' and moe_impl='pallas': the routed experts
  run under shard_map, exchanged with lax.ragged_all_to_all (the real collective: only
  XLA:CPU gets the emulation), the expert matmuls as Mosaic kernels."""
  from r1jax import sharding
  from r1jax.model import decoder, presets
  from r1jax.train import optim, sft
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 4}, devices)
  cfg = presets.get("tiny_v3", moe_impl="pallas", pallas_backend="tpu", moe_exchange="ragged",
                    n_routed_experts=8)
  optimizer = optim.make_optimizer(optim.optimizer_defaults(), 100)
  params = jax.eval_shape(functools.partial(decoder.init_params, cfg), jax.random.key(0))
  shardings = sharding.param_shardings(cfg, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shardings)
  state = {"params": params,
           "opt_state": jax.tree.map(lambda a: _struct(mesh, a.shape, a.dtype),
                                     jax.eval_shape(optimizer.init, params)),
           "step": _struct(mesh, (), jnp.int32)}
  rows = sharding.batch_sharding(mesh, 2, 8)
  batch = {name: jax.ShapeDtypeStruct((8, 32), dtype, sharding=rows) for name, dtype in (
      ("tokens", jnp.int32), ("loss_mask", jnp.bool_), ("segment_ids", jnp.int32),
      ("positions", jnp.int32))}
  with sharding.use_mesh(mesh):
    lowered = sft.make_train_step(cfg, optimizer).lower(state, batch)
  assert "ragged_all_to_all" in lowered.as_text()
  compiled = lowered.compile()
  text = compiled.as_text()
  assert "ragged-all-to-all" in text, "the ragged exchange is not in the compiled program"
  assert "tpu_custom_call" in text, "the Mosaic kernel is not in the program"
  mem = compiled.memory_analysis()
  stats = {k: getattr(mem, k) for k in ("argument_size_in_bytes", "temp_size_in_bytes")}
  record_property("memory_analysis", json.dumps(stats))
