"""Name -> class registries, and one ``build()`` that turns a config block into an object.

A config block is a mapping with a ``name`` key that selects the registered
class; every other key is passed as a keyword argument. Unknown names and
keyword arguments the class does not accept are reported as
:class:`~passl.errors.ConfigError` naming the registry, the config key path and
the closest valid choices, instead of a ``KeyError``/``TypeError`` from deep
inside the constructor.
"""
import difflib
import inspect

from passl.errors import ConfigError


def key_path_of(cfg, fallback="<config>"):
    """The dotted config path of ``cfg`` (set by :mod:`passl.config`), or ``fallback``."""
    return getattr(cfg, "key_path", None) or fallback


def source_of(cfg):
    """' (in FILE)' when ``cfg`` remembers the YAML file it came from, else ''."""
    source = getattr(cfg, "source", None)
    return f" (in {source})" if source else ""


def did_you_mean(word, choices, n=3):
    """A ' (did you mean: a, b?)' hint for ``word`` among ``choices``, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def check_keys(keys, accepted, path, source="", owner=None):
    """ConfigError for the first of ``keys`` not in ``accepted``: its key path, the closest
    accepted key and the whole list (``owner``: the class that rejects it, if any)."""
    for key in keys:
        if key not in accepted:
            what = f"{owner} does not accept {key!r}" if owner else "unknown key"
            raise ConfigError(f"{path}.{key}{source}: {what}{did_you_mean(key, accepted)}; "
                              f"accepted keys: {', '.join(accepted)}")


def accepted_kwargs(obj):
    """Keyword names ``obj`` (a class or function) accepts, or None when it takes ``**kwargs``."""
    if inspect.isclass(obj) and obj.__init__ is object.__init__:
        return []  # no constructor of its own: takes no arguments
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]  # self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def required_kwargs(obj):
    """Keyword names ``obj`` needs that have no default value."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


class Registry:
    """A named table of classes (or factory functions) that config blocks refer to by name."""

    def __init__(self, name):
        self.name = name
        self._items = {}
        self._origins = {}

    def __contains__(self, name):
        return name in self._items

    def __len__(self):
        return len(self._items)

    def names(self):
        return sorted(self._items)

    def get(self, name, key_path="<config>"):
        if name not in self._items:
            raise ConfigError(
                f"{key_path}: unknown {self.name} name {name!r}"
                f"{did_you_mean(name, self._items)}; registered: {', '.join(self.names()) or 'none'}")
        return self._items[name]

    def register(self, name=None):
        """Decorator: ``@REG.register()`` or ``@REG.register("OtherName")``; may be stacked."""
        def add(obj):
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(
                    f"{self.name} registry: {key!r} is already registered by {self._origins[key]}")
            self._items[key] = obj
            self._origins[key] = f"{obj.__module__}.{obj.__qualname__}"
            return obj
        return add

    def build(self, cfg, **defaults):
        """Instantiate ``cfg['name']`` with the other keys of ``cfg`` plus ``defaults``.

        ``defaults`` are arguments the caller supplies (e.g. ``parameters=`` for an
        optimizer); keys in ``cfg`` win over them. Returns None for a None block.
        """
        if cfg is None:
            return None
        path = key_path_of(cfg)
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}{source_of(cfg)}: expected a mapping with a 'name' key, "
                              f"got {type(cfg).__name__} {cfg!r}")
        if "name" not in cfg:
            raise ConfigError(f"{path}{source_of(cfg)}: missing 'name' key; choose one of the "
                              f"registered {self.name}s: {', '.join(self.names())}")
        obj = self.get(cfg["name"], f"{path}.name{source_of(cfg)}")
        kwargs = dict(defaults)
        kwargs.update({k: v for k, v in cfg.items() if k != "name"})
        accepted = accepted_kwargs(obj)
        if accepted is not None:
            check_keys([k for k in cfg if k != "name"], accepted, path, source_of(cfg), cfg["name"])
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        missing = [k for k in required_kwargs(obj) if k not in kwargs]
        if missing:
            raise ConfigError(f"{path}{source_of(cfg)}: {cfg['name']} needs "
                              f"{', '.join(repr(k) for k in missing)}; add it to the config block")
        return obj(**kwargs)
