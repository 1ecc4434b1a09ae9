"""core/hub.py: a task on the Hugging Face Hub, all offline.

Loading resolves ``org/name`` from a Hugging Face cache laid out under ``tmp_path`` exactly as
``huggingface_hub`` lays it out (blobs, ``snapshots/<commit>`` symlinks, ``refs/main``) with
``HF_HUB_OFFLINE=1``; pushing goes to a mocked ``HfApi`` (the one mock: the Hub is unreachable
here), whose commit is then laid out in that cache and loaded back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from adalayers.core import hub
from adalayers.core.backbone import load_backbone
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig

REPO = "org/tiny-cola"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def backbone(tiny_model_dir):
    return load_backbone(tiny_model_dir("bert"))


def make_task(backbone, task_type: str = "sequence_classification", labels=("bad", "good")):
    torch.manual_seed(3)
    task = Task(
        TaskConfig(task_type, list(labels), mixer={"dim": 8}, head={"num_heads": 2}),
        backbone.info(),
    )
    torch.nn.init.normal_(task.mixer.p)
    return task


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under ``tmp_path``, offline (what ``HF_HOME`` /
    ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE=1`` give; huggingface_hub reads them at import, so its
    constants are set too)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    commit: str = COMMIT,
    listing: dict[str, bytes] | None = None,
) -> Path:
    """Lay ``files`` out as huggingface_hub caches a download of ``repo_id`` at ``commit``
    (branch ``main``): content in ``blobs/`` (LFS files named by their sha256, others by their
    git blob id), relative symlinks in ``snapshots/<commit>/``, the commit in ``refs/main``;
    with ``listing`` (every file of the repository), the tree listing a download with the Hub
    reachable leaves in ``trees/<commit>.json``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin", ".png")):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = git_blob_id(data)
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / blob, snapshot))
    (repo / "refs" / "main").write_text(commit)
    if listing is not None:
        tree = {
            name: {"size": len(data), "blob_id": git_blob_id(data)}
            for name, data in listing.items()
        }
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": 1, "files": tree})
        )
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_from_pretrained_resolves_a_repo_id_from_the_offline_cache(
    backbone, tmp_path, hf_cache, monkeypatch
):
    from adalayers.serving.runtime import load_runs

    task = make_task(backbone)
    folder = task.save_pretrained(tmp_path / "task")
    snapshot = cache_repo(hf_cache, REPO, folder_files(folder))
    # the layout is huggingface_hub's own: its offline lookups find it
    assert huggingface_hub.snapshot_download(REPO, local_files_only=True) == str(snapshot)
    found = huggingface_hub.try_to_load_from_cache(REPO, "model.safetensors")
    assert found == str(snapshot / "model.safetensors")

    loaded = Task.from_pretrained(REPO, backbone)
    assert loaded.labels == ["bad", "good"] and loaded.base == task.base
    assert all(
        torch.equal(a, b) for a, b in zip(task.state_dict().values(), loaded.state_dict().values())
    )
    assert Task.from_pretrained(REPO, revision=COMMIT).labels == ["bad", "good"]
    # as a download with the Hub reachable leaves it: with the repository's tree listing
    cache_repo(hf_cache, "org/listed", folder_files(folder), listing=folder_files(folder))
    assert Task.from_pretrained("org/listed").labels == ["bad", "good"]
    inputs = dict(backbone.tokenizer(["a good film", "bad"], padding=True, return_tensors="pt"))
    runtime = load_runs({"cola": REPO}, base=backbone)  # serving: a repo id is a run too
    assert torch.equal(
        runtime(inputs).logits["cola"], AdaLayers(backbone, {"t": task}).eval()(inputs).logits["t"]
    )

    with pytest.raises(
        FileNotFoundError, match=r"no snapshot of org/tiny-cola \(revision v2\).*HF_HUB_OFFLINE"
    ):
        Task.from_pretrained(REPO, revision="v2")
    with pytest.raises(
        FileNotFoundError, match="org/missing is not a local folder.*holds no snapshot"
    ):
        Task.from_pretrained("org/missing")
    with pytest.raises(ValueError, match="revision='v2' names a version of a Hub repository"):
        Task.from_pretrained(folder, revision="v2")
    # a local folder wins over a repository of the same name; a missing one is no repo id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    task.save_pretrained(tmp_path / "org" / "tiny-cola")
    assert hub.resolve_task(REPO) == Path(REPO)
    with pytest.raises(FileNotFoundError, match="not a saved adalayers task"):
        Task.from_pretrained(tmp_path / "nothing" / "here")


def test_a_repository_keeps_the_safety_checks(backbone, tmp_path, hf_cache):
    folder = make_task(backbone).save_pretrained(tmp_path / "task")
    files = folder_files(folder)
    meta = json.loads(files["config.json"])
    meta["labels"] = ["bad", "good", "ugly"]  # three labels, a two-way head in the weights
    files["config.json"] = json.dumps(meta).encode()
    cache_repo(hf_cache, "org/crafted", files)
    with pytest.raises(
        ValueError,
        match=r"models--org--crafted.*model\.safetensors: head\.out\.bias has shape \(2,\)",
    ):
        Task.from_pretrained("org/crafted")
    meta["mixer"]["dim"] = 2**30  # refused from the config, before the weights are looked at
    files["config.json"] = json.dumps(meta).encode()
    cache_repo(hf_cache, "org/huge", files)
    with pytest.raises(ValueError, match=r"org/huge: .*mixer\.dim=1073741824 is larger"):
        hub.resolve_task("org/huge")


def test_a_repository_that_is_not_a_task_is_refused_naming_what_is_missing(
    backbone, tmp_path, hf_cache, tiny_model_dir
):
    cache_repo(hf_cache, "org/pickled", {"README.md": b"# hi\n", "pytorch_model.bin": b"\x80"})
    with pytest.raises(FileNotFoundError) as err:
        Task.from_pretrained("org/pickled")
    message = str(err.value)
    assert "org/pickled is not an adalayers task" in message
    assert "has no config.json and no model.safetensors" in message
    assert "files: README.md, pytorch_model.bin" in message
    # weights without a config, and a config without safetensors weights
    folder = make_task(backbone).save_pretrained(tmp_path / "task")
    cache_repo(
        hf_cache, "org/weights", {"model.safetensors": (folder / "model.safetensors").read_bytes()}
    )
    with pytest.raises(
        FileNotFoundError, match="org/weights is not an adalayers task.*no config.json \\("
    ):
        Task.from_pretrained("org/weights")
    cache_repo(hf_cache, "org/config", {"config.json": (folder / "config.json").read_bytes()})
    with pytest.raises(
        FileNotFoundError, match="org/config is not an adalayers task.*no model.safetensors"
    ):
        Task.from_pretrained("org/config")
    # where a download left the repository's listing, the message lists the repository's files
    model = {"README.md": b"# a model\n", "config.json": b'{"model_type": "bert"}'}
    listing = {**model, "pytorch_model.bin": b"\x80", "tf_model.h5": b"h5"}
    cache_repo(hf_cache, "org/listed", model, listing=listing)
    assert [f.path for f in huggingface_hub.get_cached_repo_tree("org/listed")] == list(listing)
    with pytest.raises(FileNotFoundError) as err:
        Task.from_pretrained("org/listed")
    assert (
        "org/listed is not an adalayers task: the repository has no model.safetensors (files: "
        "README.md, config.json, pytorch_model.bin, tf_model.h5)"
    ) in str(err.value)
    # a task whose weights never reached the cache: incomplete, not "not a task"
    task_files = folder_files(folder)
    small = {n: task_files[n] for n in ("config.json", "labels.json")}
    cache_repo(hf_cache, "org/partial", small, listing=task_files)
    with pytest.raises(
        FileNotFoundError,
        match=r"org/partial: the Hugging Face cache \(.*\) holds only part of it.*HF_HUB_OFFLINE",
    ):
        Task.from_pretrained("org/partial")
    # a base model's repository: config.json and model.safetensors, but a transformers config
    cache_repo(hf_cache, "org/bert", folder_files(tiny_model_dir("bert")))
    with pytest.raises(
        ValueError, match="org/bert is not an adalayers task .*model_type 'bert'.*load_backbone"
    ):
        Task.from_pretrained("org/bert")


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("FacebookAI/roberta-large", "FacebookAI/roberta-large"),
        ("/models/my-base", None),
        ("./my-base", None),
        ("my-base", None),
    ],
)
def test_hub_base_id(name, hub_id):
    assert hub.hub_base_id(name) == hub_id


RUN_METRICS = {  # the keys a run's metrics.json has (training/train.py), trimmed
    "task": "cola",
    "task_type": "sequence_classification",
    "metric": "mcc",
    "validation": {"mcc": 0.25, "accuracy": 0.625, "loss": 0.68},
    "test": {"mcc": 0.2, "accuracy": 0.6, "per_type": {"x": {"f1": 1.0}}, "nan": float("nan")},
    "samples": {"test": [{"text": "A PRIVATE EXAMPLE", "label": "good"}]},
    "parameters_added": 1234,
    "percent_of_base": 0.85,
}


def test_model_card_parses_with_huggingface_hub(backbone):
    task = make_task(backbone)
    task.base = dataclasses.replace(task.base, name_or_path="all-MiniLM-L6-v2")
    card = ModelCard(
        str(hub.model_card(task, repo_id=REPO, metrics=RUN_METRICS, figure="layer_weights.png"))
    )
    data = card.data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "adalayers" and data.pipeline_tag == "text-classification"
    assert {"adalayers", "sequence_classification"} <= set(data.tags)
    assert data.model_name == REPO
    scores = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores == {
        ("validation", "mcc"): 0.25,
        ("validation", "accuracy"): 0.625,
        ("validation", "loss"): 0.68,
        ("test", "mcc"): 0.2,
        ("test", "accuracy"): 0.6,
    }
    assert {r.dataset_name for r in data.eval_results} == {"cola"}
    assert {r.task_type for r in data.eval_results} == {"text-classification"}
    text = card.text
    assert "![learned layer weights](layer_weights.png)" in text
    for layer in task.mixer.layer_weights():  # the text bar chart: one row per state
        assert f"\n{layer:>5}  " in text
    assert f'Task.from_pretrained("{REPO}")' in text and f"adalayers serve {REPO}" in text
    assert "| test | 0.2000 | 0.6000 |" in text
    assert "PRIVATE" not in str(card)  # the run's example inputs stay out of the card


@pytest.mark.parametrize(
    ("task_type", "labels", "pipeline_tag"),
    [
        ("token_classification", ("O", "B-X", "I-X"), "token-classification"),
        ("regression", (), "text-classification"),
        ("multilabel_classification", ("a", "b", "c"), "text-classification"),
    ],
)
def test_model_card_of_each_kind(backbone, task_type, labels, pipeline_tag):
    card = ModelCard(str(hub.model_card(make_task(backbone, task_type, labels))))
    assert card.data.pipeline_tag == pipeline_tag and task_type in card.data.tags
    assert card.data.base_model is None  # the base is a local folder: no hub id to name
    assert 'base="the base it was trained on' in card.text  # so the snippet says to give it
    assert card.data.eval_results is None and "## Results" not in card.text
    assert "org/name" in card.text  # the usage snippet's placeholder


def mocked_api(monkeypatch) -> tuple[mock.MagicMock, dict[str, bytes]]:
    """A mocked ``HfApi`` (signatures checked) and the files its ``create_commit`` received,
    read while the call runs (a pushed Task's folder is temporary)."""
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.side_effect = lambda repo_id, **_: RepoUrl(f"https://huggingface.co/{repo_id}")
    received: dict[str, bytes] = {}

    def create_commit(repo_id, operations, **kwargs):
        for op in operations:
            with op.as_file() as fh:
                received[op.path_in_repo] = fh.read()
        url = f"https://huggingface.co/{repo_id}/commit/{COMMIT}"
        return CommitInfo(url, kwargs["commit_message"], "", COMMIT)

    api.create_commit.side_effect = create_commit
    monkeypatch.setattr(hub, "HfApi", lambda **_: api)
    return api, received


def test_push_sends_the_task_files_and_the_card(backbone, tmp_path, hf_cache, monkeypatch):
    api, received = mocked_api(monkeypatch)
    task = make_task(backbone)
    commit = task.push_to_hub(REPO, private=True, revision="dev", commit_message="first")
    assert commit.oid == COMMIT
    api.create_repo.assert_called_once_with(REPO, private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(REPO, branch="dev", exist_ok=True)
    api.create_commit.assert_called_once()
    kwargs = api.create_commit.call_args.kwargs
    assert kwargs["revision"] == "dev" and kwargs["commit_message"] == "first"
    assert sorted(received) == ["README.md", "config.json", "labels.json", "model.safetensors"]
    saved = folder_files(task.save_pretrained(tmp_path / "saved"))
    for name in ("config.json", "labels.json", "model.safetensors"):
        assert received[name] == saved[name], name
    card = ModelCard(received["README.md"].decode())
    assert card.data.library_name == "adalayers" and card.data.eval_results is None

    # what was pushed loads back from the cache as the same task
    cache_repo(hf_cache, REPO, received)
    loaded = Task.from_pretrained(REPO, backbone)
    assert all(
        torch.equal(a, b) for a, b in zip(task.state_dict().values(), loaded.state_dict().values())
    )

    with pytest.raises(ValueError, match="not a Hub repository id"):
        task.push_to_hub("no-org")
    api.create_commit.reset_mock()
    with pytest.raises(FileNotFoundError, match="not a saved adalayers task"):
        hub.push_to_hub(tmp_path, REPO)  # checked before anything is sent
    api.create_commit.assert_not_called()


def test_cli_push_uploads_a_run_with_its_scores_and_figure(
    backbone, tmp_path, capsys, monkeypatch, hf_cache
):
    from adalayers.cli import main
    from adalayers.report import plot_layer_weights

    api, received = mocked_api(monkeypatch)
    run = tmp_path / "run"
    task = make_task(backbone)
    task.save_pretrained(run / "model")
    (run / "metrics.json").write_text(json.dumps(RUN_METRICS))
    plot_layer_weights(task.mixer.layer_weights(), run / "layer_weights.png")

    assert (
        main(["push", str(run), REPO, "--private", "--commit-message", "cola run", "--quiet"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "repo": REPO,
        "commit": COMMIT,
        "url": f"https://huggingface.co/{REPO}/commit/{COMMIT}",
    }
    api.create_repo.assert_called_once_with(REPO, private=True, exist_ok=True)
    api.create_branch.assert_not_called()
    assert sorted(received) == [
        "README.md",
        "config.json",
        "labels.json",
        "layer_weights.png",
        "model.safetensors",
    ]
    assert received["layer_weights.png"] == (run / "layer_weights.png").read_bytes()
    assert received["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    card = ModelCard(received["README.md"].decode())
    assert {r.metric_type for r in card.data.eval_results} == {"mcc", "accuracy", "loss"}
    assert "![learned layer weights](layer_weights.png)" in card.text

    cache_repo(hf_cache, REPO, received)  # `adalayers info` reads the pushed task by its id
    assert main(["info", REPO]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == ["bad", "good"] and info["layer_weights"] == {
        str(k): v for k, v in task.mixer.layer_weights().items()
    }

    assert main(["push", str(tmp_path / "nothing"), REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adalayers push: error:") and err.count("\n") == 1
    assert "nothing is not a folder" in err
