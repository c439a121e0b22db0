# A CI host as fedimint runs them today (fedimint-infra's
# hosts/runner/github-runner.nix, reduced to what meets nix/module.nix): four
# runners per machine named "${hostName}-${name}", one static user for all of
# them, a sandbox loosened through serviceOverrides, and the crate's shared
# directory passed in serviceOverrides.Environment. eval.nix adopts portlease
# on it the way docs/nixos.md ("Adopting portlease on an existing runner host")
# says, with `keepEnvironment` telling whether the old Environment line was
# deleted.
{
  keepEnvironment ? false,
}:
{ config, lib, ... }:
let
  names = map (name: "${config.networking.hostName}-${name}") [
    "a"
    "b"
    "c"
    "d"
  ];
in
{
  networking.hostName = "runner-01";

  services.github-runners = lib.genAttrs names (name: {
    enable = true;
    ephemeral = true;
    replace = true;
    inherit name;
    url = "https://github.com/fedimint";
    tokenFile = "/run/secrets/github-runner/token";
    user = "github-runner";
    serviceOverrides = {
      PrivateUsers = false;
      ProtectHome = false;
      PrivateTmp = false;
      ProtectSystem = "full";
    }
    // lib.optionalAttrs keepEnvironment {
      # As written there: quoted, on a line of its own.
      Environment = ''
        "FM_PORTALLOC_DATA_DIR=/home/github-runner/.cache/port-alloc"
      '';
    };
  });
}
