"""The one thing pyproject.toml cannot declare without an "experimental" warning: the C extension.

preprocessing/_jpeg8.c decodes big JPEGs at 1/8 scale on two cores, to exactly Pillow's pixels. It is
optional: where no C compiler is available the install still succeeds and Pillow decodes every photo.
Everything else about the package lives in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "preprocessing._jpeg8",
            sources=["preprocessing/_jpeg8.c"],
            # No -fwrapv here on purpose: Python's own CFLAGS happen to pass it, but the decoder does
            # not rely on it. Its only sums that can pass the int range on hostile input (the DC
            # predictors) are unsigned; fuzz/ builds it with -fsanitize=undefined and without
            # -fwrapv, and tests/test_fast_jpeg.py does the same on inputs that used to overflow.
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
