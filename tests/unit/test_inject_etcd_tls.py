"""Injection for an etcd served over TLS with client-certificate authentication: the
statesync sidecar mounts the etcd client Secret of its namespace and passes meshxl's
etcd TLS options, through the admission webhook's AdmissionReview as through `meshxl
inject`."""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.cli import main
from meshxl.kube import ANNOTATION_STATUS, STATESYNC_CONTAINER, InjectConfig, mutate_pod
from meshxl.kube.inject import ETCD_CLIENT_DIR, ETCD_CLIENT_VOLUME, TOKEN_VOLUME
from meshxl.kube.webhook import admission_response

FIXTURES = Path(__file__).parent / "fixtures" / "kube"
ETCD = "https://meshxl-etcd.meshxl-system.svc:2379"
SECRET = "meshxl-statesync-etcd"
TLS = InjectConfig(image="registry.example.com/meshxl:1.0", etcd=ETCD,
                   etcd_client_secret=SECRET)
FLAGS = {"--etcd-ca": "ca.crt", "--etcd-cert": "tls.crt", "--etcd-key": "tls.key"}


def _pod() -> dict[str, Any]:
    data = yaml.safe_load((FIXTURES / "pod.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _review(pod: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "operation": "CREATE",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "namespace": "shop", "object": pod}}


def admitted(pod: dict[str, Any], config: InjectConfig) -> dict[str, Any]:
    """The pod as the API server stores it: the webhook's JSONPatch applied."""
    response = admission_response(_review(pod), config)["response"]
    assert response["allowed"] is True and not response.get("warnings"), response
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    out = jsonpatch.apply_patch(pod, patch)
    assert isinstance(out, dict)
    return out


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == STATESYNC_CONTAINER]
    return sidecar  # type: ignore[no-any-return]


def _validate(obj: dict[str, Any]) -> None:
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(obj, version, strict=True)


def test_admitted_pod_mounts_the_client_secret_and_passes_the_tls_flags() -> None:
    pod = admitted(_pod(), TLS)
    _validate(pod)
    sidecar = _sidecar(pod)
    args = sidecar["args"]
    assert _flag(args, "--etcd") == ETCD
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == ETCD_CLIENT_VOLUME)
    assert mount == {"name": ETCD_CLIENT_VOLUME, "mountPath": ETCD_CLIENT_DIR,
                     "readOnly": True}
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == ETCD_CLIENT_VOLUME)
    secret = volume["secret"]
    assert secret["secretName"] == SECRET
    assert "optional" not in secret, "no certificate, no start: the pod waits for it"
    files = {item["path"]: item["key"] for item in secret["items"]}
    for name, key in FLAGS.items():
        path = _flag(args, name)
        assert path is not None, name
        # Each flag names a file the Secret projects into the mounted directory.
        assert Path(path).parent == Path(mount["mountPath"]), name
        assert files[Path(path).name] == key, name
    # The key is readable by the sidecar's own user, whatever the pod's fsGroup.
    assert secret["defaultMode"] == 0o444
    # Only the sidecar gets the etcd credentials, not the application.
    for container in pod["spec"]["containers"]:
        assert all(m["name"] != ETCD_CLIENT_VOLUME for m in container.get("volumeMounts", []))
    for other in pod["spec"]["initContainers"]:
        if other is not sidecar:
            assert all(m["name"] != ETCD_CLIENT_VOLUME for m in other.get("volumeMounts", []))
    status = json.loads(pod["metadata"]["annotations"][ANNOTATION_STATUS])
    assert ETCD_CLIENT_VOLUME in status["volumes"]


def test_plain_etcd_injects_no_etcd_credentials() -> None:
    pod = admitted(_pod(), InjectConfig(image=TLS.image))
    sidecar = _sidecar(pod)
    assert not set(FLAGS) & set(sidecar["args"])
    assert all(v["name"] != ETCD_CLIENT_VOLUME for v in pod["spec"].get("volumes", []))


def test_with_the_statesync_token_both_secrets_are_mounted() -> None:
    config = InjectConfig(image=TLS.image, etcd=ETCD, etcd_client_secret=SECRET,
                          statesync_token_secret="meshxl-statesync-token")
    pod = admitted(_pod(), config)
    _validate(pod)
    names = [m["name"] for m in _sidecar(pod)["volumeMounts"]]
    assert sorted(names) == sorted([TOKEN_VOLUME, ETCD_CLIENT_VOLUME])
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {TOKEN_VOLUME, ETCD_CLIENT_VOLUME}


def test_injected_tls_command_line_is_accepted_by_serve_statesync() -> None:
    args = _sidecar(mutate_pod(_pod(), TLS))["args"]
    values = {"MESHXL_MEMBER": "orders-a", "MESHXL_POD_IP": "10.1.2.3"}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args]
    assert expanded[:2] == ["serve", "statesync"]
    command = main.commands["serve"].commands["statesync"]  # type: ignore[attr-defined]
    ctx = command.make_context("statesync", expanded[2:])
    assert ctx.params["etcd_urls"] == ETCD
    # The TLS options are stored where the command reads them (meshxl.cli.options.etcd_security).
    stored = ctx.meta["meshxl.etcd_security"]
    assert {k: str(v) for k, v in stored.items() if k in ("ca", "cert", "key")} == {
        "ca": f"{ETCD_CLIENT_DIR}/ca.crt", "cert": f"{ETCD_CLIENT_DIR}/tls.crt",
        "key": f"{ETCD_CLIENT_DIR}/tls.key"}


def test_a_pod_with_a_volume_of_that_name_is_not_injected() -> None:
    pod = _pod()
    pod["spec"]["volumes"] = [{"name": ETCD_CLIENT_VOLUME, "emptyDir": {}}]
    response = admission_response(_review(pod), TLS)["response"]
    assert response["allowed"] is True and "patch" not in response
    assert any(ETCD_CLIENT_VOLUME in w for w in response["warnings"])


def test_inject_command_with_tls_from_the_environment() -> None:
    """What the overlays set on the webhook (MESHXL_ETCD, MESHXL_ETCD_CLIENT_SECRET)
    reaches `meshxl inject` the same way."""
    text = (FIXTURES / "pod.yaml").read_text()
    result = CliRunner().invoke(main, ["inject", "-f", "-", "-q"], input=text,
                                env={"MESHXL_ETCD": ETCD, "MESHXL_ETCD_CLIENT_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    pod = yaml.safe_load(result.stdout)
    _validate(pod)
    sidecar = _sidecar(pod)
    assert _flag(sidecar["args"], "--etcd-cert") == f"{ETCD_CLIENT_DIR}/tls.crt"
    assert any(v.get("secret", {}).get("secretName") == SECRET for v in pod["spec"]["volumes"])


@pytest.mark.parametrize(("args", "message"), [
    (["--etcd", ETCD], "meshxl: https:// etcd endpoints need the etcd client Secret"),
    (["--etcd-client-secret", SECRET], "meshxl: an etcd client Secret needs https://"),
])
def test_inject_command_tls_mistakes_are_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["inject", "-f", "-", *args], input="")
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(secret=st.lists(_LABEL, min_size=1, max_size=3).map(".".join),
       hosts=st.lists(_LABEL, min_size=1, max_size=3, unique=True),
       port=st.integers(1, 65535))
def test_any_secret_name_and_https_endpoints_give_a_valid_pod(secret: str, hosts: list[str],
                                                              port: int) -> None:
    urls = ",".join(f"https://{h}:{port}" for h in hosts)
    config = InjectConfig(image=TLS.image, etcd=urls, etcd_client_secret=secret)
    pod = admitted(_pod(), config)
    _validate(pod)
    sidecar = _sidecar(pod)
    assert _flag(sidecar["args"], "--etcd") == urls
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == ETCD_CLIENT_VOLUME]
    assert volume["secret"]["secretName"] == secret


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(
    lambda s: not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                               s)))
def test_a_secret_that_is_not_a_secret_name_is_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="the etcd client Secret must be a Secret name"):
        InjectConfig(etcd=ETCD, etcd_client_secret=secret)


PER_CLUSTER = InjectConfig(image=TLS.image, etcd=ETCD,
                           etcd_client_secret="meshxl-etcd-{cluster}")


@pytest.mark.parametrize("cluster", ["orders", "cart", "t01.eu"])
def test_each_cluster_mounts_its_own_etcd_certificate(cluster: str) -> None:
    """``{cluster}`` in the Secret's name: the sidecar presents its cluster's certificate
    (its etcd user, docs/security.md), never another cluster's or a shared one."""
    pod = _pod()
    pod["metadata"].setdefault("labels", {})["meshxl.io/cluster"] = cluster
    pod = admitted(pod, PER_CLUSTER)
    _validate(pod)
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == ETCD_CLIENT_VOLUME]
    assert volume["secret"]["secretName"] == f"meshxl-etcd-{cluster}"
    assert _flag(_sidecar(pod)["args"], "--cluster") == cluster


def test_a_cluster_that_makes_no_secret_name_is_not_injected_and_says_why() -> None:
    pod = _pod()
    pod["metadata"].setdefault("labels", {})["meshxl.io/cluster"] = "my_cluster"
    response = admission_response(_review(pod), PER_CLUSTER)["response"]
    assert response["allowed"] is True and "patch" not in response, response
    (warning,) = response["warnings"]
    assert "cluster 'my_cluster' makes no Secret name of the etcd client Secret" in warning


@pytest.mark.parametrize("secret", ["meshxl-{cluster}-{cluster}", "meshxl-{Cluster}",
                                    "{cluster}_etcd"])
def test_a_bad_per_cluster_secret_name_is_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="the etcd client Secret must be a Secret name"):
        InjectConfig(etcd=ETCD, etcd_client_secret=secret)
