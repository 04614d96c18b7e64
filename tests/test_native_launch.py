"""The C launch's argument packing: every bad argument refused before the driver is
called (runs without a GPU: there, or with a null function, the driver call fails)."""

from __future__ import annotations

import numpy as np
import pytest

_launch = pytest.importorskip("prism_gpu.backends.cuda._launch",
                              reason="the native launch extension is not built")

G = (1, 1, 1)


def test_a_null_function_gets_an_error_code_not_a_crash() -> None:
    code = _launch.launch(0, 0, G, G, 0, b"Pfd", (0, np.float32(1.5), 2.0))
    assert isinstance(code, int) and code != 0


@pytest.mark.parametrize("codes, params, exc", [
    (b"P", (), TypeError),                      # one code, no value
    (b"", (1,), TypeError),
    ("P", (1,), TypeError),                     # codes must be bytes
    (b"P", [1], TypeError),                     # params must be a tuple
    (b"i", (1.5,), TypeError),                  # a float for an integer parameter
    (b"f", ("x",), TypeError),
    (b"Z", (1,), ValueError),                   # no such code
    (b"P" * 65, (0,) * 65, TypeError),          # more parameters than a launch packs
])
def test_bad_parameters_are_refused(codes: object, params: object, exc: type) -> None:
    with pytest.raises(exc):
        _launch.launch(0, 0, G, G, 0, codes, params)


@pytest.mark.parametrize("grid, block, shmem, exc", [
    ((1, 1), G, 0, TypeError),
    ([1, 1, 1], G, 0, TypeError),
    (G, (1, 1, 1 << 32), 0, OverflowError),
    (G, (1, -1, 1), 0, OverflowError),
    (G, G, -1, OverflowError),
])
def test_bad_dimensions_are_refused(grid: object, block: object, shmem: int,
                                    exc: type) -> None:
    with pytest.raises(exc):
        _launch.launch(0, 0, grid, block, shmem, b"", ())


def test_wrong_argument_count() -> None:
    with pytest.raises(TypeError):
        _launch.launch(0, 0, G, G, 0, b"")
