"""One way to read a field from whatever carries a config section.

Entry points pass DictConfigs, tests pass dicts, library callers pass dataclasses; the model, compat
and dry-run code accept all three.
"""
from collections.abc import Mapping
from typing import Any


def cfg_get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):  # dict; DictConfig is a MutableMapping too
        return obj.get(key, default)
    return getattr(obj, key, default)


def parallel_sizes(parallel: Any) -> tuple:
    """(tp, pp, cp, ep, etp, vpp) of a parallel section; etp/vpp None when unset."""
    return (int(cfg_get(parallel, "tp", 1)), int(cfg_get(parallel, "pp", 1)),
            int(cfg_get(parallel, "cp", 1)), int(cfg_get(parallel, "ep", 1)),
            cfg_get(parallel, "etp", None), cfg_get(parallel, "vpp", None))
