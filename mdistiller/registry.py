"""Name -> class registries filled by decorators (a leaf module: it imports nothing of mdistiller but `errors`).

Each layer owns its registry (`distillers.distiller_dict`, `engine.trainer_dict`); code above a layer reads it, and
code that must react to new entries (the config defaults of a distiller) subscribes instead of importing upward.
"""
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

from .errors import ConfigError

T = TypeVar("T")
Listener = Callable[[str, object], None]


class Registry(Dict[str, T]):
    """A dict of registered objects by name. `register(name)` is a class decorator; `lookup(name)` fails with a
    ConfigError that names the config key, the value and the registered names."""

    def __init__(self, kind: str, config_key: str):
        super().__init__()
        self.kind = kind
        self.config_key = config_key
        self._listeners: List[Listener] = []

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        """Register `obj` as `name`; the same object twice is a no-op, another object under a taken name an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        previous = self.get(name)
        if previous is obj:
            return
        if previous is not None:
            raise ConfigError(f"{self.config_key} = {name!r} is registered twice: by {_where(previous)} and by "
                              f"{_where(obj)}; rename one of them")
        for listener in self._listeners:  # first, so that an entry a listener refuses is not registered
            listener(name, obj)
        self[name] = obj

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(name, obj)` for every entry now and for every entry registered later."""
        self._listeners.append(listener)
        for name, obj in list(self.items()):
            listener(name, obj)

    def lookup(self, name: str, key: Optional[str] = None) -> T:
        if name not in self:
            raise ConfigError(f"{key or self.config_key} = {name!r} is not a registered {self.kind}; expected one of "
                              f"{', '.join(self.names())}")
        return self[name]

    def names(self) -> Iterable[str]:
        return list(self)


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
