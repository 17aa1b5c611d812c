"""YAML configs with ``_base_`` inheritance and ``-o key.path=value`` overrides.

Rules (also in docs/config.md):

* ``_base_: path`` or ``_base_: [a.yaml, b.yaml]`` (relative to the file) loads the
  bases first, later ones winning, then deep-merges this file on top.
* In a child file, a mapping with ``_replace_: true`` replaces the base's mapping
  at that key instead of being merged into it.
* ``-o ~a.b.c`` deletes a key (e.g. a key the new ``name:`` of a block does not take).
* ``-o a.b.c=value`` sets an existing key; the value is parsed as YAML
  (``-o epochs=5``, ``-o x.y=[224,96]``, ``-o amp.enable=true``). A list element
  is addressed by its index (``-o hooks.0.interval=2``). Setting a key that does
  not exist is an error with a did-you-mean, unless it is spelled ``+a.b.c=value``,
  which adds it.
* Top-level keys must be one of :data:`TOP_LEVEL_KEYS`; keys inside a block are
  checked when the block is built (:mod:`passl.registry`).

Every mapping of a loaded config is a :class:`ConfigDict` that knows its dotted
key path and the file it came from, so errors raised while building can name both.
"""
import copy
import difflib
import functools
import glob
import os

import yaml

from passl.errors import ConfigError
from passl.io.safe_write import write_text_atomic
from passl.registry import did_you_mean

#: Top-level keys a config may have, and what reads them.
TOP_LEVEL_KEYS = {
    "epochs": "number of training epochs (Trainer)",
    "output_dir": "where config.yaml, train.log, metrics.jsonl and checkpoints go (Trainer)",
    "seed": "seed for python, numpy and paddle (passl.runtime)",
    "device": "auto | cpu | gpu (passl.runtime)",
    "deterministic": "true: Paddle's deterministic cuDNN/GPU kernel flags (passl.runtime)",
    "threads": "CPU threads per process; 'auto' = cores / processes (passl.runtime)",
    "model": "the architecture block, MODELS registry (Trainer)",
    "dataloader": "train/val blocks with dataset, sampler, loader (passl.data.loader)",
    "optimizer": "OPTIMIZERS block (Trainer)",
    "lr_scheduler": "LR_SCHEDULERS block (Trainer)",
    "hooks": "list of HOOKS blocks (Trainer)",
    "amp": "mixed precision: enable, dtype, level (Trainer)",
    "sync_bn": "convert BatchNorm to SyncBatchNorm on GPU with several processes (Trainer)",
    "grad_clip": "max global gradient norm, or null (Trainer)",
    "log_interval": "iterations between metrics records (Trainer)",
    "eval_interval": "epochs between evaluations when a val loader exists (Trainer)",
}

BASE_KEY = "_base_"
REPLACE_KEY = "_replace_"


class ConfigDict(dict):
    """A dict with attribute access that remembers its key path and source file."""

    def __init__(self, *args, key_path="", source=None, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "key_path", key_path)
        object.__setattr__(self, "source", source)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        return ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()},
                          key_path=self.key_path, source=self.source)

    def to_dict(self):
        """A plain dict/list copy (for YAML dumps and checkpoints)."""
        return to_plain(self)


def to_plain(value):
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _wrap(value, key_path, source):
    """Turn nested dicts into ConfigDicts carrying their key path."""
    if isinstance(value, dict):
        return ConfigDict({k: _wrap(v, f"{key_path}.{k}" if key_path else str(k), source)
                           for k, v in value.items()}, key_path=key_path, source=source)
    if isinstance(value, list):
        return [_wrap(v, f"{key_path}.{i}", source) for i, v in enumerate(value)]
    return value


def _shown(path):
    """``path`` as a user types it: relative to the current folder when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def similar_config_files(path, n=3):
    """The existing YAML files (absolute paths) whose names are closest to the missing ``path`` (a mistyped
    ``-c``): looked for in its folder or, when that folder is missing too, in the folders
    beside it (``configs/swavv/x.yaml`` finds ``configs/swav/x.yaml``)."""
    folder = os.path.dirname(os.path.abspath(path))
    search = folder if os.path.isdir(folder) else os.path.dirname(folder)
    pattern = "*" if search == folder else os.path.join("*", "*")
    candidates = {os.path.relpath(found, search): found
                  for ext in ("yaml", "yml")
                  for found in glob.glob(os.path.join(search, f"{pattern}.{ext}"))}
    wanted = os.path.relpath(os.path.abspath(path), search)
    close = difflib.get_close_matches(wanted, sorted(candidates), n=n, cutoff=0.6)
    return [candidates[name] for name in close]


def _missing_file_hint(path, shown=_shown):
    """' (did you mean: a, b?)' with :func:`similar_config_files`, each path as ``shown``."""
    close = [shown(found) for found in similar_config_files(path)]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {_shown(path)}{_missing_file_hint(path)}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_yaml_error_place(path, e)}: not valid YAML: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def _yaml_error_place(path, error):
    """``path:line:column`` of a YAML syntax error (1-based), or ``path`` when unknown."""
    mark = getattr(error, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path


def merge(base, child):
    """Deep-merge ``child`` into a copy of ``base``; ``_replace_: true`` replaces instead."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and value.get(REPLACE_KEY):
            out[key] = {k: v for k, v in value.items() if k != REPLACE_KEY}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _strip_replace_keys(value):
    if isinstance(value, dict):
        return {k: _strip_replace_keys(v) for k, v in value.items() if k != REPLACE_KEY}
    if isinstance(value, list):
        return [_strip_replace_keys(v) for v in value]
    return value


def _load_with_bases(path, seen):
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: _base_ inheritance cycle through {' -> '.join(seen)}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            as_written = functools.partial(os.path.relpath, start=os.path.dirname(path))
            raise ConfigError(f"{path}: _base_ file not found: {base} (looked for {base_path})"
                              f"{_missing_file_hint(base_path, shown=as_written)}")
        merged = merge(merged, _load_with_bases(base_path, seen + [path]))
    return merge(merged, data)


DELETE_PREFIX = "~"


def parse_override(text):
    """Split ``'a.b=value'`` into (['a', 'b'], parsed value, add_new)."""
    if "=" not in text:
        raise ConfigError(f"-o {text}: expected key.path=value (e.g. -o epochs=5) or ~key.path "
                          f"to delete a key")
    key, raw = text.split("=", 1)
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"-o {text}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return key.split("."), value, add


def delete_key(cfg, text, source):
    """Apply one ``-o ~a.b.c``: remove that key (a list item by index) from ``cfg``."""
    parts = text[len(DELETE_PREFIX):].strip().split(".")
    node = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth + 1])
        if isinstance(node, list) and part.lstrip("-").isdigit() \
                and -len(node) <= int(part) < len(node):
            part = int(part)
        elif not isinstance(node, dict) or part not in node:
            keys = node.keys() if isinstance(node, dict) else []
            raise ConfigError(f"-o {text}: no key {here!r} to delete in {source}"
                              f"{did_you_mean(parts[depth], keys)}")
        if depth == len(parts) - 1:
            del node[part]
        else:
            node = node[part]


def apply_override(cfg, text, source):
    """Apply one ``-o`` override to the plain dict ``cfg`` in place."""
    if text.startswith(DELETE_PREFIX):
        delete_key(cfg, text, source)
        return
    parts, value, add = parse_override(text)
    node = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"-o {text}: {here} is not an index of a list of {len(node)} items")
            part = int(part)
            exists = True
        elif isinstance(node, dict):
            exists = part in node
        else:
            raise ConfigError(f"-o {text}: {'.'.join(parts[:depth])} is a value, not a mapping")
        if not exists:
            if not add:
                hint = did_you_mean(part, node.keys())
                raise ConfigError(
                    f"-o {text}: no key {here!r} in {source}{hint}; "
                    f"to add a new key write -o +{'.'.join(parts)}=...")
            if not last:
                node[part] = {}
        if last:
            node[part] = value
        else:
            node = node[part]


def check_top_level(cfg, source):
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{source}: unknown top-level key {key!r}"
                              f"{did_you_mean(key, TOP_LEVEL_KEYS)}; valid keys: "
                              f"{', '.join(TOP_LEVEL_KEYS)}")


def load_config(path, overrides=()):
    """Load ``path`` with its bases and overrides into a validated :class:`ConfigDict`."""
    data = _strip_replace_keys(_load_with_bases(path, []))
    check_top_level(data, path)
    for text in overrides:
        apply_override(data, text, path)
    check_top_level(data, path)
    return _wrap(data, "", path)


def config_from_dict(data, source):
    """A validated :class:`ConfigDict` of a config assembled in code (``source`` names it in
    errors), as :func:`load_config` would return it for the same YAML."""
    data = to_plain(data)
    check_top_level(data, source)
    return _wrap(data, "", source)


def save_config(cfg, path):
    """Write the resolved config as YAML (what the run really used), whole or not at all."""
    write_text_atomic(path, yaml.safe_dump(to_plain(cfg), sort_keys=False,
                                           default_flow_style=None))
