"""Released weights by name (`mae.weights`, `mae weights`): downloaded once, checked, recorded, usable offline, and
every failure one line with nothing half-written left in the cache, after which the next try succeeds.

Everything is real except the servers: a local HTTP server on 127.0.0.1 stands in for dl.fbaipublicfiles.com
(``MAE_WEIGHTS_MIRROR``) and for the Hugging Face Hub (``HF_ENDPOINT``, answering HEAD / GET the way the Hub does).
It serves files this library writes from a tiny MAE. The official names used are real catalogue names without a
published md5 (``*_full``, ``mae_visualize_*``), so any bytes are accepted; the md5 case serves the tiny file as
``official:mae_pretrain_vit_base`` (published prefix 8cad7c: a mismatch), then monkeypatches that catalogue entry's
``md5_prefix`` to the tiny file's own for the retry. CLI cases go through `mae.cli.main` in this process; the
concurrent download and the Hub run in subprocesses (huggingface_hub reads ``HF_ENDPOINT`` when imported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mae.cli import main
from mae.errors import WeightsError
from mae.interop import read_checkpoint
from mae.interop.huggingface import save_hf_pretrained, to_hf_state_dict
from mae.models import ARCHITECTURES, build_model
from mae.weights import CATALOGUE, is_weights_name, resolve_weights
from mae.weights.catalogue import parse_name

ROOT = Path(__file__).resolve().parents[1]
FULL = "official:mae_pretrain_vit_base_full"  # no published md5: any bytes are taken
FULL_PATH = "/mae/pretrain/mae_pretrain_vit_base_full.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOCAL = "127.0.0.1,localhost"


# ---------------------------------------------------------------------------------------------------- the servers
class Mock:
    """What the server answers: ``files`` (URL path -> (behaviour, body)) for the release, ``repos`` (repo id ->
    {file name: body}) for the Hub; it counts requests by (method, path)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.release = threading.Event()  # lets a hanging handler go
        self.lock = threading.Lock()

    def gets(self, path: str) -> int:
        return self.requests["GET", path]


class Handler(BaseHTTPRequestHandler):
    mock: Mock

    def log_message(self, *args) -> None:  # silent: the tests read the client's stderr
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        with self.mock.lock:
            self.mock.requests[self.command, self.path] += 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if self.path.startswith("/mae/"):
                self._release_file()
            else:
                self._hub_file(body)

    def _release_file(self) -> None:
        behaviour, data = self.mock.files.get(self.path, ("404", b""))
        if behaviour == "404":
            self.send_error(404)
            return
        if behaviour == "hang":  # accept the request, never answer
            self.mock.release.wait(20)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) + (1000 if behaviour == "cut" else 0)))
        self.end_headers()
        if behaviour == "slow":
            time.sleep(2.0)
        self.wfile.write(data[:len(data) // 2] if behaviour == "cut" else data)  # cut: then the connection closes

    def _hub_file(self, body: bool) -> None:
        """``/{org}/{repo}/resolve/{revision}/{file}`` as the Hub answers it: X-Repo-Commit, an ETag (the sha256 of
        an LFS file, the git blob sha1 of a small one) and Content-Length; 404s with X-Error-Code."""
        parts = self.path.split("/")
        repo, revision, filename = "/".join(parts[1:3]), parts[4] if len(parts) > 5 else "", "/".join(parts[5:])
        files = self.mock.repos.get(repo)
        if files is None or parts[3:4] != ["resolve"]:
            self._hub_error("RepoNotFound")
        elif revision not in ("main", COMMIT):
            self._hub_error("RevisionNotFound")
        elif filename not in files:
            self._hub_error("EntryNotFound")
        else:
            data = files[filename]
            large = filename.endswith((".safetensors", ".bin"))
            etag = hashlib.sha256(data).hexdigest() if large else git_sha1(data)
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    def _hub_error(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hung up: nothing to report
        pass


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@pytest.fixture(scope="module")
def server():
    mock = Mock()
    handler = type("BoundHandler", (Handler,), {"mock": mock})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    mock.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield mock
    mock.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def mock(server, tmp_path, monkeypatch):
    """The server with nothing served and no request counted; a fresh cache; online; no proxy for 127.0.0.1."""
    server.files.clear()
    server.repos.clear()
    server.requests.clear()
    monkeypatch.setenv("MAE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_WEIGHTS_MIRROR", server.url)
    monkeypatch.setenv("MAE_DOWNLOAD_TIMEOUT", "10")
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(key, LOCAL)
    for key in ("MAE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    return server


# ---------------------------------------------------------------------------------------------------- the files
def tiny_mae():
    torch.manual_seed(0)
    return build_model("mae_vit_micro_patch4_28", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                       decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> tuple[Path, bytes]:
    """A tiny MAE saved the way the official release is (``torch.save({'model': state_dict})``), and its bytes."""
    path = tmp_path_factory.mktemp("release") / "tiny.pth"
    torch.save({"model": tiny_mae().state_dict()}, path)
    return path, path.read_bytes()


def cached_folder(name: str) -> Path:
    return Path(os.environ["MAE_HOME"]) / "official" / CATALOGUE[name].location.rsplit("/", 1)[0]


def leftovers(folder: Path) -> list[str]:
    """What a folder of the cache holds besides lock files (which hold nothing)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


def cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """`mae ARGV` in this process: exit code, stdout, stderr lines."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- catalogue
def test_catalogue_holds_every_released_file_with_its_published_facts():
    """The 13 official files, the 3 facebook/vit-mae repositories and the 3 timm .mae tags; the md5 prefixes and
    top-1 of FINETUNE.md / the README; every architecture registered; the licence recorded for each."""
    official = {n for n, e in CATALOGUE.items() if e.source == "official"}
    assert len(official) == 13 and "official:mae_visualize_vit_large_ganloss" in official
    assert CATALOGUE["official:mae_pretrain_vit_large"].md5_prefix == "b8b06e"
    assert CATALOGUE["official:mae_pretrain_vit_base"].location == "pretrain/mae_pretrain_vit_base.pth"
    huge = CATALOGUE["official:mae_finetuned_vit_huge"]
    assert (huge.md5_prefix, huge.num_classes, huge.holds) == ("2541f2", 1000, "classifier")
    assert "86.928" in (huge.reported or "")
    assert CATALOGUE["official:mae_pretrain_vit_huge_full"].md5_prefix is None
    assert CATALOGUE["official:mae_visualize_vit_base"].target == "pixel"
    assert CATALOGUE["hf:facebook/vit-mae-large"].holds == "encoder+decoder"
    assert "apache-2.0" in CATALOGUE["hf:facebook/vit-mae-base"].notes
    assert CATALOGUE["timm:vit_huge_patch14_224.mae"].location == "timm/vit_huge_patch14_224.mae"
    assert len(CATALOGUE) == 19
    assert all(e.architecture in ARCHITECTURES and e.licence == "CC-BY-NC-4.0" for e in CATALOGUE.values())


def test_names_are_told_from_paths_and_unknown_names_suggest_the_closest():
    """``official:`` / ``hf:`` / ``timm:`` are names, a path (a Windows drive too) is not; an unknown official or timm
    name is one line with the closest names; any ``hf:org/repo[@rev]`` is allowed."""
    assert is_weights_name("official:mae_pretrain_vit_base") and is_weights_name("hf:org/repo")
    assert not any(map(is_weights_name, ("C:/weights/x.pth", "runs/x", "model.safetensors", "http://x/y")))
    with pytest.raises(WeightsError, match="closest: official:mae_pretrain_vit_base"):
        parse_name("official:mae_pretrain_vit_bse")
    with pytest.raises(WeightsError, match=r"timm:vit_base_patch16_224\.mae"):
        parse_name("timm:vit_base_patch16_224")
    assert parse_name("hf:someone/other@v1") == ("hf", "someone/other", "v1", None)
    assert parse_name("hf:facebook/vit-mae-base")[3] is CATALOGUE["hf:facebook/vit-mae-base"]
    with pytest.raises(WeightsError, match="hf:ORG/REPO"):
        parse_name("hf:vit-mae-base")


def test_weights_command_lists_the_catalogue_and_refuses_bad_input_in_one_line(capsys, tmp_path, monkeypatch):
    """`mae weights` prints a header and one line per name; `mae weights --help` exits 0; a bad name, a misspelt
    action, a name without its action and a download of nothing are each one error line with exit code 2."""
    monkeypatch.setenv("MAE_HOME", str(tmp_path))
    code, out, _ = cli(capsys, "weights")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1 + len(CATALOGUE)
    assert all(any(line.startswith(name + " ") for line in lines) for name in CATALOGUE)
    with pytest.raises(SystemExit) as exit_:
        main(["weights", "--help"])
    assert exit_.value.code == 0 and "download" in capsys.readouterr().out
    code, _, err = cli(capsys, "weights", "download", "official:mae_pretrain_vit_bse")
    assert code == 2 and len(err) == 1 and err[0].startswith("mae weights: error: unknown weights name")
    assert "official:mae_pretrain_vit_base" in err[0]
    for argv, said in ((["verfy"], "did you mean 'verify'"), ([FULL], f"mae weights download {FULL}"),
                       (["download"], "needs at least one NAME")):
        code, _, err = cli(capsys, "weights", *argv)
        assert code == 2 and len(err) == 1 and err[0].startswith("mae weights: error: ") and said in err[0], err


# ---------------------------------------------------------------------------------------------------- official files
def test_a_name_downloads_once_and_reads_like_the_file_by_path(mock, release_file, capsys):
    """Download by name through the CLI: the file lands in $MAE_HOME with its sha256 recorded, a stale temporary of
    a killed download is cleared, a second resolve is a cache hit (one GET in all), the tensors equal the same file
    read by path, and verify re-reads it; a flipped byte is then reported (exit 2)."""
    path, data = release_file
    mock.files[FULL_PATH] = ("ok", data)
    folder = cached_folder(FULL)
    folder.mkdir(parents=True)
    stale = folder / ".mae_pretrain_vit_base_full.pth.999999999.abcd1234.tmp"  # a killed process's temporary
    stale.write_bytes(b"half")

    code, out, err = cli(capsys, "weights", "download", FULL)
    assert code == 0, err
    resolved = resolve_weights(FULL)
    assert mock.gets(FULL_PATH) == 1 and str(resolved.path) in out
    assert resolved.path == folder / "mae_pretrain_vit_base_full.pth" and resolved.path.read_bytes() == data
    assert leftovers(folder) == ["mae_pretrain_vit_base_full.pth", "mae_pretrain_vit_base_full.pth.json"]
    sha = hashlib.sha256(data).hexdigest()
    assert resolved.provenance() == {"name": FULL, "source": "official", "checksum": f"sha256:{sha}",
                                     "licence": "CC-BY-NC-4.0"}
    assert json.loads((folder / "mae_pretrain_vit_base_full.pth.json").read_text())["sha256"] == sha
    assert tensors_equal(read_checkpoint(resolved.path).state_dict, read_checkpoint(path).state_dict)

    code, out, _ = cli(capsys, "weights")
    assert code == 0 and any(line.startswith(FULL) and " yes " in line and str(resolved.path) in line
                             for line in out.splitlines())
    code, out, _ = cli(capsys, "weights", "verify")
    assert code == 0 and out.startswith(f"ok   {FULL}") and len(out.strip().splitlines()) == 1

    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    resolved.path.write_bytes(bytes(damaged))
    code, out, err = cli(capsys, "weights", "verify", FULL)
    assert code == 2 and out.startswith(f"BAD  {FULL}") and "differs from the" in out
    assert len(err) == 1 and err[0].startswith("mae weights: error: 1 of 1 failed verification")


@pytest.mark.parametrize(("behaviour", "name", "said"), [
    ("wrong", "official:mae_pretrain_vit_base", "not the published prefix 8cad7c"),
    ("cut", FULL, "was cut short"),
    ("404", FULL, "HTTP 404"),
    ("hang", FULL, "timed out"),
])
def test_a_failed_download_is_one_line_leaves_nothing_and_the_retry_succeeds(mock, release_file, capsys,
                                                                               monkeypatch, behaviour, name, said):
    """Wrong bytes (md5 against the published prefix), a transfer cut mid-file (fewer bytes than Content-Length), a
    404 and a server that never answers (MAE_DOWNLOAD_TIMEOUT): exit 2, one `mae weights: error:` line, nothing but
    the lock file in the cache folder; then, the server fixed, the same command succeeds."""
    _, data = release_file
    url_path = "/mae/" + CATALOGUE[name].location
    mock.files[url_path] = ("ok" if behaviour == "wrong" else behaviour, data)
    if behaviour == "hang":
        monkeypatch.setenv("MAE_DOWNLOAD_TIMEOUT", "0.5")
    code, _, err = cli(capsys, "weights", "download", name)
    assert code == 2 and len(err) == 1 and err[0].startswith("mae weights: error: ") and said in err[0], err
    assert "Traceback" not in err[0]
    assert leftovers(cached_folder(name)) == []

    mock.files[url_path] = ("ok", data)
    if behaviour == "wrong":  # the tiny file stands in for the release: its own md5 becomes the published one
        entry = CATALOGUE[name]
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        monkeypatch.setitem(CATALOGUE, name, dataclasses.replace(entry, md5_prefix=md5[:6]))
    code, _, err = cli(capsys, "weights", "download", name)
    assert code == 0, err
    assert resolve_weights(name).path.read_bytes() == data


def test_offline_uses_the_cache_and_says_how_to_fetch_what_is_missing(mock, release_file, capsys, monkeypatch):
    """MAE_OFFLINE=1 (or HF_HUB_OFFLINE=1): an uncached name is one line naming `mae weights download NAME` and
    MAE_HOME, with no request made; once downloaded, the name resolves offline without a request."""
    _, data = release_file
    mock.files[FULL_PATH] = ("ok", data)
    monkeypatch.setenv("MAE_OFFLINE", "1")
    code, _, err = cli(capsys, "weights", "download", FULL)
    assert code == 2 and len(err) == 1 and f"mae weights download {FULL}" in err[0] and "MAE_HOME" in err[0]
    assert mock.requests == Counter()
    monkeypatch.delenv("MAE_OFFLINE")
    assert cli(capsys, "weights", "download", FULL)[0] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_weights(FULL).path.read_bytes() == data
    assert mock.gets(FULL_PATH) == 1


CONCURRENT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from mae.weights import resolve_weights
print(resolve_weights(sys.argv[1]).checksum)
"""


def test_processes_downloading_one_name_at_once_fetch_it_once(mock, release_file):
    """Four processes ask for the same name while the server is slow: one downloads (one GET), the others wait on
    the file lock, then use the same file."""
    _, data = release_file
    name = "official:mae_visualize_vit_base"
    mock.files["/mae/" + CATALOGUE[name].location] = ("slow", data)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, name], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert mock.gets("/mae/" + CATALOGUE[name].location) == 1
    assert {out.strip() for out, _ in results} == {f"sha256:{hashlib.sha256(data).hexdigest()}"}
    assert any("waiting: another process is downloading" in err for _, err in results)
    assert leftovers(cached_folder(name)) == ["mae_visualize_vit_base.pth", "mae_visualize_vit_base.pth.json"]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """$MAE_HOME on a 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    monkeypatch.setenv("MAE_HOME", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_one_line_leaves_nothing_and_the_retry_succeeds_once_there_is_room(mock, small_disk, capsys):
    """A 600 kB file into a 256 KiB cache: ENOSPC is one line naming the file and MAE_HOME, the partial file is
    gone; after the disk grows, the same command succeeds."""
    name = "official:mae_visualize_vit_huge"
    data = os.urandom(600_000)
    mock.files["/mae/" + CATALOGUE[name].location] = ("ok", data)
    code, _, err = cli(capsys, "weights", "download", name)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and "MAE_HOME" in err[0], err
    assert leftovers(cached_folder(name)) == []
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    code, _, err = cli(capsys, "weights", "download", name)
    assert code == 0, err
    assert resolve_weights(name).path.read_bytes() == data


# ---------------------------------------------------------------------------------------------------- the Hub
HUB_SCRIPT = """
import contextlib, io, json, os, sys
from mae.cli import main

def run(*argv, offline=False):
    os.environ.pop("MAE_OFFLINE", None)
    if offline:
        os.environ["MAE_OFFLINE"] = "1"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue().strip().splitlines()}

steps = [run("weights", "download", "hf:test-org/tiny-mae", "timm:vit_base_patch16_224.mae"),
         run("weights", "download", "hf:test-org/tiny-mae-bin@" + sys.argv[1]),
         run("weights", "download", "hf:test-org/missing"),
         run("weights", "verify", "hf:test-org/tiny-mae", "hf:test-org/tiny-mae-bin@" + sys.argv[1],
             "timm:vit_base_patch16_224.mae"),
         run("weights", "download", "hf:test-org/tiny-mae", offline=True),
         run("weights", "download", "hf:test-org/never-fetched", offline=True)]
print("RESULT " + json.dumps(steps))
"""


def test_hub_names_download_through_huggingface_hub_and_read_like_the_folder(mock, tmp_path):
    """Against a mock Hub (HF_ENDPOINT): a ViTMAEForPreTraining folder written by `save_hf_pretrained` downloads by
    ``hf:`` name (config.json + model.safetensors), a repository with only pytorch_model.bin falls back to it after
    the Hub's EntryNotFound, ``timm:<tag>`` fetches ``timm/<tag>``; each snapshot reads like the original; verify
    checks every blob against its ETag; a missing repository is one line; offline, the cached name resolves with no
    request and an uncached one is one line saying how to fetch it."""
    model = tiny_mae()
    folder = save_hf_pretrained(model, tmp_path / "hf_dir")
    bin_file = io.BytesIO()
    torch.save(to_hf_state_dict(model), bin_file)
    encoder = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    save_file(encoder, tmp_path / "timm.safetensors", metadata={"format": "pt"})
    config = (folder / "config.json").read_bytes()
    mock.repos["test-org/tiny-mae"] = {"config.json": config, "model.safetensors":
                                       (folder / "model.safetensors").read_bytes()}
    mock.repos["test-org/tiny-mae-bin"] = {"config.json": config, "pytorch_model.bin": bin_file.getvalue()}
    mock.repos["timm/vit_base_patch16_224.mae"] = {
        "config.json": json.dumps({"architecture": "vit_base_patch16_224", "num_classes": 0}).encode(),
        "model.safetensors": (tmp_path / "timm.safetensors").read_bytes()}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": mock.url,
           "HF_HOME": str(tmp_path / "hf_home"), "NO_PROXY": LOCAL, "no_proxy": LOCAL,
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, COMMIT], env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert done.returncode == 0 and result is not None, done.stderr[-3000:]
    fetched, from_bin, missing, verified, offline_hit, offline_miss = json.loads(result.removeprefix("RESULT "))

    assert fetched["code"] == 0 and from_bin["code"] == 0, (fetched, from_bin)
    paths = [Path(line.split("  ")[1]) for step in (fetched, from_bin) for line in step["out"].splitlines()]
    assert [p.name for p in paths] == [COMMIT] * 3 and sorted(os.listdir(paths[1])) == ["config.json",
                                                                                        "model.safetensors"]
    original = read_checkpoint(folder).state_dict
    assert tensors_equal(read_checkpoint(paths[0]).state_dict, original)
    assert tensors_equal(read_checkpoint(paths[2]).state_dict, original)
    assert tensors_equal(read_checkpoint(paths[1]).state_dict, read_checkpoint(tmp_path / "timm.safetensors")
                         .state_dict)
    assert mock.requests["HEAD", f"/test-org/tiny-mae-bin/resolve/{COMMIT}/model.safetensors"] == 1  # then the .bin

    assert missing["code"] == 2 and len(missing["err"]) == 1 and "no repository 'test-org/missing'" in \
        missing["err"][0], missing
    assert verified["code"] == 0 and verified["out"].count("ok ") == 3, verified
    assert offline_hit["code"] == 0 and str(paths[0]) in offline_hit["out"], offline_hit
    assert mock.requests["HEAD", "/test-org/tiny-mae/resolve/main/config.json"] == 1  # none offline
    assert offline_miss["code"] == 2 and len(offline_miss["err"]) == 1, offline_miss
    assert "mae weights download hf:test-org/never-fetched" in offline_miss["err"][0]
    assert not any("never-fetched" in path for _, path in mock.requests)
