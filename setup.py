"""Everything is declared in setup.cfg; this file only installs ``pg_broker.pth``
at the top of site-packages, where the interpreter reads it at start-up (see
pg_broker/scheme.py). setuptools has no declarative way to put a file there:
``data_files`` land under the environment's prefix (and editable installs skip
them), package data inside the package."""

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_SOURCE = "pg_broker/pg_broker.pth"
PTH_NAME = "pg_broker.pth"


class build_py_with_pth(build_py):
    """A wheel's root is site-packages: put the .pth beside the packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(PTH_SOURCE, f"{self.build_lib}/{PTH_NAME}", preserve_mode=False)


class _AlsoPth:
    """setuptools' editable strategy, plus the .pth in the editable wheel."""

    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self._strategy(wheel, files, mapping)
        wheel.write(PTH_SOURCE, PTH_NAME)

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)


class editable_wheel_with_pth(editable_wheel):
    """``pip install -e``: the editable wheel carries the .pth too (its strategy
    writes only its own path hook, whatever build_py put in build_lib)."""

    def _select_strategy(self, *args, **kwargs):
        return _AlsoPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
