"""Build of loractl's optional native kernels (loractl/_kernels.c; everything else is in pyproject.toml).

The extension is optional: without a C compiler the install goes on and loractl computes the same bits
with torch and numpy (loractl/native.py). No -ffast-math and no FMA contraction: the kernels' sums must
round as IEEE's (and torch's) do.
"""

import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99"]
setup(
    ext_modules=[
        Extension("loractl._kernels", ["loractl/_kernels.c"], optional=True, extra_compile_args=args),
    ]
)
