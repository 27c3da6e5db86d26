"""The wheel ships the configs (so an installed sslkit composes without the source tree), and ssl/
is a source root, never a package."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ssl_is_not_a_package():
    assert not (ROOT / "ssl" / "__init__.py").exists()
    import ssl

    assert hasattr(ssl, "create_default_context")  # the standard library's ssl, not ours


def test_wheel_contains_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (whl,) = tmp_path.glob("sslkit-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for group in ("method/umae.yaml", "model/sslkit_pvt_small.yaml", "experiment/umae_demo.yaml", "pretrain.yaml",
                  "finetune.yaml", "eval_knn.yaml", "eval_linear.yaml", "export.yaml", "shard.yaml", "data/webdataset.yaml"):
        assert f"sslkit/configs/{group}" in names
    assert "sslkit/models/pvt.py" in names and not any(n.startswith("ssl/") for n in names)
    sources = {str(p.relative_to(ROOT / "ssl")) for p in (ROOT / "ssl" / "sslkit").rglob("*.py")}
    assert sources <= names, f"modules missing from the wheel (list the package in pyproject.toml): {sources - names}"
    assert not any(n.startswith(("benchmarks/", "sslkit/bench")) for n in names)  # benchmarks stay in scripts/


def test_benchmark_script_lists_every_benchmark():
    """scripts/benchmark.py imports every benchmark module (they import sslkit's API: a refactor that breaks
    them fails here, not in the next benchmark run)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    for name in ("umae", "dinov2", "dropblock", "quality", "loader"):
        assert name in out
