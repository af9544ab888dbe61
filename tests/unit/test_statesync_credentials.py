"""``--etcd-credentials-dir``: each hosted cluster's own etcd user (credentials.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshxl.etcd import EtcdSecurity, EtcdSecurityError
from meshxl.statesync.credentials import check_credentials_dir, cluster_security

BASE = EtcdSecurity(ca=Path("/ca.pem"), user="pool", password="pool-pw")


def _entry(root: Path, cluster: str, **files: str) -> Path:
    entry = root / cluster
    entry.mkdir(parents=True)
    for name, text in files.items():
        (entry / name).write_text(text)
    return entry


def test_an_entry_gives_the_cluster_its_own_user_and_keeps_tls(tmp_path: Path) -> None:
    _entry(tmp_path, "ta", username="tenant-ta\n", password="secret of ta\n")
    got = cluster_security(tmp_path, "ta", BASE)
    files = {"user_file": tmp_path / "ta" / "username",
             "password_file": tmp_path / "ta" / "password"}
    assert got == EtcdSecurity(ca=Path("/ca.pem"), user="tenant-ta", password="secret of ta",
                               **files)
    assert cluster_security(tmp_path, "ta", None) == EtcdSecurity(
        user="tenant-ta", password="secret of ta", **files)


def test_the_entry_is_read_again_for_each_authentication(tmp_path: Path) -> None:
    """A rotated password: the client reads the files again when it authenticates anew."""
    _entry(tmp_path, "ta", username="tenant-ta\n", password="old\n")
    got = cluster_security(tmp_path, "ta", None)
    assert got is not None and got.rereads and got.credentials() == ("tenant-ta", "old")
    (tmp_path / "ta" / "password").write_text("new\n")
    assert got.credentials() == ("tenant-ta", "new")
    (tmp_path / "ta" / "password").write_text("")
    with pytest.raises(EtcdSecurityError, match="etcd password file .* is empty"):
        got.credentials()
    assert not EtcdSecurity(user="u", password="p").rereads
    assert EtcdSecurity(user="u", password="p").credentials() == ("u", "p")


def test_no_entry_or_no_directory_keeps_the_process_settings(tmp_path: Path) -> None:
    assert cluster_security(tmp_path, "tb", BASE) is BASE
    assert cluster_security(tmp_path, "tb", None) is None
    assert cluster_security(None, "tb", BASE) is BASE


@pytest.mark.parametrize(("files", "message"), [
    ({"username": "tenant-ta"}, "cannot read the etcd password file of cluster ta "),
    ({"password": "pw"}, "cannot read the etcd user name file of cluster ta "),
    ({"username": "\n", "password": "pw"}, "the etcd user name file of cluster ta "),
    ({"username": "tenant-ta", "password": ""}, "the etcd password file of cluster ta "),
])
def test_an_incomplete_entry_is_a_one_line_error_naming_the_file(
        tmp_path: Path, files: dict[str, str], message: str) -> None:
    _entry(tmp_path, "ta", **files)
    with pytest.raises(EtcdSecurityError) as caught:
        cluster_security(tmp_path, "ta", BASE)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_an_entry_that_is_a_file_or_a_missing_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ta").write_text("tenant-ta")
    with pytest.raises(EtcdSecurityError, match=r"cluster ta: .*/ta is not a directory"):
        cluster_security(tmp_path, "ta", BASE)
    with pytest.raises(EtcdSecurityError, match="--etcd-credentials-dir .*: not a directory"):
        check_credentials_dir(tmp_path / "missing")
    check_credentials_dir(tmp_path)
