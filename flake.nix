# A thin entry into nix/: the package, the NixOS module, the VM test, a dev shell.
{
  description = "portlease: connection-bound TCP/UDP port leases for CI runners";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      nixosModules.default = ./nix/module.nix;

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm = import ./nix/tests/vm.nix { inherit pkgs; };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (ps: [
              ps.msgspec
              ps.trio
              ps.sdnotify
              ps.anyio
              ps.pytest
              ps.pytest-xdist
              ps.hypothesis
              ps.build
              ps.setuptools
              ps.prometheus-client
              ps.mypy
            ]))
            pkgs.ruff
            pkgs.systemd
            pkgs.nix
          ];
        };
      });
    };
}
