"""Task functions: the built-in ones and the registry that adds users' modules.

A task is a plain module-level function; its name is the function's name. A user module
(`--tasks-module mypkg.jobs`, or a path to a .py file) exposes its tasks either as a dict `TASKS = {name: function}`
or, without it, every public function defined in the module. A module that cannot be
loaded is a ConfigError (exit 2: the operator must fix it, restarting cannot).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

from node.config import ConfigError


def square(n):
    """n * n: the classic tiny task."""
    return n * n


def sleep(seconds):
    """Sleep, then return the seconds slept (an I/O-bound stand-in)."""
    time.sleep(seconds)
    return seconds


def burn(ms):
    """Keep one CPU busy for `ms` milliseconds; returns the loop count."""
    deadline = time.perf_counter() + ms / 1000.0
    count = 0
    while time.perf_counter() < deadline:
        count += 1
    return count


def fail(message):
    """Always raise RuntimeError(message): for testing retries and error reports."""
    raise RuntimeError(message)


BUILTIN = {f.__name__: f for f in (square, sleep, burn, fail)}


class UnknownTask(LookupError):
    pass


def _import(module_name: str) -> ModuleType:
    """Import a module by name, or run a .py file as a module; ConfigError if that fails."""
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        if not Path(module_name).is_file():
            raise FileNotFoundError("no such file")
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (Exception, SystemExit) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
        raise ConfigError(f"cannot load tasks module {module_name}: {reason}") from None


def _tasks_of(module: ModuleType, module_name: str) -> dict:
    """The module's TASKS dict, or else its public functions defined in it."""
    found = getattr(module, "TASKS", None)
    if found is None:
        return {
            name: obj
            for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
        }
    if not isinstance(found, dict) or not all(isinstance(k, str) and callable(v) for k, v in found.items()):
        raise ConfigError(f"cannot load tasks module {module_name}: TASKS must be a dict of name: function")
    return found


class Registry:
    """Names -> functions. Built-ins first; a user module may not silently replace one.

    A module that cannot be loaded (missing, failing to import, a bad TASKS, a name clash)
    raises ConfigError naming it. A registry pickles as its module list and is rebuilt,
    modules loaded again, where it is unpickled (a pool child under the spawn method).
    """

    def __init__(self, modules: tuple[str, ...] | list[str] = ()):
        self.functions: dict[str, Callable] = dict(BUILTIN)
        self.modules = tuple(modules)
        self._arities: dict[str, tuple] = {}  # checked on every submitted task: computed once
        for module_name in self.modules:
            self._add(module_name, _tasks_of(_import(module_name), module_name))

    def __reduce__(self):
        return (Registry, (self.modules,))

    def _add(self, module_name: str, found: dict) -> None:
        for name, function in found.items():
            if name in self.functions and self.functions[name] is not function:
                raise ConfigError(f"cannot load tasks module {module_name}: "
                                  f"task {name!r} clashes with one already registered")
            self.functions[name] = function

    def get(self, name: str) -> Callable:
        try:
            return self.functions[name]
        except KeyError:
            known = ", ".join(sorted(self.functions))
            raise UnknownTask(f"unknown task {name!r} (known: {known})") from None

    def check_arguments(self, name: str, args) -> None:
        """Raise TypeError with a clear message if `args` cannot be passed to the task."""
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"arguments must be a list, got {type(args).__name__} {args!r:.60}")
        low, high = self._arity(name)
        if len(args) < low or (high is not None and len(args) > high):
            wanted = f"{low}" if low == high else f"{low} to {high}" if high is not None else f"at least {low}"
            raise TypeError(f"{name}() takes {wanted} argument(s), got {len(args)}: {list(args)!r:.80}")

    def _arity(self, name: str) -> tuple:
        """(fewest, most or None) positional arguments the task accepts."""
        if name not in self._arities:
            params = inspect.signature(self.get(name)).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            low = sum(1 for p in positional if p.default is p.empty)
            unbounded = any(p.kind == p.VAR_POSITIONAL for p in params)
            self._arities[name] = (low, None if unbounded else len(positional))
        return self._arities[name]

    def names(self) -> list[str]:
        return sorted(self.functions)
