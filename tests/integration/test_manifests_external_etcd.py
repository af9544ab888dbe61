"""deploy/kubernetes, the external-etcd overlay: least privilege behind the bridge.

Your etcd sees one client certificate, the bridge's, for every client, so the overlay
gives each etcd user a password: the bridge passes bytes and nothing else (TLS both
ways, no cache, no credential of its own); the setup Job logs in as your etcd's root
and gives each user of the model its password from Secrets named after the users;
the control plane logs in as meshxl-system; the injector mounts each pod's cluster's
Secret alone. Rendered with `kubectl kustomize` (the fixtures of test_manifests);
test_etcd_external_lp runs the same pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.kube import InjectConfig, mutate_pod
from meshxl.kube.inject import ETCD_CREDENTIALS_DIR, ETCD_CREDENTIALS_VOLUME
from tests.integration import test_manifests as manifests
from tests.integration.test_manifests import NAMESPACE, Docs, Render, _etcd_of, _find
from tests.integration.test_manifests_etcd_tls import FIXTURES, Issued, _container, _host_matches

tree = manifests.tree
render = manifests.render

MODEL = manifests.KUBE / "base" / "model.yaml"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def _bridge(docs: Docs) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The bridge's Deployment, container and Envoy configuration."""
    proxy = _find(docs, "Deployment", "meshxl-etcd-proxy")
    container = _container(proxy)
    path = Path(container["args"][container["args"].index("--config-path") + 1])
    pod = proxy["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = _find(docs, "ConfigMap", volume["configMap"]["name"])
    return proxy, container, yaml.safe_load(config_map["data"][path.name])


def _secret_at(workload: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The Secret mounted (read-only) where ``path`` lies."""
    pod = workload["spec"]["template"]["spec"]
    for mount in container["volumeMounts"]:
        if Path(path).parent == Path(mount["mountPath"]):
            assert mount.get("readOnly") is True, mount
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            return str(volume["secret"]["secretName"])
    raise AssertionError(f"nothing mounted at {path}")


def _users() -> list[str]:
    """The etcd users `meshxl etcd setup` makes for the overlay's model."""
    result = CliRunner().invoke(main, ["etcd", "setup", str(MODEL), "--dry-run", "-o",
                                       "json"])
    assert result.exit_code == 0, result.output
    return sorted(yaml.safe_load(result.stdout)["users"])


def test_the_bridge_passes_bytes_between_two_tls_sessions(render: Render) -> None:
    docs = render("external-etcd")
    issued = Issued(docs)
    proxy, container, config = _bridge(docs)
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    # Nothing that reads a request: one TCP proxy filter, to the one cluster.
    (proxying,) = chain["filters"]
    assert proxying["name"] == "envoy.filters.network.tcp_proxy"
    (cluster,) = config["static_resources"]["clusters"]
    assert proxying["typed_config"]["cluster"] == cluster["name"]
    # In: as the in-cluster etcd serves meshxl (its serving certificate, clients only
    # with a certificate of meshxl's etcd CA), speaking gRPC's HTTP/2.
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["@type"] == f"{TLS}.DownstreamTlsContext"
    assert downstream["require_client_certificate"] is True
    common = downstream["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    (serving,) = common["tls_certificates"]
    files = {_secret_at(proxy, container, serving["certificate_chain"]["filename"]),
             _secret_at(proxy, container, serving["private_key"]["filename"]),
             _secret_at(proxy, container, common["validation_context"]["trusted_ca"][
                 "filename"])}
    assert files == {"meshxl-etcd-server-tls"}
    # What meshxl dials (the bridges' Service) is a name of that certificate.
    for _, meshxl in manifests._meshxl_containers(docs):
        for url in _etcd_of(docs, meshxl):
            host = str(urlsplit(url).hostname)
            assert _host_matches(host, issued.dns_names("meshxl-etcd-server-tls")), url
            assert urlsplit(url).port == listener["address"]["socket_address"]["port_value"]
    # Out: to your etcd's members with its client certificate (a Secret you create,
    # not issued here), each member's certificate checked for its name.
    upstream = cluster["transport_socket"]["typed_config"]
    assert upstream["@type"] == f"{TLS}.UpstreamTlsContext"
    common = upstream["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    (client,) = common["tls_certificates"]
    assert {_secret_at(proxy, container, client["certificate_chain"]["filename"]),
            _secret_at(proxy, container, client["private_key"]["filename"]),
            _secret_at(proxy, container, common["validation_context"]["trusted_ca"][
                "filename"])} == {"meshxl-etcd-client-tls"}
    assert "meshxl-etcd-client-tls" not in issued
    hosts = [e["endpoint"]["address"]["socket_address"]["address"]
             for locality in cluster["load_assignment"]["endpoints"]
             for e in locality["lb_endpoints"]]
    names = [m["matcher"]["exact"] for m in common["validation_context"][
        "match_typed_subject_alt_names"]]
    assert len(hosts) == 3 and sorted(hosts) == sorted(names)
    # No cache, no credential of its own: nothing in the configuration but these.
    assert set(config) == {"static_resources", "overload_manager"}
    assert "http_filters" not in yaml.safe_dump(config)


def test_the_setup_job_gives_every_user_its_password_as_your_etcds_root(
        render: Render) -> None:
    docs = render("external-etcd")
    job = _find(docs, "Job", "meshxl-etcd-setup")
    container = _container(job)
    args = container["args"]
    assert args[:3] == ["etcd", "setup", "/etc/meshxl/model/model.yaml"]
    assert "--enable-auth" in args
    directory = next(a.split("=", 1)[1] for a in args if a.startswith("--password-dir="))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MESHXL_ETCD_USER"] == "root"
    assert env["MESHXL_ETCD_PASSWORD_FILE"] == f"{directory}/root/password"
    assert not [a for a in args if a.startswith(("--etcd-user", "--etcd-password"))]
    pod = job["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["projected"]["defaultMode"] == 0o440
    paths = {item["path"]: (source["secret"]["name"], item["key"])
             for source in volume["projected"]["sources"]
             for item in source["secret"]["items"]}
    # Every user of the model has DIR/USER/password from the Secret named after it;
    # root's comes from your etcd's root credentials.
    users = _users()
    assert paths.pop("root/password") == ("meshxl-etcd-root-user", "password")
    for user in users:
        if user != "root":
            assert paths.pop(f"{user}/password") == (user, "password")
            assert paths.pop(f"{user}/username") == (user, "username")
    assert paths == {}
    # The bridge's door: meshxl's own certificate; no root certificate anywhere.
    assert _secret_at(job, container, next(
        a.split("=", 1)[1] for a in args if a.startswith("--etcd-cert="))) == \
        "meshxl-etcd-system-tls"
    assert not [d for d in docs if d["metadata"]["name"] in ("meshxl-etcd-root",
                                                             "meshxl-etcd-root-tls")]
    # The command takes these arguments (its dry run reads no password, needs no etcd).
    result = CliRunner().invoke(main, ["etcd", "setup", str(MODEL), *args[3:], "--dry-run"],
                                env={"MESHXL_ETCD": "https://e:2379"})
    assert result.exit_code == 0, result.output
    assert f"etcdctl user add meshxl-cluster-orders --interactive=false < " \
           f"{directory}/meshxl-cluster-orders/password" in result.stdout.splitlines()


def test_the_control_plane_logs_in_as_its_own_user(render: Render) -> None:
    docs = render("external-etcd")
    xds = _find(docs, "Deployment", "meshxl-xds")
    container = xds["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MESHXL_ETCD_USER"]["valueFrom"] == {"secretKeyRef": {
        "name": "meshxl-system", "key": "username"}}
    password = env["MESHXL_ETCD_PASSWORD_FILE"]["value"]
    assert _secret_at(xds, container, password) == "meshxl-system"
    volume = next(v for v in xds["spec"]["template"]["spec"]["volumes"]
                  if v.get("secret", {}).get("secretName") == "meshxl-system")
    assert volume["secret"]["defaultMode"] == 0o440
    assert "meshxl-system" in _users()  # the user the setup gives the whole prefix
    assert "MESHXL_ETCD_PASSWORD" not in env  # a file, read again after a rotation


def test_the_webhook_mounts_each_pods_clusters_password_alone(render: Render) -> None:
    docs = render("external-etcd")
    webhook = _find(docs, "Deployment", "meshxl-webhook")
    container = _container(webhook)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MESHXL_ETCD_CREDENTIALS_SECRET"] == "meshxl-cluster-{cluster}"
    # The webhook itself holds no password.
    assert {v["secret"]["secretName"] for v in webhook["spec"]["template"]["spec"]["volumes"]
            if "secret" in v} == {"meshxl-webhook-tls"}
    config = InjectConfig(image=container["image"], etcd=",".join(_etcd_of(docs, container)),
                          etcd_client_secret=env["MESHXL_ETCD_CLIENT_SECRET"],
                          etcd_credentials_secret=env["MESHXL_ETCD_CREDENTIALS_SECRET"],
                          proxy=env["MESHXL_PROXY"])  # type: ignore[arg-type]
    pod = mutate_pod(yaml.safe_load((FIXTURES / "pod.yaml").read_text()), config)
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == ETCD_CREDENTIALS_VOLUME]
    # orders' own Secret: named after the user the setup Job gives orders' password to.
    assert volume["secret"]["secretName"] == "meshxl-cluster-orders"
    assert "meshxl-cluster-orders" in _users()
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "meshxl-statesync"]
    assert sidecar["args"][sidecar["args"].index("--etcd-credentials-dir") + 1] == \
        ETCD_CREDENTIALS_DIR


def test_the_documented_secrets_are_the_ones_the_overlay_mounts(render: Render,
                                                                tmp_path: Path) -> None:
    """`meshxl etcd passwords --secrets` writes a Secret for each name the overlay
    mounts (the Job's, the control plane's, the injector's for orders), and no other."""
    import kubernetes_validate

    docs = render("external-etcd")
    result = CliRunner().invoke(main, ["etcd", "passwords", str(MODEL), "--dir",
                                       str(tmp_path / "passwords"), "--secrets", "-"])
    assert result.exit_code == 0, result.output
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout)}
    for secret in secrets.values():
        kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    job = _find(docs, "Job", "meshxl-etcd-setup")
    mounted = {source["secret"]["name"] for v in job["spec"]["template"]["spec"]["volumes"]
               if "projected" in v for source in v["projected"]["sources"]}
    assert mounted - {"meshxl-etcd-root-user"} == set(secrets)
    assert {"meshxl-system", "meshxl-cluster-orders"} <= set(secrets)
    assert _etcd_of(docs, _container(job)) == [f"https://meshxl-etcd.{NAMESPACE}.svc:2379"]


def test_documented_copy_of_a_password_secret(tmp_path: Path) -> None:
    """docs/kubernetes.md's USER_COPY go-template copies a password Secret as a valid
    Secret of the same type and data, and nothing of the source's metadata."""
    import base64
    import json
    import os
    import re
    import subprocess

    import kubernetes_validate

    docs = (manifests.ROOT / "docs" / "kubernetes.md").read_text()
    (template,) = set(re.findall(r"^USER_COPY='(.*)'$", docs, flags=re.MULTILINE))
    proc = subprocess.run(
        [manifests._kubectl(), "-n", NAMESPACE, "create", "secret", "generic",
         "meshxl-cluster-orders", "--type=kubernetes.io/basic-auth",
         "--from-literal=username=meshxl-cluster-orders", "--from-literal=password=pw",
         "--dry-run=client", "-o", f"go-template={template}"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster")})  # offline
    assert proc.returncode == 0, proc.stderr
    copied = json.loads(proc.stdout)
    kubernetes_validate.validate(copied, kubernetes_validate.latest_version(), strict=True)
    assert copied["metadata"] == {"name": "meshxl-cluster-orders"}
    assert copied["type"] == "kubernetes.io/basic-auth"
    assert {k: base64.b64decode(v).decode() for k, v in copied["data"].items()} == {
        "username": "meshxl-cluster-orders", "password": "pw"}
