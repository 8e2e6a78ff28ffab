"""The user's own Python a run calls (GRPO's reward functions), named `module:function`.

The module is imported as Python imports any: from the directory the run starts in, or from
PYTHONPATH (both reach the ranks, locally and on Slurm). `validate` imports it once to check
that the name resolves to something callable; every rank imports it again at start.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable


def load_function(name: str) -> Callable:
    """The callable `module:function` names; ImportError or AttributeError saying why not."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `python -m` and torchrun put it there; a console script does not
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"module {module_name} ({getattr(module, '__file__', '?')}) has no '{attr}'")
    if not callable(fn):
        raise AttributeError(f"{name} is a {type(fn).__name__}, not a function")
    return fn


def import_problem(name: str) -> str | None:
    """Why `module:function` cannot be called, in one line, or None."""
    try:
        load_function(name)
    except (ImportError, AttributeError) as e:
        return f"{name} cannot be imported: {type(e).__name__}: {e}"
    except Exception as e:  # the module itself raised while importing
        return f"importing {name} raised {type(e).__name__}: {e}"
    return None
