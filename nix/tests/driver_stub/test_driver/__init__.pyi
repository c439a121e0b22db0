# The part of nixpkgs' NixOS test driver (nixos/lib/test-driver) that a
# testScript sees, for type-checking nix/tests/vm.nix's script here.
