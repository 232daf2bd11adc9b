"""Pallas kernels, each beside its pure-jnp reference; imports nothing from r1jax."""
from pallas_kernels.backends import DEFAULT_TILING, Tiling, backend_for, default_tiling
from pallas_kernels.backends import interpret_for
from pallas_kernels.gmm import gmm, reference_gmm, reference_tgmm, tgmm

__all__ = ["DEFAULT_TILING", "Tiling", "backend_for", "default_tiling", "interpret_for",
           "gmm", "tgmm", "reference_gmm", "reference_tgmm"]
