"""Injection for an etcd behind a bridge (the external-etcd overlay): besides its
client certificate, the statesync sidecar mounts its cluster's own etcd user and
password (a basic-auth Secret, ``meshxl-cluster-{cluster}``) and reads them from files,
through the admission webhook's answer as through ``meshxl inject``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.cli.entry import statesync_values
from meshxl.kube import ANNOTATION_STATUS, STATESYNC_CONTAINER, InjectConfig, mutate_pod
from meshxl.kube.inject import (
    ETCD_CLIENT_VOLUME,
    ETCD_CREDENTIALS_DIR,
    ETCD_CREDENTIALS_VOLUME,
)
from meshxl.kube.webhook import admission_response
from meshxl.statesync.credentials import cluster_security
from tests.unit.test_inject_etcd_tls import ETCD, _pod, _review, _validate, admitted

TEMPLATE = "meshxl-cluster-{cluster}"
BRIDGED = InjectConfig(image="registry.example.com/meshxl:1.0", etcd=ETCD,
                       etcd_client_secret="meshxl-etcd-{cluster}",
                       etcd_credentials_secret=TEMPLATE)


def _of(cluster: str) -> dict[str, Any]:
    pod = _pod()
    pod["metadata"]["labels"]["meshxl.io/cluster"] = cluster
    return pod


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == STATESYNC_CONTAINER]
    return sidecar  # type: ignore[no-any-return]


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("cluster", ["orders", "cart", "t01.eu"])
def test_each_cluster_mounts_its_own_user_and_password(cluster: str) -> None:
    pod = admitted(_of(cluster), BRIDGED)
    _validate(pod)
    sidecar = _sidecar(pod)
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == ETCD_CREDENTIALS_VOLUME]
    secret = volume["secret"]
    # Its cluster's own, named after the etcd user `meshxl etcd setup` makes for it.
    assert secret["secretName"] == f"meshxl-cluster-{cluster}"
    assert "optional" not in secret, "no password, no start: the pod waits for it"
    assert {i["key"]: i["path"] for i in secret["items"]} == {"username": "username",
                                                              "password": "password"}
    assert secret["defaultMode"] == 0o444
    # Mounted where --etcd-credentials-dir finds the cluster's entry: DIR/CLUSTER.
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == ETCD_CREDENTIALS_VOLUME]
    assert mount == {"name": ETCD_CREDENTIALS_VOLUME, "readOnly": True,
                     "mountPath": f"{ETCD_CREDENTIALS_DIR}/{cluster}"}
    args = sidecar["args"]
    assert _flag(args, "--etcd-credentials-dir") == ETCD_CREDENTIALS_DIR
    assert _flag(args, "--cluster") == cluster
    # No password, user or password file on the command line, nor in the environment.
    assert not {"--etcd-user", "--etcd-password-file"} & set(args)
    assert not [e for e in sidecar["env"] if "PASSWORD" in e["name"] or "USER" in e["name"]]
    # The certificate still gets it past the bridge.
    assert any(m["name"] == ETCD_CLIENT_VOLUME for m in sidecar["volumeMounts"])
    status = json.loads(pod["metadata"]["annotations"][ANNOTATION_STATUS])
    assert ETCD_CREDENTIALS_VOLUME in status["volumes"]


def test_only_the_sidecar_gets_the_password() -> None:
    pod = admitted(_pod(), BRIDGED)
    sidecar = _sidecar(pod)
    for container in [*pod["spec"]["containers"], *pod["spec"]["initContainers"]]:
        if container is sidecar:
            continue
        assert all(m["name"] != ETCD_CREDENTIALS_VOLUME
                   for m in container.get("volumeMounts", [])), container["name"]
    # And one Secret only: no other cluster's.
    secrets = [v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v]
    assert [s for s in secrets if s.startswith("meshxl-cluster-")] == ["meshxl-cluster-orders"]


def test_without_the_setting_no_password_is_mounted() -> None:
    pod = admitted(_pod(), InjectConfig(image=BRIDGED.image, etcd=ETCD,
                                        etcd_client_secret="meshxl-etcd-{cluster}"))
    assert all(v["name"] != ETCD_CREDENTIALS_VOLUME for v in pod["spec"]["volumes"])
    assert "--etcd-credentials-dir" not in _sidecar(pod)["args"]


def test_the_injected_command_line_reads_the_cluster_entry(tmp_path: Path) -> None:
    """``serve statesync`` accepts the injected arguments (click and the lean reader
    alike), and the mounted Secret is the entry its cluster reads its user from, files
    read again on each login (a rotated password)."""
    args = _sidecar(mutate_pod(_pod(), BRIDGED))["args"]
    values = {"MESHXL_MEMBER": "orders-a", "MESHXL_POD_IP": "10.1.2.3"}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args]
    command = main.commands["serve"].commands["statesync"]  # type: ignore[attr-defined]
    ctx = command.make_context("statesync", expanded[2:])
    assert ctx.params["etcd_credentials_dir"] == Path(ETCD_CREDENTIALS_DIR)
    lean = statesync_values(expanded[2:], {})
    assert lean is not None and lean["etcd_credentials_dir"] == Path(ETCD_CREDENTIALS_DIR)
    # The kubelet's projection of the Secret, read as the sidecar reads it.
    entry = tmp_path / "orders"
    entry.mkdir()
    (entry / "username").write_text("meshxl-cluster-orders\n")
    (entry / "password").write_text("s3cret\n")
    security = cluster_security(tmp_path, "orders", None)
    assert security is not None
    assert (security.user, security.password) == ("meshxl-cluster-orders", "s3cret")
    assert (security.user_file, security.password_file) == (entry / "username",
                                                            entry / "password")


def test_a_cluster_that_makes_no_secret_name_is_not_injected() -> None:
    response = admission_response(_review(_of("my_cluster")), InjectConfig(
        image=BRIDGED.image, etcd=ETCD, etcd_client_secret="meshxl-etcd",
        etcd_credentials_secret=TEMPLATE))["response"]
    assert response["allowed"] is True and "patch" not in response, response
    (warning,) = response["warnings"]
    assert "makes no Secret name of the etcd credentials Secret" in warning


def test_a_pod_with_a_volume_of_that_name_is_not_injected() -> None:
    pod = _pod()
    pod["spec"]["volumes"] = [{"name": ETCD_CREDENTIALS_VOLUME, "emptyDir": {}}]
    response = admission_response(_review(pod), BRIDGED)["response"]
    assert response["allowed"] is True and "patch" not in response
    assert any(ETCD_CREDENTIALS_VOLUME in w for w in response["warnings"])


@pytest.mark.parametrize(("settings", "message"), [
    ({"etcd": "http://etcd:2379", "etcd_client_secret": None,
      "etcd_credentials_secret": TEMPLATE},
     "an etcd credentials Secret needs https:// etcd endpoints"),
    ({"etcd_credentials_secret": "meshxl-{cluster}-{cluster}"},
     "the etcd credentials Secret must be a Secret name"),
    ({"etcd_credentials_secret": "Meshxl_Users"},
     "the etcd credentials Secret must be a Secret name"),
])
def test_bad_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"etcd": ETCD, "etcd_client_secret": "meshxl-etcd-{cluster}"}
    with pytest.raises(ValueError, match=message):
        InjectConfig(**{**base, **settings})


def test_inject_command_takes_it_from_the_environment() -> None:
    """What the external-etcd overlay sets on the webhook reaches `meshxl inject` too."""
    text = (Path(__file__).parent / "fixtures" / "kube" / "pod.yaml").read_text()
    result = CliRunner().invoke(main, ["inject", "-f", "-", "-q"], input=text, env={
        "MESHXL_ETCD": ETCD, "MESHXL_ETCD_CLIENT_SECRET": "meshxl-etcd-{cluster}",
        "MESHXL_ETCD_CREDENTIALS_SECRET": TEMPLATE})
    assert result.exit_code == 0, result.output
    pod = yaml.safe_load(result.stdout)
    _validate(pod)
    assert {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v} >= {
        "meshxl-etcd-orders", "meshxl-cluster-orders"}
    result = CliRunner().invoke(main, ["inject", "-f", "-", "--etcd", "http://etcd:2379",
                                       "--etcd-credentials-secret", TEMPLATE], input="")
    assert result.exit_code == 1
    assert result.stderr.startswith("meshxl: an etcd credentials Secret needs https://")
    assert len(result.stderr.strip().splitlines()) == 1
