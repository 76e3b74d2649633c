"""A module imported on first use: planning imports code whose functions need torch without
paying for torch (2-3 s) until one of those functions runs."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule(ModuleType):
    """Stands for module ``name`` and imports it when an attribute is first read, e.g.
    ``F = LazyModule("torch.nn.functional")`` at the top of a module, ``F.softmax(...)`` in a
    function. After the first read each look-up costs one extra attribute access."""

    def __init__(self, name: str):
        super().__init__(name)
        self._lazy_module: ModuleType | None = None

    def __getattr__(self, attr: str):
        # reached only for names this proxy lacks: every attribute of the real module
        mod = self._lazy_module
        if mod is None:
            mod = self._lazy_module = importlib.import_module(self.__name__)
        return getattr(mod, attr)
