"""Offline checks of cluster/: the KubeRay manifests, the Dockerfile they run and every
``python -m regvi.sweep`` command line the recipes contain.

Nothing here needs Docker, Kubernetes or a Ray cluster: the manifests are parsed and checked
against the fields and rules of KubeRay's ``ray.io/v1`` CRDs (and the operator's own validation
of RayJob / RayCluster specs), and the sweep command lines are parsed by the real argparse
parser of ``python -m regvi.sweep``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
import tomllib
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
MANIFESTS = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
#: files that must contain at least one sweep invocation (so the invocation tests cannot pass
#: vacuously when a recipe loses its command line)
MUST_INVOKE = {
    "kuberay-rayjob.yaml",
    "kuberay-raycluster.yaml",
    "slurm.sbatch",
    "lsf.bsub",
    "ray-cluster.yaml",
    "start_local_cluster.sh",
}
SWEEP_CMD = ("python", "-m", "regvi.sweep")
#: where the KubeRay manifests mount the shared volume; a config under /data/sweeps/ is a copy
#: of the repository's sweeps/ (docs/cluster.md, "KubeRay")
SHARED_MOUNT = "/data"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEFAULT_DASHBOARD_PORT = 8265
#: KubeRay: RayCluster names <= 53 characters, RayJob names <= 47 (it appends 6 characters to
#: name the cluster); both must be DNS-1035 labels
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _installed_ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _installed_torch_version() -> str:
    from importlib.metadata import version

    return Version(version("torch")).public


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------- the CLI parser


class _Captured(Exception):
    pass


@pytest.fixture(scope="module")
def sweep_parser() -> argparse.ArgumentParser:
    """The parser ``regvi.sweep.__main__.main`` builds, caught when it starts parsing."""
    from regvi.sweep import __main__ as cli

    box: dict[str, argparse.ArgumentParser] = {}

    def grab(self, args=None, namespace=None):
        box["parser"] = self
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        with pytest.raises(_Captured):
            cli.main(["probe.yaml"])
    parser = box["parser"]
    assert parser.prog == "python -m regvi.sweep"
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `python -m regvi.sweep {shlex.join(argv)}` is rejected by the CLI")


def test_parser_probe_rejects_unknown_flags(sweep_parser):
    """The probe is the real parser: it refuses a flag the CLI does not have."""
    with pytest.raises(SystemExit):
        sweep_parser.parse_args(["sweeps/quickstart.yaml", "--no-such-flag"])
    ns = sweep_parser.parse_args(["sweeps/quickstart.yaml", "--address", "auto", "--resume"])
    assert ns.address == "auto" and ns.resume


# ------------------------------------------------------------------- invocations in cluster/

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def _shell_values(name: str, text: str) -> dict[str, list[str]]:
    """Values for the shell variables a recipe's sweep line uses, taken from the recipe."""
    values: dict[str, list[str]] = {"head_ip": ["10.0.0.1"], "port": ["6379"]}
    default = re.search(r"^CONFIG=\$\{CONFIG:-(\S+)\}", text, re.M)
    usage = re.search(rf"^#\s+sbatch cluster/{re.escape(name)} (\S+)", text, re.M)
    if default:
        values["CONFIG"] = [default.group(1)]
    elif usage:
        values["CONFIG"] = [usage.group(1)]
    if re.search(r'^\s*\[.*\]\s*&&\s*resume="--resume"', text, re.M):
        values["resume"] = ["", "--resume"]
    return values


def _expand(tokens: list[str], values: dict[str, list[str]], where: str) -> list[list[str]]:
    """Every argv the tokens expand to (one per combination of variable values)."""
    names = sorted({m.group(1) or m.group(3) for t in tokens for m in _VAR.finditer(t)})
    defaults = {m.group(1): m.group(2) for t in tokens for m in _VAR.finditer(t) if m.group(2)}
    choices = []
    for n in names:
        if n in values:
            choices.append(values[n])
        elif n in defaults:
            choices.append([defaults[n]])
        else:
            pytest.fail(f"{where}: no value known for shell variable ${n}")
    argvs = []
    for combo in itertools.product(*choices):
        env = dict(zip(names, combo, strict=True))
        out = [_VAR.sub(lambda m, env=env: env[m.group(1) or m.group(3)], t) for t in tokens]
        argvs.append([t for t in out if t != ""])  # an unquoted empty expansion vanishes
    return argvs


def _invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `python -m regvi.sweep`) for every sweep command line in cluster/."""
    found = []
    for path in sorted(CLUSTER.iterdir()):
        if not path.is_file() or path.name == "Dockerfile":
            continue
        text = path.read_text()
        if path.name in MANIFESTS:
            for doc in yaml.safe_load_all(text):
                entry = (doc or {}).get("spec", {}).get("entrypoint")
                if entry:
                    found.append((f"{path.name}: spec.entrypoint", entry))
        for i, line in enumerate(text.splitlines(), 1):
            at = line.find(" ".join(SWEEP_CMD))
            if at < 0 or line.lstrip().startswith("entrypoint:"):
                continue
            found.append((f"{path.name}:{i}", line[at:]))
    out = []
    for where, cmd in found:
        name = where.split(":")[0]
        tokens = shlex.split(cmd)
        assert tuple(tokens[:3]) == SWEEP_CMD, where
        for argv in _expand(tokens[3:], _shell_values(name, (CLUSTER / name).read_text()), where):
            out.append((where, argv))
    return out


INVOCATIONS = _invocations()


def test_every_launcher_has_a_sweep_invocation():
    have = {where.split(":")[0] for where, _ in INVOCATIONS}
    assert MUST_INVOKE <= have, f"no `python -m regvi.sweep` line in {sorted(MUST_INVOKE - have)}"
    assert any(where.endswith("spec.entrypoint") for where, _ in INVOCATIONS)


def _repo_config(config: Path, where: str) -> Path:
    """The repository file a command line's config stands for."""
    if config.is_absolute():
        assert config.parts[:2] == ("/", SHARED_MOUNT.strip("/")), (
            f"{where}: absolute config {config} is not on the shared volume {SHARED_MOUNT}"
        )
        return REPO.joinpath(*config.parts[2:])
    return REPO / config


@pytest.mark.parametrize(
    ("where", "argv"), INVOCATIONS, ids=[f"{w}:{' '.join(a)}" for w, a in INVOCATIONS]
)
def test_sweep_invocation_is_accepted_by_the_cli(sweep_parser, where, argv):
    ns = _parse(sweep_parser, argv, where)
    config = _repo_config(ns.config, where)
    assert config.is_file(), f"{where}: config {ns.config} has no counterpart {config} in the repo"
    assert config.suffix in {".yaml", ".yml"}
    assert ns.address, f"{where}: a cluster recipe must pass --address"
    assert not ns.dry_run and not ns.list_metrics, f"{where}: recipe only checks, never runs"


# ------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def _documented_image() -> str:
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", _dockerfile())
    assert m, "cluster/Dockerfile must document `docker build -f cluster/Dockerfile -t IMAGE .`"
    return m.group(1)


def test_dockerfile_base_image_matches_installed_ray_and_python():
    froms = re.findall(r"^FROM\s+(\S+)", _dockerfile(), re.M)
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-(gpu|cu12\d*)", froms[0])
    assert m, f"FROM {froms[0]}: expected rayproject/ray:<ray>-py<XY>-gpu|cu12x"
    assert m.group(1) == _installed_ray_version()
    assert m.group(2) == "py311"
    assert m.group(2) == f"py{sys.version_info.major}{sys.version_info.minor}"


def test_dockerfile_installs_a_cuda_torch_and_the_package():
    text = _dockerfile()
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M)
    assert index and re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d+", index.group(1))
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    assert pinned, "pin torch with ARG TORCH_VERSION"
    torch_req = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert Version(pinned.group(1)) in SpecifierSet(torch_req.removeprefix("torch"))
    assert pinned.group(1) == _installed_torch_version()
    assert '--index-url "${TORCH_INDEX_URL}"' in text and '"torch==${TORCH_VERSION}"' in text
    assert re.search(r"pip install [^\n]*\s\.\s*(\\|$)", text, re.M), "install the repo (`.`)"


def test_dockerfile_copies_exactly_what_the_build_needs():
    copies = re.findall(r"^COPY(?:\s+--\S+)*\s+(.+)$", _dockerfile(), re.M)
    sources = [s.rstrip("/") for line in copies for s in line.split()[:-1]]
    assert sorted(sources) == sorted(
        ["pyproject.toml", "README.md", "regvi", "evaluation", "sweeps"]
    ), sources
    for s in sources:
        assert (REPO / s).exists(), s
    pyproject = _pyproject()
    needed = set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    needed.add(pyproject["project"]["readme"])
    assert needed <= set(sources), f"`pip install .` needs {sorted(needed - set(sources))}"


def test_image_tag_is_the_package_version_and_documented():
    image = _documented_image()
    assert image.rsplit(":", 1)[-1] == _pyproject()["project"]["version"]
    assert f"docker push {image}" in _dockerfile()
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert f"docker build -f cluster/Dockerfile -t {image} ." in doc
    assert f"docker push {image}" in doc


# ---------------------------------------------------------------------- KubeRay manifests


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [
        (g.get("groupName", "?"), g) for g in spec["workerGroupSpecs"]
    ]


def _dashboard_port(head_container: dict) -> int:
    for p in head_container.get("ports", []):
        if p.get("name") == "dashboard":
            return int(p["containerPort"])
    return DEFAULT_DASHBOARD_PORT


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_required_fields(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == MANIFESTS[name]
    meta_name = doc["metadata"]["name"]
    assert DNS1035.match(meta_name) and len(meta_name) <= MAX_NAME[doc["kind"]], meta_name
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _installed_ray_version()
    assert spec["workerGroupSpecs"], "no worker groups"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names) and all(DNS1035.match(n) for n in names), names
    for group, g in _groups(spec):
        params = g["rayStartParams"]
        assert isinstance(params, dict), f"{group}: rayStartParams must be a mapping"
        # the CRD types rayStartParams as map[string]string: `num-cpus: 0` is rejected
        assert all(isinstance(v, str) for v in params.values()), f"{group}: {params}"
        # KubeRay refuses resources given both in rayStartParams and in the group's resources
        in_params = set(params) & {"num-cpus", "num-gpus", "memory", "resources"}
        assert not (in_params and g.get("resources")), f"{group}: resources in both places"
        pod = g["template"]["spec"]
        containers = pod["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers)
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in containers:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{group}: mount of undeclared volume {m['name']}"
    for g in spec["workerGroupSpecs"]:
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", g["replicas"])
        assert lo <= g["replicas"] <= hi, g["groupName"]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_images_are_the_dockerfile_image(name):
    spec = _cluster_spec(_load(name))
    images = {c["image"] for _, g in _groups(spec) for c in g["template"]["spec"]["containers"]}
    assert images == {_documented_image()}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_dashboard_host_and_auth_are_consistent(name):
    """A dashboard bound beyond loopback is only acceptable behind Ray's token auth, and the
    declared dashboard port is the one Ray listens on (SidecarMode's submitter reads it)."""
    spec = _cluster_spec(_load(name))
    params = spec["headGroupSpec"]["rayStartParams"]
    host = params.get("dashboard-host", "0.0.0.0")  # KubeRay's default
    auth = (spec.get("authOptions") or {}).get("mode")
    if host not in LOOPBACK:
        assert auth == "token", f"{name}: dashboard on {host} without authOptions.mode: token"
    if auth == "token":
        assert Version(spec["rayVersion"]) >= Version("2.52.0")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    port = int(params.get("dashboard-port", DEFAULT_DASHBOARD_PORT))
    assert _dashboard_port(head) == port


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_mounts_the_shared_volume_everywhere(name):
    spec = _cluster_spec(_load(name))
    for group, g in _groups(spec):
        mounts = {m["mountPath"] for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert SHARED_MOUNT in mounts, f"{name}/{group}: {SHARED_MOUNT} not mounted"


def test_rayjob_uses_sidecar_submission():
    """SidecarMode: the submitter runs in the head pod and reaches the dashboard on 127.0.0.1;
    KubeRay refuses it with a submitter template/config or a cluster selector, and unless the
    head pod's restartPolicy is Never (or unset)."""
    doc = _load("kuberay-rayjob.yaml")
    spec = doc["spec"]
    assert spec.get("submissionMode") == "SidecarMode"
    for forbidden in ("submitterPodTemplate", "submitterConfig", "clusterSelector"):
        assert forbidden not in spec, forbidden
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head_pod.get("restartPolicy", "Never") == "Never"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


def test_rayjob_dashboard_is_reachable_by_the_operator():
    """The operator polls the job's status through the head Service in every submission mode,
    so a RayJob's dashboard must not be bound to loopback (it is token-protected instead)."""
    spec = _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    assert host not in LOOPBACK
    assert spec["authOptions"]["mode"] == "token"


def test_rayjob_entrypoint_config_is_on_the_head_pods_volume(sweep_parser):
    """The driver runs in the head's ray container: its config must be on a volume mounted
    there."""
    spec = _load("kuberay-rayjob.yaml")["spec"]
    tokens = shlex.split(spec["entrypoint"])
    assert tuple(tokens[:3]) == SWEEP_CMD
    ns = _parse(sweep_parser, tokens[3:], "kuberay-rayjob.yaml: spec.entrypoint")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = [m["mountPath"] for m in head.get("volumeMounts", [])]
    assert any(ns.config.is_relative_to(m) for m in mounts), (ns.config, mounts)
