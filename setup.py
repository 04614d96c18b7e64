"""The optional native parts: host copies on threads that never take the GIL, and
the CUDA driver calls of the hot path made from C (the driver library is opened at
run time, so nothing CUDA is needed to build).

Everything else is in pyproject.toml. Without a C compiler the package still
installs: copies run on Python threads, driver calls go through cuda.bindings.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("prism_gpu._hostcopy", ["src/prism_gpu/_hostcopy.c"],
                             extra_compile_args=["-O2", "-pthread"],
                             extra_link_args=["-pthread"], optional=True),
                         Extension("prism_gpu.backends.cuda._cudrv",
                                   ["src/prism_gpu/backends/cuda/_cudrv.c"],
                                   extra_compile_args=["-O2"], libraries=["dl"],
                                   optional=True)])
