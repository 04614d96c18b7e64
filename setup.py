"""The optional native parts: the engine's hot path compiled, host copies on threads that
never take the GIL, and the CUDA driver calls of the hot path made from C.

Everything else is in pyproject.toml. Without a C compiler the package still
installs: the engine runs its Python reference, copies run on Python threads, driver
calls go through cuda.core.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("prism_gpu._ccore",
                             ["src/prism_gpu/_ccore.c", "src/prism_gpu/_cring.c",
                              "src/prism_gpu/_ctable.c", "src/prism_gpu/_cpipe.c"],
                             depends=["src/prism_gpu/_ccore.h"],
                             extra_compile_args=["-O2"], optional=True),
                   Extension("prism_gpu._hostcopy", ["src/prism_gpu/_hostcopy.c"],
                             extra_compile_args=["-O2", "-pthread"],
                             extra_link_args=["-pthread"], optional=True),
                   # no CUDA headers or libraries needed: the driver is found at run time
                   Extension("prism_gpu.backends.cuda._native",
                             ["src/prism_gpu/backends/cuda/_native.c"],
                             extra_compile_args=["-O2"], libraries=["dl"], optional=True)])
