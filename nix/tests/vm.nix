# NixOS VM test: services.portlease with three of nixpkgs' github-runners, a,
# b and c, whose units run a job instead of registering with GitHub,
# node_exporter reading the metrics file, and an upgrade (a specialisation
# with a rebuilt package).
# Needs KVM and nixpkgs; on a NixOS host:
#
#   nix build .#checks.x86_64-linux.vm -L                         # with the flake
#   nix-build nix/tests/vm.nix -A driverInteractive && ./result/bin/nixos-test-driver
#   nix-build nix/tests/vm.nix                                    # without flakes (<nixpkgs>)
{
  pkgs ? import <nixpkgs> { },
}:
let
  inherit (pkgs) lib;
  runners = [
    "a"
    "b"
    "c"
  ];
  exposure = lib.fileContents ../../systemd/EXPOSURE;
  portallocDir = "/var/lib/fm-portalloc";

  # A runner's job: prove the portalloc share is writable from the sandbox,
  # then hold ten ports until the service is stopped. portlease comes from the
  # PATH and PORTLEASE_SOCKET from the environment the module gives the unit.
  job = pkgs.writeShellScript "job" ''
    set -eu
    touch "$FM_PORTALLOC_DATA_DIR/probe-$RUNNER"
    exec portlease lease -n 10 --env BASE=0 --note "$RUNNER" -- \
      ${pkgs.bash}/bin/sh -c 'echo "LEASED $BASE"; exec sleep infinity'
  '';

  # nixpkgs' github-runner units, with their sandbox, environment and
  # directories as nixpkgs sets them; only what needs GitHub is replaced: the
  # registration (ExecStartPre), the listener (ExecStart: the job instead),
  # the token files it hides, and the start at boot (the test starts them).
  runnerUnit = name: {
    environment.RUNNER = name;
    wantedBy = lib.mkForce [ ];
    serviceConfig = {
      ExecStartPre = lib.mkForce [ ];
      ExecStart = lib.mkForce job;
      Restart = lib.mkForce "no";
      InaccessiblePaths = lib.mkForce [ "-/run/secrets/github-runner-${name}-token" ];
    };
  };

  package = pkgs.callPackage ../package.nix { };
  # The same package with one more file: a new store path, as an upgrade
  # gives. Its tests already ran on `package`.
  upgraded = package.overridePythonAttrs (old: {
    postInstall = old.postInstall + "\necho upgraded > $out/share/doc/portlease/UPGRADED\n";
    doCheck = false;
  });
  textfile = "/var/lib/prometheus-node-exporter-text-files/portlease.prom";
in
pkgs.testers.runNixOSTest {
  name = "portlease";

  nodes.machine = {
    imports = [ ../module.nix ];

    services.portlease = {
      enable = true;
      inherit package;
      githubRunners = runners;
      metrics.nodeExporter.enable = true;
      allowedUsers = [ "insider" ];
      settings = {
        port_min = 20000;
        port_max = 20099;
        ttl = 60;
        portalloc_dir = portallocDir;
      };
    };

    # Real services.github-runners entries: the module joins only runners
    # that exist there. Their units are changed only where GitHub is needed.
    services.github-runners = lib.genAttrs runners (name: {
      enable = true;
      url = "https://github.com/example-org";
      tokenFile = "/run/secrets/github-runner-${name}-token";
    });
    systemd.services = lib.listToAttrs (
      map (name: lib.nameValuePair "github-runner-${name}" (runnerUnit name)) runners
    );

    services.prometheus.exporters.node.enable = true;
    environment.systemPackages = [ pkgs.curl ];

    users.users.insider.isNormalUser = true;
    users.users.outsider.isNormalUser = true;

    specialisation.upgraded.configuration.services.portlease.package = lib.mkForce upgraded;
  };

  # nixpkgs type-checks this with mypy; check.sh runs `mypy --strict` on it
  # against nix/tests/driver_stub (check_vm_script.py).
  testScript = ''
    import json
    import re
    import time
    from typing import Any, Callable

    Leases = dict[str, dict[str, Any]]

    def leases() -> Leases:
        status = json.loads(machine.succeed("portlease status --json"))
        return {lease.get("note"): lease for lease in status["leases"]}

    def wait_for(predicate: Callable[[Leases], bool], what: str, timeout: float = 30.0) -> Leases:
        deadline = time.monotonic() + timeout
        while True:
            current = leases()
            if predicate(current):
                return current
            assert time.monotonic() < deadline, f"{what}: {current}"
            time.sleep(0.2)

    def show(unit: str, prop: str) -> str:
        return machine.succeed(f"systemctl show -p {prop} --value {unit}").strip()

    machine.wait_for_unit("sockets.target")

    with subtest("the socket is root:portlease 0660 under /run, the broker not started yet"):
        machine.succeed("test \"$(stat -c '%a %U %G' /run/portlease/portlease.sock)\" = '660 root portlease'")
        machine.succeed("test \"$(stat -c '%a %U %G' /run/portlease/portserver.sock)\" = '660 root portlease'")
        assert show("portlease-portserver.socket", "FileDescriptorName") == "portserver"
        machine.fail("systemctl is-active portlease.service")
        machine.succeed("test \"$(stat -c '%a %G' ${portallocDir})\" = '2770 portlease'")

    with subtest("the broker's unit: its own dynamic user, restarted in place on a change"):
        machine.succeed("grep -x User=portlease-broker /etc/systemd/system/portlease.service")
        machine.succeed("grep -x X-StopIfChanged=false /etc/systemd/system/portlease.service")

    with subtest("no runner unit names the portlease store path"):
        for name in "abc":
            unit = machine.succeed(f"systemctl cat github-runner-{name}")
            assert "${package}" not in unit, unit
            environment = show(f"github-runner-{name}", "Environment")
            assert "/run/current-system/sw/bin" in environment, environment
            assert "PORTSERVER_ADDRESS=/run/portlease/portserver.sock" in environment, environment

    with subtest("three sandboxed runners lease concurrently and get disjoint ports"):
        machine.succeed("systemctl start github-runner-a github-runner-b github-runner-c")
        held = wait_for(lambda l: set(l) == {"a", "b", "c"}, "three leases")
        machine.succeed("systemctl is-active portlease.service")
        ports = {name: set(lease["ports"]) for name, lease in held.items()}
        assert all(len(p) == 10 for p in ports.values()), ports
        assert not (ports["a"] & ports["b"] or ports["a"] & ports["c"] or ports["b"] & ports["c"]), ports
        assert len({lease["uid"] for lease in held.values()}) == 3, held
        for name in "abc":
            machine.succeed(f"test -e ${portallocDir}/probe-{name}")
            assert show(f"github-runner-{name}", "PrivateUsers") == "yes"
            assert show(f"github-runner-{name}", "UMask") == "0007"

    with subtest("killing a runner frees its ports at once"):
        machine.succeed("systemctl kill -s KILL github-runner-a")
        wait_for(lambda l: set(l) == {"b", "c"}, "a's lease ended", timeout=2.0)

    with subtest("only the group may connect"):
        machine.succeed("runuser -u insider -- portlease status")
        machine.fail("runuser -u outsider -- portlease status")

    with subtest("a reload keeps the leases"):
        before = {name: set(lease["ports"]) for name, lease in leases().items()}
        machine.succeed("systemctl reload portlease.service")
        assert {name: set(lease["ports"]) for name, lease in leases().items()} == before

    with subtest("a restart keeps the leases: the clients reclaim them"):
        before = {name: set(lease["ports"]) for name, lease in leases().items()}
        machine.succeed("systemctl restart portlease.service")
        after = wait_for(
            lambda l: set(l) == set(before)
            and all(lease.get("state") == "attached" for lease in l.values()),
            "leases reclaimed after restart",
        )
        assert {name: set(lease["ports"]) for name, lease in after.items()} == before

    with subtest("node_exporter serves the broker's metrics file"):
        machine.wait_for_file("${textfile}")
        machine.wait_until_succeeds("curl -sf http://127.0.0.1:9100/metrics | grep -q '^portlease_'")

    with subtest("a package upgrade restarts the broker only: the socket and the runners stay"):
        before = {name: set(lease["ports"]) for name, lease in leases().items()}
        socket_since = show("portlease.socket", "ActiveEnterTimestampMonotonic")
        broker_pid = show("portlease.service", "MainPID")
        runs = {name: show(f"github-runner-{name}", "InvocationID") for name in "bc"}
        machine.succeed("/run/current-system/specialisation/upgraded/bin/switch-to-configuration test")
        assert machine.succeed("readlink -f /run/current-system/sw/bin/portlease").startswith("${upgraded}/")
        assert show("portlease.socket", "ActiveEnterTimestampMonotonic") == socket_since
        assert {name: show(f"github-runner-{name}", "InvocationID") for name in "bc"} == runs
        after = wait_for(
            lambda l: set(l) == set(before)
            and all(lease.get("state") == "attached" for lease in l.values()),
            "leases reclaimed after the upgrade",
        )
        assert {name: set(lease["ports"]) for name, lease in after.items()} == before
        assert show("portlease.service", "MainPID") != broker_pid

    with subtest("the journal shows the broker"):
        machine.succeed("journalctl -u portlease.service | grep -q serving")

    with subtest("exposure stays at the figure in systemd/EXPOSURE"):
        out = machine.succeed("systemd-analyze security --no-pager portlease.service")
        found = re.search(r"Overall exposure level for portlease\.service: ([0-9.]+)", out)
        assert found is not None, out
        assert float(found.group(1)) <= ${exposure}, out
  '';
}
