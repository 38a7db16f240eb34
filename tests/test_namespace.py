"""The import namespace: everything under `xattn_jax` (a user's `models.py` cannot shadow it), the deprecated
top-level names as aliases of the same modules, and dependencies that point one way between the layers."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Layer order (xattn_jax/_subpackages.py): a folder may import only from folders before it.
LAYERS = [
  ("xattn_jax", "xattn_jax"),
  ("pallas_kernels", "xattn_jax.pallas_kernels"),
  ("models", "xattn_jax.models"),
  ("evaluation", "xattn_jax.evaluation"),
  ("cli", "xattn_jax.cli"),
]


def _run(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_user_modules_named_like_the_folders_do_not_shadow_the_project(tmp_path):
  (tmp_path / "models.py").write_text("raise ImportError('the user models.py was imported by the project')\n")
  (tmp_path / "pallas_kernels.py").write_text("USER = True\n")
  (tmp_path / "evaluation.py").write_text("raise ImportError('the user evaluation.py was imported')\n")
  code = """
import jax, jax.numpy as jnp
import xattn_jax
from xattn_jax.models import AttentionConfig, Transformer, llama3_1_8b
from xattn_jax.evaluation.haystack import needle_prompt
from xattn_jax.cli import main
import pallas_kernels
assert pallas_kernels.USER  # the user's module stays theirs
cfg = llama3_1_8b(num_layers=1, vocab_size=64, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=32)
q = jax.random.normal(jax.random.key(0), (1, 256, 2, 64))
out = xattn_jax.xattention(q, q, q, is_causal=True, implementation="pallas_tpu", interpret=True)
print("ok", out.shape, cfg.num_layers, sorted(xattn_jax.backends.available()))
"""
  done = _run(code, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "ok (1, 256, 2, 64) 1 ['pallas_mosaic_gpu', 'pallas_tpu', 'xla']" in done.stdout


def test_old_top_level_names_are_deprecated_aliases(tmp_path):
  code = """
import warnings
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import models.config, models.calibration
  from models import haystack
  from pallas_kernels.mosaic_gpu import MosaicGpu
import xattn_jax.models, xattn_jax.evaluation.calibration, xattn_jax.pallas_kernels.mosaic_gpu as mg
assert models is xattn_jax.models and models.config is xattn_jax.models.config
assert models.calibration is xattn_jax.evaluation.calibration and MosaicGpu is mg.MosaicGpu
import xattn_jax.evaluation.haystack
assert haystack is xattn_jax.evaluation.haystack
assert xattn_jax.models.config.__spec__.name == "xattn_jax.models.config"
words = sorted({str(w.message).split("`")[1] for w in caught if w.category is DeprecationWarning})
print(words)
"""
  done = _run(code, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "['import models', 'import pallas_kernels', 'models.haystack']" in done.stdout


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[folder for folder, _ in LAYERS])
def test_dependencies_point_one_way(index):
  folder, _ = LAYERS[index]
  above = [name for _, name in LAYERS[index + 1 :]]
  old = ["models", "pallas_kernels"]  # only the aliases' own packages may name these
  for path in sorted((ROOT / folder).rglob("*.py")):
    if folder == "xattn_jax" and path.name == "__init__.py":
      above_here = [n for n in above if n != "xattn_jax.pallas_kernels"]  # it imports the kernels to register them
    else:
      above_here = above
    for name in _imports(path):
      bad = [a for a in above_here if name == a or name.startswith(a + ".")]
      bad += [o for o in old if name == o or name.startswith(o + ".")]
      assert not bad, f"{path.relative_to(ROOT)} imports {name}, a layer above {folder} (or an old name)"
