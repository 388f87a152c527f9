"""Dependencies and side effects (issue 11): the core library runs on torch, numpy and safetensors
alone; each optional package belongs to an extra and its absence is one clear line; importing
exl2 changes nothing in the process; the pytest plugin loads only where asked for.

Absent packages are simulated in a subprocess by a meta-path finder that refuses them, as an
environment without them would (ModuleNotFoundError naming the module)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from exl2.extras import EXTRA_OF, install_hint

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = sorted(EXTRA_OF)


def without(modules: list[str], code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python where ``modules`` (and their submodules) cannot be imported."""
    blocker = (
        "import sys\n"
        f"BLOCKED = {set(modules)!r}\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", blocker + code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_core_library_works_without_any_optional_package(tmp_path):
    code = f"""
import torch
import exl2, exl2.errors, exl2.format, exl2.qmatrix, exl2.qparams, exl2.extras, exl2.nn, exl2.fast
from exl2 import QParams
from exl2.io import open_model, save_tensors
from exl2.reference import dequantize, matmul, quantize
from exl2.reference.bounds import matmul_within_bound
qm = quantize(torch.randn(40, 64), QParams(32, [5, 4], [0.5, 0.5]), bias=torch.randn(40))
save_tensors({str(tmp_path / 'm.safetensors')!r}, qm.to_tensors('layer'))
(key, back), = open_model({str(tmp_path / 'm.safetensors')!r}).qmatrices()
assert key == 'layer' and torch.equal(dequantize(back), dequantize(qm))
x = torch.randn(3, 64)
# a bare file has no config.json: the layer reads as its 64 padded columns (spec 3.1); the first 40 are qm's
assert back.out_features == 64 and matmul(x, back).shape == (3, 64)
assert matmul_within_bound(matmul(x, back)[:, :40], matmul(x, qm).double(), x, dequantize(qm), qm.output_bias)
print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))
"""
    r = without(OPTIONAL, code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_test_vectors_need_no_hypothesis(tmp_path):
    """vectors.py builds its layers from exl2.conformance.layers, which needs no hypothesis."""
    code = ("from exl2.conformance import vectors\n"
            "v = vectors.positives()[0]\n"
            "assert v.spec.build().in_features > 0\n"
            "print('hypothesis' in sys.modules)\n")
    r = without(["hypothesis"], code)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


@pytest.mark.parametrize("module", ["typer", "rich"])
def test_the_command_without_the_cli_extra_says_what_to_install(module):
    r = without([module], "import runpy; runpy.run_module('exl2', run_name='__main__')", "inspect", "x")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "pip install 'exl2[cli]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_verb_without_its_extra_says_what_to_install(tmp_path):
    """``exl2 conformance run`` draws random layers with hypothesis (the conformance extra)."""
    code = "import runpy; runpy.run_module('exl2', run_name='__main__')"
    r = without(["hypothesis"], code, "conformance", "run", "--examples", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"exl2: error: {install_hint('hypothesis')}", r.stderr


def test_fast_without_triton_says_what_to_install():
    code = ("import exl2.fast\n"
            "try:\n"
            "    exl2.fast.dequantize\n"
            "except ModuleNotFoundError as e:\n"
            "    print(e)\n")
    r = without(["triton"], code)
    assert r.returncode == 0 and "pip install 'exl2[fast]'" in r.stdout, r.stdout + r.stderr


def test_importing_the_fast_path_changes_nothing_in_the_process():
    """No TRITON_INTERPRET, no triton import; the kernels load on first use."""
    code = ("import os, exl2.fast\n"
            "print(os.environ.get('TRITON_INTERPRET'), 'triton' in sys.modules)\n")
    r = without([], code)
    assert r.returncode == 0 and r.stdout.split() == ["None", "False"], r.stdout + r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU")
def test_without_a_gpu_the_fast_path_says_how_to_opt_in():
    code = ("import torch\n"
            "from exl2 import QParams, fast, reference\n"
            "qm = reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0]))\n"
            "try:\n"
            "    fast.dequantize(qm)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    r = without([], code)
    assert r.returncode == 0 and "exl2.fast.use_interpreter()" in r.stdout and "TRITON_INTERPRET=1" in r.stdout, \
        r.stdout + r.stderr


def test_the_interpreter_opt_in_works_before_triton_and_refuses_after():
    opted = ("import torch\n"
             "from exl2 import QParams, fast, reference\n"
             "fast.use_interpreter()\n"
             "qm = reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0]))\n"
             "print(fast.interpreted(), torch.equal(fast.dequantize(qm), reference.dequantize(qm)))\n")
    r = without([], opted)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stdout + r.stderr
    late = ("import triton\n"
            "from exl2 import fast\n"
            "try:\n"
            "    fast.use_interpreter()\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    r = without([], late)
    assert r.returncode == 0 and "too late" in r.stdout, r.stdout + r.stderr


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_are_torch_numpy_safetensors():
    assert names(project()["dependencies"]) == {"torch", "numpy", "safetensors"}


def test_each_optional_package_is_in_the_extra_its_hint_names():
    extras = project()["optional-dependencies"]
    for module, extra in EXTRA_OF.items():
        assert module in names(extras[extra]), (module, extra)
    assert set(extras["all"][0].partition("[")[2].rstrip("]").split(",")) == set(extras) - {"all", "dev"}


def test_requirements_txt_pins_every_dependency():
    """README's set-up (``pip install -r requirements.txt -e .``) installs everything."""
    pinned = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    extras = project()["optional-dependencies"]
    wanted = names(project()["dependencies"]) | set().union(*(names(reqs) for reqs in extras.values())) - {"exl2"}
    assert wanted <= pinned, wanted - pinned


def test_the_pytest_plugin_is_not_loaded_automatically():
    """No pytest11 entry point: the plugin would load in every pytest run of every project that
    installs exl2. Projects opt in (docs/porting.md)."""
    assert "pytest11" not in project().get("entry-points", {})
