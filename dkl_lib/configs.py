"""Experiment config files (``configs/*.yaml``): load, validate, turn into a command line.

A config file names a preset of :mod:`dkl_lib.experiments` and the dotted overrides to apply on top
of it (the format :func:`dkl_lib.experiments.resolve_config` and
:func:`~dkl_lib.experiments.resolve_adv_config` accept), plus the task, the losses and the seeds::

    name: kd_cifar100_resnet56_resnet20     # optional (default: the file name without .yaml)
    task: kd                                # kd | adv
    description: one line                   # optional
    preset: paper
    losses: [kl, dkd, ikl-nogi]
    seeds: [0, 1, 2]
    overrides:                              # optional
      teacher.model: resnet56
      losses.ikl.alpha: 4.0
    sources: [...]                          # optional: where the values come from
    unverified: [...]                       # optional: what could not be checked
    notes: [...]                            # optional

:func:`load_config` reads and validates a file (every override goes through the resolver, so an
unknown key fails here rather than hours into a run) and returns a plain dict;
:func:`config_to_cli` gives the equivalent arguments of ``python -m dkl_lib.experiments`` and
:func:`config_command` the whole command as one shell string. From a shell::

    python -m dkl_lib.configs configs/kd_cifar100_resnet56_resnet20.yaml --out runs/res56_res20
    python -m dkl_lib.configs --check configs/*.yaml

See ``configs/README.md`` for the files shipped with the repository and where their values come from.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import _paths
from ._checks import check_seeds, tolerant_console

__all__ = [
    "TASKS",
    "config_dir",
    "list_configs",
    "load_config",
    "config_to_cli",
    "config_command",
    "main",
]

#: Tasks a config can describe: knowledge distillation and adversarial training.
TASKS = ("kd", "adv")
_REQUIRED = ("task", "preset", "losses", "seeds")
_OPTIONAL = ("name", "description", "overrides", "sources", "unverified", "notes")


def config_dir() -> Path:
    """The repository's ``configs/`` folder (found from this file, like ``default_runs_dir``; for a
    package installed outside a clone, ``configs/`` of the working directory)."""
    return _paths.home() / "configs"


def list_configs(folder=None) -> List[Path]:
    """The ``*.yaml`` / ``*.yml`` files of ``folder`` (default :func:`config_dir`), sorted by name."""
    folder = Path(folder) if folder is not None else config_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"no config folder at {folder} (outside a clone of the repository, name the "
                                "config files: python -m dkl_lib.configs FILE ...)")
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _fail(path, message: str):
    raise ValueError(f"{path}: {message}")


def _read_yaml(path: Path):
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml ships with jupyter
        raise ImportError("reading config files needs PyYAML: pip install pyyaml") from err
    try:
        text = path.read_text(encoding="utf-8")  # not the locale's (cp1252 on Windows): the files hold ε, ±, T²
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file at {path}") from None
    try:
        return yaml.load(text, Loader=_strict_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        _fail(path, f"{'refused' if getattr(err, 'refused', False) else 'not valid YAML'}: {err}")


def _strict_loader(yaml):
    """PyYAML's SafeLoader, less two YAML 1.1 surprises that would change a run without a word: a key
    written twice in one mapping (YAML keeps the last: a second ``seeds:`` line replaces the first) and
    integers written with a leading zero (octal: ``010`` is 8) or with colons (base 60: ``1:30`` is 90)."""
    from yaml.constructor import ConstructorError

    class StrictLoader(yaml.SafeLoader):
        pass

    def refuse(problem, node):
        err = ConstructorError(None, None, problem, node.start_mark)
        err.refused = True  # (valid YAML, refused here: _read_yaml says so)
        raise err

    def mapping(loader, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:  # (a list as a key: construct_mapping reports it)
                continue
            if key in lines:
                refuse(f"the key {key!r} is written twice (lines {lines[key]} and {line}); YAML would keep only "
                       "the last one", key_node)
            lines[key] = line
        return loader.construct_mapping(node, deep=deep)

    def integer(loader, node):
        text = loader.construct_scalar(node)
        digits = text.lstrip("+-")
        if ":" in text or (len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXbB"):
            refuse(f"the number {text} would be read as {'base 60' if ':' in text else 'octal'} "
                   f"({loader.construct_yaml_int(node)}); write it without leading zeros or colons", node)
        return loader.construct_yaml_int(node)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    StrictLoader.add_constructor("tag:yaml.org,2002:int", integer)
    return StrictLoader


def _looks_numeric(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return value.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _check_no_numeric_strings(path, key: str, value) -> None:
    """PyYAML (YAML 1.1) reads 5e-4 as a string; a number written that way would reach the
    trainer as text. Refuse it here with the fix."""
    if isinstance(value, str) and _looks_numeric(value):
        _fail(path, f"override {key!r} is the string {value!r}; YAML reads numbers like 5e-4 as text, "
                    f"write 0.0005 or 5.0e-4 (with a dot) for a number")
    if isinstance(value, str) and "/" in value and all(_looks_numeric(p) for p in value.split("/", 1)):
        _fail(path, f"override {key!r} is the string {value!r}; write the number itself "
                    f"(e.g. 0.03137254901960784 for 8/255)")
    if isinstance(value, list):
        for item in value:
            _check_no_numeric_strings(path, key, item)
    if isinstance(value, dict):
        for sub, item in value.items():
            _check_no_numeric_strings(path, f"{key}.{sub}", item)


def _string_list(path, raw: dict, key: str) -> List[str]:
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(path, f"{key!r} must be a list of strings")
    return list(value)


def _resolve(task: str, preset: str, overrides: dict) -> dict:
    from . import experiments

    if task == "kd":
        return experiments.resolve_config(preset, overrides)
    resolver = getattr(experiments, "resolve_adv_config", None)
    if resolver is None:  # pragma: no cover - only while the adversarial engine is absent
        return {"preset": preset, "overrides": dict(overrides)}
    return resolver(preset, overrides)


def _known_losses(task: str) -> Sequence[str]:
    from . import experiments

    return experiments.GRID_LOSSES if task == "kd" else getattr(experiments, "ADV_LOSSES", ())


def _known_presets(task: str) -> Sequence[str]:
    from . import experiments

    return sorted(experiments.PRESETS if task == "kd" else getattr(experiments, "ADV_PRESETS", {}))


def load_config(path) -> dict:
    """Read and validate the experiment config file ``path``.

    Checks: the file is YAML mapping with only the known keys (see the module docstring); ``task``
    is "kd" or "adv"; ``preset`` names a preset of that task (:data:`dkl_lib.experiments.PRESETS`
    / ``ADV_PRESETS``); ``losses`` are known loss names (``GRID_LOSSES`` / ``ADV_LOSSES``) without
    repeats; ``seeds`` are distinct non-negative integers; ``name`` is one plain folder name (no
    '/', '\\', '..' or leading '.'); every override is accepted by the resolver
    (:func:`dkl_lib.experiments.resolve_config` for kd, ``resolve_adv_config`` for adv, which also
    checks types and ranges, and refuses inf and nan), and no override holds a number that YAML
    read as text (``5e-4``, ``8/255``).

    Returns:
        dict with ``path`` (str), ``name``, ``task``, ``description``, ``preset``, ``overrides``
        (dotted key → value, in file order), ``losses`` (list of str), ``seeds`` (list of int),
        ``sources``, ``unverified``, ``notes`` (lists of str) and ``resolved``: the full resolved
        config (the preset with the overrides applied).

    Raises:
        FileNotFoundError: no such file.
        ValueError: anything invalid; the message starts with the file's path and names the
            offending key (for an override the resolver refuses, the resolver's reason follows).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the config file's path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        _fail(path, f"must hold a YAML mapping (key: value lines), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        _fail(path, f"missing key(s) {missing}")

    task = raw["task"]
    if task not in TASKS:
        _fail(path, f"task must be one of {list(TASKS)}, got {task!r}")
    preset = raw["preset"]
    presets = _known_presets(task)
    if not isinstance(preset, str) or (presets and preset not in presets):
        _fail(path, f"unknown {task} preset {preset!r}; choose one of {list(presets)}")

    losses = raw["losses"]
    if isinstance(losses, str):
        losses = [s.strip() for s in losses.split(",") if s.strip()]
    if not isinstance(losses, list) or not losses or not all(isinstance(s, str) for s in losses):
        _fail(path, f"'losses' must be a non-empty list of loss names, got {raw['losses']!r}")
    known = _known_losses(task)
    for loss in losses:
        if known and loss not in known:
            _fail(path, f"unknown {task} loss {loss!r} in 'losses'; choose from {list(known)}")
    if len(set(losses)) != len(losses):
        _fail(path, f"'losses' lists a loss twice: {losses}")

    seeds = raw["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    try:
        seeds = check_seeds("'seeds'", seeds)
    except ValueError as err:
        _fail(path, str(err))

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        _fail(path, f"'overrides' must be a mapping of dotted keys to values, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or key != key.strip() or ".." in key or key.startswith(".") \
                or key.endswith("."):
            _fail(path, f"override key {key!r} is not a dotted path like 'distill.lr'")
        _check_no_numeric_strings(path, key, value)

    try:
        resolved = _resolve(task, preset, overrides)
    except (ValueError, TypeError, KeyError):
        # find the first override the resolver refuses, so the message can name it
        accepted: Dict[str, object] = {}
        for key, value in overrides.items():
            try:
                _resolve(task, preset, {**accepted, key: value})
            except (ValueError, TypeError, KeyError) as err:
                _fail(path, f"override {key!r} is refused: {err}")
            accepted[key] = value
        raise  # not caused by one override (should not happen): the resolver's own error

    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        _fail(path, "'description' must be a string")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        _fail(path, "'name' must be a non-empty string")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or name != name.strip():
        _fail(path, f"'name' must be one plain folder name (it names the results folder runs/<name>): no '/', "
                    f"'\\', '..', leading '.' or surrounding spaces, got {name!r}")
    return {
        "path": str(path),
        "name": name,
        "task": task,
        "description": description or "",
        "preset": preset,
        "overrides": dict(overrides),
        "losses": list(losses),
        "seeds": [int(s) for s in seeds],
        "sources": _string_list(path, raw, "sources"),
        "unverified": _string_list(path, raw, "unverified"),
        "notes": _string_list(path, raw, "notes"),
        "resolved": resolved,
    }


def _encode(value) -> str:
    """The text of an ``--override key=TEXT`` that the CLI parses back to ``value``: the CLI reads
    TEXT as JSON and falls back to the raw string, so a plain string stays raw unless it would parse
    as JSON (e.g. "true", "1"), and everything else is JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except (json.JSONDecodeError, ValueError):
            return value
        return json.dumps(value)
    return json.dumps(value, allow_nan=False)


def config_to_cli(cfg: dict, *, out=None) -> List[str]:
    """The arguments of ``python -m dkl_lib.experiments`` equivalent to a loaded config.

    ``[task, "--preset", P, "--losses", "a,b", "--seeds", "0,1", "--override", "k=v", ...]`` with
    one ``--override`` per override in file order (values JSON-encoded where needed, so the CLI
    parses them back to the same values), then ``--out OUT`` when ``out`` is given (the CLI
    requires it without ``--config``). ``cfg`` is what :func:`load_config` returns.
    """
    for key in ("task", "preset", "losses", "seeds"):
        if key not in cfg:
            raise ValueError(f"config has no {key!r}; pass what load_config returns")
    args = [cfg["task"], "--preset", cfg["preset"], "--losses", ",".join(cfg["losses"]),
            "--seeds", ",".join(str(int(s)) for s in cfg["seeds"])]
    for key, value in (cfg.get("overrides") or {}).items():
        try:
            text = _encode(value)
        except ValueError as err:  # inf or nan: JSON, hence the command line, has no spelling for it
            raise ValueError(f"override {key!r} = {value!r} cannot be written on a command line: {err}") from None
        args += ["--override", f"{key}={text}"]
    if out is not None:
        args += ["--out", str(out)]
    return args


#: Quote printed commands for Windows (cmd.exe and PowerShell take "double quotes", not 'single' ones).
_WINDOWS = os.name == "nt"


def config_command(cfg: dict, *, out=None, python: str = "python") -> str:
    """The whole command as one shell-quoted string: ``python -m dkl_lib.experiments ...`` (POSIX shell
    quoting; on Windows the double quotes of its command lines)."""
    args = [python, "-m", "dkl_lib.experiments", *config_to_cli(cfg, out=out)]
    return subprocess.list2cmdline(args) if _WINDOWS else shlex.join(args)


def _default_out(cfg: dict) -> Path:
    """Where ``python -m dkl_lib.experiments TASK --config FILE`` puts the results without ``--out``, as an
    absolute path (so the printed command means the same from any folder)."""
    from .experiments import default_runs_dir

    return (default_runs_dir() / cfg["name"]).absolute()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dkl_lib.configs FILE... [--out DIR] [--check]``: validate the files and print the
    equivalent ``python -m dkl_lib.experiments`` command of each (``--check``: only validate), whose
    ``--out`` is DIR, else the absolute path of the folder ``--config FILE`` would write to."""
    parser = argparse.ArgumentParser(prog="python -m dkl_lib.configs",
                                     description="Validate experiment config files and print their command lines.")
    parser.add_argument("files", nargs="*", help="config files (default: every file in configs/)")
    parser.add_argument("--out", default=None,
                        help="results folder to put in the command (--out; default: the absolute path of the "
                             "folder `--config FILE` writes to, $DKL_RUNS_DIR/<name> or <repository>/runs/<name>)")
    parser.add_argument("--check", action="store_true", help="only validate; print one line per file")
    tolerant_console()
    args = parser.parse_args(argv)
    try:
        files = [Path(f) for f in args.files] or list_configs()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    status = 0
    for path in files:
        try:
            cfg = load_config(path)
            if args.check:
                line = (f"ok  {path}  ({cfg['task']}, preset {cfg['preset']}, {len(cfg['losses'])} losses x "
                        f"{len(cfg['seeds'])} seeds)")
            else:
                line = config_command(cfg, out=args.out if args.out is not None else _default_out(cfg))
        except (ValueError, TypeError, FileNotFoundError) as err:
            text = str(err)
            if not text.startswith(str(path)):  # load_config's messages start with the file already
                text = f"{path}: {text}"
            print(f"error: {text}", file=sys.stderr)
            status = 2
            continue
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
