"""Everything about the package is in pyproject.toml; this file only adds one build step.

The wheel carries ``hmora_ds_lm_eval.pth`` at the top of site-packages, so that lm-eval's own
``lm_eval --model hmora`` finds our model class (lm-eval has no plug-in mechanism for models;
see ``hmora_ds/_lm_eval_hook.py``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hmora_ds_lm_eval.pth"


class BuildPyWithLmEvalHook(build_py):
    def run(self):
        super().run()
        Path(self.build_lib, PTH).write_text("import hmora_ds._lm_eval_hook\n")

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


setup(cmdclass={"build_py": BuildPyWithLmEvalHook})
