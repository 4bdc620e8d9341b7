"""Nothing a file or a directory says runs code or reaches the network: the git commit is read without
running the cwd's repository config, and loading models is local whatever their configs name."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

import prunedm
from prunedm.architectures import build
from prunedm.bench import common
from prunedm.cli.models import load_model

pytestmark = [pytest.mark.usefixtures("one_thread_module"), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[2]
HUB_ID = "stabilityai/stable-diffusion-2-1"


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def hostile_repo(tmp_path):
    """A git checkout whose config and hooks run a script that leaves a marker file; returns (repo, marker)."""
    repo, marker = tmp_path / "hostile", tmp_path / "marker"
    repo.mkdir()
    script = tmp_path / "payload.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {marker}\n")
    script.chmod(0o755)
    _git("init", "-q", cwd=repo)
    (repo / "file.txt").write_text("x")
    _git("-c", "user.name=a", "-c", "user.email=a@b", "add", "file.txt", cwd=repo)
    _git("-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q", "--no-verify", "-m", "x", cwd=repo)
    _git("config", "core.fsmonitor", str(script), cwd=repo)
    hooks = repo / ".git" / "hooks"
    for hook in ("post-checkout", "post-index-change", "reference-transaction", "fsmonitor-watchman"):
        shutil.copy(script, hooks / hook)
    (repo / "file.txt").write_text("changed")  # a dirty tree: status must look at it
    # The repository is truly hostile: a plain `git status` in it runs the payload.
    subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True)
    assert marker.exists(), "the test repository did not trigger core.fsmonitor"
    marker.unlink()
    return repo, marker


def _own_head() -> str | None:
    head = REPO / ".git" / "HEAD"
    if not head.exists():
        return None
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def test_git_commit_never_runs_the_cwd_repository_config(hostile_repo, monkeypatch):
    repo, marker = hostile_repo
    monkeypatch.chdir(repo)
    commit = common.git_commit()
    env = common.environment(torch.device("cpu"))
    assert not marker.exists(), "recording the commit ran the cwd repository's core.fsmonitor"
    hostile_head = (repo / ".git" / "refs" / "heads").iterdir().__next__().read_text().strip()
    assert not commit.startswith(hostile_head[:7]) and env["commit"] == commit
    own = _own_head()
    if own is not None:  # prunedm's own checkout is described, not the cwd's
        assert commit.removesuffix("+dirty") == own[:7]


def test_git_commit_of_an_installed_copy_inside_a_hostile_checkout_is_unknown(hostile_repo, monkeypatch):
    # A wheel installed in a venv that sits inside someone's checkout must not describe (or run) that checkout.
    repo, marker = hostile_repo
    installed = repo / "venv" / "site-packages" / "prunedm" / "bench" / "common.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("# an installed copy\n")
    monkeypatch.setattr(common, "__file__", str(installed))
    monkeypatch.chdir(repo)
    assert common.git_commit() == "unknown"
    assert not marker.exists()


def test_head_commit_reads_refs_packed_refs_detached_heads_and_worktrees(tmp_path):
    sha_a, sha_b, sha_c = "a" * 40, "b" * 40, "c" * 40
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha_a + "\n")
    assert common.head_commit(tmp_path / "repo") == sha_a
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha_b} refs/heads/main\n^{sha_c}\n")
    assert common.head_commit(tmp_path / "repo") == sha_b
    (git / "HEAD").write_text(sha_c + "\n")
    assert common.head_commit(tmp_path / "repo") == sha_c
    (git / "HEAD").write_text("ref: refs/heads/../../../etc/passwd\n")
    assert common.head_commit(tmp_path / "repo") is None
    # A worktree: .git is a file naming its git dir, whose commondir holds the shared refs.
    wt_git = git / "worktrees" / "wt"
    wt_git.mkdir(parents=True)
    (wt_git / "HEAD").write_text("ref: refs/heads/main\n")
    (wt_git / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {wt_git}\n")
    assert common.head_commit(tmp_path / "wt") == sha_b


def test_build_backend_probe_never_imports_from_the_source_tree(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    (tmp_path / "torch.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n__file__ = '/fake/site/torch/x.py'\n")
    spec = importlib.util.spec_from_file_location("prunedm_test_build_backend", REPO / "tools" / "build_backend.py")
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    monkeypatch.chdir(tmp_path)
    site = backend._target_torch_site()
    assert not marker.exists(), "the torch probe imported a torch.py from the cwd"
    assert site is not None and Path(site) == Path(torch.__file__).resolve().parents[1]


# ---- loading is local only ----


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection or resolve a name is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access in a test of local loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return attempts


@pytest.fixture(scope="module")
def tiny_unet():
    return build("tiny-unet", seed=0).eval()


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("config", [HUB_ID, f"https://huggingface.co/{HUB_ID}", ["x"]])
def test_load_pretrained_never_fetches_a_config_a_structure_names(tmp_path, tiny_unet, no_network, config):
    prunedm.save_pretrained(tiny_unet, tmp_path / "m")
    _edit_json(tmp_path / "m" / "structure.json", lambda s: s.update(config=config))
    with pytest.raises(ValueError, match=r"structure\.json: field 'config' must be a JSON object"):
        prunedm.load_pretrained(tmp_path / "m")
    assert no_network == []


def test_load_pretrained_ignores_remote_names_inside_the_config(tmp_path, tiny_unet, no_network):
    prunedm.save_pretrained(tiny_unet, tmp_path / "m")
    remote = {"_name_or_path": HUB_ID, "_commit_hash": "0" * 40, "_diffusers_version": "https://example.com/x"}
    _edit_json(tmp_path / "m" / "structure.json", lambda s: s["config"].update(remote))
    model = prunedm.load_pretrained(tmp_path / "m")
    x, t = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, tiny_unet(x, t).sample)
    assert no_network == []


@pytest.mark.parametrize("name_or_path", [HUB_ID, f"https://huggingface.co/{HUB_ID}", "hf://x/y"])
def test_cli_model_dir_loads_locally_whatever_its_config_names(tmp_path, tiny_unet, no_network, name_or_path):
    tiny_unet.save_pretrained(tmp_path / "d", safe_serialization=True)
    _edit_json(tmp_path / "d" / "config.json", lambda c: c.update(_name_or_path=name_or_path))
    model = load_model(str(tmp_path / "d"))
    assert torch.equal(model.conv_in.weight, tiny_unet.conv_in.weight)
    assert no_network == []


def test_cli_model_dir_of_pickled_weights_is_refused_offline(tmp_path, tiny_unet, no_network):
    # Only safetensors: a .bin beside config.json is never unpickled, and nothing is fetched instead.
    tiny_unet.save_pretrained(tmp_path / "d", safe_serialization=True)
    (tmp_path / "d" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "d" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_model(str(tmp_path / "d"))
    assert no_network == []


@pytest.mark.parametrize("class_name", ["DiffusionPipeline", "StableDiffusionPipeline", "DDPMScheduler", "os"])
def test_cli_model_dir_names_only_model_classes(tmp_path, tiny_unet, no_network, class_name):
    # A pipeline class would read model_index.json (and could load code from the dir): model classes only.
    tiny_unet.save_pretrained(tmp_path / "d", safe_serialization=True)
    _edit_json(tmp_path / "d" / "config.json", lambda c: c.update(_class_name=class_name))
    with pytest.raises(ValueError, match=f"config.json: _class_name '{class_name}' is not a diffusers model class"):
        load_model(str(tmp_path / "d"))
    assert no_network == []


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ValueError, match="no local copy"):
        load_model(HUB_ID)
    assert no_network == []
