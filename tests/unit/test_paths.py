"""Socket choice, directory checks and the advice given when nothing answers."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from portlease.client import paths
from portlease.client.paths import SocketChoice, choose_socket, directory_problem, on_connect_error
from portlease.client.protocol.errors import BrokerUnavailable


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("PORTLEASE_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("PORTLEASE_SYSTEM_DIR", str(tmp_path / "sys"))
    monkeypatch.setenv("PORTLEASE_SYSTEM_CONFIG", str(tmp_path / "sys.toml"))
    return tmp_path


def test_the_order_is_argument_env_system_per_user(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_socket() == SocketChoice(str(env / "run" / "portlease" / "portlease.sock"),
                                           "per-user")
    (env / "sys.toml").write_text("")
    assert choose_socket() == SocketChoice(str(env / "sys" / "portlease.sock"), "system")
    (env / "sys.toml").unlink()
    (env / "sys").mkdir()  # the directory alone is a deployment too, socket or not
    assert choose_socket().source == "system"
    monkeypatch.setenv("PORTLEASE_SOCKET", "/x/env.sock")
    assert choose_socket() == SocketChoice("/x/env.sock", "PORTLEASE_SOCKET")
    assert choose_socket("/x/arg.sock") == SocketChoice("/x/arg.sock", "argument")
    assert choose_socket("/x/arg.sock").explicit and not choose_socket().per_user


def test_without_xdg_runtime_dir_the_fallback_is_tmp_per_uid(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.user_socket() == f"/tmp/portlease-{os.getuid()}/portlease.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not absolute: ignored
    assert paths.user_socket() == f"/tmp/portlease-{os.getuid()}/portlease.sock"


def test_directory_problems(tmp_path: Path) -> None:
    d = tmp_path / "d"
    assert directory_problem(str(d)) is None  # missing: nothing can answer there
    d.mkdir(mode=0o700)
    assert directory_problem(str(d)) is None
    os.chmod(d, 0o755)
    assert directory_problem(str(d)) is None
    for mode in (0o770, 0o757, 0o777, 0o1777):
        os.chmod(d, mode)
        problem = directory_problem(str(d))
        assert problem is not None and f"mode {mode:04o}" in problem
    os.chmod(d, 0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    assert "symlink" in (directory_problem(str(link)) or "")
    f = tmp_path / "f"
    f.write_text("")
    assert directory_problem(str(f)) == "it is not a directory"
    assert "belongs to uid" in (directory_problem(str(d), uid=os.getuid() + 1) or "")


def test_what_to_do_when_connect_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTLEASE_AUTOSTART", "0")
    user = SocketChoice("/r/portlease/portlease.sock", "per-user")
    system = SocketChoice("/run/portlease/portlease.sock", "system")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    denied = PermissionError(errno.EACCES, "Permission denied")

    assert on_connect_error(user, missing, autostart_on=True, autostart_tried=False) == "autostart"
    assert on_connect_error(system, refused, autostart_on=True, autostart_tried=False) == "wait"
    for choice in (user, system):
        err = on_connect_error(choice, denied, autostart_on=True, autostart_tried=False)
        assert isinstance(err, BrokerUnavailable)
        assert "permission denied" in str(err) and "group" in str(err)
        assert "autostart" not in str(err) and "starting one" not in str(err)

    off = on_connect_error(user, missing, autostart_on=False, autostart_tried=False)
    assert isinstance(off, BrokerUnavailable)
    assert "autostart is off (PORTLEASE_AUTOSTART=0)" in str(off) and "unset PORTLEASE_AUTOSTART" in str(off)

    down = paths.unavailable(system, missing, autostart_on=True)
    assert "socket file is missing" in str(down)
    assert "systemctl status portlease.socket" in str(down) and "system portlease broker is down" in str(down)

    env = paths.unavailable(SocketChoice("/e.sock", "PORTLEASE_SOCKET"), refused, autostart_on=True)
    assert "$PORTLEASE_SOCKET" in str(env)
    arg = paths.unavailable(SocketChoice("/a.sock", "argument"), refused, autostart_on=True)
    assert "PORTLEASE_SOCKET" not in str(arg) and "/a.sock" in str(arg)


def test_a_dial_autostarts_once_and_waits_for_a_system_broker_until_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PORTLEASE_AUTOSTART", raising=False)
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    user = paths.Dialing(SocketChoice("/r/portlease/portlease.sock", "per-user"), autostart=True,
                         deadline=10.0, max_delay=0.1)
    assert user.after_error(missing, 0.0) == "autostart"
    with pytest.raises(BrokerUnavailable, match="no portlease broker answers"):
        user.after_error(missing, 0.0)  # the broker it started did not answer either

    system = paths.Dialing(SocketChoice("/run/portlease/portlease.sock", "system"), autostart=True,
                           deadline=1.0, max_delay=0.1)
    now, waits = 0.0, []
    with pytest.raises(BrokerUnavailable, match="system portlease broker is down"):
        while True:
            wait = system.after_error(missing, now)
            assert isinstance(wait, float)
            waits.append(wait)
            now += wait
    assert waits[0] < waits[-1] <= 0.1 and now < 1.0  # never waits past the deadline

    off = paths.Dialing(SocketChoice("/r/portlease/portlease.sock", "per-user"), autostart=False,
                        deadline=10.0, max_delay=0.1)
    # The caller chose not to start a broker (autostart=False, as `portlease status`
    # does): nothing about autostart to undo, only how to start one.
    with pytest.raises(BrokerUnavailable) as refused:
        off.after_error(missing, 0.0)
    assert "autostart" not in str(refused.value)
    assert str(refused.value).endswith("; start one with `portlease serve`")


def test_without_the_broker_extra_the_advice_installs_it_first(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    user = SocketChoice("/r/portlease/portlease.sock", "per-user")
    assert paths.broker_installed()  # the test extra has the broker's
    monkeypatch.setitem(sys.modules, "trio", None)  # what an import of a missing module meets
    assert not paths.broker_installed()
    install = "install the broker first, `pip install 'portlease[broker]'`, then start one"
    for err in (paths.unavailable(user, missing, autostart_on=False),
                paths.autostart_failed(user, missing),
                paths.unavailable(SocketChoice("/a.sock", "argument"), missing, autostart_on=True)):
        assert install in str(err), err
    assert "trio" not in sys.modules or sys.modules["trio"] is None  # looked up, never imported


ROOT = Path(__file__).resolve().parents[2]


def _plain(text: str) -> str:
    # Markdown's backticks, a .dot label's line breaks and wrapping are not wording.
    return " ".join(text.replace("`", "").replace("\\n", " ").replace("//!", " ").split())


def test_the_socket_rule_has_one_wording_everywhere() -> None:
    """Step 3 of the rule (when the system socket is chosen) is said in the same words by
    --help, the code's docstrings, the README, the docs, the picture and the Rust crate."""
    from portlease.client.cli.main import build_parser
    from portlease.client.host import locations

    rule = locations.SYSTEM_RULE
    assert rule == ("where a system deployment exists (/run/portlease or "
                    "/etc/portlease/config.toml is present)")
    said = {
        "portlease --help": build_parser().format_help(),
        "portlease lease --help": build_parser("lease").format_help(),
        "client/host/locations.py": locations.__doc__ or "",
        "client/paths.py": paths.__doc__ or "",
        **{doc: (ROOT / doc).read_text() for doc in (
            "README.md", "docs/concepts.md", "docs/usage.md", "docs/rust.md",
            "client/rust/src/lib.rs", "client/rust/src/socket.rs")},
    }
    for where, text in said.items():
        # Some go on inside the parenthesis (the test hooks), hence no ")".
        assert f"/run/portlease/portlease.sock {rule[:-1]}" in _plain(text), where
    picture = _plain((ROOT / "docs" / "diagrams" / "socket-choice.dot").read_text())
    assert rule.removeprefix("where ") in picture
    for text in [*said.values(), picture]:
        for other in ("when it exists", "if it exists", "wherever a system", "system deployment?"):
            assert other not in _plain(text), other
