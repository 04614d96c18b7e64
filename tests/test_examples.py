"""The README's examples run as written (on the backend auto picks: CPU in CI)."""

from __future__ import annotations

import pathlib
import runpy

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    if "dask" in path.stem:
        pytest.importorskip("distributed", reason='needs pip install "prism-gpu[dask]"')
    runpy.run_path(str(path), run_name="__main__")
    assert "ok" in capsys.readouterr().out
