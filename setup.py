"""Build hook for the one optional compiled module, sevmigd.psp._accel (issue 16).

Everything else about the package is in pyproject.toml. The extension is `optional=True`: when the C
compiler or OpenSSL's headers (Debian: libssl-dev) are missing, setuptools prints a warning and the install
goes on without it; sevmigd then runs its pure-Python PSP path, which gives the same bytes
(sevmigd/psp/accel.py says which path is in use, `sevmigd bench --only psp` prints it).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sevmigd.psp._accel",
            sources=["sevmigd/psp/_accel.c"],
            libraries=["crypto"],
            extra_compile_args=["-O3", "-std=c99", "-pthread", "-Wall", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
)
