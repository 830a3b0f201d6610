"""Adds the startup hook ``l2pd_harness_lm_eval.pth`` to regular and editable wheels (metadata: pyproject.toml).

Python runs .pth files found in site-packages at start-up; the hook lets the stock ``lm_eval`` CLI find the
``l2pd`` model (see ``l2pd_harness/lm_eval_hook.py``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK = Path(__file__).resolve().parent / "l2pd_harness_lm_eval.pth"


class BuildPyWithHook(build_py):
    """Regular wheels: the hook sits next to the package, so it lands in site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(HOOK), str(Path(self.build_lib) / HOOK.name), preserve_mode=False)


class _StrategyWithHook:
    """Wraps setuptools' editable strategy (the part that writes the editable wheel) to add the hook."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(HOOK.name, HOOK.read_bytes())


class EditableWheelWithHook(editable_wheel):
    """Editable installs (``pip install -e .``): the same hook in the editable wheel."""

    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithHook(super()._select_strategy(name, tag, build_lib))


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
