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
    # nixpkgs' node exporter options that module.nix reads and sets.
    options.services.prometheus.exporters.node = {
      enable = lib.mkEnableOption "node_exporter";
      extraFlags = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
      };
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
      portserverSocket = config.systemd.sockets.portlease-portserver or null;
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
  runnerModule = ./github-runner-module.nix;

  full = eval [
    runnerModule
    ../github-runner.nix
  ];
  package = stub.pkgs.callPackage ../package.nix { };
  options = (stub.evalModules { modules = [ base module ]; }).options;

  runnersOf = config: lib.filterAttrs (name: _: lib.hasPrefix "github-runner-" name) config.systemd.services;
  umaskOf = config: lib.mapAttrs (_: unit: unit.serviceConfig.UMask or null) (runnersOf config);

  # The VM test's arguments, through the stub's runNixOSTest (which returns them).
  vmTest = import ./vm.nix { inherit (stub) pkgs; };
  # With the stand-in of nixpkgs' github-runners, which NixOS always declares.
  vmNode = eval [
    runnerModule
    vmTest.nodes.machine
  ];

  metricsEval = extra: eval ([ module enabled ] ++ extra);

  # fedimint's CI host (fedimint-host.nix) adopting portlease.
  fedimintHost = ./fedimint-host.nix;
  adopt =
    {
      keepEnvironment ? false,
      portlease ? { },
      extra ? [ ],
    }:
    eval (
      [
        runnerModule
        module
        (import fedimintHost { inherit keepEnvironment; })
        {
          services.portlease = {
            enable = true;
            githubRunners = "all";
            settings.portalloc_dir = "/var/lib/fm-portalloc";
          }
          // portlease;
        }
      ]
      ++ extra
    );
  # What the checks read of a host: its runner units as they render, the
  # runners declared, its assertions and warnings.
  hostSummary = config: {
    runners = runnersOf config;
    declared = lib.attrNames config.services.github-runners;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    warnings = config.warnings;
    portalloc = config.services.portlease.settings.portalloc_dir;
  };
  # Only the checks at evaluation: the units of these hosts do not evaluate
  # (a "conflicting definition values" error), which is what the assertions
  # are there to explain first.
  verdict = config: {
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    warnings = config.warnings;
  };
  extraEnvironmentClash = {
    services.github-runners.runner-01-b.extraEnvironment.FM_PORTALLOC_DATA_DIR = "/home/github-runner/.cache/port-alloc";
  };
  metricsSummary =
    config:
    summary config
    // {
      exporterFlags = config.services.prometheus.exporters.node.extraFlags;
    };
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

  # Adopting portlease on fedimint's CI host (docs/nixos.md, "Adopting
  # portlease on an existing runner host").
  adoption = {
    # As the docs say: githubRunners = "all", the share under /var/lib, the
    # old serviceOverrides.Environment line deleted.
    adopted = hostSummary (adopt { });
    # The Environment line kept: systemd would keep it over the module's.
    keptEnvironment = hostSummary (adopt { keepEnvironment = true; });
    # The module's own value, set again: redundant, warned.
    sameEnvironment = hostSummary (adopt {
      extra = [
        { services.github-runners.runner-01-a.serviceOverrides.Environment = [ "FM_PORTALLOC_DATA_DIR=/var/lib/fm-portalloc" ]; }
      ];
    });
    # The runners' short names, which are not their attribute names.
    shortNames = hostSummary (adopt { portlease.githubRunners = [ "a" "b" "c" "d" ]; });
    # One runner named, and a disabled one that "all" must leave alone.
    oneNamed = hostSummary (adopt {
      portlease.githubRunners = [ "runner-01-c" ];
      extra = [ { services.github-runners.spare = { enable = false; url = "https://github.com/fedimint"; tokenFile = "/run/secrets/x"; }; } ];
    });
    allButDisabled = hostSummary (adopt {
      extra = [ { services.github-runners.spare = { enable = false; url = "https://github.com/fedimint"; tokenFile = "/run/secrets/x"; }; } ];
    });
    # The crate's directory kept where it was: the broker cannot see it.
    portallocInHome = (verdict (adopt {
      portlease.settings.portalloc_dir = "/home/github-runner/.cache/port-alloc";
    })).failedAssertions;
    portallocInTmp = (verdict (adopt { portlease.settings.portalloc_dir = "/tmp/fm-portalloc"; })).failedAssertions;
    # A directory that only starts like /tmp is fine.
    portallocTmpLike = (verdict (adopt { portlease.settings.portalloc_dir = "/tmpfs/fm-portalloc"; })).failedAssertions;
    # The old directory in extraEnvironment instead: NixOS's own error, and
    # the assertion that names the option first.
    extraEnvironment = verdict (adopt { extra = [ extraEnvironmentClash ]; });
    extraEnvironmentFails = fails [
      runnerModule
      module
      (import fedimintHost { })
      {
        services.portlease = {
          enable = true;
          githubRunners = "all";
          settings.portalloc_dir = "/var/lib/fm-portalloc";
        };
      }
      extraEnvironmentClash
    ];
    # The same value in extraEnvironment merges without a word.
    extraEnvironmentSame = hostSummary (adopt {
      extra = [ { services.github-runners.runner-01-b.extraEnvironment.FM_PORTALLOC_DATA_DIR = "/var/lib/fm-portalloc"; } ];
    });
    portserverOff = hostSummary (adopt { portlease.portserver.enable = false; }) // {
      portserverSocket = (adopt { portlease.portserver.enable = false; }).systemd.sockets.portlease-portserver or null;
    };
  };

  # The operator's own serviceOverrides.UMask on runner a (plain priority)
  # against the module's: the operator's wins, and nothing conflicts.
  umaskOverride = umaskOf (eval [
    runnerModule
    ../github-runner.nix
    { services.github-runners.a.serviceOverrides.UMask = "0077"; }
  ]);

  # Two modules' serviceOverrides for one runner: types.attrs keeps one value
  # per key, the later definition's (nixpkgs' merge: a shallow //).
  shallowOverrides =
    (eval [
      runnerModule
      ../github-runner.nix
      { services.github-runners.a.serviceOverrides.ReadWritePaths = [ "/first" ]; }
      {
        services.github-runners.a.serviceOverrides = {
          ReadWritePaths = [ "/second" ];
          Nice = 5;
        };
      }
    ]).systemd.services.github-runner-a.serviceConfig;

  # The module writes nothing into serviceOverrides, so it cannot drop the operator's keys.
  moduleOverrides = lib.mapAttrs (_: runner: runner.serviceOverrides) full.services.github-runners;

  vm = {
    inherit (vmTest) testScript;
    machine = summary vmNode;
    packageOutPath = vmNode.services.portlease.package.outPath;
  };

  metrics = {
    textfile = metricsSummary (metricsEval [
      { services.portlease.metrics.textfile = "/var/lib/metrics/portlease.prom"; }
    ]);
    nodeExporter = metricsSummary (metricsEval [
      {
        services.portlease.metrics.nodeExporter.enable = true;
        services.prometheus.exporters.node.enable = true;
      }
    ]);
    nodeExporterOff = metricsSummary (metricsEval [ { services.portlease.metrics.nodeExporter.enable = true; } ]);
    twoFlags = metricsSummary (metricsEval [
      {
        services.portlease.metrics.nodeExporter.enable = true;
        services.prometheus.exporters.node.enable = true;
        services.prometheus.exporters.node.extraFlags = [ "--collector.textfile.directory=/srv/prom" ];
      }
    ]);
  };

  # The keys the broker added for issue 14, as an operator writes them.
  newKeys = (summary (eval [
    module
    enabled
    {
      services.portlease.settings = {
        exclude = [
          20080
          "21000-21009"
        ];
        max_connections_per_uid = 64;
      };
    }
  ])).settings;

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
    excludeNotARange = fails [
      module
      enabled
      { services.portlease.settings.exclude = [ "21000..21009" ]; }
    ];
    excludePortZero = fails [
      module
      enabled
      { services.portlease.settings.exclude = [ 0 ]; }
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
    nativeCheckInputs = map (d: d.name) package.nativeCheckInputs;
    disabledTestPaths = package.disabledTestPaths or [ ];
    # What nixpkgs' pytestCheckHook reads (check_pytest_hook.py replays it).
    enabledTestPaths = package.enabledTestPaths or null;
    enabledTests = package.enabledTests or null;
    disabledTests = package.disabledTests or null;
    enabledTestMarks = package.enabledTestMarks or null;
    disabledTestMarks = package.disabledTestMarks or null;
    pytestFlagsArray = package.pytestFlagsArray or null;
    pytestFlags = package.pytestFlags or null;
    pytestImportMode = package.pytestImportMode or null;
    dontAddPytestImportMode = package.dontAddPytestImportMode or null;
    srcFiles = package.src.files;
  };
}
