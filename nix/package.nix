# portlease: the broker (`portlease serve`) and the client CLI, with the units
# from systemd/ installed for NixOS and for other systemd distributions.
{
  lib,
  python3Packages,
}:
python3Packages.buildPythonApplication {
  pname = "portlease";
  version = "0.1.0";
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../client
      ../broker
      ../tests
      ../systemd
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = [
    python3Packages.trio
    python3Packages.msgspec
    python3Packages.sdnotify
  ];

  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    python3Packages.pytest-xdist
    python3Packages.hypothesis
  ];

  # The build sandbox has loopback networking, so the broker tests run. The
  # checks needing systemd-analyze or nix-instantiate skip themselves there.
  pytestFlagsArray = [
    "-m"
    "not slow"
  ];

  pythonImportsCheck = [
    "portlease.client"
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
