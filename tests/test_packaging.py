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
    for group in ("method/umae.yaml", "model/sslkit_pvt_small.yaml", "experiment/umae_demo.yaml", "pretrain.yaml"):
        assert f"sslkit/configs/{group}" in names
    assert "sslkit/models/pvt.py" in names and not any(n.startswith("ssl/") for n in names)
