"""launch/: every launcher is strict and documented; the ones that can run here, run for real."""
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import BIN, PINS, REPO, check_run, read_json, requires_mpi, run

LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "hosts.sh", "mpirun.sh", "docker.sh", "slurm.sbatch", "elastic.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launcher_is_strict_and_has_help(script):
    path = LAUNCH / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    proc = run(["bash", path, "--help"], timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr
    assert "HVD_TRAIN_ARGS" in proc.stdout, "says how arguments reach hvd-train"


@pytest.mark.parametrize("script,args,message", [
    ("local.sh", ["--np", "0"], "--np must be a positive integer"),
    ("local.sh", ["--epochs", "3"], "unknown option --epochs (hvd-train options go after --)"),
    ("hosts.sh", [], "no hosts"),
    ("hosts.sh", ["-H", "node1"], "bad host entry 'node1' (want host:slots)"),
    ("mpirun.sh", ["-n", "x"], "--np must be a positive integer"),
    ("docker.sh", ["launcher"], "launcher needs -H"),
    ("docker.sh", ["worker"], "worker needs --authorized-keys"),
    ("docker.sh", ["launcher", "-H", "a:2,b", "--identity", "/dev/null"], "bad host entry 'b' (want host:slots)"),
    ("slurm.sbatch", [], "not inside a Slurm allocation"),
    ("elastic.sh", ["--min-np", "1", "--max-np", "2"], "--min-np, --max-np and --discovery are required"),
    ("elastic.sh", ["--min-np", "3", "--max-np", "2", "--discovery", "x"], "need --min-np <= --np <= --max-np"),
    ("elastic.sh", ["--min-np", "1", "--max-np", "2", "--discovery", "/nonexistent"], "does not exist"),
    ("elastic.sh", ["--min-np", "1", "--max-np", "2", "--discovery", "README.md"], "is not executable"),
])
def test_launcher_rejects_bad_arguments(script, args, message):
    proc = run(["bash", LAUNCH / script, *args], timeout=30)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_dry_run_prints_the_one_command_each_launcher_would_run(tmp_path):
    """The shared launcher helpers (launch/common.sh): venv, slot sum and DRY_RUN, alike everywhere."""
    env = {"DRY_RUN": "1", "VENV": str(BIN.parent)}
    local = run(["bash", LAUNCH / "local.sh", "-n", "3", "--gloo", "--", "--epochs", "2"], env=env)
    assert local.stdout.split() == [f"{BIN}/hvd-horovodrun", "-np", "3", "-H", "localhost:3", "--gloo",
                                    f"{BIN}/hvd-train", "--epochs", "2"], local.stderr
    hosts = run(["bash", LAUNCH / "hosts.sh", "--skip-preflight", "-H", "a:2,b:1", "--", "--epochs", "2"], env=env)
    assert hosts.stdout.split()[:3] == [f"{BIN}/hvd-horovodrun", "-np", "3"], hosts.stderr
    mpi = run(["bash", LAUNCH / "mpirun.sh", "-n", "2", "--", "--epochs", "2"], env={**env, "MPIRUN": "bash"})
    words = mpi.stdout.split()
    assert words[:3] == ["bash", "-np", "2"] and words[-3:] == [f"{BIN}/hvd-train", "--epochs", "2"], mpi.stderr
    assert "-bind-to" in words and "none" in words
    discovery = LAUNCH / "discover" / "hostfile.sh"
    elastic = run(["bash", LAUNCH / "elastic.sh", "--min-np", "1", "--max-np", "4", "-n", "2", "--discovery",
                   discovery, "--reset-limit", "3", "--", "--epochs", "2"], env=env)
    assert elastic.stdout.split() == [
        f"{BIN}/hvd-horovodrun", "-np", "2", "--min-np", "1", "--max-np", "4", "--host-discovery-script",
        str(discovery),
        "--slots-per-host", "1", "--elastic-timeout", "600", "--reset-limit", "3",
        f"{BIN}/hvd-train", "--epochs", "2"], elastic.stderr
    # Every listed host is this machine: Gloo on the loopback, said in one line (Horovod would
    # otherwise wait in silence to compare two hosts' interfaces).
    (tmp_path / "hosts.txt").write_text("localhost:1\n127.0.0.1:1\n")
    here = run(["bash", LAUNCH / "elastic.sh", "--min-np", "1", "--max-np", "2", "--discovery", discovery],
               env={**env, "HOSTS_FILE": str(tmp_path / "hosts.txt")})
    assert "--network-interface lo" in here.stdout and here.stderr.count("loopback interface") == 1, here.stderr
    (tmp_path / "hosts.txt").write_text("localhost:1\nnode7:1\n")
    there = run(["bash", LAUNCH / "elastic.sh", "--min-np", "1", "--max-np", "2", "--discovery", discovery],
                env={**env, "HOSTS_FILE": str(tmp_path / "hosts.txt")})
    assert "--network-interface" not in there.stdout and "loopback" not in there.stderr, there.stderr


@pytest.mark.integration
def test_elastic_sh_says_what_it_waits_for(tmp_path):
    """Too few slots listed: a line every few seconds saying so, then horovodrun's timeout ends it."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n")
    proc = run(["bash", LAUNCH / "elastic.sh", "--min-np", "2", "--max-np", "2", "--elastic-timeout", "6",
                "--discovery", LAUNCH / "discover" / "hostfile.sh", "--", "--epochs", "1"],
               env={"VENV": str(BIN.parent), "HOSTS_FILE": str(hosts), "ELASTIC_WAIT_REPORT_SECONDS": "2"}, timeout=60)
    waiting = [line for line in proc.stderr.splitlines() if line.startswith("elastic.sh: waiting for hosts")]
    assert proc.returncode != 0 and len(waiting) >= 2, proc.stderr[-2000:]
    assert "--min-np 2 needs 2 slot(s), the discovery script lists 1 (localhost:1)" in waiting[0]


def test_sample_discovery_scripts(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# the workers\nnode1:4\n\n  node2:2  # two GPUs\nnode3\n")
    proc = run([LAUNCH / "discover" / "hostfile.sh"], env={"HOSTS_FILE": str(hosts)})
    assert proc.returncode == 0 and proc.stdout.split() == ["node1:4", "node2:2", "node3"], proc.stderr
    missing = run([LAUNCH / "discover" / "hostfile.sh"], env={"HOSTS_FILE": str(tmp_path / "none")})
    assert missing.returncode != 0 and "cannot read" in missing.stderr


@pytest.mark.integration
def test_local_sh_trains_with_arguments_after_the_separator(tmp_path):
    # The default controller, from the benchmark: MPI when mpirun is installed (horovodrun --mpi
    # prefixes lines [1,0]), else Gloo ([0]). Wine, logits out of the model, sqrt LR scaling.
    out = tmp_path / "out"
    proc = run([LAUNCH / "local.sh", "-n", "2", "--", "--dataset", "wine", "--epochs", "30", "--logits", "--dropout",
                "0.1", "--lr-scaling", "sqrt", "--output-dir", out, "--progress", "epoch"])
    m = check_run(out, proc, 2)
    prefix = "[1,0]" if shutil.which("mpirun") else "[0]"
    assert m["epochs_completed"] == 30 and f"{prefix}<stdout>:epoch 30/30" in proc.stdout, proc.stdout[-2000:]
    assert m["test_accuracy"] >= 0.9
    assert m["scaled_lr"] == pytest.approx(0.01 * 2 ** 0.5)
    saved = read_json(out / "config.json")["config"]
    assert (saved["logits"], saved["dropout"]) == (True, 0.1)


@pytest.mark.integration
@requires_mpi
def test_mpirun_sh_plain_mpirun_with_uneven_eval_shards(tmp_path):
    # 45 test samples over 2 ranks (23 + 22): exact metrics need the sample-weighted combination.
    out = tmp_path / "run"
    proc = run([LAUNCH / "mpirun.sh", "-n", "2", "--", "--epochs", "40", "--test-fraction", "0.3", "--optimizer",
                "sgd", "--lr", "0.05", "--warmup-epochs", "0", "--threads", "2", "--output-dir", out,
                "--progress", "none"])
    m = check_run(out, proc, 2)
    assert m["test_samples"] == 45 and m["test_accuracy"] >= 0.9
    plan = read_json(out / "config.json")["plan"]
    assert plan["intra_op_threads"] == 2, "--threads overrides the cores // local size default"
    assert "learning rate 0.05 scaled to 0.1, warmup 0 epoch(s)" in proc.stdout


def test_slurm_script_turns_the_allocation_into_a_launch(tmp_path):
    # scontrol is Slurm's; this stand-in expands the node list the way it does, to check the shape
    # of the command the batch script builds (Slurm itself is not available here).
    (tmp_path / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node1\\nnode2\\n"\n')
    (tmp_path / "scontrol").chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "4",
           "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_CPUS_PER_TASK": "3", "SLURM_SUBMIT_DIR": "/work/proj",
           "DRY_RUN": "1", "VENV": ""}  # the script's own default venv, whatever the caller's VENV
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--", "--epochs", "5"], env={**env, "LAUNCH_MODE": "horovodrun"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["/work/proj/.venv/bin/hvd-horovodrun", "-np", "4", "-H", r"node1:2\,node2:2",
                                   "--gloo", "/work/proj/.venv/bin/hvd-train", "--threads", "3", "--epochs", "5"]
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--epochs", "5"], env=env)
    assert proc.stdout.split() == ["srun", "--mpi=pmix", "--cpu-bind=none", "/work/proj/.venv/bin/hvd-train",
                                   "--threads", "3", "--epochs", "5"]
    directives = re.findall(r"^#SBATCH --([\w-]+)=", (LAUNCH / "slurm.sbatch").read_text(), re.M)
    assert {"job-name", "nodes", "ntasks-per-node", "cpus-per-task", "time", "output"} <= set(directives)


def test_mpijob_has_what_the_mpi_operator_requires():
    job = yaml.safe_load((LAUNCH / "k8s" / "mpijob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v2beta1" and job["kind"] == "MPIJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["slotsPerWorker"], int) and spec["slotsPerWorker"] >= 1
    assert spec["mpiImplementation"] == "OpenMPI" and spec["runPolicy"]["cleanPodPolicy"]
    replicas = spec["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"} and replicas["Launcher"]["replicas"] == 1
    for role in replicas.values():
        containers = role["template"]["spec"]["containers"]
        assert len(containers) == 1 and containers[0]["name"] and containers[0]["image"]
    launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
    args = launcher["args"]
    assert launcher["command"] == ["mpirun"]
    assert int(args[args.index("-np") + 1]) == replicas["Worker"]["replicas"] * spec["slotsPerWorker"]
    assert "/opt/hvd_train/venv/bin/hvd-train" in args, "the image's entry point (see Dockerfile)"
    worker = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert "sshd" in " ".join(worker["command"]), "workers serve the launcher's ssh"
    # The bucket's credentials: a Secret in the launcher's environment, passed to the ranks by name.
    assert launcher["envFrom"] == [{"secretRef": {"name": "hvd-train-s3"}}]
    passed = {args[i + 1] for i, a in enumerate(args) if a == "-x"}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= passed
    assert args[args.index("--output-dir") + 1].startswith("s3://") and "volumes" not in str(job)


def test_the_shell_launchers_pass_what_the_storage_module_reads():
    from hvd_train import storage

    text = (LAUNCH / "common.sh").read_text()
    names = re.search(r"^STORAGE_ENV=\(([^)]*)\)", text, re.M).group(1).split()
    assert tuple(names) == storage.ENV


def test_object_storage_settings_reach_the_ranks_by_name_never_by_value():
    """mpirun.sh and docker.sh pass the AWS variables that are set (and only those) as -x NAME /
    -e NAME: the values travel in the environment, never on a command line or in a log."""
    secret = "s3cr3t-value-never-printed"
    env = {"DRY_RUN": "1", "VENV": str(BIN.parent), "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "HVD_TRAIN_STORAGE_TIMEOUT": "3"}
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        env[var] = ""  # set but empty: still passed (set is set)
    mpirun = run(["bash", LAUNCH / "mpirun.sh", "-n", "2", "--", "--epochs", "1"], env=env)
    docker = run(["bash", LAUNCH / "docker.sh", "--", "--epochs", "1"], env=env)
    for proc, flag in ((mpirun, "-x"), (docker, "-e")):
        assert proc.returncode == 0, proc.stderr
        words = proc.stdout.split()
        passed = {words[i + 1] for i, w in enumerate(words) if w == flag}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "HVD_TRAIN_STORAGE_TIMEOUT",
                "AWS_SESSION_TOKEN"} <= passed, proc.stdout
        assert secret not in proc.stdout + proc.stderr and "AWS_DEFAULT_REGION" not in passed
    # Nothing set, nothing passed.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("HVD_TRAIN_STORAGE")}
    proc = subprocess.run(["bash", str(LAUNCH / "mpirun.sh"), "--", "--epochs", "1"], capture_output=True, text=True,
                          env={**clean, "DRY_RUN": "1", "VENV": str(BIN.parent)})
    assert "AWS_" not in proc.stdout, proc.stdout


def test_docker_sh_mounts_keys_at_run_time(tmp_path):
    key, pub = tmp_path / "id", tmp_path / "id.pub"
    key.write_text("private")
    pub.write_text("public")
    env = {"DRY_RUN": "1"}
    local = run(["bash", LAUNCH / "docker.sh", "--runs", tmp_path / "runs", "--", "--epochs", "3"], env=env).stdout
    assert local.split()[:5] == ["docker", "run", "--rm", "--network", "host"]
    assert "horovodrun -np 2 -H localhost:2 --gloo /opt/hvd_train/venv/bin/hvd-train --epochs 3" in local
    worker = run(["bash", LAUNCH / "docker.sh", "worker", "--authorized-keys", pub, "-p", "2233",
                  "--runs", tmp_path / "runs"], env=env).stdout
    assert f"{pub}:/home/trainer/.ssh/authorized_keys:ro" in worker and "--network host" in worker
    assert worker.rstrip().endswith("sshd 2233")
    launcher = run(["bash", LAUNCH / "docker.sh", "launcher", "-H", "a:2,b:1", "--identity", key,
                    "--runs", tmp_path / "runs", "--", "--epochs", "3"], env=env).stdout
    assert f"{key}:/home/trainer/.ssh/id:ro" in launcher
    assert "horovodrun -np 3 -H a:2\\,b:1 --gloo --ssh-port 2222 --ssh-identity-file /home/trainer/.ssh/id" in launcher


def test_dockerfile_matches_the_pins_and_caches_well():
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    pins = PINS
    assert args["BASE_IMAGE"] == "debian:trixie-slim"
    assert args["TENSORFLOW_PACKAGE"] == "tensorflow-cpu"
    assert args["TENSORFLOW_VERSION"] == pins["tensorflow-cpu"] == pins["tensorflow"]
    assert args["HOROVOD_VERSION"] == pins["horovod"]
    assert 'SHELL ["/bin/bash", "-euo", "pipefail", "-c"]' in text
    # Layer order: TF and Horovod before the package source, so source edits reuse them.
    assert text.index("horovod==") < text.index("COPY hvd_train") and "horovodrun --check-build" in text
    assert "USER trainer" in text and "openssh-server" in text and "openmpi-bin" in text
    # Keras 3 (pinned with TensorFlow), no tf_keras; Horovod patched by the project's patch file.
    assert "TF_USE_LEGACY_KERAS" not in text and "tf-keras" not in text and " keras " in text
    assert "COPY patches/horovod-${HOROVOD_VERSION}.patch" in text and "patch -d" in text
    assert not re.search(r"^(COPY|ADD) .*(\.ssh|id_|\.pem)", text, re.M), "no keys baked into the image"
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "*" in ignore and "!hvd_train/" in ignore and "!patches/" in ignore, "only what the image needs"


def test_hvd_horovodrun_leaves_out_the_narration_of_a_failure_rank_0_explained():
    # What horovodrun's driver printed in a CI run: rank 0 explained the failure (exit 2), Horovod
    # stopped rank 1, whose teardown outlived the grace and got SIGKILL (137): all of it a
    # consequence. A crash (status 1) keeps Horovod's lines.
    import io

    from hvd_train.launchers.horovodrun import Ending

    out = io.StringIO()
    ending = Ending(out, {}, set())
    for text in ["[0]<stderr>:hvd-train: error: bad data\n", "Process 0 exit with status code 2.", "\n",
                 "Terminating remaining workers after failure of Process 0.\n", "[1]<stderr>:Terminated\n",
                 "[1]<stderr>:Killed\n", "Process 1 exit with status code 137.\n"]:
        ending.write(text)
    assert out.getvalue() == "[0]<stderr>:hvd-train: error: bad data\n"
    crash = io.StringIO()
    Ending(crash, {}, set()).write("Process 1 exit with status code 1.\n"
                                   "Terminating remaining workers after failure of Process 1.\n")
    assert crash.getvalue().count("\n") == 2
