# portlease: the broker (`portlease serve`) and the client CLI, with the units
# from systemd/ installed for NixOS and for other systemd distributions.
{
  lib,
  python3Packages,
}:
python3Packages.buildPythonApplication {
  pname = "portlease";
  # client/_pkg/__init__.py's __version__ (check_eval.py holds the two together).
  version = "0.2.0.dev0";
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    # What the build reads (pyproject.toml's readme and license-files) and
    # what the tests the check phase runs read: tests/process runs
    # bench/chaos.py and bench/load.py, tests/unit/test_metrics.py reads
    # docs/configuration.md. tests/system/test_nix.py compares this list with
    # the files the tests name.
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../LICENSE
      ../client
      ../broker
      ../tests
      ../bench
      ../docs
      ../systemd
    ];
  };

  build-system = [ python3Packages.setuptools ];

  # The client's msgspec, the `broker` extra (trio, sdnotify) and the `async`
  # extra (anyio): the package is the broker and the whole client.
  dependencies = [
    python3Packages.msgspec
    python3Packages.trio
    python3Packages.sdnotify
    python3Packages.anyio
  ];

  # pyproject.toml's `test` extra (pytest comes with pytestCheckHook).
  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    python3Packages.pytest-xdist
    python3Packages.hypothesis
    python3Packages.build
    python3Packages.setuptools
    python3Packages.prometheus-client
    python3Packages.uvicorn
    python3Packages.mypy
    # The ecosystem's port fixtures and portpicker, served by portlease leases.
    python3Packages.pytest-asyncio
    python3Packages.aiohttp
    python3Packages.pytest-aiohttp
    python3Packages.portpicker
  ];

  # The build sandbox has loopback networking, so the unit, in-process and
  # process tests run. tests/system needs what the sandbox lacks: systemd
  # (systemd-analyze, a booted systemd-nspawn container), nix-instantiate, root
  # and the network (debootstrap, pip download). The process tests that need
  # root (other uids through setpriv) skip themselves: the builder is not root.
  # tests/process/test_packaging.py checks the PyPI sdist of a git checkout
  # (it must carry nix/, .ci/, CHANGELOG.md, ...), which this source, cut to
  # what the build and the other tests read, deliberately is not.
  # tests/process/test_rust_client.py builds the Rust crate with cargo (and,
  # as CI does, Debian's packaged crates through .ci/rust-offline.toml): the
  # sandbox has neither cargo nor a crate registry, so it would only skip.
  disabledTestPaths = [
    "tests/system"
    "tests/process/test_packaging.py"
    "tests/process/test_rust_client.py"
  ];
  # The marker expression (`not slow and not system`) and `-p no:cacheprovider`
  # come from pyproject.toml's addopts. Not through pytestFlagsArray: the hook
  # expands it with `eval`, so "not slow" would become two words and pytest
  # would look for a file named `slow` (exit 4); a `-m` there would also
  # replace addopts' `not system`. nix/tests/pytest-hook.sh replays the hook.
  #
  # The hook's default import mode, importlib, leaves sys.path alone, and
  # tests/conftest.py imports its helpers (brokerproc, localusers) from
  # tests/: prepend, pytest's own default, puts tests/ on sys.path. The
  # installed package is still the one imported: the source tree has no
  # `portlease/` directory to shadow it.
  pytestImportMode = "prepend";

  pythonImportsCheck = [
    "portlease"
    "portlease.client"
    "portlease.client.aio"
    "portlease.broker.activation"
    "portlease.broker.notify"
  ];

  postInstall = ''
    install -Dm644 systemd/portlease.socket $out/lib/systemd/system/portlease.socket
    install -Dm644 systemd/portlease.service $out/lib/systemd/system/portlease.service
    substituteInPlace $out/lib/systemd/system/portlease.service \
      --replace-fail /usr/bin/portlease $out/bin/portlease
    install -Dm644 systemd/portlease-sysusers.conf $out/lib/sysusers.d/portlease.conf
    install -Dm644 systemd/portlease.conf $out/lib/tmpfiles.d/portlease.conf
    install -Dm644 systemd/config.toml $out/share/doc/portlease/config.toml
  '';

  meta = {
    description = "Connection-bound TCP/UDP port leases for CI hosts shared by many runners";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "portlease";
  };
}
