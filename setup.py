"""Build of loractl's optional native kernels (loractl/_kernels.c; everything else is in pyproject.toml).

The extension is optional: without a C compiler the install goes on and loractl computes the same bits
with torch and numpy (loractl/native.py). No -ffast-math and no FMA contraction: the kernels' sums must
round as IEEE's (and torch's) do.
"""

import hashlib
import sys
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "loractl/_kernels.c"
# the source's sha256, compiled in: loractl/native.py refuses a library built from another source (a stale
# build in a working tree whose _kernels.c changed since)
sha = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()
args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99"]
setup(
    ext_modules=[
        Extension(
            "loractl._kernels",
            [SOURCE],
            optional=True,
            extra_compile_args=args,
            define_macros=[("LORACTL_SOURCE_SHA256", f'"{sha}"')],
        ),
    ]
)
