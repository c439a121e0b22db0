# A stand-in for nixpkgs' services.github-runners (nixos/modules/services/
# continuous-integration/github-runner/{options,service}.nix), reduced to what
# decides how nix/module.nix lands on a runner unit: the option names and
# types, the unit name, the sandbox keys and their priorities (mkDefault), and
# serviceOverrides (types.attrs, a shallow merge) merged last into
# serviceConfig, extraEnvironment merged into the unit's environment (so a
# second value for one variable is a conflict, as in NixOS), and a unit only
# for an enabled entry. eval.nix imports it with nix/github-runner.nix,
# fedimint-host.nix and the VM node; the checks that rest on it say so in
# docs/nixos.md. It does not render unit files: the order of Environment=
# lines (the unit's environment first, then serviceConfig.Environment) is
# modelled in check_eval.py's effective_environment, after what an
# evaluation against the real modules showed. The VM test runs nixpkgs' own
# module.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption mkDefault types;

  runnerOptions = {
    options = {
      enable = lib.mkEnableOption "the runner";
      url = mkOption { type = types.str; };
      tokenFile = mkOption { type = types.path; };
      tokenType = mkOption {
        type = types.enum [
          "auto"
          "access"
          "registration"
        ];
        default = "auto";
      };
      name = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      runnerGroup = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      extraLabels = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      noDefaultLabels = mkOption {
        type = types.bool;
        default = false;
      };
      replace = mkOption {
        type = types.bool;
        default = false;
      };
      extraPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      extraEnvironment = mkOption {
        type = types.attrs;
        default = { };
      };
      serviceOverrides = mkOption {
        type = types.attrs;
        default = { };
      };
      package = mkOption {
        type = types.package;
        default = pkgs.github-runner;
      };
      ephemeral = mkOption {
        type = types.bool;
        default = false;
      };
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      group = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      workDir = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      nodeRuntimes = mkOption {
        type = types.listOf types.str;
        default = [ "node20" ];
      };
    };
  };

  unit = name: cfg: {
    description = "GitHub Actions runner";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    environment = {
      HOME = "/var/lib/github-runner/${name}";
      RUNNER_ROOT = "/var/lib/github-runner/${name}";
    }
    // cfg.extraEnvironment;
    path = [
      pkgs.bash
      pkgs.coreutils
    ]
    ++ cfg.extraPackages;
    serviceConfig = lib.mkMerge [
      {
        ExecStart = "${cfg.package}/bin/Runner.Listener run --startuptype service";
        StateDirectory = [ "github-runner/${name}" ];
        RuntimeDirectory = [ "github-runner/${name}" ];
        InaccessiblePaths = [
          "-${cfg.tokenFile}"
          "/var/lib/github-runner/${name}/.new-token"
        ];
        KillSignal = "SIGINT";
        DynamicUser = mkDefault true;
        PrivateUsers = mkDefault true;
        PrivateTmp = mkDefault true;
        PrivateDevices = mkDefault true;
        PrivateMounts = mkDefault true;
        ProtectSystem = mkDefault "strict";
        ProtectHome = mkDefault true;
        ProtectProc = mkDefault "invisible";
        NoNewPrivileges = mkDefault true;
        UMask = mkDefault "0066";
        SystemCallFilter = lib.mkBefore [
          "~@clock"
          "~@cpu-emulation"
          "~@module"
          "~@mount"
          "~@obsolete"
          "~@raw-io"
          "~@reboot"
          "~capset"
          "~setdomainname"
          "~sethostname"
        ];
        RestrictAddressFamilies = lib.mkBefore [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
          "AF_NETLINK"
        ];
      }
      (lib.mkIf (cfg.user != null) {
        DynamicUser = false;
        User = cfg.user;
      })
      (lib.mkIf (cfg.group != null) {
        DynamicUser = false;
        Group = cfg.group;
      })
      cfg.serviceOverrides
    ];
  };

  enabled = lib.filterAttrs (_: cfg: cfg.enable) config.services.github-runners;
in
{
  options.services.github-runners = mkOption {
    type = types.attrsOf (types.submodule runnerOptions);
    default = { };
  };

  config.systemd.services = lib.mapAttrs' (
    name: cfg: lib.nameValuePair "github-runner-${name}" (unit name cfg)
  ) enabled;
}
