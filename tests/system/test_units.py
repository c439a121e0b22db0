"""The units in systemd/: systemd-analyze verify and the exposure score, plus their contents.

``systemd-analyze verify`` only warns about unknown keys and bad values (exit
0), so any output at all counts as a failure. It also fails on an ExecStart
binary missing from this machine, so the units are checked from a copy whose
ExecStart names a binary that exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from portlease.broker.config import Config, load_file

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
EXPOSURE_FILE = UNITS / "EXPOSURE"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def exposure_limit() -> float:
    """The reported figure: the one place it is written down."""
    return float(EXPOSURE_FILE.read_text().strip())


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values in order (a key may repeat). No line continuations used here."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((UNITS / name).read_text())


def runnable_copy(tmp_path: Path, extra_service_lines: str = "") -> Path:
    """Copies of both units whose ExecStart binary exists here."""
    true = shutil.which("true")
    assert true is not None
    text = (UNITS / "portlease.service").read_text()
    assert "ExecStart=/usr/bin/portlease " in text
    text = text.replace("ExecStart=/usr/bin/portlease ", f"ExecStart={true} ")
    text = text.replace("[Install]", extra_service_lines + "[Install]")
    (tmp_path / "portlease.service").write_text(text)
    shutil.copy(UNITS / "portlease.socket", tmp_path / "portlease.socket")
    shutil.copy(UNITS / "portlease-portserver.socket", tmp_path / "portlease-portserver.socket")
    return tmp_path


def verify(directory: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "portlease.socket", "portlease-portserver.socket", "portlease.service"],
        cwd=directory, capture_output=True, text=True, timeout=60,
    )


def security(directory: Path, threshold: float) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        # --threshold compares against exposure times 10.
        [ANALYZE, "security", "--offline=yes", f"--threshold={round(threshold * 10)}",
         "--no-pager", "./portlease.service"],
        cwd=directory, capture_output=True, text=True, timeout=60,
    )


def overall(output: str) -> float:
    match = re.search(r"Overall exposure level for portlease\.service: (\d+\.\d+)", output)
    assert match, output
    return float(match.group(1))


@needs_analyze
def test_verify_is_silent(tmp_path: Path) -> None:
    result = verify(runnable_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_verify_output_is_caught(tmp_path: Path) -> None:
    """The check above can fail: an unknown key makes verify talk (while exiting 0)."""
    result = verify(runnable_copy(tmp_path, "ProtectEverything=yes\n"))
    assert "Unknown key" in result.stdout + result.stderr


@needs_analyze
def test_exposure_within_reported_figure(tmp_path: Path) -> None:
    limit = exposure_limit()
    result = security(runnable_copy(tmp_path), limit)
    score = overall(result.stdout)
    assert result.returncode == 0, (
        f"exposure {score} is above the reported {limit} (systemd/EXPOSURE):\n{result.stdout}"
    )
    assert score <= limit


@needs_analyze
def test_threshold_fails_on_a_weaker_unit(tmp_path: Path) -> None:
    """Dropping one hardening line must trip the threshold: the gate is real."""
    directory = runnable_copy(tmp_path)
    path = directory / "portlease.service"
    path.write_text(path.read_text().replace("IPAddressDeny=any\n", ""))
    result = security(directory, exposure_limit())
    assert overall(result.stdout) > exposure_limit()
    assert result.returncode != 0


def test_socket_unit_settings() -> None:
    socket = unit("portlease.socket")["Socket"]
    assert socket["ListenStream"] == ["/run/portlease/portlease.sock"]
    assert socket["SocketMode"] == ["0660"]
    assert socket["SocketGroup"] == ["portlease"]
    assert socket["RemoveOnStop"] == ["yes"]
    assert socket["Accept"] == ["no"]
    assert socket["DirectoryMode"] == ["0755"]


def test_portserver_socket_settings() -> None:
    """portpicker's socket: handed to the same broker, named so that it tells the two apart,
    with the main socket's access control."""
    main = unit("portlease.socket")["Socket"]
    socket = unit("portlease-portserver.socket")["Socket"]
    assert socket["ListenStream"] == ["/run/portlease/portserver.sock"]
    assert socket["FileDescriptorName"] == ["portserver"]
    assert socket["Service"] == ["portlease.service"]
    for key in ("SocketUser", "SocketGroup", "SocketMode", "DirectoryMode", "Accept", "RemoveOnStop"):
        assert socket[key] == main[key], key
    assert main["FileDescriptorName"] != ["portserver"]
    assert "portlease-portserver.socket" in unit("portlease.service")["Unit"]["After"][0].split()


def test_service_unit_settings() -> None:
    service = unit("portlease.service")["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == ["/usr/bin/portlease serve --config /etc/portlease/config.toml"]
    assert service["ExecReload"] == ["kill -HUP $MAINPID"]
    assert service["StateDirectory"] == ["portlease"]
    assert service["Restart"] == ["on-failure"]
    assert "WatchdogSec" in service
    assert service["CapabilityBoundingSet"] == [""]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # Each of these would break the broker (see the comments in the unit).
    for forbidden in ("PrivateNetwork", "PrivateUsers", "ProcSubset", "RuntimeDirectory",
                      "SocketBindDeny", "ProtectProc"):
        assert forbidden not in service, forbidden


def test_example_config_is_read_as_documented() -> None:
    # Every value in the example is the default, so it reads back as Config().
    assert load_file(str(UNITS / "config.toml")) == Config()


def test_group_and_share_agree() -> None:
    sysusers = (UNITS / "portlease-sysusers.conf").read_text()
    assert re.search(r"^g\s+portlease\s+-\s*$", sysusers, re.M)
    tmpfiles = (UNITS / "portlease.conf").read_text()
    share = re.search(r"^d\s+(\S+)\s+2770\s+root\s+portlease\s+-\s*$", tmpfiles, re.M)
    assert share
    service = unit("portlease.service")["Service"]
    assert service["ReadWritePaths"] == ["-" + share.group(1)]
    assert service["SupplementaryGroups"] == ["portlease"]
    assert f'# portalloc_dir = "{share.group(1)}"' in (UNITS / "config.toml").read_text()


@needs_analyze
def test_protectproc_dropin_score_as_documented(tmp_path: Path) -> None:
    """docs/systemd.md: ProtectProc=invisible trades the command lines for 1.1."""
    directory = runnable_copy(tmp_path, "ProtectProc=invisible\n")
    assert overall(security(directory, exposure_limit()).stdout) == 1.1
    assert "(1.1 instead of 1.3)" in (ROOT / "docs" / "systemd.md").read_text()


def test_broker_user_is_not_the_group() -> None:
    """DynamicUser without User= is named after the unit, "portlease": the group's name (217/USER)."""
    service = unit("portlease.service")["Service"]
    assert service["DynamicUser"] == ["yes"]
    assert service["User"] == ["portlease-broker"]
    groups = re.findall(r"^[gu]\s+(\S+)", (UNITS / "portlease-sysusers.conf").read_text(), re.M)
    assert service["User"][0] not in groups
    assert "portlease" in groups


def test_install_paths_agree_with_docs() -> None:
    """The files' headers and the docs' install commands name the same places."""
    doc = (ROOT / "docs" / "systemd.md").read_text()
    for name, target in (("portlease-sysusers.conf", "/etc/sysusers.d/portlease.conf"),
                         ("portlease.conf", "/etc/tmpfiles.d/portlease.conf")):
        assert f"install as {target}" in (UNITS / name).read_text(), name
        assert re.search(rf"install -Dm644 systemd/{re.escape(name)}\s+{re.escape(target)}\n", doc), name
    for name in ("portlease.service", "portlease.socket", "portlease-portserver.socket"):
        doc_lines = unit(name)["Unit"]["Documentation"]
        assert doc_lines == ["file:/usr/share/doc/portlease/systemd.md"], name
    assert "install -Dm644 docs/systemd.md           /usr/share/doc/portlease/systemd.md" in doc
