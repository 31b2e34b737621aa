"""convert / validate on a local Ray cluster (--workers, dfq_onnx/distributed.py): the same bytes
and the same figures as one process, a worker killed mid-run, and the one-line error without Ray.
The references are one-process runs, not stored outputs."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dfq_onnx import QuantConfig
from dfq_onnx.errors import DfqError
from dfq_onnx.pipeline import run
from dfq_onnx.validate import validate

from helpers import CALIB, SHIPPED, TEST

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dfq_onnx.cli"]


def cli(*args, env=None, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_line_failure(p, mention: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert mention in lines[0], lines[0]
    assert "Traceback" not in p.stderr and p.stdout.strip() == "", p.stdout


@pytest.fixture(scope="module")
def cluster():
    from dfq_onnx.distributed import Cluster

    with Cluster(workers=2) as c:
        yield c


def test_cli_convert_workers_writes_the_same_bytes(tmp_path):
    one = cli("convert", SHIPPED, tmp_path / "one.onnx", "--calib", CALIB, "-q")
    assert one.returncode == 0, one.stderr
    two = cli("convert", SHIPPED, tmp_path / "two.onnx", "--calib", CALIB, "--workers", "2", "--json")
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()
    assert isinstance(json.loads(two.stdout), dict)  # stdout is the summary only (no Ray messages)


def test_cli_validate_workers_same_figures(tmp_path, shipped_qdq):
    q = tmp_path / "q.onnx"
    q.write_bytes(shipped_qdq.model.SerializeToString())
    args = ["validate", SHIPPED, q, "--data", TEST, "--runs", "3", "--batch-size", "64"]
    one, two = cli(*args, "--json"), cli(*args, "--json", "--workers", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    a.pop("latency_ms"), b.pop("latency_ms")
    assert a == b and a["samples"] == 1000
    # the printed table too, every line but latency
    one, two = cli(*args), cli(*args, "--workers", "2")
    keep = lambda s: [ln for ln in s.splitlines() if "latency" not in ln and " ms" not in ln]  # noqa: E731
    assert keep(one.stdout) == keep(two.stdout) and "agreement" in one.stdout


def test_cli_killed_worker_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "q.onnx"
    p = cli("convert", SHIPPED, out, "--calib", CALIB, "--workers", "2", env={"DFQ_TEST_KILL_WORKER": "1"})
    one_line_failure(p, "Ray worker 1")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_without_ray_one_line_naming_the_extra(tmp_path, shipped_qdq):
    """`import ray` fails in the subprocess (a meta-path blocker in sitecustomize), as without the extra."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError("No module named 'ray'", name="ray")
                return None
        sys.meta_path.insert(0, _NoRay())
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    out = tmp_path / "q.onnx"
    p = subprocess.run(CLI + ["convert", str(SHIPPED), str(out), "--calib", str(CALIB), "--workers", "2"],
                       capture_output=True, text=True, env={**os.environ, **env})
    one_line_failure(p, "pip install 'dfq-onnx[ray]'")
    assert not out.exists()
    q = tmp_path / "given.onnx"
    q.write_bytes(shipped_qdq.model.SerializeToString())
    p = subprocess.run(CLI + ["validate", str(SHIPPED), str(q), "--data", str(TEST), "--ray", "auto"],
                       capture_output=True, text=True, env={**os.environ, **env})
    one_line_failure(p, "pip install 'dfq-onnx[ray]'")
    # the blocker works: the same interpreter without the options converts
    p = subprocess.run(CLI + ["convert", str(SHIPPED), str(out), "--calib", str(CALIB), "-q"],
                       capture_output=True, text=True, env={**os.environ, **env})
    assert p.returncode == 0 and out.exists(), p.stderr


def test_api_shards_of_a_folder_and_an_odd_count(cluster, tmp_path):
    """A folder of .npy files holding 1 to 5 samples each, 100 samples (not whole batches), and a
    num_samples cut inside a file: the same bytes and facts as one process; progress adds up."""
    x = np.load(CALIB)["input"]
    folder = tmp_path / "calib"
    folder.mkdir()
    i, k = 0, 0
    while i < len(x):
        n = 1 + k % 5
        np.save(folder / f"{k:03d}.npy", x[i] if n == 1 else x[i:i + n])
        i, k = i + n, k + 1
    for src, config in ((folder, QuantConfig(num_samples=100, batch_size=8)),
                        (CALIB, QuantConfig(num_samples=77, batch_size=5, format="int"))):
        seen = []
        a = run(SHIPPED, str(src), config)
        b = run(SHIPPED, str(src), config, cluster=cluster, on_batch=seen.append)
        assert b.model.SerializeToString() == a.model.SerializeToString()
        assert b.facts == a.facts and b.samples == a.samples == sum(seen) == config.num_samples
        assert len(cluster.report["workers"]) == 2


def test_api_validate_same_figures_then_a_killed_worker(cluster, monkeypatch, shipped_qdq, tmp_path):
    q = tmp_path / "q.onnx"
    q.write_bytes(shipped_qdq.model.SerializeToString())
    a = validate(SHIPPED, q, TEST, num_samples=300, batch_size=16, runs=1)
    b = validate(SHIPPED, q, TEST, num_samples=300, batch_size=16, runs=1, cluster=cluster)
    a.pop("latency_ms"), b.pop("latency_ms")
    assert a == b
    monkeypatch.setenv("DFQ_TEST_KILL_WORKER", "0")
    with pytest.raises(DfqError, match="Ray worker 0 failed during validation"):
        validate(SHIPPED, q, TEST, num_samples=300, batch_size=16, runs=1, cluster=cluster)
