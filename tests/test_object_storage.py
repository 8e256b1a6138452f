"""Object storage as the run storage (`cluster.storage_path: s3://...`), against a real S3 API on
127.0.0.1: moto's standalone server, with its IAM authentication on (a request signed with a key
it did not issue is refused, as S3 refuses it).

- data_pipeline.objects: a folder published with its marker last and fetched whole; one whose
  marker never arrived is never fetched; a node's cache fetched once by processes that ask at
  once, the least recently used copy removed beyond its limit while a reader keeps its pages;
  a run's working copy made the bucket's (orchestrator.training.remote_run).
- wrong credentials: `cxr run` fails at start naming the URI and the cause, before any stage.
- a 2-node cluster of its own whose nodes share no folder: each has its own cache folder
  (CXR_CACHE_DIR, as a node's local disk), the driver's workdir is the driver's alone, and the
  runs' storage is the bucket. The 4-run job finishes with every checkpoint and done.json an
  object there; a worker SIGKILLed after a checkpoint resumes on the other node from the bucket,
  each epoch logged once; the same command from a fresh workdir trains nothing; `cxr prepare
  --upload` puts a store and its splits there.
- `cxr doctor`'s checks of a node's bucket and cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.objects import NodeCache, Prefix, get_tree, put_tree
from orchestrator.paths import RunPaths
from orchestrator.tracking.records import RunRecords
from orchestrator.training import remote_run
from tests.conftest import ROOT
from tests.ray_clusters import FixedCluster, free_port, wait_for_url
from tests.test_orchestration import NODE_ENV, end_group, start_server

BIN = Path(sys.executable).parent
PAPER = str(ROOT / "configs" / "paper.yaml")
BUCKET = "cxr-test"
RUNS = sorted(f"fold{k}-{n}" for k in (1, 2) for n in ("xception", "resnet50v2"))
SLOTS = 4  # logical CPUs and GPUs per node
# the paper's config shrunk as tests/conftest.py's PAPER_SHRINK, with two phases of two epochs and
# a checkpoint at each phase's end (the first is what a killed worker resumes from)
SHRINK = [
    f"--set={item}"
    for item in (
        "model.weights=none",
        "store.image_size=72",
        "splits.phases=2",
        "splits.test_covid=6",
        "splits.test_covid_pneumonia=2",
        "splits.phase_normal=35",
        "splits.phase_pneumonia=26",
        "splits.s_test_normal=5",
        "splits.s_test_pneumonia=5",
        "train.epochs=2",
        "train.steps_per_epoch=1",
        "execution.eval_batch_size=64",
        "checkpoint.log=none",
        "train.batch_size=4",
        "train.batchnorm_batches=1",
        "execution.run_eagerly=true",
        "train.batchnorm=moving",
        "checkpoint.min_seconds=0",
        "checkpoint.keep=1",
        "cluster.allow_cpu_fallback=true",
        "tracking.register=false",
    )
]


# ---------------------------------------------------------------- the S3 server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server on 127.0.0.1 with authentication on after its first three requests, which
    create the one user it knows (allowed everything on S3); then the bucket, with that user's
    key."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_url(f"{endpoint}/moto-api/", 60, alive=server)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="cxr")
        key = iam.create_access_key(UserName="cxr")["AccessKey"]
        iam.put_user_policy(
            UserName="cxr",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        credentials = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield {"env": credentials, "client": client}
    finally:
        end_group(server)


@pytest.fixture
def aws(s3, monkeypatch):
    """This process's environment holds the bucket's credentials (pyarrow reads them there)."""
    for name, value in s3["env"].items():
        monkeypatch.setenv(name, value)
    return s3


def objects(client, prefix: str, field: str = "Size") -> dict:
    """{key: its size (or another field of the listing)} of the bucket's objects under `prefix`."""
    found, token = {}, None
    while True:
        page = client.list_objects_v2(
            Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {})
        )
        found.update({o["Key"]: o[field] for o in page.get("Contents", [])})
        if not page.get("IsTruncated"):
            return found
        token = page["NextContinuationToken"]


def folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ---------------------------------------------------------------- data_pipeline.objects


def test_a_folder_is_uploaded_marker_last_and_one_without_its_marker_never_fetched(
    aws, tmp_path, monkeypatch
):
    files = {"a.bin": os.urandom(3000), "sub/b.bin": os.urandom(10), "MARK": b"done"}
    source = folder(tmp_path / "source", files)
    order = []
    upload = Prefix.upload
    monkeypatch.setattr(
        Prefix, "upload", lambda self, local: (order.append(self.uri), upload(self, local))[1]
    )
    prefix = Prefix(f"s3://{BUCKET}/unit/published")
    put_tree(source, prefix, marker="MARK")
    assert order[-1] == f"s3://{BUCKET}/unit/published/MARK" and len(order) == 3
    assert get_tree(prefix, tmp_path / "copy", marker="MARK")
    assert {
        p.relative_to(tmp_path / "copy").as_posix(): p.read_bytes()
        for p in (tmp_path / "copy").rglob("*")
        if p.is_file()
    } == files
    # a publisher that died before its marker: the files are there, the folder is not complete
    cut = Prefix(f"s3://{BUCKET}/unit/cut-short")
    for name in ("a.bin", "sub/b.bin"):
        cut.child(name).upload(source / name)
    assert not get_tree(cut, tmp_path / "never", marker="MARK")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


FETCH = """
import logging, sys
from pathlib import Path
from data_pipeline.objects import NodeCache, Prefix
logging.basicConfig(level=logging.INFO, format="%(message)s")
path = NodeCache(Path(sys.argv[1]), 1.0).fetch(Prefix(sys.argv[2]), "store", sys.argv[3], "MARK")
print(path)
"""


def test_the_node_cache_is_fetched_once_for_processes_asking_at_once_and_evicts_beyond_its_limit(
    aws, tmp_path
):
    data = np.arange(200_000, dtype=np.float32)
    for key in ("key1", "key2"):
        source = tmp_path / key
        source.mkdir()
        np.save(source / "images.npy", data + (key == "key2"))
        (source / "MARK").write_text(key)
        put_tree(source, Prefix(f"s3://{BUCKET}/unit/store/{key}"), marker="MARK")
    cache = tmp_path / "cache"
    asking = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH, str(cache), f"s3://{BUCKET}/unit/store/key1", "key1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    answers = [p.communicate(timeout=120) for p in asking]
    assert all(p.returncode == 0 for p in asking), answers
    assert {out.strip() for out, _ in answers} == {str(cache / "store" / "key1")}
    assert sum("cached store key1" in err for _, err in answers) == 1, (
        answers
    )  # one download, two waited
    mapped = np.load(cache / "store" / "key1" / "images.npy", mmap_mode="r")
    # a limit the two copies do not fit: the older stays while a process uses it...
    user = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FETCH + "sys.stdout.flush(); sys.stdin.read()",
            str(cache),
            f"s3://{BUCKET}/unit/store/key1",
            "key1",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert user.stdout.readline().strip() == str(cache / "store" / "key1")
    small = NodeCache(cache, max_gb=data.nbytes * 1.5 / 2**30)
    newer = small.fetch(Prefix(f"s3://{BUCKET}/unit/store/key2"), "store", "key2", "MARK")
    assert (cache / "store" / "key1" / "MARK").is_file()
    user.communicate(timeout=60)
    # ...and goes once none does; its reader keeps its pages
    assert small.evict() == [cache / "store" / "key1"] and not (cache / "store" / "key1").exists()
    assert newer == cache / "store" / "key2" and not list(
        (cache / "store").glob(".key1.removing-*")
    )
    assert np.array_equal(mapped, data) and np.array_equal(np.load(newer / "images.npy"), data + 1)


def test_a_runs_working_copy_becomes_the_buckets_run(aws, tmp_path):
    """What a node held of a run (a checkpoint the bucket no longer has, a record it never had) is
    replaced by the bucket's run; a checkpoint there without its cursor is not fetched."""
    remote = Prefix(f"s3://{BUCKET}/unit/runs/fold1-xception")
    remote.child("mlflow_run.json").write_bytes(b'{"run_id": "abc"}')
    remote.child("checkpoints/ckpt-000002/model.keras").write_bytes(b"model 2")
    remote.child("checkpoints/ckpt-000002/cursor.json").write_bytes(b'{"epoch": 2}')
    remote.child("checkpoints/ckpt-000004/model.keras").write_bytes(
        b"model 4, its cursor never came"
    )
    local = folder(
        tmp_path / "fold1-xception",
        {"checkpoints/ckpt-000001/cursor.json": b"{}", "done.json": b"{}", ".cxr.lock": b"held"},
    )
    paths = RunPaths(local, remote.uri)
    assert remote_run.fetch(paths) == 3
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        ".cxr.lock",
        "checkpoints/ckpt-000002/cursor.json",
        "checkpoints/ckpt-000002/model.keras",
        "mlflow_run.json",
    ]
    assert RunRecords(paths).read_mlflow_run() == "abc"
    # records written through RunPaths are objects at once
    RunRecords(paths).write_done("abc", "f" * 64, "models:/m/1")
    assert json.loads(remote.child("done.json").read_bytes())["run_id"] == "abc"
    # --restart-stale's move: copied aside, then gone from the run's prefix (no rename there)
    before = objects(aws["client"], "unit/runs/fold1-xception/")
    remote_run.move_aside(paths, f"s3://{BUCKET}/unit/runs/.stale/1/fold1-xception")
    assert not [
        k for k in objects(aws["client"], "unit/runs/fold1-xception/") if not k.endswith("/")
    ]
    assert objects(aws["client"], "unit/runs/.stale/1/fold1-xception/") == {
        k.replace("unit/runs/", "unit/runs/.stale/1/"): v
        for k, v in before.items()
        if not k.endswith("/")
    }


def test_wrong_credentials_fail_at_start_naming_the_uri_and_the_cause(s3, tmp_path):
    env = {**os.environ, **s3["env"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    uri = f"s3://{BUCKET}/refused"
    run = subprocess.run(
        [
            str(BIN / "cxr"),
            "run",
            "--config",
            PAPER,
            "--set=data.synthetic=tiny",
            *SHRINK,
            f"--set=workdir={tmp_path / 'work'}",
            f"--set=cluster.storage_path={uri}",
            f"--set=tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert re.search(rf"{uri}/\.cxr-write-check-[0-9a-f]{{32}}: could not write it", run.stderr), (
        run.stderr[-3000:]
    )
    assert "SIGNATURE_DOES_NOT_MATCH" in run.stderr
    assert (
        not (tmp_path / "work" / "manifest.csv").exists()
        and not (tmp_path / "work" / "runs").exists()
    )
    assert not objects(s3["client"], "refused/")


def test_doctor_checks_a_nodes_bucket_and_its_own_cache(aws, tmp_path, monkeypatch):
    """`cxr doctor`'s checks of one node (the job below runs them on both nodes first, as every
    `cxr run` does): with object storage, `storage` and `cache` in place of `paths` and `disk`."""
    from orchestrator.cluster.doctor import Requirements, expectations, node_checks
    from orchestrator.config import load_config

    uri = f"s3://{BUCKET}/doctor"
    store = folder(tmp_path / "work" / "store", {"images.npy": os.urandom(2**20)})
    config = load_config(
        PAPER,
        [
            f"workdir={tmp_path / 'work'}",
            f"cluster.storage_path={uri}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ],
    )
    monkeypatch.setenv(
        "CXR_CACHE_DIR", str(tmp_path / "node-disk" / "cache")
    )  # the node's own, over cache.dir

    def checks(config) -> dict[str, tuple[bool, str]]:
        return {
            name: (ok, detail)
            for name, ok, detail in node_checks(
                {"gpus": 0}, expectations(Requirements.of(config), "t", [])
            )
        }

    found = checks(config)
    assert "paths" not in found and "disk" not in found
    assert found["storage"] == (True, f"{uri} takes this node's writes")
    ok, detail = found["cache"]
    assert (
        ok
        and detail.startswith(f"{tmp_path / 'node-disk' / 'cache'}: ")
        and "the store 0.00 GiB" in detail
    )
    assert not [
        k for k in objects(aws["client"], "doctor/") if ".cxr-write-check" in k
    ]  # its probe removed
    # a store over the cache's limit, a cache folder that cannot be made, a bucket that refuses the
    # node
    tight = load_config(
        PAPER,
        [f"workdir={tmp_path / 'work'}", f"cluster.storage_path={uri}", "cache.max_gb=0.0005"],
    )
    assert (
        checks(tight)["cache"][0] is False
        and "the store alone is over cache.max_gb" in checks(tight)["cache"][1]
    )
    monkeypatch.setenv("CXR_CACHE_DIR", str(store / "images.npy" / "cache"))
    assert (
        checks(config)["cache"][0] is False and "is not writable here" in checks(config)["cache"][1]
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    ok, detail = checks(config)["storage"]
    assert (
        not ok
        and detail.startswith(f"{uri}/.cxr-write-check-")
        and "SIGNATURE_DOES_NOT_MATCH" in detail
    )


# ---------------------------------------------------------------- two nodes, no shared folder

BLOCK = """
import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
# stdout: its own lines only
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_gpus=1, num_cpus=0)
class Hold:
    def ready(self):
        return True

print("connected", flush=True)
here = NodeAffinitySchedulingStrategy(sys.stdin.readline().strip(), soft=False)
holds = [Hold.options(scheduling_strategy=here).remote() for _ in range(int(sys.argv[2]))]
print("queued", flush=True)
ray.get([h.ready.remote() for h in holds])
print("holding", flush=True)
sys.stdin.read()
"""


class Killer(threading.Thread):
    """While the job runs: note every checkpoint cursor that appears in the bucket; once a run's
    first checkpoint is complete there, hold every GPU of its node (those of its runs as they end)
    and SIGKILL its worker, so that Ray Train can restart it only on the other node."""

    def __init__(self, client, tracking: str, cluster: FixedCluster, job: subprocess.Popen):
        super().__init__(daemon=True)
        self.client, self.tracking, self.cluster, self.job = client, tracking, cluster, job
        self.seen: set[str] = set()
        self.killed: dict = {}
        self.error = ""
        # connected to the cluster before any run: from a checkpoint seen to the kill, a second or
        # two
        self.blocker = subprocess.Popen(
            [sys.executable, "-c", BLOCK, cluster.address, str(SLOTS)],
            env=cluster.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def run(self) -> None:
        try:
            self._expect("connected")
            while self.job.poll() is None:
                keys = objects(self.client, "exp/runs/")
                self.seen |= {k for k in keys if k.endswith("/cursor.json")}
                if not self.killed:
                    self._kill_one(keys)
                time.sleep(0.3)
        except Exception as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"

    def _expect(self, line: str) -> None:
        """The blocker's next line of its own (Ray may print its warnings there too)."""
        while (said := self.blocker.stdout.readline()).strip() != line:
            if not said:
                raise AssertionError(f"the blocker ended before saying {line!r}")

    def _kill_one(self, keys: dict[str, int]) -> None:
        for name in RUNS:
            if (
                f"exp/runs/{name}/checkpoints/ckpt-000002/cursor.json" not in keys
                or f"exp/runs/{name}/done.json" in keys
            ):
                continue
            experiment = MlflowClient(self.tracking).get_experiment_by_name("cxr-paper")
            found = MlflowClient(self.tracking).search_runs(
                [experiment.experiment_id], f"attributes.run_name = '{name}'"
            )
            tags = found[0].data.tags if found else {}
            if "cxr.worker_pid" not in tags:
                continue
            node = tags["cxr.node_id"]
            self.blocker.stdin.write(node + "\n")
            self.blocker.stdin.flush()
            self._expect("queued")
            time.sleep(1)  # the requests wait on the node's raylet, ahead of any restart
            os.kill(int(tags["cxr.worker_pid"]), signal.SIGKILL)
            cursors = [
                k
                for k in objects(self.client, f"exp/runs/{name}/checkpoints/")
                if k.endswith("/cursor.json")
            ]
            self.killed = {
                "run": name,
                "pid": tags["cxr.worker_pid"],
                "node": node,
                "run_id": found[0].info.run_id,
                "epoch": str(int(max(cursors).split("ckpt-")[1].split("/")[0])),
            }
            return


def cxr(*args: str, cwd: Path, env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cxr"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def bucket_cluster(s3, tmp_path_factory):
    """Two nodes of 4 CPUs and 4 logical GPUs, each with the bucket's credentials (as an instance
    role gives them) and its own cache folder. Room for the 4 runs on either node: a killed run
    restarts on the other one at once (its own node's devices are held), not after another run."""
    caches = [tmp_path_factory.mktemp(f"node{i}-disk") / "cache" for i in range(2)]
    with FixedCluster(
        nodes=2,
        gpus_per_node=SLOTS,
        cpus_per_node=SLOTS,
        env={**NODE_ENV, **s3["env"]},
        node_env=[{"CXR_CACHE_DIR": str(c)} for c in caches],
    ) as cluster:
        yield {"cluster": cluster, "caches": caches}
    assert not cluster.leftovers


@pytest.fixture(scope="module")
def bucket_job(s3, bucket_cluster, tmp_path_factory):
    cluster = bucket_cluster["cluster"]
    server_folder = tmp_path_factory.mktemp("mlflow-server")
    server, tracking = start_server(
        server_folder,
        "--serve-artifacts",
        "--artifacts-destination",
        str(server_folder / "artifacts"),
    )
    driver = tmp_path_factory.mktemp("driver")  # the driver's alone: the datasets and its workdirs
    env = {**cluster.env, **s3["env"]}
    try:
        made = cxr(
            "synth",
            "--scale",
            "tiny",
            "--out",
            str(driver / "data"),
            cwd=driver,
            env=env,
            timeout=300,
        )
        assert made.returncode == 0, made.stderr[-2000:]
        common = [
            "--config",
            PAPER,
            "--address",
            cluster.address,
            *SHRINK,
            f"--set=tracking.uri={tracking}",
            f"--set=data.covid_root={driver / 'data' / 'covid-chestxray-dataset'}",
            f"--set=data.rsna_root={driver / 'data' / 'rsna-pneumonia-detection-challenge'}",
            f"--set=cluster.storage_path=s3://{BUCKET}/exp",
            "--folds",
            "1,2",
            "--networks",
            "xception,resnet50v2",
        ]
        job = subprocess.Popen(
            [str(BIN / "cxr"), "run", *common, f"--set=workdir={driver / 'work'}"],
            cwd=driver,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        killer = Killer(s3["client"], tracking, cluster, job)
        killer.start()
        log, _ = job.communicate(timeout=1500)
        killer.join(timeout=30)
        (driver / "job.log").write_text(log)  # kept with the test's folders, for a failure's story
        again = cxr("run", *common, f"--set=workdir={driver / 'fresh'}", cwd=driver, env=env)
        (driver / "again.log").write_text(again.stdout + again.stderr)
        yield {
            "rc": job.returncode,
            "log": log,
            "killer": killer,
            "again": again,
            "tracking": tracking,
            "driver": driver,
            "caches": bucket_cluster["caches"],
            "nodes": cluster.node_ids,
            "client": s3["client"],
        }
    finally:
        if "killer" in locals():
            end_group(killer.blocker)
        end_group(server)


def children(tracking: str) -> dict:
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("cxr-paper")
    return {
        r.info.run_name: r
        for r in client.search_runs([experiment.experiment_id], max_results=100)
        if r.info.run_name in RUNS
    }


def test_the_four_runs_finish_with_every_checkpoint_and_done_json_in_the_bucket(bucket_job):
    assert bucket_job["rc"] == 0, bucket_job["log"][-5000:]
    assert not bucket_job["killer"].error, bucket_job["killer"].error
    runs = children(bucket_job["tracking"])
    assert sorted(runs) == RUNS and all(r.info.status == "FINISHED" for r in runs.values())
    keys = objects(bucket_job["client"], "exp/")
    for name in RUNS:
        assert (
            json.loads(
                bucket_job["client"]
                .get_object(Bucket=BUCKET, Key=f"exp/runs/{name}/done.json")["Body"]
                .read()
            )["run_id"]
            == runs[name].info.run_id
        )
        # each phase's checkpoint was an object there (the first one seen while the run went on);
        # a finished run keeps none
        assert f"exp/runs/{name}/checkpoints/ckpt-000002/cursor.json" in bucket_job["killer"].seen
        assert not [k for k in keys if k.startswith(f"exp/runs/{name}/checkpoints/")]
    assert [k for k in keys if k.startswith("exp/store/")] and [
        k for k in keys if k.startswith("exp/splits/")
    ]
    assert [k for k in keys if k.startswith("exp/ray/")]  # Ray Tune's and Train's own results
    # nothing of the runs in the driver's workdir but their records, fetched from the bucket
    work = bucket_job["driver"] / "work"
    assert not [p for p in work.rglob("*") if "ckpt-" in p.name or p.suffix in (".keras", ".h5")]
    # each run trained in a working folder on the disk of its node, never in the driver's folders
    caches = [str(c) for c in bucket_job["caches"]]
    for run in runs.values():
        assert any(run.data.params["workdir"].startswith(c) for c in caches), run.data.params[
            "workdir"
        ]
    for cache in bucket_job["caches"]:  # both nodes trained, each from its own copy of the store
        assert len(list((cache / "store").glob("[!.]*"))) == 1 and list(
            (cache / "work").glob("*/**/runs/*")
        )


def test_a_killed_worker_resumes_on_the_other_node_from_the_bucket_each_epoch_logged_once(
    bucket_job,
):
    killed = bucket_job["killer"].killed
    assert killed, bucket_job["log"][-5000:]
    run = MlflowClient(bucket_job["tracking"]).get_run(killed["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    other = next(n for n in bucket_job["nodes"] if n != killed["node"])
    assert tags["cxr.node_id"] == other and tags["cxr.worker_pid"] != killed["pid"]
    # from the newest checkpoint in the bucket when it was killed (the first phase's, before the
    # second's was written), not from scratch
    assert tags["cxr.resumed_from"] == killed["epoch"] and killed["epoch"] in ("2", "4"), (
        tags,
        killed,
    )
    for key in ("loss", "accuracy", "val_loss"):
        steps = [
            m.step
            for m in MlflowClient(bucket_job["tracking"]).get_metric_history(killed["run_id"], key)
        ]
        assert steps == [1, 2, 3, 4], (key, steps)
    # the node it resumed on had never held the run: its working copy came from the bucket
    node = bucket_job["nodes"].index(other)
    assert list((bucket_job["caches"][node] / "work").glob(f"*/**/runs/{killed['run']}"))


def test_the_same_command_from_a_fresh_workdir_trains_nothing(bucket_job):
    again = bucket_job["again"]
    assert again.returncode == 0, again.stderr[-4000:]
    assert "all 4 runs are complete" in again.stderr
    runs = MlflowClient(bucket_job["tracking"]).search_runs(
        [MlflowClient(bucket_job["tracking"]).get_experiment_by_name("cxr-paper").experiment_id],
        max_results=100,
    )
    assert (
        sorted(r.info.run_name for r in runs if r.info.run_name in RUNS) == RUNS
    )  # no run opened twice


def test_cxr_prepare_uploads_a_store_and_its_splits_by_their_keys(bucket_job, aws, tmp_path):
    s3 = aws
    work = bucket_job["driver"] / "work"
    env = {**os.environ, **s3["env"]}
    args = [
        "prepare",
        "--manifest",
        str(work / "manifest.csv"),
        "--out",
        str(work / "store"),
        "--upload",
        f"s3://{BUCKET}/published",
        "--splits",
        str(work / "splits"),
    ]
    first = cxr(*args, cwd=tmp_path, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    where = re.findall(r"uploaded -> (\S+)", first.stdout)
    assert [w.split("/")[-2] for w in where] == ["store", "splits"], first.stdout
    stored = objects(s3["client"], "published/")
    times = objects(s3["client"], "published/", "LastModified")
    local = {
        f"store/{where[0].rsplit('/', 1)[1]}/"
        f"{p.relative_to(work / 'store').as_posix()}": p.stat().st_size
        for p in (work / "store").rglob("*")
        if p.is_file()
    }
    assert {k[len("published/") :]: v for k, v in stored.items() if "/store/" in k} == local
    assert any(k.endswith("/SHA256SUMS") for k in stored)
    # a worker's copy of it is the store, byte for byte
    copy = NodeCache(tmp_path / "cache", 1.0).fetch(Prefix(where[0]), "store", "k", "store.json")
    assert (copy / "images.npy").read_bytes() == (work / "store" / "images.npy").read_bytes()
    # uploaded once: the same command finds it there and uploads nothing again (here under the
    # flag's former name, still read for one release with a warning)
    args[args.index("--upload")] = "--publish"
    again = cxr(*args, cwd=tmp_path, env=env, timeout=300)
    assert again.returncode == 0 and re.findall(r"uploaded -> (\S+)", again.stdout) == where
    assert "is on s3://" in again.stderr and "--publish is now --upload" in again.stderr
    assert objects(s3["client"], "published/", "LastModified") == times
