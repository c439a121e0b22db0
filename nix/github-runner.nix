# Three GitHub Actions runners, a, b and c, on one NixOS host, sharing one
# portlease broker. Copy this into your configuration and adjust the URL, the
# token file and the port range.
#
# With the flake, import `portlease.nixosModules.default` instead of ./module.nix.
{ config, lib, ... }:
let
  runners = [
    "a"
    "b"
    "c"
  ];
in
{
  imports = [ ./module.nix ];

  services.portlease = {
    enable = true;
    # Each github-runner-NAME unit joins the socket's group and gets
    # PORTLEASE_SOCKET and the portlease client. The names are attribute names
    # of services.github-runners below ("all" joins every enabled runner).
    githubRunners = runners;
    # The default: a second socket, /run/portlease/portserver.sock, for
    # Google portpicker's port-server protocol. The runners get
    # PORTSERVER_ADDRESS and JAX_PORTSERVER_ADDRESS pointing at it.
    portserver.enable = true;
    settings = {
      # Above the crate's busiest ports (it starts at 10000), below the
      # kernel's ephemeral range (32768 and up).
      port_min = 20000;
      port_max = 32000;
      # Jobs get this long to reclaim their leases after a broker restart.
      ttl = 300;
      max_ports_per_uid = 2048;
      # Projects still on the fedimint-portalloc crate: each runner gets
      # FM_PORTALLOC_DATA_DIR=/var/lib/fm-portalloc and the broker keeps the
      # crate's allocations and its leases apart.
      portalloc_dir = "/var/lib/fm-portalloc";
    };
  };

  services.github-runners = lib.genAttrs runners (name: {
    enable = true;
    url = "https://github.com/example-org";
    # A fine-grained PAT (organization self-hosted runners: read and write):
    # ephemeral runners register again after every job, which a one-hour
    # registration token would not survive.
    tokenFile = "/run/secrets/github-runner-token";
    name = "${config.networking.hostName}-${name}";
    ephemeral = true;
    replace = true;
    extraLabels = [
      "nixos"
      "portlease"
    ];
    # null: each runner works in its own /run/github-runner/NAME, wiped on
    # every start (with ephemeral = true: after every job).
    workDir = null;
    # The runner's own sandbox (DynamicUser, PrivateUsers, ProtectSystem=strict,
    # PrivateTmp, ...) stays as nixpkgs sets it: the socket is under /run.
    # Your own serviceOverrides keep working: the module sets its keys on the
    # unit, not there, and a plain serviceOverrides.UMask wins over its 0007
    # (docs/nixos.md, "Join runners"). The exception is Environment (and
    # extraEnvironment): one that sets FM_PORTALLOC_DATA_DIR, PORTLEASE_SOCKET
    # or PORTSERVER_ADDRESS to another value than the module's is refused by
    # an assertion; delete it, the module sets them.
  });
}
