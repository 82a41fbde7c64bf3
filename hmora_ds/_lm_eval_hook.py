"""Makes lm-evaluation-harness's own ``lm_eval --model hmora`` find our model class.

lm-eval 0.4.13 discovers models only from a table in its own package (``lm_eval.models``), so an
installed hmora-ds puts one line in site-packages (``hmora_ds_lm_eval.pth``, written into the
wheel by ``setup.py``) that imports this module at interpreter start-up. All it does there is
add an import hook that waits for ``lm_eval.models``: only when lm-eval loads its model table
are ``hmora`` / ``hmora-ds`` added to it, as lazy entries, so no interpreter that does not use
lm-eval imports anything more and ``hmora_ds.lm_eval_model`` loads only when the model is asked
for. Written by hand: lm-eval offers no entry point for this.
"""

from __future__ import annotations

import importlib.util
import sys

TARGET = "hmora_ds.lm_eval_model:HMoRALM"
NAMES = ("hmora", "hmora-ds")


def _register() -> None:
    try:
        from lm_eval.api.registry import model_registry

        for name in NAMES:
            if name not in model_registry:
                model_registry.register(name, target=TARGET)
    except Exception:  # an lm-eval without this registry: the class is not offered
        pass


class _WaitForModelTable:
    """A meta-path finder that wraps the loading of ``lm_eval.models`` once."""

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # the real finders locate it; this hook is done after
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _WaitForModelTable) for f in sys.meta_path):
    sys.meta_path.insert(0, _WaitForModelTable())
