"""The Keras tests on every backend, and the lazy, typed import of dynamic_moe_router.keras.

Keras picks its backend once per process, at import. The other test_keras_*.py modules run in the
pytest process on its backend (TensorFlow unless KERAS_BACKEND says otherwise); this module reruns
them in a fresh interpreter for each other backend of BACKENDS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

keras = pytest.importorskip("keras")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKENDS = ("tensorflow", "jax")
MODULES = sorted(
    str(p.relative_to(ROOT)) for p in HERE.glob("test_keras_*.py") if p.name != Path(__file__).name
)
INNER = "DMR_KERAS_INNER_RUN"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != keras.backend.backend()])
def test_keras_modules_pass_on_other_backend(backend):  # type: ignore[no-untyped-def]
    if os.environ.get(INNER):
        pytest.skip("already inside a per-backend run")
    pytest.importorskip(backend)
    assert len(MODULES) >= 4, MODULES
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *MODULES],
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": backend, INNER: "1", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]  # e.g. "201 passed, 6 warnings in 150.2s"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 100 and "failed" not in summary and "error" not in summary, tail


def test_backend_of_this_process_is_one_of_the_tested():  # type: ignore[no-untyped-def]
    assert keras.backend.backend() in BACKENDS


def test_importing_the_library_does_not_import_keras_or_tensorflow():  # type: ignore[no-untyped-def]
    proc = run_python(
        "import sys, dynamic_moe_router as dmr; dmr.route; "
        "print(sorted(m for m in ('keras', 'tensorflow', 'keras_hub', 'jax') if m in sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("blocked", ["keras", "keras_hub"])
def test_missing_extra_raises_missing_dependency_error(blocked):  # type: ignore[no-untyped-def]
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "import dynamic_moe_router as dmr\n"
        "try:\n"
        "    import dynamic_moe_router.keras as dk\n"
        "    from dynamic_moe_router.keras.tiny import tiny_hub_backbone\n"
        "    tiny_hub_backbone('mixtral')\n"
        "except dmr.MissingDependencyError as err:\n"
        "    print('MissingDependencyError:', err)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MissingDependencyError:"), proc.stdout
    assert 'pip install "dynamic-moe-router-kit[tf]"' in proc.stdout and repr(blocked) in proc.stdout
