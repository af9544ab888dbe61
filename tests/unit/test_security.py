"""Security settings without processes: flags and files, the Envoy bootstrap's TLS, the
sidecar token middleware, etcd endpoint and credential checks, injection of the token."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from meshxl import etcd
from meshxl.cli import main
from meshxl.kube import InjectConfig, mutate_pod
from meshxl.kube.inject import TOKEN_FILE_ENV, TOKEN_VOLUME
from meshxl.proxy.bootstrap import XDS_CLUSTER, XdsTls, build_bootstrap
from meshxl.statesync.app import StatesyncConfig
from meshxl.statesync.auth import (
    TokenError,
    check_exposure,
    read_token,
    valid_token,
)
from meshxl.xds.config import ControlPlaneConfig
from tests.harness.certs import CA

TOKEN = "0123456789abcdef0123456789abcdef"
FIXTURES = Path(__file__).parent / "fixtures" / "kube"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Any, Any]:
    ca = CA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("server", client=False), ca.issue("client", server=False)


def one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return str(lines[0])


# -- etcd endpoints and credentials ---------------------------------------------------------


def test_https_endpoints_are_accepted_and_schemes_never_mixed() -> None:
    assert etcd.parse_urls("https://a:2379,https://b:2379") == (True, [("a", 2379), ("b", 2379)])
    assert etcd.parse_urls("127.0.0.1:2379") == (False, [("127.0.0.1", 2379)])
    with pytest.raises(etcd.EtcdEndpointError, match="mix http:// and https://"):
        etcd.parse_urls("http://a:1,https://b:2")
    with pytest.raises(etcd.EtcdEndpointError, match="unsupported etcd URL scheme 'grpc'"):
        etcd.parse_urls("grpc://a:1")


def test_plain_clients_stay_vanilla_and_secure_ones_are_not() -> None:
    import aetcd

    from meshxl.etcd import h2c

    # A plain client is aetcd's own, plus its HTTP/2 channel (meshxl.etcd.h2c); a
    # secure one keeps grpcio's channel and its interceptors, never that channel.
    assert type(etcd.client("http://127.0.0.1:2379")) is h2c.Client
    secure = etcd.client("https://127.0.0.1:2379")
    assert isinstance(secure, aetcd.Client) and not isinstance(secure, h2c.Client)
    authed = etcd.client("http://127.0.0.1:2379",
                         security=etcd.EtcdSecurity(user="u", password="p"))
    assert isinstance(authed, aetcd.Client) and not isinstance(authed, h2c.Client)


@pytest.mark.parametrize(("security", "message"), [
    (etcd.EtcdSecurity(cert=Path("c")), "--etcd-cert and --etcd-key go together"),
    (etcd.EtcdSecurity(user="u"), "--etcd-user needs a password"),
    (etcd.EtcdSecurity(password="p"), "without --etcd-user"),
    (etcd.EtcdSecurity(ca=Path("/nonexistent/ca.crt")), "cannot read --etcd-ca"),
])
def test_bad_etcd_security_settings(security: etcd.EtcdSecurity, message: str) -> None:
    with pytest.raises(etcd.EtcdSecurityError, match=message):
        etcd.check_settings("https://127.0.0.1:2379", security)


def test_tls_files_need_https(pki: tuple[CA, Any, Any]) -> None:
    ca, _, client = pki
    security = etcd.EtcdSecurity(ca=ca.cert, cert=client.cert, key=client.key)
    etcd.check_settings("https://127.0.0.1:2379", security)
    with pytest.raises(etcd.EtcdSecurityError, match="need https://"):
        etcd.check_settings("http://127.0.0.1:2379", security)
    with pytest.raises(ValueError, match="need https://"):
        StatesyncConfig(cluster="c", member="m", app="127.0.0.1:1",
                        etcd="http://127.0.0.1:2379", etcd_security=security)


def test_password_file_first_line(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("  s3cret \nignored\n")
    assert etcd.read_secret_file(path, "etcd password file") == "s3cret"
    path.write_text("\n")
    with pytest.raises(etcd.EtcdSecurityError, match="is empty"):
        etcd.read_secret_file(path, "etcd password file")


def test_etcd_errors_get_a_hint() -> None:
    import aetcd

    text = etcd.describe_error(aetcd.exceptions.ConnectionFailedError(
        "failed to connect: ... CERTIFICATE_VERIFY_FAILED: unable to get local issuer"))
    assert "not signed by --etcd-ca" in text
    assert etcd.describe_error(aetcd.exceptions.ClientError("boom")) == "ClientError: boom"


def test_cli_refuses_bad_etcd_flags_before_connecting(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = one_line(runner.invoke(main, ["status", "--etcd", "https://127.0.0.1:9",
                                            "--etcd-ca", str(tmp_path / "none.crt")]))
    assert missing == f"meshxl: cannot read --etcd-ca {tmp_path / 'none.crt'}: " \
                      "No such file or directory"
    half = one_line(runner.invoke(main, ["sync", "--etcd", "https://127.0.0.1:9",
                                         "--etcd-key", str(tmp_path / "k")]))
    assert "--etcd-cert and --etcd-key go together" in half
    password = one_line(runner.invoke(main, ["status", "--etcd-user", "meshxl"],
                                      env={"MESHXL_ETCD_PASSWORD": ""}))
    assert "--etcd-user needs a password" in password
    # No option takes the password itself (ps would show it): a file or the variable.
    help_text = runner.invoke(main, ["status", "--help"]).output
    assert set(re.findall(r"--etcd-pass\S*", help_text)) == {"--etcd-password-file"}


# -- control plane TLS flags -----------------------------------------------------------------


def test_control_plane_tls_settings(pki: tuple[CA, Any, Any], tmp_path: Path) -> None:
    ca, server, client = pki
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ControlPlaneConfig(config_path=tmp_path, tls_cert=server.cert)
    with pytest.raises(ValueError, match="--client-ca .* needs --tls-cert"):
        ControlPlaneConfig(config_path=tmp_path, client_ca=ca.cert)
    mismatched = ControlPlaneConfig(config_path=tmp_path, tls_cert=server.cert,
                                    tls_key=client.key)
    with pytest.raises(ValueError, match="do not load as a matching pair"):
        mismatched.server_tls()
    tls = ControlPlaneConfig(config_path=tmp_path, tls_cert=server.cert, tls_key=server.key,
                             client_ca=ca.cert).server_tls()
    assert tls is not None and tls.client_ca == ca.cert


@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key"],
     "cannot read TLS certificate /nonexistent/tls.crt: No such file or directory"),
    (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
    (["--client-ca", "ca.pem"], "needs --tls-cert and --tls-key"),
])
def test_serve_xds_flag_errors(args: list[str], message: str, tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text("clusters: []\n")
    result = CliRunner().invoke(main, ["serve", "xds", "--config", str(model), *args])
    assert message in one_line(result)


def test_serve_xds_refuses_a_file_that_is_not_pem(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text("clusters: []\n")
    junk = tmp_path / "junk"
    junk.write_text("not a certificate")
    result = CliRunner().invoke(main, ["serve", "xds", "--config", str(model),
                                       "--tls-cert", str(junk), "--tls-key", str(junk)])
    assert "is not a PEM file" in one_line(result)


# -- Envoy bootstrap -----------------------------------------------------------------------


def _tls_of(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"]
                  if c["name"] == XDS_CLUSTER]
    socket: dict[str, Any] = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    return dict(socket["typed_config"])


def test_bootstrap_without_tls_has_no_transport_socket() -> None:
    (cluster,) = build_bootstrap("n", ["127.0.0.1:18000"], admin_port=9901)[
        "static_resources"]["clusters"]
    assert "transport_socket" not in cluster


def test_bootstrap_tls_checks_the_server_against_ca_and_names() -> None:
    tls = _tls_of(build_bootstrap("n", ["xds.example:18000", "10.0.0.7:18000"],
                                  admin_port=9901, xds_tls=XdsTls(ca="/etc/ca.crt")))
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert tls["sni"] == "xds.example"
    context = tls["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert "tls_certificates" not in context
    validation = context["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/ca.crt"}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "xds.example"}},
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.7"}}]


def test_bootstrap_mutual_tls_presents_the_client_certificate() -> None:
    tls = _tls_of(build_bootstrap("n", ["127.0.0.1:18000"], admin_port=9901, xds_tls=XdsTls(
        ca="ca.crt", cert="envoy.crt", key="envoy.key", sni="meshxl-xds.svc")))
    assert tls["sni"] == "meshxl-xds.svc"
    assert tls["common_tls_context"]["tls_certificates"] == [
        {"certificate_chain": {"filename": "envoy.crt"},
         "private_key": {"filename": "envoy.key"}}]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ca": "ca", "cert": "c"}, "--xds-cert and --xds-key go together"),
    ({"ca": "ca", "sni": "10.0.0.1"}, "must be a DNS name"),
    ({"ca": "ca", "sni": "bad name"}, "bad xDS TLS server name"),
    ({"ca": ""}, "CA path must be a non-empty string"),
])
def test_bad_xds_tls(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        XdsTls(**kwargs)


def test_bootstrap_cli_tls_flag_errors(tmp_path: Path, pki: tuple[CA, Any, Any]) -> None:
    runner = CliRunner()
    base = ["bootstrap", "--node-id", "n", "--xds", "127.0.0.1:18000"]
    assert "need --xds-ca" in one_line(runner.invoke(main, [*base, "--xds-cert", "c.pem",
                                                            "--xds-key", "k.pem"]))
    assert "--xds-cert and --xds-key go together" in one_line(
        runner.invoke(main, [*base, "--xds-ca", "ca.pem", "--xds-cert", "c.pem"]))
    # `meshxl envoy` runs Envoy here: its files must exist (bootstrap may name others').
    missing = tmp_path / "none.crt"
    envoy = runner.invoke(main, ["envoy", "--node-id", "n", "--xds", "127.0.0.1:18000",
                                 "--xds-ca", str(missing)])
    assert f"cannot read --xds-ca {missing}" in one_line(envoy)
    ok = runner.invoke(main, [*base, "--xds-ca", "relative/ca.pem"])
    assert ok.exit_code == 0
    assert "filename: relative/ca.pem" in ok.output


# -- sidecar token ---------------------------------------------------------------------------


def test_token_sources(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert read_token(path, {}) == TOKEN
    assert read_token(None, {"MESHXL_STATESYNC_TOKEN": TOKEN}) == TOKEN
    assert read_token(None, {}) is None
    with pytest.raises(TokenError, match="give the token once"):
        read_token(path, {"MESHXL_STATESYNC_TOKEN": TOKEN})
    with pytest.raises(TokenError, match="cannot read the token file"):
        read_token(tmp_path / "missing", {})
    path.write_text("\n\n")
    with pytest.raises(TokenError, match="is empty"):
        read_token(path, {})
    with pytest.raises(TokenError, match="16 to 4096 characters"):
        valid_token("short", "test")
    with pytest.raises(TokenError, match="may hold only"):
        valid_token("spaces are not ok in a token", "test")


def test_only_loopback_goes_without_a_token() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        check_exposure(host, None)
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.com"):
        with pytest.raises(TokenError, match="not a loopback address"):
            check_exposure(host, None)
        check_exposure(host, TOKEN)


def test_serve_statesync_refuses_an_exposed_api_without_a_token(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["serve", "statesync", "--cluster", "c", "--member", "m", "--app", "127.0.0.1:1"]
    exposed = one_line(runner.invoke(main, [*base, "--listen", "0.0.0.0:7070"]))
    assert "not a loopback address" in exposed and "--token-file" in exposed
    unreadable = one_line(runner.invoke(main, [*base, "--token-file",
                                               str(tmp_path / "none")]))
    assert "cannot read the token file" in unreadable
    weak = tmp_path / "weak"
    weak.write_text("1234\n")
    assert "16 to 4096 characters" in one_line(runner.invoke(main, [*base, "--token-file",
                                                                    str(weak)]))
    assert TOKEN not in runner.invoke(main, ["serve", "statesync", "--help"]).output



# -- injection ----------------------------------------------------------------------------


def test_injection_mounts_the_token_for_sidecar_and_app() -> None:
    pod = yaml.safe_load((FIXTURES / "pod.yaml").read_text())
    config = InjectConfig(statesync_token_secret="meshxl-statesync-token")
    out = mutate_pod(pod, config)
    sidecar = next(c for c in out["spec"]["initContainers"]
                   if c["name"] == "meshxl-statesync")
    token_file = sidecar["args"][sidecar["args"].index("--token-file") + 1]
    mount = sidecar["volumeMounts"][0]
    assert mount == {"name": TOKEN_VOLUME, "mountPath": str(Path(token_file).parent),
                     "readOnly": True}
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == TOKEN_VOLUME)
    assert volume["secret"]["secretName"] == "meshxl-statesync-token"
    assert volume["secret"]["items"] == [{"key": "token", "path": Path(token_file).name}]
    for app in out["spec"]["containers"]:
        env = {e["name"]: e.get("value") for e in app["env"]}
        assert env[TOKEN_FILE_ENV] == token_file
        assert mount in app["volumeMounts"]
    status = json.loads(out["metadata"]["annotations"]["meshxl.io/status"])
    assert TOKEN_VOLUME in status["volumes"]
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(out, version, strict=True)
    # Without the option nothing changes.
    plain = mutate_pod(pod, InjectConfig())
    assert all(TOKEN_FILE_ENV not in json.dumps(c) for c in plain["spec"]["containers"])


def test_inject_command_takes_the_token_secret(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inject", "-q", "-f", str(FIXTURES / "pod.yaml"),
                                       "--statesync-token-secret", "tok"])
    assert result.exit_code == 0, result.output
    assert "secretName: tok" in result.output and "--token-file" in result.output
    bad = CliRunner().invoke(main, ["inject", "-q", "-f", str(FIXTURES / "pod.yaml"),
                                    "--statesync-token-secret", "Bad_Name"])
    assert "must be a Secret name" in one_line(bad)


def test_etcd_refusing_the_credentials_is_told_from_other_failures() -> None:
    import aetcd

    from meshxl.etcd.auth import EtcdAuthError

    assert etcd.credentials_refused(EtcdAuthError("etcd refused user a: bad password"))
    assert not etcd.credentials_refused(aetcd.exceptions.ClientError("boom"))
    assert not etcd.credentials_refused(ValueError("x"))
    assert etcd.describe_error(EtcdAuthError("refused")) == "refused"
