"""Configuration: ``configs/base.yaml`` + an experiment file (+ its ``_base_`` chain) + ``key=value`` overrides.

``configs/base.yaml`` is the schema: every key the code reads. Anything else is rejected with the nearest valid key,
a value whose type contradicts the schema is rejected, and keys left at ``???`` must be set. The resolved config is
saved as ``<run.out_dir>/config.yaml`` and every tool can reload it (``--run-dir RUN_DIR``).

Command line (all tools): ``--config FILE`` or ``--run-dir RUN_DIR``, then ``key=value`` overrides, e.g.
``python -m tools.train --config configs/voc.yaml data.root=/data/VOC2012 train.max_iters=100``.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.io import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
BASE_KEY = "_base_"
# Mappings whose sub-keys are free-form (passed straight to a library), so they are not checked against the schema.
OPEN_NODES = ("model.backbone_kwargs",)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file."""


def _leaf_items(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.key, value)`` for every leaf; lists and open nodes are leaves."""
    if isinstance(node, (dict, DictConfig)) and prefix not in OPEN_NODES:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for key, value in items:
            yield from _leaf_items(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _schema() -> dict[str, Any]:
    with open(BASE_CONFIG) as f:
        return dict(_leaf_items(yaml.safe_load(f)))


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelt leaf under a correct section, e.g. train.max_iter
        section = key.rsplit(".", 1)[0]
        close = difflib.get_close_matches(key, [k for k in valid if k.startswith(section + ".")], n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "mapping"
    return "string"


def _check_types(key: str, default: Any, value: Any, source: str) -> None:
    """Reject values whose kind contradicts the schema default (null defaults and ??? accept anything)."""
    if default is None or default == "???" or value is None or value == "???":
        return
    if isinstance(value, str) and value.startswith("${"):  # OmegaConf interpolation, checked when resolved
        return
    want, got = _type_name(default), _type_name(value)
    if isinstance(default, int) and not isinstance(default, bool):  # counts stay integers (range(), indexing)
        want = "integer"
        got = "integer" if isinstance(value, int) and not isinstance(value, bool) else got
    if want != got:
        article = "an" if want[0] in "aeiou" else "a"
        raise ConfigError(
            f"config key '{key}' from {source} expects {article} {want} (default {default!r}), got {value!r}"
        )


def _validate(node: Any, schema: dict[str, Any], source: str) -> None:
    valid = sorted(schema)
    for key, value in _leaf_items(node):
        if key in schema:
            _check_types(key, schema[key], value, source)
            continue
        if any(key.startswith(open_node + ".") for open_node in OPEN_NODES):
            continue
        # A mapping given where the schema has a leaf, or a key missing from the schema altogether.
        raise ConfigError(f"unknown config key '{key}' in {source}{_suggest(key, valid)}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The files to merge, furthest ancestor first, following ``_base_`` (relative to each file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files include each other in a cycle: {' -> '.join(map(str, (*seen, path)))}")
    data = _read_yaml(path)
    parent = data.pop(BASE_KEY, None)
    chain = [] if parent is None else _file_chain((path.parent / parent), (*seen, path))
    if path == BASE_CONFIG.resolve():
        return []
    return [*chain, (path, data)]


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override {item!r} must look like key=value (e.g. train.max_iters=100)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; on a command line it means a number
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item!r} conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), require: bool = True) -> DictConfig:
    """Build the read-only config: base.yaml <- ``path`` (and its ``_base_`` chain) <- ``overrides``.

    Args:
        path: an experiment YAML file (or a run's saved ``config.yaml``); None = base.yaml alone.
        overrides: ``key=value`` strings; values are parsed as YAML (``[1, 2]``, ``null``, ``1e-4``).
        require: raise if a ``???`` key is still unset.

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a wrongly typed value, a missing file, or an unset
            required key.
    """
    schema = _schema()
    cfg = OmegaConf.create(_read_yaml(BASE_CONFIG))
    layers = [] if path is None else [(str(p), data) for p, data in _file_chain(Path(path))]
    layers.append(("the command line", _parse_overrides(overrides)))
    for source, data in layers:
        _validate(data, schema, source)
        cfg = OmegaConf.merge(cfg, data)
    if require:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            hint = " ".join(f"{key}=..." for key in missing)
            raise ConfigError(f"required config key(s) not set: {', '.join(missing)} (add {hint} to the command)")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically) and return the path."""
    target = Path(run_dir) / "config.yaml"
    atomic_write_text(target, to_yaml(cfg))
    return target


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Reload a run's saved config, with optional overrides (e.g. another data.root on another machine)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {path} not found (train first or pass --config)")
    return load_config(path, overrides)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared command line: ``--config FILE`` | ``--run-dir RUN_DIR`` followed by ``key=value`` overrides."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="experiment YAML (merged over configs/base.yaml)")
    source.add_argument("--run-dir", dest="run", type=Path, help="a run folder; its config.yaml is reloaded")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_iters=100")


def config_from_args(args: argparse.Namespace) -> DictConfig:
    """Load the config named by :func:`add_config_arguments`' arguments.

    With ``--run-dir`` and no explicit ``run.out_dir`` override, outputs go into that run folder.
    """
    if args.run is not None:
        overrides = list(args.overrides)
        if not any(o.startswith("run.out_dir=") for o in overrides):
            overrides.append(f"run.out_dir={args.run}")
        return load_run_config(args.run, overrides)
    return load_config(args.config, args.overrides)
