"""The one place that knows how JAX versions spell a shard_map output's varying axes.

Inside `jax.shard_map(check_vma=True)` a pallas_call must say over which manual mesh
axes its output varies. JAX 0.10+ takes `manual_axis_type=ManualAxisType(varying=...)`,
earlier releases took `vma=frozenset(...)`; outside shard_map neither is needed.
"""
import jax


def _varying(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", frozenset()))


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """A kernel output varying over the union of its operands' varying mesh axes."""
  varying = frozenset().union(*(_varying(x) for x in operands))
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  manual_axis_type = getattr(jax.sharding, "ManualAxisType", None)
  if manual_axis_type is not None:
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=manual_axis_type(varying=varying))
  return jax.ShapeDtypeStruct(shape, dtype, vma=varying)


def match_varying(*operands):
  """Casts every operand to vary over the union of their varying mesh axes.

  A custom_vjp inside shard_map must return cotangents typed like its inputs. A
  replicated weight times a sharded activation gives a sharded gradient; casting the
  weight to varying first makes JAX's transpose of the cast psum that gradient, which
  is the weight's true gradient.
  """
  varying = frozenset().union(*(_varying(x) for x in operands))
  if not varying:
    return operands
  cast = getattr(jax.lax, "pcast", None)
  out = []
  for x in operands:
    missing = tuple(sorted(varying - _varying(x)))
    if not missing:
      out.append(x)
    elif cast is not None:
      out.append(cast(x, missing, to="varying"))
    else:
      out.append(jax.lax.pvary(x, missing))
  return tuple(out)
