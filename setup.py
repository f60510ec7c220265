"""Builds the optional C++ CPU kernels (csrc/) as perta_fast._cpp. Everything else is in pyproject.toml.

The extension is optional: without a compiler (or OpenMP) the install still succeeds and perta-fast
falls back to its torch reference path, saying so once (`perta-fast info` tells why).
"""
from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # building without pybind11 (not the normal path: pyproject requires it)
    setup()
else:
    setup(
        ext_modules=[Pybind11Extension("perta_fast._cpp", ["csrc/perta_kernels.cpp"], cxx_std=17,
                                       extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"],
                                       optional=True)],
        cmdclass={"build_ext": build_ext},
    )
