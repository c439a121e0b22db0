"""Check what eval.nix printed: unit settings, runners, rendered config, unit-file agreement.

Usage: python3 check_eval.py EVAL.json   (check.sh runs it)

Beyond reading the module's output, it holds the module to two outside
references: systemd/portlease.{socket,service} (the hardening must agree key by
key) and portlease's own config reader (the rendered settings must load with
``portlease.broker.config.load_file``, the function ``portlease serve --config``
uses, and the module's documented defaults must be the reader's defaults).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from portlease.broker.config import Config, load_file

try:
    from portlease.client.protocol.errors import ConfigError
except ImportError:  # before the errors moved to portlease.client.protocol
    from portlease.broker.errors import ConfigError  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
SOCKET_PATH = "/run/portlease/portlease.sock"
CONFIG_PATH = "/etc/portlease/config.toml"

# Options of nixpkgs' services.github-runners.<name> (nixos/modules/services/
# continuous-integration/github-runner/options.nix); the stand-in does not
# declare them, so a misspelling in github-runner.nix is caught here.
GITHUB_RUNNER_OPTIONS = {
    "enable", "url", "tokenFile", "tokenType", "name", "runnerGroup", "extraLabels",
    "noDefaultLabels", "replace", "extraPackages", "extraEnvironment", "serviceOverrides",
    "package", "ephemeral", "user", "group", "workDir", "nodeRuntimes",
}

# What nixpkgs' github-runner units run with; the module must leave it so.
RUNNER_SANDBOX = {
    "DynamicUser": True, "PrivateUsers": True, "PrivateTmp": True, "PrivateDevices": True,
    "PrivateMounts": True, "ProtectSystem": "strict", "ProtectHome": True,
    "ProtectProc": "invisible", "NoNewPrivileges": True,
}
SYSTEM_PROFILE = "/run/current-system/sw"
PORTSERVER_PATH = "/run/portlease/portserver.sock"
RUNNER_SOCKETS = ["portlease.socket", "portlease-portserver.socket"]

# Keys whose values are space-separated lists: one line or several mean the same.
TOKEN_KEYS = {"RestrictAddressFamilies", "ReadWritePaths", "SupplementaryGroups", "ListenStream"}
# Keys that name store paths in the module and FHS paths in the unit file, and
# Documentation=: the unit file names the installed doc, the module the NixOS
# page online (a store path there would change the units on every upgrade).
PATH_KEYS = {"ExecStart", "ExecReload", "Documentation"}
DOCUMENTATION = ["https://github.com/portlease/portlease/blob/main/docs/nixos.md"]

failures: list[str] = []


def check(condition: object, message: str) -> None:
    if not condition:
        failures.append(message)


# ---------------------------------------------------------------- unit files


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def render(value: Any) -> list[str]:
    """A NixOS unit value as the lines systemd would read (booleans as systemd spells them)."""
    if isinstance(value, list):
        return [line for item in value for line in render(item)]
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    return [str(value)]


_BOOLS = {"yes": "yes", "true": "yes", "on": "yes", "1": "yes",
          "no": "no", "false": "no", "off": "no", "0": "no"}


def normal(key: str, lines: list[str]) -> list[str]:
    lines = [_BOOLS.get(line, line) for line in lines]
    if key in TOKEN_KEYS:
        return [token for line in lines for token in line.split()]
    return lines


def compare_section(
    what: str, from_file: dict[str, list[str]], from_module: dict[str, Any]
) -> None:
    module = {key: render(value) for key, value in from_module.items() if render(value)}
    for key in sorted(set(from_file) | set(module)):
        if key in PATH_KEYS:
            continue
        if key not in module:
            failures.append(f"{what}: {key}= is in the unit file but not in module.nix")
        elif key not in from_file:
            failures.append(f"{what}: {key}= is in module.nix but not in the unit file")
        elif normal(key, from_file[key]) != normal(key, module[key]):
            failures.append(
                f"{what}: {key}= differs: unit file {from_file[key]}, module.nix {module[key]}"
            )


def check_units_agree(out: dict[str, Any]) -> None:
    # The operator's setup (with the portalloc share) is what the unit file describes.
    full = out["full"]
    service_file = parse_unit(ROOT / "systemd" / "portlease.service")
    socket_file = parse_unit(ROOT / "systemd" / "portlease.socket")

    service = full["service"]
    # The module sets variables through `environment` (merged per variable); NixOS
    # renders them as Environment= lines, as the unit file has them.
    environment = [f"{k}={v}" for k, v in sorted(service.get("environment", {}).items())]
    compare_section("portlease.service [Service]", service_file["Service"],
                    {**service["serviceConfig"], "Environment": environment})
    compare_section(
        "portlease.service [Unit]", service_file["Unit"],
        {"Description": service["description"], "Documentation": service["documentation"],
         # NixOS renders a list of units as one space-separated line, as the file has it.
         "Requires": [" ".join(service["requires"])], "After": [" ".join(service["after"])]},
    )
    exec_start = service["serviceConfig"]["ExecStart"]
    check(
        service_file["Service"]["ExecStart"] == [f"/usr/bin/portlease serve --config {CONFIG_PATH}"]
        and exec_start == f"{full['packageOutPath']}/bin/portlease serve --config {CONFIG_PATH}",
        f"ExecStart differs beyond the binary's path: {exec_start}",
    )
    reload_cmd = service["serviceConfig"]["ExecReload"]
    check(
        reload_cmd.endswith("/bin/kill -HUP $MAINPID")
        and service_file["Service"]["ExecReload"] == ["kill -HUP $MAINPID"],
        f"ExecReload differs: {reload_cmd}",
    )

    for unit in (service, full["socket"]):
        check(unit["documentation"] == DOCUMENTATION, f"Documentation= {unit['documentation']}")
        check(len(service_file["Unit"].get("Documentation", [])) == 1,
              "the unit file has no Documentation=")

    socket = full["socket"]
    socket_config = {k: v for k, v in socket["socketConfig"].items() if k != "ExecStartPost"}
    compare_section(
        "portlease.socket [Socket]", socket_file["Socket"],
        socket_config | {"ListenStream": socket["listenStreams"]},
    )
    compare_section(
        "portlease.socket [Unit]", socket_file["Unit"],
        {"Description": socket["description"], "Documentation": socket["documentation"]},
    )
    compare_section(
        "portlease.socket [Install]", socket_file["Install"], {"WantedBy": socket["wantedBy"]}
    )


# ---------------------------------------------------------------- module output


def effective_environment(unit: dict[str, Any]) -> dict[str, str]:
    """The environment a unit's process gets: NixOS renders ``environment`` as
    Environment= lines before those of ``serviceConfig.Environment`` (where
    serviceOverrides.Environment lands), and systemd keeps the last assignment.
    A model of that rendering (seen in an evaluation against the real nixpkgs
    modules, December 2026), not NixOS's own; systemd's quoting is read with shlex."""
    env = {key: str(value) for key, value in unit.get("environment", {}).items()}
    lines = unit.get("serviceConfig", {}).get("Environment", [])
    for line in [lines] if isinstance(lines, str) else lines:
        for word in shlex.split(str(line)):
            name, sep, value = word.partition("=")
            if sep:
                env[name] = value
    return env


def joined(unit: dict[str, Any]) -> bool:
    return "portlease" in unit.get("serviceConfig", {}).get("SupplementaryGroups", [])


def check_joined_runner(what: str, unit: dict[str, Any], portalloc: str | None,
                        portserver: bool = True) -> None:
    """A runner joined to the broker: the group, the sockets, and the environment it really gets."""
    want = {"PORTLEASE_SOCKET": SOCKET_PATH}
    if portalloc is not None:
        want["FM_PORTALLOC_DATA_DIR"] = portalloc
    if portserver:
        want |= {"PORTSERVER_ADDRESS": PORTSERVER_PATH, "JAX_PORTSERVER_ADDRESS": PORTSERVER_PATH}
    env = effective_environment(unit)
    for key, value in want.items():
        check(env.get(key) == value,
              f"{what}: the runner's process gets {key}={env.get(key)}, not {value}")
    if not portserver:
        for key in ("PORTSERVER_ADDRESS", "JAX_PORTSERVER_ADDRESS"):
            check(key not in env, f"{what}: {key} without the portserver socket")
    sockets = RUNNER_SOCKETS if portserver else RUNNER_SOCKETS[:1]
    for key in ("wants", "after"):
        got = [s for s in unit.get(key, []) if s.startswith("portlease")]
        check(got == sockets, f"{what}: {key} {got}, want {sockets}")


def check_common(name: str, s: dict[str, Any]) -> None:
    socket, service = s["socket"], s["service"]
    sc, svc = socket["socketConfig"], service["serviceConfig"]
    check(socket["listenStreams"] == [SOCKET_PATH], f"{name}: listenStreams {socket['listenStreams']}")
    check(sc["SocketGroup"] == "portlease", f"{name}: SocketGroup {sc['SocketGroup']}")
    check(sc["SocketMode"] == "0660", f"{name}: SocketMode {sc['SocketMode']}")
    check(sc["SocketUser"] == "root", f"{name}: SocketUser")
    check(sc["Accept"] is False and sc["RemoveOnStop"] is True, f"{name}: Accept/RemoveOnStop")
    check(sc["DirectoryMode"] == "0755", f"{name}: DirectoryMode")
    check(socket["wantedBy"] == ["sockets.target"], f"{name}: socket not wanted by sockets.target")
    check(svc["Type"] == "notify" and svc["NotifyAccess"] == "main", f"{name}: Type/NotifyAccess")
    check(svc["StateDirectory"] == "portlease", f"{name}: StateDirectory")
    check(svc["Restart"] == "on-failure", f"{name}: Restart")
    check(bool(svc.get("WatchdogSec")), f"{name}: no WatchdogSec")
    check(svc["DynamicUser"] is True, f"{name}: DynamicUser")
    # Not `portlease`: that is the socket's static group (217/USER).
    check(svc.get("User") == "portlease-broker", f"{name}: User {svc.get('User')}")
    check(service.get("stopIfChanged") is False,
          f"{name}: stopIfChanged is not false: a changed service would stop the socket")
    check(svc["CapabilityBoundingSet"] == "", f"{name}: CapabilityBoundingSet not empty")
    check(
        svc["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6"],
        f"{name}: RestrictAddressFamilies {svc['RestrictAddressFamilies']}",
    )
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges",
                "MemoryDenyWriteExecute", "SystemCallFilter", "RestrictNamespaces",
                "LockPersonality", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectClock", "ProtectHostname"):
        check(key in svc, f"{name}: hardening key {key} missing")
    for key in ("PrivateNetwork", "PrivateUsers", "ProcSubset", "ProtectProc", "RuntimeDirectory"):
        check(key not in svc, f"{name}: {key} would break the broker")
    check(svc["ExecStart"].endswith(f" serve --config {CONFIG_PATH}"), f"{name}: ExecStart")
    check(s["configFile"] in service["reloadTriggers"], f"{name}: config change does not reload")
    check("/nix/store/" not in json.dumps(socket) or bool(sc.get("ExecStartPost")),
          f"{name}: the socket unit names a store path, so upgrades change it: {socket}")
    check(service["requires"] == ["portlease.socket"], f"{name}: service does not require socket")
    check("portlease" in s["groups"], f"{name}: users.groups.portlease missing")
    check(all(a["assertion"] for a in s["assertions"]), f"{name}: an assertion fails")


def check_runners(out: dict[str, Any]) -> None:
    full = out["full"]
    runners, declared = full["runners"], full["githubRunners"]
    portalloc = full["settings"]["portalloc_dir"]
    check(sorted(declared) == ["a", "b", "c"], f"runners declared: {sorted(declared)}")
    check(
        sorted(runners) == [f"github-runner-{n}" for n in ("a", "b", "c")],
        f"runner units joined: {sorted(runners)}",
    )
    for name, unit in runners.items():
        env, sc = unit["environment"], unit["serviceConfig"]
        check(env.get("PORTLEASE_SOCKET") == SOCKET_PATH, f"{name}: PORTLEASE_SOCKET {env}")
        check(env.get("FM_PORTALLOC_DATA_DIR") == portalloc, f"{name}: FM_PORTALLOC_DATA_DIR")
        check(sc.get("SupplementaryGroups") == ["portlease"], f"{name}: SupplementaryGroups {sc}")
        check(sc.get("ReadWritePaths") == [f"-{portalloc}"],
              f"{name}: ReadWritePaths {sc.get('ReadWritePaths')}, want -{portalloc}")
        check(sc.get("UMask") == "0007", f"{name}: UMask for the share {sc.get('UMask')}")
        check_joined_runner(name, unit, portalloc)
        # A stable directory on PATH: the store path would restart the runner
        # (and kill its job) on every portlease upgrade.
        check(unit["path"][-1:] == [SYSTEM_PROFILE], f"{name}: PATH ends {unit['path'][-1:]}")
        check(full["packageOutPath"] not in json.dumps(unit),
              f"{name}: the unit names the portlease store path: {unit}")
        check(full["packageOutPath"] in [p["outPath"] if isinstance(p, dict) else p
                                         for p in full["systemPackages"]],
              "the package is not in environment.systemPackages (/run/current-system/sw/bin)")
        # The runner module's sandbox (nix/tests/github-runner-module.nix) stays as it set it.
        for key, value in RUNNER_SANDBOX.items():
            check(sc.get(key) == value, f"{name}: the runner's {key} is {sc.get(key)!r}, not {value!r}")
    names = set()
    for name, runner in declared.items():
        unknown = set(runner) - GITHUB_RUNNER_OPTIONS
        check(not unknown, f"github-runners.{name}: not nixpkgs options: {sorted(unknown)}")
        check(runner.get("enable") is True, f"github-runners.{name} not enabled")
        check(runner.get("ephemeral") is True, f"github-runners.{name} not ephemeral")
        check(str(runner.get("tokenFile", "")).startswith("/"), f"github-runners.{name} tokenFile")
        names.add(runner.get("name"))
    check(len(names) == len(declared), f"runner names are not distinct: {names}")
    check(
        full["tmpfiles"] == [f"d {portalloc} 2770 root portlease -"],
        f"portalloc share not created: {full['tmpfiles']}",
    )
    check(full["warnings"] == [], f"warnings: {full['warnings']}")


def check_portserver(out: dict[str, Any]) -> None:
    for name in ("minimal", "full", "access"):
        main_socket, socket = out[name]["socket"], out[name]["portserverSocket"]
        if socket is None:
            failures.append(f"{name}: no portlease-portserver socket unit")
            continue
        sc, main = socket["socketConfig"], main_socket["socketConfig"]
        check(socket["listenStreams"] == [PORTSERVER_PATH],
              f"{name}: portserver listenStreams {socket['listenStreams']}")
        check(sc.get("FileDescriptorName") == "portserver",
              f"{name}: portserver FileDescriptorName {sc.get('FileDescriptorName')}")
        check(sc.get("Service") == "portlease.service", f"{name}: portserver Service {sc.get('Service')}")
        for key in ("SocketUser", "SocketGroup", "SocketMode", "DirectoryMode", "Accept", "RemoveOnStop"):
            check(sc.get(key) == main.get(key),
                  f"{name}: portserver {key}={sc.get(key)!r}, the main socket's is {main.get(key)!r}")
        check(socket["wantedBy"] == ["sockets.target"], f"{name}: portserver socket not wanted")
        posts = [post.replace(PORTSERVER_PATH, SOCKET_PATH) for post in sc.get("ExecStartPost", [])]
        check(posts == main.get("ExecStartPost", []),
              f"{name}: portserver socket ACLs {sc.get('ExecStartPost')} differ from the main socket's")


def check_adoption(out: dict[str, Any]) -> None:
    """fedimint's CI host (nix/tests/fedimint-host.nix) adopting portlease."""
    a = out["adoption"]
    names = [f"runner-01-{x}" for x in "abcd"]
    units = [f"github-runner-{n}" for n in names]
    portalloc = "/var/lib/fm-portalloc"

    adopted = a["adopted"]
    check(adopted["failedAssertions"] == [] and adopted["warnings"] == [],
          f"adopted host: {adopted['failedAssertions']} {adopted['warnings']}")
    check(sorted(adopted["runners"]) == units, f"adopted host: runner units {sorted(adopted['runners'])}")
    for unit_name, unit in adopted["runners"].items():
        sc = unit["serviceConfig"]
        check(joined(unit), f"adopted host: githubRunners = \"all\" did not join {unit_name}")
        check_joined_runner(f"adopted host {unit_name}", unit, portalloc)
        # What the operator's serviceOverrides set stays.
        for key, value in {"PrivateUsers": False, "ProtectHome": False, "PrivateTmp": False,
                           "ProtectSystem": "full", "User": "github-runner"}.items():
            check(sc.get(key) == value, f"adopted host {unit_name}: {key}={sc.get(key)!r}, not {value!r}")

    # The old Environment line kept: the runners would get the old directory.
    kept = a["keptEnvironment"]
    for unit_name, unit in kept["runners"].items():
        check(effective_environment(unit).get("FM_PORTALLOC_DATA_DIR")
              == "/home/github-runner/.cache/port-alloc",
              f"kept Environment: the stand-in does not reproduce systemd keeping the last line ({unit_name})")
    for name in names:
        option = f"services.github-runners.{name}.serviceOverrides.Environment"
        check(any(option in m and "FM_PORTALLOC_DATA_DIR" in m for m in kept["failedAssertions"]),
              f"an operator's serviceOverrides.Environment FM_PORTALLOC_DATA_DIR is not refused "
              f"(no assertion names {option}): {kept['failedAssertions']}")
    same = a["sameEnvironment"]
    check(same["failedAssertions"] == [], f"the module's own value in Environment is refused: "
          f"{same['failedAssertions']}")
    check(any("services.github-runners.runner-01-a.serviceOverrides.Environment" in w
              for w in same["warnings"]),
          f"the module's own value in serviceOverrides.Environment is not warned: {same['warnings']}")

    extra = a["extraEnvironment"]
    option = "services.github-runners.runner-01-b.extraEnvironment.FM_PORTALLOC_DATA_DIR"
    check(a["extraEnvironmentFails"], "the stand-in accepts two extraEnvironment values (NixOS does not)")
    check(any(option in m for m in extra["failedAssertions"]),
          f"an extraEnvironment FM_PORTALLOC_DATA_DIR clash is not explained (no assertion names "
          f"{option}): {extra['failedAssertions']}")
    check(a["extraEnvironmentSame"]["failedAssertions"] == [],
          f"the same value in extraEnvironment is refused: {a['extraEnvironmentSame']['failedAssertions']}")

    short = a["shortNames"]
    check(sorted(short["runners"]) == units,
          f"units defined for names that are not runners: {sorted(set(short['runners']) - set(units))}")
    check(not any(joined(u) for u in short["runners"].values()), "short names joined a runner")
    check(any("`a`" in w and all(f"`{n}`" in w for n in names) for w in short["warnings"]),
          f"the warning for names that are not runners does not list the runners: {short['warnings']}")
    one = a["oneNamed"]
    check(sorted(n for n, u in one["runners"].items() if joined(u)) == ["github-runner-runner-01-c"],
          f"githubRunners = [ \"runner-01-c\" ] joined {[n for n, u in one['runners'].items() if joined(u)]}")
    check("spare" in one["declared"] and "github-runner-spare" not in one["runners"],
          "a disabled runner got a unit")
    every = a["allButDisabled"]
    check(sorted(n for n, u in every["runners"].items() if joined(u)) == units,
          f"githubRunners = \"all\" joined {sorted(n for n, u in every['runners'].items() if joined(u))}")

    for case, directory in (("portallocInHome", "/home"), ("portallocInTmp", "/tmp")):
        check(any("portalloc_dir" in m and "ProtectHome" in m and "/var/lib/fm-portalloc" in m
                  and directory in m for m in a[case]),
              f"a portalloc_dir under {directory} is not refused: {a[case]}")
    check(a["portallocTmpLike"] == [], f"/tmpfs/... refused as if under /tmp: {a['portallocTmpLike']}")

    off = a["portserverOff"]
    check(off["portserverSocket"] is None, "portserver.enable = false still defines the socket")
    for unit_name, unit in off["runners"].items():
        check_joined_runner(f"portserver off {unit_name}", unit, portalloc, portserver=False)


def check_access_and_failures(out: dict[str, Any]) -> None:
    access = out["access"]
    check(access["groups"]["portlease"]["members"] == ["alice"], "allowedUsers not in the group")
    posts = access["socket"]["socketConfig"]["ExecStartPost"]
    check(
        len(posts) == 1 and posts[0].endswith(f"/bin/setfacl -m g:wheel:rw {SOCKET_PATH}"),
        f"allowedGroups ACL: {posts}",
    )
    tmp = [a for a in out["socketInTmp"] if not a["assertion"]]
    check(len(tmp) == 1 and "/run" in tmp[0]["message"], "a socket in /tmp is not refused")
    check(any("`z`" in w for w in out["undeclaredRunner"]), "an unknown runner name is not warned")
    check(out["disabled"] == {"systemd": {}, "users": {}, "environment": {}},
          f"disabled module still defines {out['disabled']}")
    refused = out["refused"]
    check(refused.pop("control") is False, "the control evaluation failed")
    for case, failed in refused.items():
        check(failed, f"the stand-in accepted {case}: it would not catch that mistake")
    check(out["forcedType"] == "simple", "mkForce does not win")


def check_overrides(out: dict[str, Any]) -> None:
    umask = out["umaskOverride"]
    check(umask == {"github-runner-a": "0077", "github-runner-b": "0007", "github-runner-c": "0007"},
          f"the operator's serviceOverrides.UMask does not win over the module's: {umask}")
    shallow = out["shallowOverrides"]
    check("/first" not in shallow["ReadWritePaths"] and "/second" in shallow["ReadWritePaths"]
          and shallow.get("Nice") == 5,
          f"serviceOverrides is not the shallow merge docs/nixos.md describes: {shallow}")
    check(f"-{out['full']['settings']['portalloc_dir']}" in shallow["ReadWritePaths"],
          "the operator's serviceOverrides.ReadWritePaths dropped the module's")
    check(all(v == {} for v in out["moduleOverrides"].values()),
          f"the module writes into serviceOverrides: {out['moduleOverrides']}")


def check_vm(out: dict[str, Any]) -> None:
    vm = out["vm"]
    machine = vm["machine"]
    check(machine["warnings"] == [], f"the VM node warns: {machine['warnings']}")
    check(all(a["assertion"] for a in machine["assertions"]), "an assertion fails on the VM node")
    check(sorted(machine["runners"]) == [f"github-runner-{n}" for n in "abc"],
          f"VM runners: {sorted(machine['runners'])}")
    for name, unit in machine["runners"].items():
        sc = unit["serviceConfig"]
        for key, value in RUNNER_SANDBOX.items():
            check(sc.get(key) == value, f"VM {name}: stand-in {key} is {sc.get(key)!r}, not {value!r}")
        for key in ("SystemCallFilter", "InaccessiblePaths"):
            check(bool(sc.get(key)), f"VM {name}: the stand-in lacks the runner's {key}")
        check(sc.get("UMask") == "0007", f"VM {name}: UMask {sc.get('UMask')}")
        check(vm["packageOutPath"] not in json.dumps(unit), f"VM {name}: names the store path")
    check(machine["settings"].get("metrics_textfile", "").endswith("/portlease.prom"),
          f"VM: metrics_textfile {machine['settings'].get('metrics_textfile')}")
    check("machine.succeed(" in vm["testScript"], "the VM test script did not come through")


def check_metrics(out: dict[str, Any]) -> None:
    metrics = out["metrics"]
    plain = metrics["textfile"]
    check(plain["settings"].get("metrics_textfile") == "/var/lib/metrics/portlease.prom",
          f"metrics.textfile renders {plain['settings'].get('metrics_textfile')}")
    check("-/var/lib/metrics" in plain["service"]["serviceConfig"]["ReadWritePaths"],
          "the broker cannot write the metrics file's directory")
    check(plain["tmpfiles"] == [], f"metrics.textfile alone creates {plain['tmpfiles']}")
    check("metrics_textfile" not in out["minimal"]["settings"], "metrics_textfile rendered unset")
    node = metrics["nodeExporter"]
    directory = "/var/lib/prometheus-node-exporter-text-files"
    check(node["settings"].get("metrics_textfile") == f"{directory}/portlease.prom",
          f"nodeExporter: metrics_textfile {node['settings'].get('metrics_textfile')}")
    check(node["exporterFlags"] == [f"--collector.textfile.directory={directory}"],
          f"nodeExporter: node_exporter flags {node['exporterFlags']}")
    check(node["tmpfiles"] == [f"d {directory} 0775 root portlease -"],
          f"nodeExporter: directory {node['tmpfiles']}")
    check(f"-{directory}" in node["service"]["serviceConfig"]["ReadWritePaths"],
          "nodeExporter: directory not writable by the broker")
    check(node["warnings"] == [] and all(a["assertion"] for a in node["assertions"]),
          f"nodeExporter: {node['warnings']}")
    check(any("exporters.node.enable" in w for w in metrics["nodeExporterOff"]["warnings"]),
          "no warning when node_exporter is off")
    check(any(not a["assertion"] and "--collector.textfile.directory" in a["message"]
              for a in metrics["twoFlags"]["assertions"]),
          "two textfile directories for node_exporter are not refused")
    try:
        load_rendered(node["settings"])
    except ConfigError as exc:
        failures.append(f"portlease serve --config refuses the metrics settings: {exc}")


# ---------------------------------------------------------------- rendered config


def toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(key, item) for item in value) + "]"
    raise TypeError(f"settings.{key}: {value!r} is not flat")


def to_toml(settings: dict[str, Any]) -> str:
    """Flat TOML (scalars and arrays), as pkgs.formats.toml writes the module's settings."""
    lines = [f"{key} = {toml_value(key, value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def load_rendered(settings: dict[str, Any]) -> Config:
    text = to_toml(settings)
    assert tomllib.loads(text) == settings, "TOML writer lost something"
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        return load_file(f.name)


def check_settings(out: dict[str, Any]) -> None:
    try:
        minimal = load_rendered(out["minimal"]["settings"])
        full = out["full"]["settings"]
        config = load_rendered(full)
    except ConfigError as exc:
        failures.append(f"portlease serve --config refuses the rendered settings: {exc}")
        return
    # The module's documented defaults render to a file that reads as Config().
    check(minimal == Config(), "the default settings do not read back as the broker's defaults")
    # The operator's settings arrive as written.
    for key, value in full.items():
        check(getattr(config, key) == value, f"settings.{key}: wrote {value!r}, read "
              f"{getattr(config, key)!r}")
    try:
        new_keys = load_rendered(out["newKeys"])
    except ConfigError as exc:
        failures.append(f"portlease serve --config refuses exclude/max_connections_per_uid: {exc}")
    else:
        check(new_keys.exclude == [20080, "21000-21009"] and new_keys.max_connections_per_uid == 64,
              f"exclude/max_connections_per_uid read back as {new_keys.exclude}, "
              f"{new_keys.max_connections_per_uid}")
    # Every declared option is a Config field with the same default.
    defaults = msgspec.structs.asdict(Config())
    for key, value in out["settingsDefaults"].items():
        check(key in defaults, f"settings.{key} is not a broker config key")
        check(defaults.get(key) == value,
              f"settings.{key}: module default {value!r}, broker default {defaults.get(key)!r}")
    check(out["settingsFreeform"], "settings is not freeform")


def check_package(out: dict[str, Any]) -> None:
    package = out["package"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = pyproject.get("version") or project_version()
    check(package["version"] == version, f"package.nix version {package['version']} != {version}")
    extras = pyproject.get("optional-dependencies", {})
    # The package is the broker and every client: the plain dependencies and
    # the broker and async extras.
    wanted = requirement_names(pyproject["dependencies"], extras, ["broker", "async"])
    got = {name.removeprefix("python3-") for name in package["dependencies"]}
    check(got == wanted, f"package.nix dependencies {got} != pyproject.toml {wanted}")
    test_deps = requirement_names([], extras, ["test"]) - wanted
    checks = {name.removeprefix("python3-") for name in package["nativeCheckInputs"]}
    checks = {"pytest" if name == "pytestCheckHook" else name for name in checks}
    check(test_deps <= checks,
          f"package.nix nativeCheckInputs lack the test extra's {sorted(test_deps - checks)}")
    check("tests/system" in package["disabledTestPaths"],
          "the check phase runs tests/system (root, systemd, nix, network)")
    for path in ("systemd/portlease.socket", "systemd/portlease.service",
                 "systemd/portlease-sysusers.conf", "systemd/portlease.conf",
                 "systemd/config.toml"):
        check(f" {path} " in package["postInstall"], f"package.nix does not install {path}")
        check((ROOT / path).exists(), f"{path} is missing")
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for module in package["pythonImportsCheck"]:
        parts = module.split(".")
        base = next((parts[:n] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in dirs), None)
        if base is None:
            failures.append(f"pythonImportsCheck {module}: no package-dir in pyproject.toml")
            continue
        path = ROOT / dirs[".".join(base)] / Path(*parts[len(base):])
        check(path.with_suffix(".py").exists() or (path / "__init__.py").exists(),
              f"pythonImportsCheck {module}: no {path}.py")
    for src in package["srcFiles"]:
        check(Path(src).exists(), f"package.nix source {src} does not exist")
    check(package["mainProgram"] == "portlease", "meta.mainProgram")


def project_version() -> str:
    """The version setuptools reads ([tool.setuptools.dynamic] attr portlease.__version__)."""
    text = (ROOT / "client" / "_pkg" / "__init__.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__"):
            return str(ast.literal_eval(line.partition("=")[2].strip()))
    raise SystemExit("no __version__ in client/_pkg/__init__.py")


def requirement_names(deps: list[str], extras: dict[str, list[str]], names: list[str]) -> set[str]:
    """Distribution names in ``deps`` and in the named extras, self-references followed."""
    found: set[str] = set()
    pending = list(deps) + [dep for name in names for dep in extras.get(name, [])]
    while pending:
        dep = pending.pop()
        name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].strip()
        if name == "portlease":
            inner = re.search(r"\[(.*)\]", dep)
            for extra in (inner.group(1).split(",") if inner else []):
                pending.extend(extras.get(extra.strip(), []))
            continue
        found.add(name)
    return found


def main() -> int:
    out = json.loads(Path(sys.argv[1]).read_text())
    for name in ("minimal", "full", "access"):
        check_common(name, out[name])
    check(out["minimal"]["runners"] == {}, "runners joined without githubRunners")
    check(out["minimal"]["tmpfiles"] == [], "portalloc share created though not configured")
    check_runners(out)
    check_access_and_failures(out)
    check_portserver(out)
    check_adoption(out)
    check_overrides(out)
    check_vm(out)
    check_metrics(out)
    check_settings(out)
    check_units_agree(out)
    check_package(out)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if failures:
        return 1
    print("nix evaluation checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
