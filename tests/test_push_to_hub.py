"""push_to_hub, offline: huggingface_hub's own HfApi client talks to an in-process fake Hub (no sockets).

The fake answers the endpoints a model upload uses (create repo, create branch, validate the card's YAML, preupload,
the LFS batch API, the LFS PUT of each large file, commit) and records every request, so the tests check the exact
operations of the ONE commit. Not covered offline: Xet transfers (hf_xet's own Rust network stack; disabled here,
so huggingface_hub takes its LFS path), the Hub's real answers (permissions, quotas, LFS/Xet storage, PR creation).
The real thing is `test_push_to_the_real_hub` (marked network, deselected by default).
"""

import base64
import hashlib
import json
import os
import socket
from pathlib import Path

import httpx2
import pytest
from conftest import load_script
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import _http

from transformers_cheers.conversion import ConversionError, convert_official_checkpoint


# huggingface_hub's LFS upload passes bytes as data= to httpx2, which warns about it
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
REPO = "someone/cheers-hf"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB (and *.safetensors) with LFS/Xet


push_script = load_script(ROOT / "conversion" / "push_to_hub.py")
model_card, push_to_hub = push_script.model_card, push_script.push_to_hub


class FakeHub:
    """An in-process Hub for httpx2.MockTransport: answers and records what huggingface_hub sends."""

    def __init__(self, already_uploaded: bool = False):
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.created: list[dict] = []
        self.validated_yaml: list[str] = []
        self.already_uploaded = already_uploaded  # the LFS store already has the objects (a resumed push)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        url, body = request.url, request.read()
        path = url.path
        self.requests.append((request.method, f"{url.host}{path}"))
        if path == "/api/repos/create":
            data = json.loads(body)
            self.created.append(data)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{data['organization']}/{data['name']}"})
        if path == "/api/validate-yaml":
            self.validated_yaml.append(json.loads(body)["content"])
            return httpx2.Response(200, json={})
        if path.startswith("/api/models/") and "/branch/" in path:
            return httpx2.Response(200, json={})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": file["path"],
                    "uploadMode": "lfs"
                    if file["path"].endswith(".safetensors") or file["size"] > LFS_THRESHOLD
                    else "regular",
                    "shouldIgnore": False,
                }
                for file in files
            ]
            return httpx2.Response(200, json={"files": modes})
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            answer = [
                {"oid": o["oid"], "size": o["size"]}
                if self.already_uploaded
                else {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"https://lfs.fake/{o['oid']}"}},
                }
                for o in objects
            ]
            return httpx2.Response(200, json={"transfer": "basic", "objects": answer})
        if url.host == "lfs.fake" and request.method == "PUT":
            self.lfs_objects[path.strip("/")] = body
            return httpx2.Response(200)
        if path.startswith("/api/models/") and "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            revision = path.rsplit("/commit/", 1)[1]
            self.commits.append({"revision": revision, "params": dict(url.params), "lines": lines})
            pr = url.params.get("create_pr") == "1"
            repo = path.removeprefix("/api/models/").rsplit("/commit/", 1)[0]
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/{repo}/commit/{'1' * 40}",
                    "commitOid": "1" * 40,
                    "pullRequestUrl": f"https://huggingface.co/{repo}/discussions/1" if pr else None,
                },
            )
        return httpx2.Response(404, json={"error": f"the fake Hub does not know {request.method} {path}"})

    def commit_files(self, commit: dict) -> dict[str, dict]:
        return {line["value"]["path"]: line for line in commit["lines"] if line["key"] in ("file", "lfsFile")}


@pytest.fixture
def fake_hub(monkeypatch):
    """Route huggingface_hub's HTTP client to a FakeHub; any real socket connection fails the test."""
    hub = FakeHub()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS path: its transfer runs through the fake too
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a real network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    yield hub
    _http.set_client_factory(_http.default_client_factory)


@pytest.fixture(scope="module")
def folder(golden, tmp_path_factory):
    """A converted golden folder (2 shards; verified elsewhere, so no verification here)."""
    output = tmp_path_factory.mktemp("push") / "cheers-hf"
    return convert_official_checkpoint(golden.checkpoint, output, max_shard_size="20MB", verify=False).output_dir


def local_files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir() if path.is_file()}


def test_push_is_one_commit_with_every_file_and_the_card(folder, fake_hub):
    info = push_to_hub(
        folder, REPO, private=True, revision="v1", commit_message="Add Cheers", api=HfApi(token="hf_fake")
    )
    assert info.commit_url == f"https://huggingface.co/{REPO}/commit/{'1' * 40}"
    assert fake_hub.created == [
        {"name": "cheers-hf", "organization": "someone", "visibility": "private", "type": "model"}
    ]
    # The exact sequence: repo, branch, card check, preupload, LFS batch, one PUT per shard, ONE commit.
    assert [request for request in fake_hub.requests if request[0] != "PUT"] == [
        ("POST", "huggingface.co/api/repos/create"),
        ("POST", f"huggingface.co/api/models/{REPO}/branch/v1"),
        ("POST", "huggingface.co/api/validate-yaml"),
        ("POST", f"huggingface.co/api/models/{REPO}/preupload/v1"),
        ("POST", f"huggingface.co/{REPO}.git/info/lfs/objects/batch"),
        ("POST", f"huggingface.co/api/models/{REPO}/commit/v1"),
    ]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["lines"][0] == {"key": "header", "value": {"summary": "Add Cheers", "description": ""}}
    files = fake_hub.commit_files(commit)
    assert set(files) == local_files(folder) | {"README.md"}
    expected = {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "configuration_cheers.py",
        "modeling_cheers.py",
        "processing_cheers.py",
        "image_processing_cheers.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    }
    assert expected <= set(files)
    # Large files go through LFS (their bytes were PUT to the LFS store, addressed by sha256), the rest inline.
    lfs = {path for path, line in files.items() if line["key"] == "lfsFile"}
    assert lfs == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"}
    for path in lfs:
        data = (folder / path).read_bytes()
        oid = hashlib.sha256(data).hexdigest()
        assert files[path]["value"] == {"path": path, "algo": "sha256", "oid": oid, "size": len(data)}
        assert fake_hub.lfs_objects[oid] == data
    for path in set(files) - lfs - {"README.md"}:
        assert base64.b64decode(files[path]["value"]["content"]) == (folder / path).read_bytes(), path
    card = base64.b64decode(files["README.md"]["value"]["content"]).decode()
    assert fake_hub.validated_yaml and "license: apache-2.0" in fake_hub.validated_yaml[0]
    assert ModelCard(card).data.license == "apache-2.0"
    assert not (folder / "README.md").exists()  # the card is generated in memory, the folder is left alone


def test_push_as_a_pull_request(folder, fake_hub):
    info = push_to_hub(folder, REPO, create_pr=True, api=HfApi(token="hf_fake"))
    assert info.pr_url == f"https://huggingface.co/{REPO}/discussions/1"
    assert not any("/branch/" in url for _, url in fake_hub.requests)
    [commit] = fake_hub.commits
    assert commit["revision"] == "main" and commit["params"] == {"create_pr": "1"}


def test_resumed_push_sends_no_bytes_the_hub_already_has(folder, fake_hub):
    fake_hub.already_uploaded = True  # e.g. the first attempt died after the LFS uploads, before the commit
    push_to_hub(folder, REPO, api=HfApi(token="hf_fake"))
    assert not [request for request in fake_hub.requests if request[0] == "PUT"]
    assert (
        len(fake_hub.commits) == 1 and len(fake_hub.commit_files(fake_hub.commits[0])) == len(local_files(folder)) + 1
    )


def test_push_cli(folder, fake_hub, capsys, tmp_path):
    cli = push_script
    code = cli.main(["--folder", str(folder), "--repo-id", REPO, "--create-pr", "--commit-message", "Cheers bf16"])
    assert code == 0 and f"pushed: https://huggingface.co/{REPO}/discussions/1" in capsys.readouterr().out
    assert fake_hub.commits[0]["lines"][0]["value"]["summary"] == "Cheers bf16"
    (tmp_path / "config.json").write_text('{"model_type": "umm"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    code = cli.main(["--folder", str(tmp_path), "--repo-id", REPO])
    assert code == 1 and "is not a native Cheers config" in capsys.readouterr().err
    assert len(fake_hub.commits) == 1


def test_push_refuses_pickles_and_non_converted_folders(folder, tmp_path):
    with pytest.raises(ConversionError, match="not a converted Cheers folder"):
        push_to_hub(tmp_path, REPO, api=object())
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors"):
        (copy / name).write_bytes((folder / name).read_bytes())
    (copy / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConversionError, match="contains pickled weights"):
        push_to_hub(copy, REPO, api=object())


def test_model_card(folder):
    card = model_card(REPO, folder, base_model="AI9Stars/Cheers")
    data = ModelCard(card).data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.base_model == "AI9Stars/Cheers" and "cheers" in data.tags
    for needle in (
        f'CheersForConditionalGeneration.from_pretrained("{REPO}"',
        f'AutoModelForImageTextToText.from_pretrained("{REPO}", trust_remote_code=True',
        f'AutoProcessor.from_pretrained("{REPO}", trust_remote_code=True)',
        f'CheersPipeline.from_pretrained("{REPO}"',
        f'DiffusionPipeline.from_pretrained("{REPO}", trust_remote_code=True',
        "LoraConfig(",
        "arXiv 2603.12793",
        "https://arxiv.org/abs/2603.12793",
        "journal = {arXiv preprint arXiv:2603.12793}",
        "2 safetensors shard(s)",
        "bfloat16",
    ):
        assert needle in card, needle
    # What the converter checked, and what it did not (no claim of parity with the official code).
    claim = " ".join(card.split())
    assert "every tensor here is bit-identical to the official file's after renaming" in claim
    assert "as the same weights loaded from the official layout by transformers-cheers" in claim
    assert "within a stated floating-point tolerance" in claim
    assert "not a comparison with the official code" in claim
    assert "the same logits and velocities as the unconverted ones" not in claim


@pytest.mark.network
def test_push_to_the_real_hub(folder):
    """Needs HF_TOKEN and CHEERS_TEST_REPO (a scratch repo you own); run with `pytest -m network`."""
    repo = os.environ.get("CHEERS_TEST_REPO")
    if not repo or not os.environ.get("HF_TOKEN"):
        pytest.skip("set HF_TOKEN and CHEERS_TEST_REPO")
    info = push_to_hub(folder, repo, private=True, create_pr=True, commit_message="transformers-cheers push test")
    assert info.pr_url
    files = set(HfApi().list_repo_files(repo, revision=info.pr_revision))
    assert local_files(folder) | {"README.md"} <= files
