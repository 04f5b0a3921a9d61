"""Builds the Cython CPU kernels; everything else is in pyproject.toml."""

import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("cython_kernels._cpuinfo", ["cython_kernels/_cpuinfo.pyx"], include_dirs=["cython_kernels"],
              extra_compile_args=["-O2"]),
    # -O3 without -march: the AVX-512 code is compiled per function through target attributes
    # and chosen at run time, so the build runs on any x86-64 and needs no special flags.
    # -falign-loops=64: the hot loops' speed moved with where other code put them (adding an
    # unrelated header made the BF16 row kernel 5-9 % slower on the LM head; aligned, it is not).
    Extension("cython_kernels._kernels", ["cython_kernels/_kernels.pyx"], include_dirs=["cython_kernels"],
              extra_compile_args=["-O3", "-fopenmp", "-Wno-unused-function", "-falign-loops=64"],
              extra_link_args=["-fopenmp"],
              depends=sorted(glob.glob("cython_kernels/*.h"))),  # (every header: a rebuild on any change)
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
