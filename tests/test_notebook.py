"""colab/r1_tiny.ipynb runs top to bottom, so no change can silently break what a Colab user
runs: any cell error fails the test. It runs the notebook's own cells with the recipe's config
argument swapped from `colab=True` (the learning run) to `runlocal=True` (a smoke run); the
colab run itself is measured by hand (README, notebook section). The notebook imports
`configs` after a pip install, so a second test checks that a built wheel carries them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "r1_tiny.ipynb")
COLAB_ARG, CI_ARG = "r1_tiny.get_config('colab=True')", "r1_tiny.get_config('runlocal=True')"


def test_notebook_executes_without_errors():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  recipe = [c for c in nb.cells if c.cell_type == "code" and COLAB_ARG in c.source]
  assert len(recipe) == 1, f"one code cell of {NOTEBOOK} should call {COLAB_ARG}"
  recipe[0].source = recipe[0].source.replace(COLAB_ARG, CI_ARG)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "r1jax is importable" in text  # the install cell skipped pip inside a checkout
  assert "DeepSeek-V3: 671.0B total" in text  # the model cell's count, printed
  for line in ("held-out accuracy before GRPO", "after GRPO", "SFT control", "GRPO lift"):
    assert line in text, line  # the summary cell's accuracies
  assert any(o.get("output_type") in ("display_data", "execute_result")
             and "image/png" in o.get("data", {})
             for o in outputs)  # the pipeline's plot


def test_wheel_carries_configs(tmp_path):
  """`from configs import r1_tiny` works from a wheel installed outside the checkout."""
  src = tmp_path / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("r1jax", "pallas_kernels", "configs"):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  for name in ("setup.py", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
  (wheel,) = (tmp_path / "dist").iterdir()
  names = set(zipfile.ZipFile(wheel).namelist())
  shipped = {f"configs/{f}" for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")}
  assert "configs/r1_tiny.py" in shipped and shipped <= names, shipped - names
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                  str(wheel)], check=True, cwd=tmp_path)
  probe = ("import configs.r1_tiny as m, r1jax; m.get_config('colab=True'); "
           "print(m.__file__); print(r1jax.__file__)")
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  config_file, r1jax_file = subprocess.run(
      [sys.executable, "-c", probe], check=True, cwd=tmp_path, env=env, capture_output=True,
      text=True).stdout.split()
  assert config_file == str(site / "configs" / "r1_tiny.py"), config_file  # not the checkout's
  assert r1jax_file == str(site / "r1jax" / "__init__.py"), r1jax_file
  with open(config_file, "rb") as f, open(os.path.join(REPO, "configs", "r1_tiny.py"), "rb") as g:
    assert f.read() == g.read()


def test_colab_variant_keeps_the_cold_start():
  """The notebook's variant shortens GRPO and the held-out set only (a shorter cold start left
  GRPO nothing to lift)."""
  from configs import r1_tiny
  full, colab = r1_tiny.get_config(), r1_tiny.get_config("colab=True")
  assert colab.sft.to_dict() == full.sft.to_dict() and colab.task == full.task
  assert (colab.grpo.steps, colab.eval.num_problems) == (30, 128)
  assert (full.grpo.steps, full.eval.num_problems) == (80, 256)
  with pytest.raises(ValueError, match="exclusive"):
    r1_tiny.get_config("colab=True,runlocal=True")
