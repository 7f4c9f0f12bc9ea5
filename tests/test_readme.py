"""The README's API example runs as written and agrees with the reference it shows."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["out"].shape == (4, 1, 16, 512) and scope["lse"].shape == (4, 16, 1)
    np.testing.assert_allclose(np.asarray(scope["out"], np.float32),
                               np.asarray(scope["ref_out"], np.float32), atol=2e-2)
    np.testing.assert_allclose(np.asarray(scope["lse"]), np.asarray(scope["ref_lse"]), atol=1e-4)
