"""The API reference users read through help(dkl.<module>) and Shift-Tab: pydoc lists only the names of a
module's ``__all__``, so every public function and class a module defines must be in it, with a docstring."""
import importlib
import inspect

import pytest

MODULES = ("losses", "grads", "prior", "analysis", "data", "models", "train", "experiments", "attacks",
           "distributed", "configs", "plots", "widgets", "profiling")


def _defined_here(module):
    """Public functions and classes defined in ``module`` itself (not imported into it)."""
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__}


@pytest.mark.parametrize("name", MODULES)
def test_public_functions_and_classes_are_exported(name):
    module = importlib.import_module(f"dkl_lib.{name}")
    exported = set(module.__all__)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []
    assert sorted(set(_defined_here(module)) - exported) == []


@pytest.mark.parametrize("name", MODULES)
def test_exported_functions_and_classes_have_docstrings(name):
    module = importlib.import_module(f"dkl_lib.{name}")
    undocumented = []
    for public, obj in _defined_here(module).items():
        doc = inspect.getdoc(obj) or ""
        # a dataclass without a docstring gets its signature as __doc__: "Name(field: type, ...)"
        if not doc.strip() or doc.startswith(f"{public}("):
            undocumented.append(public)
    assert undocumented == []


def test_make_refuses_a_too_old_python_before_installing_anything(tmp_path):
    """`make lab` / `make test` with a Python 3.9 used to spend minutes installing the requirements into a
    new .venv and then fail inside pip on requires-python; the Makefile now says which Python it needs
    before it creates anything."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.fail("make is not installed (the README's two commands need it)")
    root = Path(__file__).resolve().parents[1]
    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy(root / name, tmp_path / name)
    def fake_python(version):  # runs make's `-c` check as that version; stops at anything else
        path = tmp_path / f"python{version[:4]}"
        path.write_text(f"#!{sys.executable}\nimport sys\nif sys.argv[1] != '-c':\n    sys.exit('venv step reached')\n"
                        f"sys.version_info, sys.version = {tuple(map(int, version.split('.')))}, '{version} (fake)'\n"
                        "exec(sys.argv[2])\n")
        path.chmod(0o755)
        return path

    def setup(python):
        return subprocess.run(["make", "-C", str(tmp_path), "setup", f"PYTHON={python}"], capture_output=True,
                              text=True, timeout=60)

    old = fake_python("3.9.18")
    proc = setup(old)
    assert proc.returncode != 0
    assert f"dkl_lib needs Python >= 3.10, but {old} is 3.9.18" in proc.stderr
    assert not (tmp_path / ".venv").exists()
    # the same check lets a good interpreter through, to the venv step (stopped there by the fake)
    proc = setup(fake_python("3.12.1"))
    assert "needs Python" not in proc.stderr and "venv step reached" in proc.stderr



def test_the_package_metadata_asks_for_what_requirements_txt_asks_for():
    """pip install of the library alone reads pyproject.toml; make reads requirements.txt. Every
    dependency the package declares (extras included) must carry the same lower bound as there, and the
    core ones must be what `import dkl_lib` and training need."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = (root / "pyproject.toml").read_text(encoding="utf-8")
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)(>=[0-9.]+)"', project.split("[project]", 1)[1].split("[tool.", 1)[0]))
    required = dict(re.findall(r"^([A-Za-z0-9_.-]+)(>=[0-9.]+)\s*$", (root / "requirements.txt").read_text(encoding="utf-8"),
                               re.M))
    assert {"torch", "torchvision", "numpy", "pandas", "scikit-learn", "tqdm", "pyyaml",
            "adversarial-robustness-toolbox", "multiprocess", "plotly", "ipywidgets"} <= set(declared)
    assert {name: bound for name, bound in declared.items()} == {name: required.get(name) for name in declared}
