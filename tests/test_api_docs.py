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
