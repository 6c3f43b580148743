"""Shared fixtures: the repo root on sys.path, a private TORCH_HOME, and a way to run the scripts
exactly as a user would (a subprocess in the repo root)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


OFFLINE = {name: "http://127.0.0.1:9" for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}


@pytest.fixture(scope="session", autouse=True)
def index_cache(tmp_path_factory) -> Path:
    """The image-index cache of every test and the scripts they start: a temporary folder, never ~/.cache."""
    folder = tmp_path_factory.mktemp("index_cache")
    os.environ["IMAGENET_INDEX_CACHE"] = str(folder)
    return folder


@pytest.fixture
def offline(monkeypatch) -> dict:
    """No network for this test and the scripts it starts (they inherit the environment): every HTTP(S)
    request goes to a closed local port, so 'weights missing offline' is tested online too."""
    for name, value in {**OFFLINE, "NO_PROXY": "", "no_proxy": ""}.items():
        monkeypatch.setenv(name, value)
    return OFFLINE


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision weights cache: $TORCH_HOME/hub/checkpoints."""
    import torch

    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return home


def run_script(*args, env=None, timeout=600, cwd=ROOT) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS... from the repo root; returns the finished process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(script: str, *args, env=None) -> subprocess.CompletedProcess:
    """SCRIPT's entry point called in this process, as `python SCRIPT ARGS...` runs it: the exit code,
    stdout and stderr, as run_script gives them. For the runs of a test whose point is what they compute,
    not the process around them (each such test keeps at least one run_script): starting a process
    (importing torch and torchvision) costs seconds."""
    import contextlib
    import gc
    import importlib
    import io

    import torch

    import dataset

    module = importlib.import_module(script.removesuffix(".py"))
    entry = getattr(module, "cli_main", None) or module.main
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env, threads = dict(os.environ), torch.get_num_threads()  # benchmark.py --threads sets them
    os.environ.update({key: str(value) for key, value in (env or {}).items()})
    torch.hub._hub_dir = None  # TORCH_HOME may be another
    dataset._manifest_arrays.cache_clear()  # shards rewritten under the same name are read again
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.hub._hub_dir = None
        # what the run left (an ONNX Runtime session, say) is destroyed here, not as garbage in a process
        # a later test forks, where its thread pool's locks would hang
        gc.collect()
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, one 'error:' line naming the problem, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def read_csv(path) -> list[dict]:
    """The rows of a CSV file with a header line, as dicts."""
    import csv

    return list(csv.DictReader(Path(path).read_text().splitlines()))


def make_image(path, size=(80, 60), mode="RGB", fmt="JPEG", seed=0) -> Path:
    """A smooth random picture (JPEG-friendly) of `size` (w, h) in PIL `mode`, saved as `fmt`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BILINEAR).convert(mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def save_torchvision_checkpoint(torch_home, arch, weights, seed=0):
    """A randomly initialised `arch` saved under the file name torchvision caches `weights` as."""
    import torch
    from torchvision import models

    from model import weights_file_name

    torch.manual_seed(seed)
    model = models.get_model(arch, weights=None, num_classes=len(weights.meta["categories"]))
    path = Path(torch_home) / "hub" / "checkpoints" / weights_file_name(weights)
    torch.save(model.state_dict(), path)
    return model.eval()


# ----------------------------------------------------------------------------- the reliability tests' inputs


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """root/{train,val}/{a,b}/*.png: a tiny two-class training folder (tests/reliability_inputs.py)."""
    from reliability_inputs import train_folder

    return train_folder(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def weights_home(tmp_path_factory):
    """A TORCH_HOME holding (random) mobilenet_v3_small IMAGENET1K_V1 weights."""
    from reliability_inputs import WEIGHTS

    home = tmp_path_factory.mktemp("weights_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    save_torchvision_checkpoint(home, "mobilenet_v3_small", WEIGHTS)
    return home


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A resnet18 checkpoint in train.py's format (2 classes), its plain state dict, and a truncated copy."""
    import torch
    from torchvision import models

    folder = tmp_path_factory.mktemp("checkpoints")
    model = models.resnet18(num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 1,
        "batch": 0,
        "step": 4,
        "config": {"arch": "resnet18"},
        "classes": ["a", "b"],
    }
    torch.save(state, folder / "resnet18-train.pt")
    torch.save(model.state_dict(), folder / "resnet18-plain.pth")
    whole = (folder / "resnet18-train.pt").read_bytes()
    (folder / "cut.pt").write_bytes(whole[: len(whole) // 3])
    return folder
