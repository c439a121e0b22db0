# Evaluates nix/module.nix and nix/github-runner.nix against stub-lib.nix and
# prints what the checks in check_eval.py look at. Run by check.sh:
#   nix-instantiate --eval --strict --json nix/tests/eval.nix
let
  stub = import ./stub-lib.nix;
  inherit (stub) lib;

  # What the rest of NixOS would declare and the modules read.
  base = {
    options.networking.hostName = lib.mkOption {
      type = lib.types.str;
      default = "ci-host";
    };
  };

  eval = modules: (stub.evalModules { modules = [ base ] ++ modules; }).config;

  summary =
    config:
    let
      services = config.systemd.services;
    in
    {
      socket = config.systemd.sockets.portlease;
      service = services.portlease;
      runners = lib.filterAttrs (name: _: lib.hasPrefix "github-runner-" name) services;
      settings = config.environment.etc."portlease/config.toml".source.stubTomlData;
      configFile = config.environment.etc."portlease/config.toml".source.outPath;
      groups = config.users.groups;
      systemPackages = config.environment.systemPackages;
      tmpfiles = config.systemd.tmpfiles.rules or [ ];
      assertions = config.assertions;
      warnings = config.warnings;
    };

  # Evaluation that must fail: proves the stand-in refuses what NixOS refuses.
  fails = modules: !(builtins.tryEval (builtins.deepSeq (eval modules) true)).success;

  module = ../module.nix;
  enabled = {
    services.portlease.enable = true;
  };

  full = eval [ ../github-runner.nix ];
  package = stub.pkgs.callPackage ../package.nix { };
  options = (stub.evalModules { modules = [ base module ]; }).options;
in
{
  minimal = summary (eval [
    module
    enabled
  ]);

  full = summary full // {
    githubRunners = full.services.github-runners;
    hostName = full.networking.hostName;
    packageOutPath = full.services.portlease.package.outPath;
  };

  access = summary (eval [
    module
    enabled
    {
      services.portlease.allowedUsers = [ "alice" ];
      services.portlease.allowedGroups = [ "wheel" ];
    }
  ]);

  # A runner named here but not declared in services.github-runners.
  undeclaredRunner = (summary (eval [
    module
    enabled
    { services.portlease.githubRunners = [ "z" ]; }
  ])).warnings;

  socketInTmp = (summary (eval [
    module
    enabled
    { services.portlease.socketPath = "/tmp/portlease.sock"; }
  ])).assertions;

  disabled =
    let
      config = eval [ module ];
    in
    {
      systemd = config.systemd;
      users = config.users;
      environment = config.environment;
    };

  refused = {
    # The control: the same evaluation without the fault succeeds.
    control = fails [
      module
      enabled
    ];
    misspelledOption = fails [
      module
      enabled
      { services.portlease.socketPth = "/run/x.sock"; }
    ];
    wrongType = fails [
      module
      enabled
      { services.portlease.settings.port_min = "10000"; }
    ];
    portOutOfRange = fails [
      module
      enabled
      { services.portlease.settings.port_max = 70000; }
    ];
    conflictingScalars = fails [
      module
      enabled
      { systemd.services.portlease.serviceConfig.Type = "simple"; }
    ];
  };

  # A forced value wins over the module's, as in NixOS.
  forcedType =
    (eval [
      module
      enabled
      { systemd.services.portlease.serviceConfig.Type = lib.mkForce "simple"; }
    ]).systemd.services.portlease.serviceConfig.Type;

  settingsDefaults = stub.optionDefaults options.services.portlease.settings.type.options;
  settingsFreeform = options.services.portlease.settings.type.freeformType != null;

  package = {
    inherit (package)
      pname
      version
      pyproject
      postInstall
      pythonImportsCheck
      ;
    mainProgram = package.meta.mainProgram;
    dependencies = map (d: d.name) package.dependencies;
    srcFiles = package.src.files;
  };
}
