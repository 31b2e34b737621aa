import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CALIB, SHIPPED, TEST  # noqa: E402,F401
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def test_data():
    d = np.load(TEST)
    return d["input"], d["labels"]


@pytest.fixture(scope="session")
def calib_data():
    return np.load(CALIB)["input"]


@pytest.fixture(scope="session")
def shipped_qdq():
    from dfq_onnx.pipeline import run

    return run(SHIPPED, CALIB)


@pytest.fixture(scope="session")
def shipped_int_unified_pair():
    """The shipped model converted to the integer graph and to the unified-layout QDQ graph (the
    same modules, one requantization each)."""
    from dfq_onnx import QuantConfig
    from dfq_onnx.pipeline import run

    return run(SHIPPED, CALIB, QuantConfig(format="int")), run(SHIPPED, CALIB, QuantConfig(layout="unified", target="ort-x86-vnni"))
