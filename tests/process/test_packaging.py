"""What a newcomer installs: the sdist, the wheel, a lean client, the top-level package.

Everything here is built from this checkout and installed for real (``build``,
``pip``), offline: the sdist and wheel are built without build isolation, and
the lean environment borrows only msgspec from this interpreter.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import itertools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerproc import BrokerProc

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def _can_build() -> str | None:
    """Why the sdist cannot be built here without a network, or None if it can."""
    try:
        import build  # noqa: F401
        import setuptools
    except ImportError as exc:
        return f"{exc.name} is missing (it is in the test extra)"
    if int(setuptools.__version__.split(".")[0]) < 77:
        return f"setuptools {setuptools.__version__} < 77 (the SPDX license string needs 77)"
    return None


needs_build = pytest.mark.skipif(_can_build() is not None, reason=str(_can_build()))


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would leak this checkout into a child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PORTLEASE_"))}
    env.update({"PORTLEASE_AUTOSTART": "0", "PYTHONDONTWRITEBYTECODE": "1", **extra})
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The sdist of this checkout, and the wheel built from that sdist (as pip would)."""
    why = _can_build()
    if why is not None:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("dist")
    # The build writes portlease.egg-info into the checkout: one build at a time
    # across xdist workers (and concurrent runs in one tree).
    with open(ROOT / "pyproject.toml", "rb") as anchor:
        fcntl.flock(anchor, fcntl.LOCK_EX)
        try:
            sdist = run(PYTHON, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT,
                        env=clean_env())
        finally:
            fcntl.flock(anchor, fcntl.LOCK_UN)
    assert sdist.returncode == 0, sdist.stdout + sdist.stderr
    (tarball,) = out.glob("portlease-*.tar.gz")
    unpacked = out / "unpacked"
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.11.4 and later
            tar.extraction_filter = tarfile.data_filter
        tar.extractall(unpacked)
    (tree,) = unpacked.iterdir()
    wheel = run(PYTHON, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, tree, env=clean_env())
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    (whl,) = out.glob("portlease-*.whl")
    shutil.rmtree(tree / "build", ignore_errors=True)
    yield {"sdist": tarball, "tree": tree, "wheel": whl}


@pytest.fixture(scope="module")
def lean(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding the wheel and msgspec and nothing else: ``pip install portlease``."""
    venv = tmp_path_factory.mktemp("lean") / "venv"
    made = run(PYTHON, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    vpy = venv / "bin" / "python"
    installed = run(PYTHON, "-m", "pip", "--python", vpy, "install", "--no-deps", "--no-index",
                    "--no-compile", dists["wheel"], env=clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = Path(run(vpy, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    # msgspec, the one dependency, taken from this interpreter as it is (with
    # its dist-info, so that pip and importlib.metadata see it installed).
    import msgspec

    msgspec_dir = Path(msgspec.__file__).parent
    (site / "msgspec").symlink_to(msgspec_dir)
    for info in msgspec_dir.parent.glob("msgspec-*.dist-info"):
        (site / info.name).symlink_to(info)
    return venv


def test_sdist_carries_everything_its_tests_read(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("tests/conftest.py", "tests/brokerproc.py", "tests/portalloc_crate.py",
                   "tests/unit", "tests/inproc", "tests/process", "tests/system", "bench/run.py",
                   "docs/usage.md", "systemd/portlease.service", "nix/module.nix",
                   "client/_pkg/__init__.py", "LICENSE", "CHANGELOG.md", "CONTRIBUTING.md"):
        assert needed in names, f"{needed} missing from {dists['sdist'].name}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_unpacked_sdist_collects_its_own_tests_against_its_own_wheel(
    dists: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "site"
    installed = run(PYTHON, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                    "--target", target, dists["wheel"], env=clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # PYTHONPATH puts the wheel ahead of this checkout's editable install.
    env = clean_env(PYTHONPATH=str(target))
    where = run(PYTHON, "-c", "import portlease.client; print(portlease.client.__file__)",
                cwd=dists["tree"], env=env)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    collected = run(PYTHON, "-m", "pytest", "--collect-only", "-q",
                    cwd=dists["tree"], env=env)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    summary = collected.stdout.strip().splitlines()[-1]
    assert "error" not in summary, summary
    count = int(re.match(r"(\d+)", summary).group(1))  # type: ignore[union-attr]
    assert count >= 100, summary
    # And a few of them run there, from the unpacked tree.
    ran = run(PYTHON, "-m", "pytest", "-q", "-n", "0", "tests/unit/test_allocator.py",
              cwd=dists["tree"], env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]


def test_wheel_metadata_license_urls_classifiers_and_lean_dependencies(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(meta_name).decode()
    assert "License-Expression: MIT" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    urls = dict(line.split(": ", 1)[1].split(", ", 1) for line in meta.splitlines()
                if line.startswith("Project-URL: "))
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert re.search(r"^Classifier: Development Status :: ", meta, re.M)
    for minor in (11, 12, 13):
        assert f"Classifier: Programming Language :: Python :: 3.{minor}" in meta
    plain = [line for line in meta.splitlines()
             if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    assert plain == ["Requires-Dist: msgspec>=0.18"], plain
    # The top-level package is a regular one, with the client and the broker under it,
    # and client/_pkg is not carried a second time as data of portlease.client.
    assert {"portlease/__init__.py", "portlease/__main__.py", "portlease/client/sync.py",
            "portlease/broker/serve.py", "portlease/client/cli/main.py",
            "portlease/client/protocol/messages.py", "portlease/client/host/procnet.py"} <= set(names)
    assert not [n for n in names if "_pkg" in n]


def test_version_is_single_sourced() -> None:
    import portlease

    assert portlease.__version__ == importlib.metadata.version("portlease")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"] and "version" not in project


def test_lean_install_leases_through_the_sync_client_without_trio(lean: Path, broker: BrokerProc) -> None:
    vpy = lean / "bin" / "python"
    assert run(vpy, "-c", "import trio").returncode != 0  # truly absent, not merely unused
    code = (
        "import sys, portlease\n"
        "from portlease.client import lease\n"
        f"with lease(2, socket={broker.socket!r}) as held:\n"
        "    assert held.ports == (held.port, held.port + 1)\n"
        "import importlib.metadata as md\n"
        "assert md.version('portlease') == portlease.__version__\n"
        "print(held.port, portlease.__file__)\n"
    )
    out = run(vpy, "-c", code, env=clean_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(lean) in out.stdout
    wrapped = run(lean / "bin" / "portlease", "lease", "--socket", broker.socket, "-n", "1", "--",
                  "sh", "-c", 'test -n "$PORTLEASE_PORT"', env=clean_env())
    assert wrapped.returncode == 0, wrapped.stdout + wrapped.stderr


def test_python_dash_m_portlease_is_the_command(lean: Path) -> None:
    out = run(lean / "bin" / "python", "-m", "portlease", "--help", env=clean_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: portlease ")


def test_serve_without_the_broker_extra_says_how_to_install_it(lean: Path, tmp_path: Path) -> None:
    out = run(lean / "bin" / "portlease", "serve", "--socket", tmp_path / "s.sock", env=clean_env(),
              timeout=60)
    assert out.returncode != 0
    assert "portlease[broker]" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_autostart_in_a_lean_install_says_how_to_install_the_broker(lean: Path, tmp_path: Path) -> None:
    from portlease.client import paths

    if paths.system_deployment():
        pytest.skip("this host has a system deployment: clients wait for it instead of autostarting")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    out = run(lean / "bin" / "portlease", "lease", "-n", "1", "--", "true", timeout=60,
              env=clean_env(PORTLEASE_AUTOSTART="1", XDG_RUNTIME_DIR=str(runtime)))
    assert out.returncode == 69, out.stdout + out.stderr
    assert "portlease[broker]" in out.stderr, out.stderr


def test_a_folder_named_portlease_in_the_working_directory_does_not_shadow_the_install(
    lean: Path, tmp_path: Path
) -> None:
    # A clone named portlease, and Python run from the folder that holds it:
    # with portlease a namespace package, ./portlease/client won the import.
    clone = tmp_path / "portlease"
    shutil.copytree(ROOT / "client", clone / "client", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "client" / "__init__.py").write_text("raise ImportError('imported from the clone')\n")
    out = run(lean / "bin" / "python", "-c",
              "import portlease, portlease.client; print(portlease.__version__, portlease.client.__file__)",
              cwd=tmp_path, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert str(lean) in out.stdout, out.stdout


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python3 -m venv .venv && .*)$", readme, re.M)
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1, commands
    assert test_command[0] in ci.splitlines(), test_command[0]
    serve_command = [c for c in commands if c.endswith("portlease serve")]
    assert len(serve_command) == 1, commands


DIAGRAMS = ROOT / "docs" / "diagrams"


def _svg_texts(svg: str) -> list[str]:
    return sorted(re.findall(r"<text[^>]*>([^<]*)</text>", svg))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (graphviz)")
@pytest.mark.parametrize("name", sorted(p.stem for p in DIAGRAMS.glob("*.dot")))
def test_each_picture_is_rendered_from_its_current_source(name: str, tmp_path: Path) -> None:
    fresh = run("dot", "-Tsvg", DIAGRAMS / f"{name}.dot", "-o", tmp_path / "fresh.svg")
    assert fresh.returncode == 0, fresh.stderr
    committed = (DIAGRAMS / f"{name}.svg").read_text()
    # Coordinates differ between Graphviz versions; the words must not.
    assert _svg_texts(committed) == _svg_texts((tmp_path / "fresh.svg").read_text()), (
        f"docs/diagrams/{name}.svg is stale: run docs/diagrams/render.sh")
    assert (DIAGRAMS / f"{name}.png").stat().st_size > 10_000


def test_no_picture_title_is_split_into_runs_on_one_line() -> None:
    """A bold run and a plain run on one baseline are placed apart by Graphviz's font
    metrics; a viewer with other fonts runs them together ("--hold 0(server binds by
    itself)"). Titles put the plain part on a line of its own."""
    for svg in sorted(DIAGRAMS.glob("*.svg")):
        texts = re.findall(r'<text ([^>]*)>([^<]*)</text>', svg.read_text())
        for (attrs, words), (next_attrs, next_words) in itertools.pairwise(texts):
            y = re.search(r' y="([^"]+)"', attrs)
            next_y = re.search(r' y="([^"]+)"', next_attrs)
            if "bold" in attrs and y and next_y and y.group(1) == next_y.group(1):
                raise AssertionError(f"{svg.name}: {words!r} and {next_words!r} share a line")


def test_pictures_name_what_the_code_uses() -> None:
    from portlease.broker.leases import ORPHAN_KEEP_TTLS, LeaseState
    from portlease.client import paths

    states = (DIAGRAMS / "lease-states.dot").read_text()
    for state in LeaseState:
        assert f"<b>{state.value}</b>" in states
    assert f"at most {ORPHAN_KEEP_TTLS} TTLs" in states
    choice = (DIAGRAMS / "socket-choice.dot").read_text()
    for name in (paths.SYSTEM_SOCKET, paths.SYSTEM_DIR, paths.SYSTEM_CONFIG, "PORTLEASE_SOCKET",
                 "XDG_RUNTIME_DIR/portlease/portlease.sock", "/tmp/portlease-$UID/portlease.sock",
                 "systemctl status portlease.socket", "SO_PEERCRED"):
        assert name in choice, name
    host = (DIAGRAMS / "host.dot").read_text()
    units = {f: (ROOT / "systemd" / f).read_text() for f in ("portlease.socket", "portlease.service")}

    def key(unit: str, name: str) -> str:
        (value,) = re.findall(rf"^{name}=(.*)$", units[unit], re.M)
        return value.strip()

    assert f"<b>{key('portlease.socket', 'ListenStream')}</b>" in host
    mode = f"{key('portlease.socket', 'SocketUser')}:{key('portlease.socket', 'SocketGroup')} "
    assert mode + key("portlease.socket", "SocketMode") in host
    assert f"DynamicUser {key('portlease.service', 'User')}" in host
    assert f"/var/lib/{key('portlease.service', 'StateDirectory')}" in host
    assert "Type=notify" in units["portlease.service"] and "Type=notify" in host
