"""The cluster configs: cluster.yaml (AWS), deploy/gcp/cluster-gcp.yaml and the KubeRay manifests.

The two launcher configs go through Ray's own validation, as `ray up` does before it talks to a
cloud (provider defaults merged by `prepare_config`, then `validate_config` against
ray/autoscaler/ray-schema.json), and then through the checks of the fields cxr-ray relies on.
No network, no cloud calls.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
AWS = REPO / "cluster.yaml"
GCP = REPO / "deploy" / "gcp" / "cluster-gcp.yaml"
RAYJOB = REPO / "deploy" / "kuberay" / "rayjob-study.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice-serve.yaml"

IMAGE = re.compile(r"^rayproject/ray:2\.60\.\d+-py311-gpu$")
LAUNCHER = pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before any cloud call; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def head_and_gpu_types(config: dict) -> tuple[dict, dict[str, dict]]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = {
        name: t
        for name, t in types.items()
        if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    }
    return head, gpu


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def dashboard_hosts(command: str) -> list[str]:
    hosts = []
    for arg in shlex.split(command.replace(";", " ; ")):
        if arg.startswith("--dashboard-host="):
            hosts.append(arg.split("=", 1)[1])
    return hosts


# ----------------------------------------------------------------------- launcher configs


@LAUNCHER
def test_launcher_config_passes_rays_validator(path):
    prepared = ray_validate(load(path))
    assert prepared["cluster_name"].startswith("cxr-ray")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("max_worker", c.pop("max_workers")),
        lambda c: c["available_node_types"][c["head_node_type"]].__setitem__("min_worker", 0),
        lambda c: c["docker"].__setitem__("run_option", c["docker"].pop("run_options")),
        lambda c: c["auth"].__setitem__("ssh_usr", c["auth"].pop("ssh_user")),
    ],
    ids=["top-level", "node-type", "docker", "auth"],
)
def test_typo_key_fails_validation(mutate):
    config = load(AWS)
    ray_validate(config)  # the untouched file passes
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        ray_validate(config)


@LAUNCHER
def test_image_is_ray_260_py311_gpu(path):
    docker = load(path)["docker"]
    assert IMAGE.match(docker["image"]), docker["image"]
    for key in ("head_image", "worker_image"):
        assert key not in docker or IMAGE.match(docker[key])
    assert docker["container_name"]
    options = " ".join(docker["run_options"])
    assert "--ulimit nofile=65536:65536" in options
    assert re.search(r"--shm-size=\d+g\b", options)


@LAUNCHER
def test_head_runs_no_training_and_gpu_workers_autoscale_from_zero(path):
    config = ray_validate(load(path))
    head, gpu = head_and_gpu_types(config)
    assert head["resources"] == {"CPU": 0}
    assert gpu, "no worker node type with a GPU"
    for t in gpu.values():
        assert t["min_workers"] == 0
        assert 1 <= t["max_workers"] <= config["max_workers"]
        assert t["resources"]["CPU"] >= 1


def test_aws_gpu_worker_is_g5_with_s3_profile():
    config = load(AWS)
    _, gpu = head_and_gpu_types(config)
    (worker,) = gpu.values()
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert worker["resources"] == {"CPU": 4, "GPU": 1}
    assert "instance-profile/" in worker["node_config"]["IamInstanceProfile"]["Arn"]
    assert config["provider"]["region"] == "us-west-2"
    assert config["provider"]["cache_stopped_nodes"] is False


def test_gcp_gpu_worker_has_guest_accelerator():
    config = load(GCP)
    assert config["provider"]["type"] == "gcp" and config["provider"]["project_id"]
    _, gpu = head_and_gpu_types(config)
    for t in gpu.values():
        (accelerator,) = t["node_config"]["guestAccelerators"]
        assert accelerator["acceleratorCount"] == t["resources"]["GPU"]
        assert re.search(r"nvidia-(tesla-t4|l4)", accelerator["acceleratorType"])
        assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


AWS_POLICIES = {who: REPO / "deploy" / "aws" / f"iam-{who}-policy.json" for who in ("head", "worker")}


def statements(who: str) -> list[dict]:
    return json.loads(AWS_POLICIES[who].read_text())["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_aws_nodes_use_the_shipped_security_group_so_the_launcher_opens_nothing():
    """With SecurityGroupIds on every node type Ray creates no group (its own would admit SSH from
    0.0.0.0/0); the group itself comes from deploy/aws/setup.sh."""
    config = load(AWS)
    assert "security_group" not in config["provider"]
    for t in config["available_node_types"].values():
        assert t["node_config"]["SecurityGroupIds"] == ["sg-REPLACE-ME"]
    assert not any("0.0.0.0/0" in value for value in strings(config))


def test_aws_profiles_are_the_least_privilege_ones():
    _, gpu = head_and_gpu_types(load(AWS))
    head = load(AWS)["available_node_types"][load(AWS)["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/cxr-ray-head")
    (worker,) = gpu.values()
    assert worker["node_config"]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/cxr-ray-worker")
    for who in ("head", "worker"):
        for st in statements(who):
            assert st["Effect"] == "Allow"
            for action in as_list(st["Action"]):
                assert "*" not in action, (who, action)  # no service:* or *
            if any(a.startswith("s3:") for a in as_list(st["Action"])):
                assert all(r.startswith("arn:aws:s3:::YOUR-BUCKET") for r in as_list(st["Resource"])), st
    worker_actions = {a for st in statements("worker") for a in as_list(st["Action"])}
    assert worker_actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    head = statements("head")
    (pass_role,) = [st for st in head if "iam:PassRole" in as_list(st["Action"])]
    assert pass_role["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/cxr-ray-worker"
    assert {a for st in head for a in as_list(st["Action"]) if a.startswith("iam:")} == {"iam:PassRole"}
    for st in head:  # every EC2 action that changes an instance is bound to this cluster's tag
        changes = {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"} & set(as_list(st["Action"]))
        if changes:
            assert st["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == "cxr-ray"
    (launch,) = [st for st in head if st["Resource"] == "arn:aws:ec2:*:ACCOUNT_ID:instance/*"
                 and as_list(st["Action"]) == ["ec2:RunInstances"]]
    assert launch["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == load(AWS)["cluster_name"]


@pytest.mark.parametrize("script, args", [
    ("deploy/aws/setup.sh", ["--bucket", "study-bucket"]),
    ("deploy/gcp/setup.sh", ["--project", "p1", "--bucket", "study-bucket"]),
], ids=["aws", "gcp"])
def test_setup_scripts_open_ssh_to_the_given_range_only(script, args):
    run = subprocess.run(["bash", str(REPO / script), *args, "--cidr", "198.51.100.7/32", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    commands = (run.stdout + run.stderr).splitlines()
    ingress = [c for c in commands if "authorize-security-group-ingress" in c or "firewall-rules create" in c]
    assert ingress and not any("0.0.0.0/0" in c for c in commands)
    ssh = [c for c in ingress if "22" in c and ("CidrIp=" in c or "--source-ranges" in c)]
    assert len(ssh) == 1 and "198.51.100.7/32" in ssh[0], ingress
    open_run = subprocess.run(["bash", str(REPO / script), *args, "--cidr", "0.0.0.0/0", "--dry-run"],
                              capture_output=True, text=True, timeout=60)
    assert open_run.returncode != 0 and "refusing" in open_run.stderr


def test_gcp_nodes_use_the_setup_network_and_their_own_service_accounts():
    config = ray_validate(load(GCP))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    assert head["serviceAccounts"][0]["email"].startswith("cxr-ray-head@")
    for name, t in types.items():
        node = t["node_config"]
        (interface,) = node["networkInterfaces"]
        assert interface["network"].endswith("/networks/cxr-ray-net"), name
        assert node["tags"]["items"] == ["cxr-ray"], name
        if name != config["head_node_type"]:
            assert node["serviceAccounts"][0]["email"].startswith("cxr-ray-worker@")


@LAUNCHER
def test_start_commands_keep_dashboard_on_localhost(path):
    config = ray_validate(load(path))
    head = config["head_start_ray_commands"]
    workers = config["worker_start_ray_commands"]
    for command in head + workers:
        for host in dashboard_hosts(command):
            assert host in ("127.0.0.1", "localhost", "::1"), command
        assert "0.0.0.0" not in command
    (head_start,) = [c for c in head if "ray start" in c]
    assert dashboard_hosts(head_start) == ["127.0.0.1"]
    for flag in (
        "--head",
        "--port=6379",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
        "--metrics-export-port=8080",
    ):
        assert flag in shlex.split(head_start.replace(";", " ; ")), flag
    (worker_start,) = [c for c in workers if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


@LAUNCHER
def test_token_auth_stays_on_and_the_token_reaches_every_node(path):
    config = ray_validate(load(path))
    for value in strings(config):  # every command, option and path (comments aside)
        assert not re.search(r"RAY_AUTH_MODE\s*=\s*[\"']?disabled", value), value
    env = dict(
        opt.split(" ", 1)[1].split("=", 1)
        for opt in config["docker"]["run_options"]
        if opt.startswith("--env ")
    )
    assert env["RAY_AUTH_MODE"] == "token"
    assert config["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]] == "~/.ray/auth_token"


@LAUNCHER
def test_project_is_shipped_and_installed_on_every_node(path):
    config = ray_validate(load(path))
    (project,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    install = f"pip install -e {project}"
    # prepare_config merged the common setup_commands into both lists
    assert install in config["head_setup_commands"]
    assert install in config["worker_setup_commands"]
    for t in config["available_node_types"].values():
        assert install in t.get("worker_setup_commands", [install])
    # the copy of "." leaves out what .gitignore ignores (the virtualenv above all)
    assert ".gitignore" in config["rsync_filter"]
    assert ".venv/" in (REPO / ".gitignore").read_text().split()


# ----------------------------------------------------------------------- KubeRay manifests


def ray_containers(cluster_spec: dict) -> tuple[list[dict], list[tuple[dict, list[dict]]]]:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [(g, g["template"]["spec"]["containers"]) for g in cluster_spec["workerGroupSpecs"]]
    return head, workers


def walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.mark.parametrize(
    "path, kind, cluster_key",
    [(RAYJOB, "RayJob", "rayClusterSpec"), (RAYSERVICE, "RayService", "rayClusterConfig")],
    ids=["rayjob", "rayservice"],
)
def test_kuberay_manifest_shape(path, kind, cluster_key):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    cluster = doc["spec"][cluster_key]
    assert cluster["rayVersion"].startswith("2.60.")
    assert cluster["authOptions"]["mode"] == "token"
    head, workers = ray_containers(cluster)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(IMAGE.match(c["image"]) for c in head), [c["image"] for c in head]
    gpu_groups = []
    for group, containers in workers:
        assert all(IMAGE.match(c["image"]) for c in containers)
        if any(str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1" for c in containers):
            gpu_groups.append(group)
    assert gpu_groups, "no worker group asks for nvidia.com/gpu: 1"
    for node in walk(doc):
        assert node.get("type") != "LoadBalancer" and node.get("serviceType") != "LoadBalancer"
        assert node.get("value") != "disabled" or node.get("name") != "RAY_AUTH_MODE"


def test_rayjob_runs_the_study_and_shuts_down():
    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert re.fullmatch(
        r"cxr-ray study run studies/kaggle_backbones\.yaml --storage s3://\S+", spec["entrypoint"]
    )
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and any(p.startswith("cxr-ray") for p in runtime_env["pip"])


def test_rayservice_deploys_serve_app_from_a_study_dir():
    spec = load(RAYSERVICE)["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serve_app:app"
    # a study directory: <storage>/<study name>, the layout `cxr-ray study run --storage` writes
    assert re.fullmatch(r"s3://[^/\s]+/\S+/[^/\s]+", app["args"]["study_dir"])
    # 0.0.0.0 inside the pod; exposure is the ClusterIP Service's business (see the file)
    assert serve["http_options"]["host"] == "0.0.0.0"
    # the app's Host allowlist names the Service KubeRay creates (<name>-serve-svc)
    service = load(RAYSERVICE)["metadata"]["name"] + "-serve-svc"
    assert service in app["args"]["allowed_hosts"].split(",") and app["args"]["host"] == "0.0.0.0"
    assert "serveService" not in spec or spec["serveService"]["spec"].get("type") == "ClusterIP"
