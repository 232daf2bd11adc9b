"""Grouped matmul kernels (interpreted on CPU) against lax.ragged_dot and jnp references.

Shapes are chosen so that m, k and n are not whole tiles, several row tiles hold two
groups, there are empty groups, rows past sum(group_sizes), and (in one case) a single
group holding every row. Group sizes are traced arguments, so each (backend, dtype)
compiles once and every case reuses it.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Tiling, backend_for, gmm, interpret_for, reference_gmm
from pallas_kernels import reference_tgmm, tgmm
from pallas_kernels.group_metadata import make_group_metadata

M, K, N, E = 45, 200, 136, 6
# Small tiles so the grid has several k steps, n blocks and shared row tiles.
TILING = {"tpu": Tiling(16, 128, 128), "gpu": Tiling(16, 32, 32)}
CASES = {
    "zeros_and_tail": [7, 0, 19, 0, 3, 9],     # sum 38 < 45: rows 38.. must be zero
    "one_full_group": [0, 0, 45, 0, 0, 0],
    "random_full": None,                        # seeded random split of all 45 rows
}
# bf16 inputs, f32 reference on the same rounded inputs: the kernels accumulate in f32
# and round once to bf16 (relative 2^-9), so 2^-6 is ample and still far below the
# error of a row sent to the wrong group (O(1)).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-6}


def _group_sizes(case):
  sizes = CASES[case]
  if sizes is None:
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, M + 1, size=E - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [M]]))
    sizes[1] = 0  # keep an empty group in the middle
    sizes[-1] += M - sizes.sum()
  return jnp.asarray(sizes, jnp.int32)


def _close(x, ref, dtype, what):
  """|x - ref| <= tol * (|ref| + RMS(ref)) everywhere: relative, with an RMS floor."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  scale = float(np.sqrt(np.mean(ref**2))) or 1.0
  err = float(np.max(np.abs(x - ref) / (np.abs(ref) + scale)))
  assert err <= TOL[dtype], f"{what}: error {err:.2e} exceeds {TOL[dtype]:.1e}"


@pytest.fixture(scope="module")
def data():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(keys[0], (M, K)), jax.random.normal(keys[1], (E, K, N)),
          jax.random.normal(keys[2], (M, N)))


@functools.cache
def _kernel_fwd_bwd(backend, dtype):
  """One jit per (backend, dtype): forward value and both input gradients."""
  f = functools.partial(gmm, backend=backend, interpret=True, tiling=TILING[backend])

  @jax.jit
  def run(lhs, rhs, cot, group_sizes):
    out, vjp = jax.vjp(lambda x, w: f(x, w, group_sizes), lhs, rhs)
    return (out,) + vjp(cot)
  return run


@jax.jit
def _ragged_fwd_bwd(lhs, rhs, cot, group_sizes):
  f = lambda x, w: jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
  out, vjp = jax.vjp(f, lhs, rhs)
  return (out,) + vjp(cot)


@jax.jit
def _reference_fwd_bwd(lhs, rhs, cot, group_sizes):
  out = reference_gmm(lhs, rhs, group_sizes, jnp.float32)
  dlhs = jnp.zeros_like(lhs)
  for e in range(E):  # an independent d lhs: dout @ rhs[e]^T on the rows of group e
    rows = (jnp.arange(M) >= jnp.cumsum(group_sizes)[e] - group_sizes[e]) & (
        jnp.arange(M) < jnp.cumsum(group_sizes)[e])
    dlhs = dlhs + jnp.where(rows[:, None], cot @ rhs[e].T, 0.0)
  return out, dlhs, reference_tgmm(lhs, cot, group_sizes, jnp.float32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_gmm_forward_and_grads(data, backend, dtype, case):
  lhs, rhs, cot = (x.astype(dtype) for x in data)
  group_sizes = _group_sizes(case)
  got = _kernel_fwd_bwd(backend, dtype)(lhs, rhs, cot, group_sizes)
  f32 = [x.astype(jnp.float32) for x in (lhs, rhs, cot)]
  ragged = _ragged_fwd_bwd(*f32, group_sizes)
  ref = _reference_fwd_bwd(*f32, group_sizes)
  for name, g, r1, r2 in zip(("out", "d lhs", "d rhs"), got, ragged, ref):
    assert g.shape == r1.shape, name
    _close(g, r1, dtype, f"{name} vs ragged_dot")
    _close(g, r2, dtype, f"{name} vs reference")
  total = int(group_sizes.sum())
  assert not np.asarray(got[0][total:]).any(), "rows past sum(group_sizes) must be zero"
  assert not np.asarray(got[1][total:]).any(), "their lhs gradient must be zero"
  empty = np.flatnonzero(np.asarray(group_sizes) == 0)
  assert not np.asarray(got[2][empty]).any(), "empty groups must get a zero rhs gradient"


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_tgmm_direct_and_all_empty(data, backend):
  lhs, _, grad = data
  run = jax.jit(functools.partial(tgmm, backend=backend, interpret=True,
                                  tiling=TILING[backend]))
  sizes = _group_sizes("zeros_and_tail")
  _close(run(lhs, grad, sizes), reference_tgmm(lhs, grad, sizes), jnp.float32, "tgmm")
  zeros = run(lhs, grad, jnp.zeros((E,), jnp.int32))
  assert zeros.shape == (E, K, N) and not np.asarray(zeros).any()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_transpose_rhs_matches_plain(data, backend):
  """rhs given as [E, n, k]: same product, and its gradient comes back as [E, n, k]."""
  lhs, rhs, cot = data
  sizes = _group_sizes("random_full")
  f = functools.partial(gmm, backend=backend, interpret=True, tiling=TILING[backend],
                        transpose_rhs=True)

  @jax.jit
  def run(lhs, rhs_t, cot):
    out, vjp = jax.vjp(lambda x, w: f(x, w, sizes), lhs, rhs_t)
    return (out,) + vjp(cot)
  out, dlhs, drhs_t = run(lhs, rhs.transpose(0, 2, 1), cot)
  ref_out, ref_dlhs, ref_drhs = _ragged_fwd_bwd(lhs, rhs, cot, sizes)
  _close(out, ref_out, jnp.float32, "out")
  _close(dlhs, ref_dlhs, jnp.float32, "d lhs")
  _close(drhs_t.transpose(0, 2, 1), ref_drhs, jnp.float32, "d rhs")


def test_tpu_kernels_under_the_tpu_interpreter():
  """The stricter TPU interpreter fills uninitialised VMEM with NaN and checks races.

  The forward kernel reads its output block before writing a group's rows into it;
  this catches a row that no group writes (it would stay NaN).
  """
  pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
  params = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
  m, k, n = 40, 128, 128
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  lhs, grad = jax.random.normal(keys[0], (m, k)), jax.random.normal(keys[2], (m, n))
  rhs = jax.random.normal(keys[1], (E, k, n))
  sizes = jnp.array([3, 0, 14, 0, 1, 9], jnp.int32)  # sum 27 < 40
  t = Tiling(16, 128, 128)
  out = gmm(lhs, rhs, sizes, tiling=t, interpret=params)
  _close(out, reference_gmm(lhs, rhs, sizes), jnp.float32, "gmm")
  assert not np.asarray(out[27:]).any()
  _close(tgmm(lhs, grad, sizes, tiling=t, interpret=params),
         reference_tgmm(lhs, grad, sizes), jnp.float32, "tgmm")


def test_inside_shard_map(backend="tpu"):
  """Two shards, each with its own rows and group sizes, as expert dispatch calls it.

  The wrapper under test (custom_vjp, varying axes) is shared by both backends, so one
  is enough. check_vma=False: the Pallas interpreter (CPU) cannot yet trace under
  check_vma; the TPU compile test covers check_vma=True on real TPU lowering.
  """
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  m, k, n, e = 24, 128, 128, 4
  keys = jax.random.split(jax.random.PRNGKey(2), 2)
  x, w = jax.random.normal(keys[0], (2 * m, k)), jax.random.normal(keys[1], (e, k, n))
  sizes = jnp.array([[5, 0, 12, 3], [1, 2, 3, 18]], jnp.int32)
  mm = functools.partial(gmm, backend=backend, interpret=True, tiling=TILING[backend])

  def local(x, w, gs):
    loss, (dx, dw) = jax.value_and_grad(lambda x, w: jnp.sum(mm(x, w, gs[0]) ** 2),
                                        (0, 1))(x, w)
    return jax.lax.psum(loss, "data"), dx, jax.lax.psum(dw, "data")
  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                              out_specs=(P(), P("data"), P()), check_vma=False))

  def reference(x, w):
    return sum(jnp.sum(reference_gmm(x[i * m:(i + 1) * m], w, sizes[i]) ** 2)
               for i in range(2))
  want_loss, (want_dx, want_dw) = jax.value_and_grad(reference, (0, 1))(x, w)
  loss, dx, dw = run(x, w, sizes)
  _close(loss, want_loss, jnp.float32, "loss")
  _close(dx, want_dx, jnp.float32, "d x")
  _close(dw, want_dw, jnp.float32, "d w")


def test_group_metadata_by_hand():
  """Groups [5, 0, 20, 1, 0, 3] over 32 rows in tiles of 16 (sum 29, tail 29..31)."""
  sizes = jnp.array([5, 0, 20, 1, 0, 3], jnp.int32)
  meta = jax.jit(make_group_metadata, static_argnums=(1, 2),
                 static_argnames=("with_tail", "visit_empty_groups"))
  fwd = meta(sizes, 32, 16, with_tail=True, visit_empty_groups=False)
  # tile 0: groups 0 and 2; tile 1: groups 2, 3, 5 and the tail (group 6).
  assert fwd.offsets.tolist() == [0, 5, 5, 25, 26, 26, 29, 32]
  assert int(fwd.num_items[0]) == 6
  assert fwd.group_ids.tolist()[:6] == [0, 2, 2, 3, 5, 6]
  assert fwd.tile_ids.tolist()[:6] == [0, 0, 1, 1, 1, 1]
  # Padding items repeat the last real one so no new block is fetched.
  assert set(fwd.group_ids.tolist()[6:]) == {6} and set(fwd.tile_ids.tolist()[6:]) == {1}
  bwd = meta(sizes, 32, 16, with_tail=False, visit_empty_groups=True)
  assert int(bwd.num_items[0]) == 7  # empty groups 1 and 4 get one item each
  assert bwd.group_ids.tolist()[:7] == [0, 1, 2, 2, 3, 4, 5]
  assert bwd.tile_ids.tolist()[:7] == [0, 0, 0, 1, 1, 1, 1]


def test_backend_for_uses_the_devices_not_the_process():
  class Fake:
    def __init__(self, platform):
      self.platform = platform
  assert backend_for([Fake("tpu")] * 4) == "tpu"
  assert backend_for(Fake("cuda")) == "gpu"
  assert backend_for(jax.devices("cpu")) == "tpu" and interpret_for(jax.devices("cpu"))
  assert backend_for(jax.devices("cpu"), cpu="gpu") == "gpu"
  with pytest.raises(ValueError, match="one platform"):
    backend_for([Fake("tpu"), Fake("cuda")])


def test_gpu_kernels_lower_to_triton():
  """Lowers for CUDA from this CPU host: Pallas -> Triton IR, no GPU needed.

  This proves the Triton lowering accepts the kernels (masked loads and stores, the
  dynamic k loop, transposed dots); compiling that IR to PTX happens only on a GPU.
  """
  export = pytest.importorskip("jax.export")
  S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  sizes = S((4,), jnp.int32)
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for f, args in [
      (lambda x, w, g: gmm(x, w, g, backend="gpu"), (S((256, 192), bf), S((4, 192, 256), bf))),
      (lambda x, w, g: gmm(x, w, g, backend="gpu", transpose_rhs=True),
       (S((256, 192), bf), S((4, 256, 192), bf))),
      (lambda x, d, g: tgmm(x, d, g, backend="gpu"), (S((256, 192), bf), S((256, 128), bf))),
  ]:
    try:
      exported = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
          *args, sizes)
    except RuntimeError as e:  # JAX >= 0.12 reads the GPU model while lowering
      if "No supported GPU devices found" not in str(e):
        raise
      pytest.skip(f"jax {jax.__version__} needs a GPU device to lower Triton kernels")
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 1


def test_rejects_bad_arguments(data):
  lhs, rhs, _ = data
  sizes = _group_sizes("zeros_and_tail")
  with pytest.raises(ValueError, match="backend"):
    gmm(lhs, rhs, sizes, backend="cpu")
  with pytest.raises(ValueError, match="share a dtype"):
    gmm(lhs, rhs.astype(jnp.bfloat16), sizes, interpret=True)
  with pytest.raises(ValueError, match="groups"):
    gmm(lhs, rhs[:3], sizes, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    gmm(lhs, rhs, sizes, backend="gpu", tiling=Tiling(16, 48, 32), interpret=True)


def test_no_rows():
  """A shard that received no tokens: empty output, zero weight gradient."""
  lhs, rhs, sizes = jnp.zeros((0, 8)), jnp.ones((3, 8, 4)), jnp.zeros((3,), jnp.int32)
  out, vjp = jax.vjp(lambda w: gmm(lhs, w, sizes, interpret=True), rhs)
  assert out.shape == (0, 4)
  (drhs,) = vjp(out)
  assert drhs.shape == rhs.shape and not np.asarray(drhs).any()
