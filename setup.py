"""The optional native parts: host copies on threads that never take the GIL, and
kernel launches packed in C (the CUDA driver library is opened at run time, so
nothing CUDA is needed to build).

Everything else is in pyproject.toml. Without a C compiler the package still
installs: copies run on Python threads, launches go through cuda.core.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("prism_gpu._hostcopy", ["src/prism_gpu/_hostcopy.c"],
                             extra_compile_args=["-O2", "-pthread"],
                             extra_link_args=["-pthread"], optional=True),
                         Extension("prism_gpu.backends.cuda._launch",
                                   ["src/prism_gpu/backends/cuda/_launch.c"],
                                   extra_compile_args=["-O2"], libraries=["dl"],
                                   optional=True)])
