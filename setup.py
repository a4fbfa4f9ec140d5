"""Build the Cython extension(s). Metadata lives in pyproject.toml.

Compiler directives are set here, in one place. ``LOOPS_DEBUG_BUILD=1`` turns bounds checking,
wraparound and initialisation checks back on (and drops -O3) for a debug build.
"""

import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("LOOPS_DEBUG_BUILD", "") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

# -ffp-contract=off: no fused multiply-add, so the C scorer's arithmetic is bit-for-bit the
# pure-Python twin's (and the same on every x86-64/arm64 machine).
COMPILE_ARGS = ["-O0", "-g"] if DEBUG else ["-O3", "-ffp-contract=off"]
if DEBUG:
    COMPILE_ARGS.append("-ffp-contract=off")

extensions = [
    Extension(
        # One compiled module built from core.pyx and the .pxi files it includes.
        "loops_sdk._scorer.core",
        ["loops_sdk/_scorer/core.pyx"],
        depends=["loops_sdk/_scorer/_kernels.h", "loops_sdk/_scorer/core.pxd",
                 *sorted(glob.glob("loops_sdk/_scorer/*.pxi"))],
        include_dirs=["loops_sdk/_scorer", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES,
                            annotate=os.environ.get("LOOPS_ANNOTATE") == "1"))
