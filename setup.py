"""Build the Cython core; everything else lives in pyproject.toml."""

import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# popcnt exists on every x86-64 CPU made since 2008 (x86-64-v2); without the
# flag gcc turns __builtin_popcountll into a libgcc call that is ~5x slower.
extra = ["-O3", "-mpopcnt"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]

setup(
    ext_modules=cythonize(
        [
            Extension(
                "isc._core",
                ["isc/_core.pyx"],
                include_dirs=[numpy.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=extra,
            )
        ],
        compiler_directives={"language_level": 3},
    )
)
