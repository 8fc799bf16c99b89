"""The container files, checked without a Docker daemon: docker/compose.yaml by Compose's own
validator (`docker-compose config`, the Debian package that `make test` installs), and the
Dockerfile's install through constraints.txt."""
import os
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPOSE = os.path.join(ROOT, "docker", "compose.yaml")


def compose_config(path):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: `make test` installs it (apt-get install docker-compose)")
    return subprocess.run([exe, "-f", str(path), "config"], capture_output=True, text=True, cwd=os.path.dirname(path))


def test_compose_file_passes_the_compose_validator():
    done = compose_config(COMPOSE)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"demo", "fit", "tensorboard"}
    # the CPU demo asks for no GPU; the fit service reserves them; runs, data and weights are mounted
    assert "deploy" not in services["demo"] and services["fit"]["deploy"]["resources"]["reservations"]["devices"]
    mounted = {v.split(":")[1] for v in services["fit"]["volumes"]}
    assert mounted == {"/workspace/ayf/runs", "/workspace/ayf/data", "/workspace/ayf/weights"}
    assert services["demo"]["entrypoint"] == ["bash", "scripts/demo.sh"]


def test_the_validator_rejects_a_broken_compose_file(tmp_path):
    """The check can fail: a misspelt service key is refused."""
    broken = tmp_path / "docker" / "compose.yaml"
    broken.parent.mkdir()
    broken.write_text(open(COMPOSE).read().replace("shm_size: 8gb", "shm_sise: 8gb"))
    done = compose_config(broken)
    assert done.returncode != 0 and "shm_sise" in done.stderr


def test_dockerfile_installs_through_the_constraints_file():
    text = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all(re.search(r"-c constraints\.txt", line) for line in installs)
    copied = text.index("constraints.txt")
    assert copied < text.index("pip install")  # copied into the image before the install
    pins = open(os.path.join(ROOT, "constraints.txt")).read()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    for folder in ("configs", "scripts"):  # what the demo service runs
        assert f"COPY {folder} " in text
