# services.portlease: one socket-activated broker per host, shared by its CI runners.
#
# The units here mirror systemd/portlease.socket and systemd/portlease.service.
# nix/tests/check.sh evaluates this module and fails when the two disagree
# (nix/tests/check_eval.py), so change both together.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  cfg = config.services.portlease;
  settingsFormat = pkgs.formats.toml { };

  # TOML has no null: an unset option means "the broker's default".
  configFile = settingsFormat.generate "portlease.toml" (
    lib.filterAttrs (_: value: value != null) cfg.settings
  );
  configPath = "/etc/portlease/config.toml";
  portallocDir = cfg.settings.portalloc_dir;
  sharing = portallocDir != null;

  textfile = cfg.metrics.textfile;
  nodeExporter = cfg.metrics.nodeExporter;
  textfileFlag = "--collector.textfile.directory=";
  exporterFlags = config.services.prometheus.exporters.node.extraFlags or [ ];

  # A stable directory on every runner's PATH, in place of the package's store
  # path: a store path there would change the runner units on every portlease
  # upgrade, and NixOS would restart them, killing their jobs.
  systemProfile = "/run/current-system/sw";

  # The sandbox of systemd/portlease.service, key for key. Why each line is
  # there (and why PrivateUsers, ProtectProc and ProcSubset are not) is said in
  # that file and in docs/systemd.md.
  hardening = {
    DynamicUser = true;
    # Named apart from the socket's static group: with DynamicUser and no
    # User=, systemd names the user after the unit, `portlease`, which clashes
    # with the group (217/USER).
    User = "portlease-broker";
    SupplementaryGroups = [ cfg.group ];
    UMask = "0007";
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateIPC = true;
    PrivateMounts = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    IPAddressDeny = "any";
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    SystemCallErrorNumber = "EPERM";
    SystemCallArchitectures = "native";
    MemoryDenyWriteExecute = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RemoveIPC = true;
    DevicePolicy = "closed";
    KeyringMode = "private";
  };

  # The page online, not a file of the package: a store path here would
  # change both units on every upgrade.
  documentation = [ "https://github.com/portlease/portlease/blob/main/docs/nixos.md" ];

  portserverPath = "/run/portlease/portserver.sock";
  portserver = cfg.portserver.enable;
  runnerSockets = [ "portlease.socket" ] ++ lib.optional portserver "portlease-portserver.socket";

  runnerUnit = name: "github-runner-${name}";
  # nixpkgs' services.github-runners: only an enabled entry has a unit
  # (github-runner-NAME, NAME being the attribute name, not its `name`).
  enabledRunners = lib.filterAttrs (_: runner: runner.enable) (config.services.github-runners or { });
  joinAll = cfg.githubRunners == "all";
  namedRunners = if joinAll then [ ] else cfg.githubRunners;
  # The runners joined: taken from services.github-runners and filtered by
  # the option, never from the option's list alone, so a name that is not a
  # runner defines nothing (a unit defined for it would have no ExecStart).
  joined = lib.filterAttrs (name: _: joinAll || lib.elem name namedRunners) enabledRunners;
  notRunners = lib.filter (name: !(enabledRunners ? ${name})) namedRunners;
  showNames = names: lib.concatStringsSep ", " (map (name: "`${name}`") names);

  # What a joined runner finds in its environment.
  runnerEnvironment = {
    PORTLEASE_SOCKET = cfg.socketPath;
  }
  // lib.optionalAttrs sharing { FM_PORTALLOC_DATA_DIR = portallocDir; }
  // lib.optionalAttrs portserver {
    PORTSERVER_ADDRESS = portserverPath;
    JAX_PORTSERVER_ADDRESS = portserverPath;
  };

  # An Environment= setting as NAME -> value, the last assignment winning as
  # in systemd. Assignments are split on whitespace and their quotes dropped:
  # enough to find the names above, whose values hold no spaces.
  environmentAssignments =
    value:
    builtins.foldl' (
      acc: word:
      let
        m = builtins.match "([A-Za-z_][A-Za-z0-9_]*)=(.*)" (builtins.replaceStrings [ "\"" "'" ] [ "" "" ] word);
      in
      if m == null then acc else acc // { ${builtins.head m} = builtins.elemAt m 1; }
    ) { } (builtins.filter (word: builtins.isString word && word != "") (builtins.split "[[:space:]]+" (toString (lib.toList value))));

  # A variable the module sets, set again by the operator on a joined runner:
  # in extraEnvironment (NixOS refuses two values with "conflicting definition
  # values", which names neither option to change) or in Environment= through
  # serviceOverrides (rendered after the module's Environment= lines, so
  # systemd silently keeps the operator's). `clash`: a different value (an
  # assertion); otherwise the same value (a warning: it would hide a later
  # change of the module's).
  runnerEnvironmentClashes = lib.concatMap (
    name:
    let
      runner = joined.${name};
      unit = runnerUnit name;
      extra = runner.extraEnvironment or { };
      overrideOption =
        if (runner.serviceOverrides or { }) ? Environment then
          "services.github-runners.${name}.serviceOverrides.Environment"
        else
          "systemd.services.${unit}.serviceConfig.Environment";
      overridden = environmentAssignments (config.systemd.services.${unit}.serviceConfig.Environment or [ ]);
    in
    lib.concatMap (
      var:
      let
        ours = runnerEnvironment.${var};
        theirs = overridden.${var};
        moveShare = lib.optionalString (
          var == "FM_PORTALLOC_DATA_DIR"
        ) " (to move the share, set services.portlease.settings.portalloc_dir)";
      in
      lib.optional (extra ? ${var} && toString extra.${var} != ours) {
        clash = true;
        message = ''
          services.github-runners.${name}.extraEnvironment.${var} = "${toString extra.${var}}" clashes with the ${var}=${ours} that services.portlease sets on ${unit} (NixOS would stop with "conflicting definition values"). Delete services.github-runners.${name}.extraEnvironment.${var}: services.portlease sets it${moveShare}.'';
      }
      ++ lib.optional (overridden ? ${var}) {
        clash = theirs != ours;
        message =
          if theirs != ours then
            ''
              ${overrideOption} sets ${var}=${theirs}. systemd keeps the last Environment= line, so that silently replaces the ${var}=${ours} services.portlease sets on ${unit}. Delete ${var}=… from ${overrideOption}: services.portlease sets it${moveShare}.''
          else
            ''
              ${overrideOption} sets ${var}=${theirs}, as services.portlease does. Delete ${var}=… from ${overrideOption}: systemd keeps that line over the module's, so it would hide a later change of the module's value.'';
      }
    ) (lib.attrNames runnerEnvironment)
  ) (lib.attrNames joined);

  # Directories the broker's sandbox hides (ProtectHome=true, PrivateTmp=true).
  hiddenFromBroker = [
    "/home"
    "/root"
    "/run/user"
    "/tmp"
    "/var/tmp"
  ];
  portallocHidden = lib.filter (
    root: sharing && (portallocDir == root || lib.hasPrefix "${root}/" portallocDir)
  ) hiddenFromBroker;
in
{
  options.services.portlease = {
    enable = lib.mkEnableOption "the portlease broker, which leases TCP/UDP ports to CI jobs";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The portlease package: broker (`portlease serve`) and client CLI.";
    };

    socketPath = mkOption {
      type = types.str;
      default = "/run/portlease/portlease.sock";
      description = ''
        The broker's socket, held by `portlease.socket`. It must stay under
        `/run`: runners run with `PrivateTmp=`, so a socket in `/tmp` is
        invisible to them.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "portlease";
      description = "Group allowed to connect to the socket (mode 0660, owner root).";
    };

    allowedUsers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "alice" ];
      description = "Users added to {option}`services.portlease.group`.";
    };

    allowedGroups = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "wheel" ];
      description = ''
        Further groups allowed to connect. A group cannot join a group, so
        each gets a POSIX ACL entry (`setfacl -m g:NAME:rw`) on the socket.
      '';
    };

    githubRunners = mkOption {
      type = types.either (types.enum [ "all" ]) (types.listOf types.str);
      default = [ ];
      example = [
        "a"
        "b"
        "c"
      ];
      description = ''
        The {option}`services.github-runners` entries to join to the broker:
        a list of their attribute names (not their `name` settings), or
        `"all"` for every enabled one. A name that is no enabled runner joins
        nothing and draws a warning that lists the runners there are.
        Each joined `github-runner-NAME` service gets
        {option}`services.portlease.group` as a supplementary group,
        `PORTLEASE_SOCKET` (and, with {option}`services.portlease.portserver.enable`,
        `PORTSERVER_ADDRESS` and `JAX_PORTSERVER_ADDRESS`) in its environment
        and `/run/current-system/sw` on its `path`: its `bin` is the last of
        the `bin` directories on `PATH` (the `sbin` directories follow). No
        store path, so a portlease upgrade does not restart the runner. With
        {option}`services.portlease.settings.portalloc_dir` set, it also gets
        `FM_PORTALLOC_DATA_DIR`, write access to that directory and
        `UMask=0007` (at priority 900: a plain `serviceOverrides.UMask` of
        yours wins). Nothing is written into `serviceOverrides`; an
        `Environment=` of yours (or an `extraEnvironment`) that sets one of
        these variables to another value is refused by an assertion.
      '';
    };

    portserver.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        A second socket, `portlease-portserver.socket` on
        `${portserverPath}`, on which the broker answers Google portpicker's
        port-server protocol (`PORTSERVER_ADDRESS`). Same owner, group and
        mode as the main socket; the joined runners get `PORTSERVER_ADDRESS`
        and `JAX_PORTSERVER_ADDRESS` pointing at it.
      '';
    };

    metrics = {
      textfile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/prometheus-node-exporter-text-files/portlease.prom";
        description = ''
          File the broker rewrites (atomically) every few seconds with its
          metrics in the classic Prometheus text format, for node_exporter's textfile collector
          (config key `metrics_textfile`). The broker gets write access to
          the file's directory. null: no file; `portlease metrics` still
          prints them.
        '';
      };
      nodeExporter = {
        enable = lib.mkEnableOption ''
          the metrics file in node_exporter's textfile collector directory:
          {option}`services.portlease.metrics.textfile` defaults to
          `DIRECTORY/portlease.prom`, the directory is created
          (`0775 root:GROUP`) and {option}`services.prometheus.exporters.node.extraFlags`
          gets `--collector.textfile.directory=DIRECTORY`
        '';
        directory = mkOption {
          type = types.str;
          default = "/var/lib/prometheus-node-exporter-text-files";
          description = ''
            node_exporter's textfile collector directory. If you already pass
            `--collector.textfile.directory` yourself, set this to the same
            directory and remove your flag (an assertion refuses two).
          '';
        };
      };
    };

    settings = mkOption {
      default = { };
      description = ''
        The broker's config file (`/etc/portlease/config.toml`), in the keys of
        `portlease serve --config`. Unknown keys make the broker refuse to
        start. Changing settings reloads the broker (SIGHUP): leases stay.
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          port_min = mkOption {
            type = types.port;
            default = 10000;
            description = "First port of the leased range.";
          };
          port_max = mkOption {
            type = types.port;
            default = 32000;
            description = "Last port of the leased range; keep it below the kernel's ephemeral range.";
          };
          ttl = mkOption {
            type = types.number;
            default = 120.0;
            description = ''
              Seconds a lease outlives its connection (detached leases, and
              leases awaiting reclaim after a broker restart).
            '';
          };
          max_ports_per_request = mkOption {
            type = types.ints.positive;
            default = 256;
            description = "Most ports one request may ask for.";
          };
          max_ports_per_uid = mkOption {
            type = types.ints.positive;
            default = 4096;
            description = "Most ports held at once by the clients of one uid.";
          };
          max_leases_per_connection = mkOption {
            type = types.ints.positive;
            default = 1024;
            description = "Most leases one connection may hold.";
          };
          portalloc_dir = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/var/lib/fm-portalloc";
            description = ''
              A fedimint-portalloc data directory (`FM_PORTALLOC_DATA_DIR`) the
              broker shares the range with, for projects still on the Rust
              crate. The module creates it (`2770 root:GROUP`) and opens it to
              the broker and to the runners in
              {option}`services.portlease.githubRunners`. Not under `/home`,
              `/root`, `/run/user`, `/tmp` or `/var/tmp`: the broker's sandbox
              hides them (an assertion refuses them).
            '';
          };
          exclude = mkOption {
            type = types.listOf (types.either (types.ints.between 1 65535) (types.strMatching "[0-9]+-[0-9]+"));
            default = [ ];
            example = [
              8080
              "20000-20099"
            ];
            description = ''
              Ports (numbers, or `"LO-HI"` ranges) the broker never grants, on
              top of the ports browsers refuse (always excluded).
            '';
          };
          max_connections_per_uid = mkOption {
            type = types.ints.positive;
            default = 1024;
            description = "Most connections open at once from the clients of one uid; more are refused (`quota`).";
          };
          log_level = mkOption {
            type = types.enum [
              "debug"
              "info"
              "warning"
              "error"
            ];
            default = "info";
            description = "Broker log level (the journal: `journalctl -u portlease`).";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = lib.hasPrefix "/run/" cfg.socketPath;
            message = "services.portlease.socketPath must be under /run (runners cannot see /tmp).";
          }
          {
            assertion = cfg.settings.port_min <= cfg.settings.port_max;
            message = "services.portlease.settings: port_min is above port_max.";
          }
          {
            assertion = !sharing || lib.hasPrefix "/" portallocDir;
            message = "services.portlease.settings.portalloc_dir must be an absolute path.";
          }
          {
            assertion = portallocHidden == [ ];
            message = ''
              services.portlease.settings.portalloc_dir = "${toString portallocDir}" is under ${lib.concatStringsSep ", " portallocHidden}, which the broker cannot see: it runs with ProtectHome=true (/home, /root and /run/user are empty to it) and PrivateTmp=true (its /tmp and /var/tmp are its own). The module's tmpfiles rule (d DIR 2770 root:${cfg.group}) would also take the directory over from its owner. Use a directory of its own, such as /var/lib/fm-portalloc: the runners find it through the FM_PORTALLOC_DATA_DIR the module gives them.'';
          }
          {
            assertion = textfile == null || lib.hasPrefix "/" textfile;
            message = "services.portlease.metrics.textfile must be an absolute path.";
          }
          {
            assertion = lib.length (lib.filter (lib.hasPrefix textfileFlag) exporterFlags) <= 1;
            message = ''
              services.prometheus.exporters.node.extraFlags has more than one
              ${textfileFlag}: with services.portlease.metrics.nodeExporter.enable,
              set services.portlease.metrics.nodeExporter.directory instead of your own flag.
            '';
          }
        ]
        ++ map (clash: {
          assertion = false;
          inherit (clash) message;
        }) (lib.filter (clash: clash.clash) runnerEnvironmentClashes);

        warnings =
          lib.optional (notRunners != [ ]) (
            "services.portlease.githubRunners names ${showNames notRunners}, but services.github-runners has no enabled runner of that name, so nothing is joined for it. "
            + (
              if enabledRunners == { } then
                "No services.github-runners entry is enabled."
              else
                "The enabled runners are ${showNames (lib.attrNames enabledRunners)}: use those names (the attribute names, not their `name` settings), or githubRunners = \"all\"."
            )
          )
          ++ lib.optional (
            joinAll && enabledRunners == { }
          ) "services.portlease.githubRunners = \"all\", but no services.github-runners entry is enabled: no runner joins the broker."
          ++ map (clash: clash.message) (lib.filter (clash: !clash.clash) runnerEnvironmentClashes)
          ++ lib.optional (nodeExporter.enable && !(config.services.prometheus.exporters.node.enable or false))
            "services.portlease.metrics.nodeExporter.enable is set, but services.prometheus.exporters.node.enable is not: nothing reads ${nodeExporter.directory}.";

        services.portlease.settings.metrics_textfile = lib.mkIf (textfile != null) textfile;

        users.groups.${cfg.group}.members = cfg.allowedUsers;

        environment.systemPackages = [ cfg.package ];
        environment.etc."portlease/config.toml".source = configFile;

        systemd.sockets.portlease = {
          description = "portlease broker socket (port leases for CI jobs)";
          inherit documentation;
          wantedBy = [ "sockets.target" ];
          listenStreams = [ cfg.socketPath ];
          socketConfig = {
            SocketUser = "root";
            SocketGroup = cfg.group;
            SocketMode = "0660";
            DirectoryMode = "0755";
            FileDescriptorName = "portlease";
            Accept = false;
            RemoveOnStop = true;
            ExecStartPost = map (
              group: "${pkgs.acl}/bin/setfacl -m g:${group}:rw ${cfg.socketPath}"
            ) cfg.allowedGroups;
          };
        };

        systemd.services.portlease = {
          description = "portlease broker (port leases for CI jobs)";
          inherit documentation;
          requires = [ "portlease.socket" ];
          # As the unit file: ordered after both sockets, so the broker starts
          # with every fd systemd will hand it (LISTEN_FDNAMES).
          after = runnerSockets;
          # X-StopIfChanged=false: when the unit changes (a new package),
          # switch-to-configuration restarts the service in place. Otherwise it
          # stops portlease.socket with it, and RemoveOnStop= deletes the
          # socket file until the socket starts again.
          stopIfChanged = false;
          # A settings change re-reads the file (SIGHUP) instead of restarting.
          reloadTriggers = [ configFile ];
          # Through `environment` (merged per variable), not serviceConfig.Environment,
          # which an operator's own Environment= would conflict with.
          environment.FDSTORE = "4096";
          serviceConfig = hardening // {
            Type = "notify";
            NotifyAccess = "main";
            ExecStart = "${cfg.package}/bin/portlease serve --config ${configPath}";
            ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
            WatchdogSec = "30s";
            Restart = "on-failure";
            RestartSec = "1s";
            TimeoutStopSec = "15s";
            StateDirectory = "portlease";
            StateDirectoryMode = "0700";
            LimitNOFILE = 524288;
            # As the unit file: the claims of every lease outlive a crash or a
            # restart in systemd's fd store (FDSTORE, below, tells the broker its size).
            FileDescriptorStoreMax = 4096;
            ReadWritePaths =
              lib.optional sharing "-${portallocDir}"
              # The file is replaced by a rename, so its directory must be writable.
              ++ lib.optional (textfile != null) "-${dirOf textfile}";
          };
        };
      }

      {
        # Set directly on the units, not through serviceOverrides: that option
        # is types.attrs, merged shallowly, so a key set there by this module
        # and the same key in the operator's serviceOverrides would silently
        # lose one of the two values.
        systemd.services = lib.mapAttrs' (
          name: _:
          lib.nameValuePair (runnerUnit name) {
            wants = runnerSockets;
            after = runnerSockets;
            # After the runner's own tools, so the system profile shadows
            # none of them. NixOS puts every entry's bin on PATH, then every
            # entry's sbin: /run/current-system/sw/bin is the last bin.
            path = lib.mkAfter [ systemProfile ];
            environment = runnerEnvironment;
            serviceConfig = {
              SupplementaryGroups = [ cfg.group ];
            }
            // lib.optionalAttrs sharing {
              # `-`: a missing directory must not keep the runner from starting.
              ReadWritePaths = [ "-${portallocDir}" ];
              # The crate rewrites its JSON file; the next runner (another
              # dynamic uid) must be able to read and replace it. Above
              # nixpkgs' mkDefault "0066", below a plain
              # serviceOverrides.UMask of the operator's, which wins.
              UMask = lib.mkOverride 900 "0007";
            };
          }
        ) joined;
      }

      (lib.mkIf portserver {
        # A second socket for portpicker's port-server protocol, passed to the
        # same service: the broker tells the two fds apart by their names
        # (LISTEN_FDNAMES: portlease, portserver).
        systemd.sockets.portlease-portserver = {
          description = "portlease broker socket for portpicker's port-server protocol";
          inherit documentation;
          wantedBy = [ "sockets.target" ];
          listenStreams = [ portserverPath ];
          socketConfig = {
            FileDescriptorName = "portserver";
            Service = "portlease.service";
            SocketUser = "root";
            SocketGroup = cfg.group;
            SocketMode = "0660";
            DirectoryMode = "0755";
            Accept = false;
            RemoveOnStop = true;
            ExecStartPost = map (group: "${pkgs.acl}/bin/setfacl -m g:${group}:rw ${portserverPath}") cfg.allowedGroups;
          };
        };
      })

      (lib.mkIf nodeExporter.enable {
        services.portlease.metrics.textfile = lib.mkDefault "${nodeExporter.directory}/portlease.prom";
        services.prometheus.exporters.node.extraFlags = [ "${textfileFlag}${nodeExporter.directory}" ];
        # Others may read: node_exporter runs as its own user.
        systemd.tmpfiles.rules = [ "d ${nodeExporter.directory} 0775 root ${cfg.group} -" ];
      })

      (lib.mkIf sharing {
        systemd.tmpfiles.rules = [ "d ${portallocDir} 2770 root ${cfg.group} -" ];
      })
    ]
  );
}
