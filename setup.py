"""Builds the Cython CPU kernels; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("cython_kernels._cpuinfo", ["cython_kernels/_cpuinfo.pyx"], include_dirs=["cython_kernels"],
              extra_compile_args=["-O2"]),
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
