"""keep_last_k removes only iterations this job owns, never the newest good one or newer ones."""

import os

from msa_train.trainer import ckpt_layout as layout


def _mk(root, *its):
    for it in its:
        os.makedirs(layout.iteration_dir(str(root), it))


def test_prune_spares_iterations_this_job_does_not_own(tmp_path):
    _mk(tmp_path, 2, 4, 6, 8)
    removed = layout.prune(str(tmp_path), 1, protect=8, owned={6, 8})
    assert removed == [6]
    assert layout.list_iterations(str(tmp_path)) == [2, 4, 8]


def test_prune_never_touches_the_protected_or_newer_iterations(tmp_path):
    _mk(tmp_path, 1, 2, 3, 9)  # 9: a save in flight (newer than what the tracker names)
    removed = layout.prune(str(tmp_path), 1, protect=3, owned={1, 2, 3, 9})
    assert removed == [1, 2]
    assert layout.list_iterations(str(tmp_path)) == [3, 9]


def test_prune_without_owner_set_keeps_old_behaviour(tmp_path):
    _mk(tmp_path, 1, 2, 3)
    assert layout.prune(str(tmp_path), 2, protect=3) == [1]
