"""The optional native part: host copies on threads that never take the GIL.

Everything else is in pyproject.toml. Without a C compiler the package still
installs, and copies run on Python threads instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("prism_gpu._hostcopy", ["src/prism_gpu/_hostcopy.c"],
                             extra_compile_args=["-O2", "-pthread"],
                             extra_link_args=["-pthread"], optional=True)])
