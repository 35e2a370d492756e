"""Checkpoint manifests: damage is found, named, and a save dir falls back to the previous
intact iteration without deleting anything."""

import json
import os

import pytest

from msa_train.trainer import ckpt_layout as layout
from msa_train.trainer import ckpt_manifest
from msa_train.trainer.checkpointing import select_intact
from msa_train.trainer.ckpt_layout import CheckpointError


def _iteration(root, it, payload=b"weights" * 1000):
    d = layout.iteration_dir(str(root), it)
    os.makedirs(d)
    with open(os.path.join(d, "__0_0.distcp"), "wb") as f:
        f.write(payload + bytes([it]))
    for name, text in (("metadata.json", "{}"), ("common.pt", "common"),
                       (layout.STATE_FILENAME, json.dumps({"progress": {"iteration": it}}))):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    ckpt_manifest.write_manifest(d, ckpt_manifest.collect_shard_entries(d))
    layout.write_tracker(str(root), it)
    return d


def _flip(path, offset=100, n=16):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    d = _iteration(tmp_path, 1)
    manifest = ckpt_manifest.read_manifest(d)
    assert set(manifest["files"]) == {"__0_0.distcp", "metadata.json", "common.pt",
                                      layout.STATE_FILENAME}
    assert manifest["files"]["__0_0.distcp"]["size"] == 7001
    assert ckpt_manifest.verify(d) == []


@pytest.mark.parametrize("damage, expected", [
    ("flip16", "changed on disk"), ("truncate", "truncated or replaced"),
    ("remove", "is missing"), ("state", "changed on disk")])
def test_damage_is_detected_and_names_the_file(tmp_path, damage, expected):
    d = _iteration(tmp_path, 1)
    shard = os.path.join(d, "__0_0.distcp")
    if damage == "flip16":
        _flip(shard)
    elif damage == "truncate":
        os.truncate(shard, 1000)
    elif damage == "remove":
        os.remove(shard)
    else:
        shard = os.path.join(d, layout.STATE_FILENAME)
        _flip(shard, offset=2, n=3)
    problems = ckpt_manifest.verify(d)
    assert len(problems) == 1 and shard in problems[0] and expected in problems[0]


def test_damaged_latest_falls_back_loudly_and_deletes_nothing(tmp_path, capsys):
    good = _iteration(tmp_path, 2)
    bad = _iteration(tmp_path, 4)
    _flip(os.path.join(bad, "__0_0.distcp"))
    listing = sorted(os.listdir(tmp_path))
    assert select_intact(str(tmp_path), "checkpoint.save") == good
    err = capsys.readouterr().err
    assert "CHECKPOINT DAMAGED" in err and bad in err and "__0_0.distcp" in err
    assert sorted(os.listdir(tmp_path)) == listing and os.path.isdir(bad)
    # verify=false loads what the tracker names, unchecked
    assert select_intact(str(tmp_path), "checkpoint.save", verify=False) == bad


def test_no_intact_iteration_left_fails_naming_the_file(tmp_path):
    only = _iteration(tmp_path, 3)
    os.truncate(os.path.join(only, "__0_0.distcp"), 10)
    with pytest.raises(CheckpointError) as err:
        select_intact(str(tmp_path), "checkpoint.save")
    msg = str(err.value)
    assert "__0_0.distcp" in msg and "checkpoint.verify=false" in msg
    assert "checkpoint.save" in msg


def test_explicit_iteration_does_not_fall_back(tmp_path):
    _iteration(tmp_path, 1)
    bad = _iteration(tmp_path, 2)
    _flip(os.path.join(bad, "common.pt"), offset=0, n=3)
    with pytest.raises(CheckpointError, match="named explicitly"):
        select_intact(bad, "checkpoint.load")


def test_damaged_manifest_is_reported(tmp_path):
    d = _iteration(tmp_path, 1)
    with open(os.path.join(d, ckpt_manifest.MANIFEST_FILENAME), "w") as f:
        f.write('{"algorithm": "xx')
    problems = ckpt_manifest.verify(d)
    assert problems and ckpt_manifest.MANIFEST_FILENAME in problems[0]


def test_checkpoint_without_manifest_is_loaded_unverified(tmp_path):
    d = _iteration(tmp_path, 1)
    os.remove(os.path.join(d, ckpt_manifest.MANIFEST_FILENAME))
    assert ckpt_manifest.verify(d) is None
    assert select_intact(str(tmp_path), "checkpoint.save") == d
