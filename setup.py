"""Ships the native kernel's C++ sources (``kernels/``) inside the package as
``fastcon/_kernels``, where :mod:`fastcon.backends.build` compiles them on first use against
the installed torch. (An editable install reads ``kernels/`` from the source tree.)"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastcon" / "_kernels"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path(__file__).resolve().parent.joinpath("kernels").iterdir():
            if source.suffix in (".cpp", ".h"):
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithKernels})
