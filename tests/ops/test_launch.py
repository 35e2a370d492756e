"""Launch scripts: syntax, the torchrun/srun command for a faked Slurm job, and the requeue chain.

Slurm is faked with small executables on PATH (scontrol, squeue, scancel, srun) that record how
they were called; the fake srun plays the trainer (saves a checkpoint iteration, asks for a requeue).
"""
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / "launch" / "torchrun.sh", REPO / "launch" / "lib.sh",
           REPO / "launch" / "slurm" / "job.sh", REPO / "launch" / "slurm" / "pt_109b.sbatch",
           REPO / "launch" / "slurm" / "cpt_109b.sbatch", REPO / "launch" / "slurm" / "m3_cpt.sbatch"]

FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_CALLS"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-a017\\ngpu-a018\\ngpu-b001\\ngpu-b002\\n'; fi
"""
FAKE_SQUEUE = """#!/bin/bash
echo "squeue $*" >> "$FAKE_CALLS"
echo "1-02:03:04"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_CALLS"
touch "$FAKE_DIR/signalled"
"""
# Plays 4 nodes of trainers: optionally waits for the forwarded signal, then saves and asks to requeue.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_CALLS"
save=""
for a in "$@"; do case $a in checkpoint.save=*) save=${a#*=} ;; esac; done
touch "$FAKE_DIR/started"
if [[ ${FAKE_WAIT_SIGNAL:-0} == 1 ]]; then
  for _ in $(seq 200); do [[ -f $FAKE_DIR/signalled ]] && break; sleep 0.05; done
fi
if [[ -n ${FAKE_NEW_ITER:-} ]]; then echo "$FAKE_NEW_ITER" > "$save/latest_checkpointed_iteration.txt"; fi
if [[ ${FAKE_REQUEUE:-0} == 1 ]]; then echo '{"reason": "walltime", "step": 1}' > "$save/requeue_request.json"; exit 1; fi
exit ${FAKE_RC:-0}
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE),
                       ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)]:
        p = bin_dir / name
        p.write_text(body)
        p.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MSA_", "NCCL_"))}
    env.update({
        "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_CALLS": str(tmp_path / "calls.log"),
        "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "gpu-a[017-018],gpu-b[001-002]", "SLURM_SUBMIT_DIR": str(REPO),
        "MSA_SAVE_DIR": str(tmp_path / "save"), "MSA_RUN_DIR": str(tmp_path / "run"),
        "MSA_LOG_DIR": str(tmp_path / "logs"),
    })
    return env


def _calls(tmp_path):
    f = tmp_path / "calls.log"
    return f.read_text().splitlines() if f.exists() else []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_slurm_builds_one_torchrun_per_node_with_c10d_at_first_node(fake_slurm, tmp_path):
    env = dict(fake_slurm, MSA_LAUNCH_DRY_RUN="1", SLURM_JOB_END_TIME="1900000000")
    out = subprocess.run(["bash", str(REPO / "launch/slurm/pt_109b.sbatch"), "train.lr=1e-4"],
                         env=env, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(out)
    assert argv[0] == "srun"
    assert "--ntasks-per-node=1" in argv and "--nodes=4" in argv and "--ntasks=4" in argv
    t = argv.index("torchrun")
    torchrun = argv[t:]
    assert "--nnodes=4" in torchrun and "--nproc-per-node=8" in torchrun
    assert "--rdzv-backend=c10d" in torchrun
    assert "--rdzv-endpoint=gpu-a017:29500" in torchrun
    assert "--rdzv-id=4242-0" in torchrun
    mod = torchrun.index("-m")
    assert torchrun[mod + 1] == "msa_train.train"
    assert torchrun[mod + 2:] == ["experiment=msa_109b_pt", "name=msa_109b_pt", f"run_dir={tmp_path}/run",
                                  f"checkpoint.save={tmp_path}/save", "train.lr=1e-4"]


def test_cpt_requires_the_dense_checkpoint(fake_slurm, tmp_path):
    env = dict(fake_slurm, MSA_LAUNCH_DRY_RUN="1")
    r = subprocess.run(["bash", str(REPO / "launch/slurm/cpt_109b.sbatch")], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "MSA_INIT_FROM" in r.stderr
    env["MSA_INIT_FROM"] = "/ckpt/dense"
    out = subprocess.run(["bash", str(REPO / "launch/slurm/cpt_109b.sbatch")], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "checkpoint.init_from=/ckpt/dense" in shlex.split(out)
    assert "experiment=msa_109b_cpt" in shlex.split(out)


def test_slurm_requeues_after_progress_and_exports_end_time(fake_slurm, tmp_path):
    env = dict(fake_slurm, FAKE_NEW_ITER="100", FAKE_REQUEUE="1")
    r = subprocess.run(["bash", str(REPO / "launch/slurm/pt_109b.sbatch")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert "scontrol requeue 4242" in calls
    assert any(c.startswith("squeue -h -j 4242") for c in calls)  # no SLURM_JOB_END_TIME here
    assert (tmp_path / "save" / "requeue_request.json").exists()


def test_slurm_stops_chain_without_progress(fake_slurm, tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("100")
    env = dict(fake_slurm, FAKE_REQUEUE="1", SLURM_RESTART_COUNT="3")
    (save / ".msa_stalled_jobs").write_text("1")  # the previous job made no progress either
    r = subprocess.run(["bash", str(REPO / "launch/slurm/pt_109b.sbatch")], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no new checkpoint" in r.stderr
    assert not any("requeue" in c for c in _calls(tmp_path) if c.startswith("scontrol"))


def test_slurm_requeue_cap_and_plain_failure(fake_slurm, tmp_path):
    env = dict(fake_slurm, FAKE_NEW_ITER="7", FAKE_REQUEUE="1", SLURM_RESTART_COUNT="5",
               MSA_MAX_REQUEUES="5")
    r = subprocess.run(["bash", str(REPO / "launch/slurm/pt_109b.sbatch")], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "MSA_MAX_REQUEUES" in r.stderr
    # A stale request left by an earlier job must not requeue a job that simply failed.
    (tmp_path / "save" / "requeue_request.json").write_text("{}")
    env = dict(fake_slurm, FAKE_RC="3")
    r = subprocess.run(["bash", str(REPO / "launch/slurm/pt_109b.sbatch")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 3 and "not requeueing" in r.stderr


def test_batch_shell_forwards_usr1_to_job_steps(fake_slurm, tmp_path):
    env = dict(fake_slurm, FAKE_WAIT_SIGNAL="1", FAKE_NEW_ITER="5", FAKE_REQUEUE="1")
    p = subprocess.Popen(["bash", str(REPO / "launch/slurm/pt_109b.sbatch")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if (tmp_path / "started").exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)  # let the shell reach its wait
        p.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@900` delivers
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    calls = _calls(tmp_path)
    assert "scancel --signal=USR1 4242" in calls
    assert "scontrol requeue 4242" in calls


def test_torchrun_wrapper_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSA_")}
    env.update(MSA_LAUNCH_DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1,2,3")
    out = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), "experiment=tiny", "name=a b"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert shlex.split(out) == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4",
                                "--max-restarts=0", "-m", "msa_train.train", "experiment=tiny",
                                "name=a b"]
    env["NPROC"] = "zero"
    r = subprocess.run(["bash", str(REPO / "launch/torchrun.sh")], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "NPROC" in r.stderr
