"""Build lamina's optional C speedups; everything else is in pyproject.toml.

The extension (``lamina.archive._speedups``) is optional twice over: setuptools only
warns when it cannot be compiled (no gcc, no Python headers), so ``pip install`` still
succeeds, and lamina then runs its pure-Python code, which is the specification of the
same behaviour (see ``lamina.archive.native``).
"""

from pathlib import Path

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lamina.archive._speedups",
            sources=sorted(str(p) for p in Path("src/lamina/archive/_speedups").glob("*.c")),
            depends=["src/lamina/archive/_speedups/speedups.h"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
