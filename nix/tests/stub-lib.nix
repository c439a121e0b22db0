# A stand-in for the parts of nixpkgs that nix/module.nix, nix/github-runner.nix
# and nix/package.nix use, so they can be evaluated where nixpkgs cannot be had
# (`nix-instantiate --eval --strict`, see check.sh).
#
# It has a small module evaluator that follows the NixOS rules the modules rely
# on: options with defaults and types, submodules (with freeformType), mkIf /
# mkMerge / mkOverride pushed down to the leaves so a condition may read
# `config` without recursion, priorities at the leaves, lists concatenated and
# conflicting scalars refused. It is not nixpkgs: what it cannot show is left
# to the VM test (nix/tests/vm.nix), as docs/nixos.md says.
let
  inherit (builtins)
    all
    any
    attrNames
    attrValues
    concatLists
    concatMap
    elem
    filter
    foldl'
    head
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    listToAttrs
    substring
    stringLength
    ;

  # ---------------------------------------------------------------- lib

  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  nameValuePair = name: value: { inherit name value; };
  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  mapAttrs = builtins.mapAttrs;
  filterAttrs =
    pred: set:
    listToAttrs (
      concatMap (name: if pred name set.${name} then [ (nameValuePair name set.${name}) ] else [ ]) (
        attrNames set
      )
    );
  genAttrs = names: f: listToAttrs (map (n: nameValuePair n (f n)) names);
  mapAttrs' = f: set: listToAttrs (map (name: f name set.${name}) (attrNames set));
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: set: if cond then set else { };
  optionalString = cond: s: if cond then s else "";
  toList = x: if isList x then x else [ x ];

  isType = type: v: isAttrs v && (v._type or null) == type;
  isProperty = v: isType "if" v || isType "merge" v || isType "override" v || isType "order" v;
  isPlainAttrs = v: isAttrs v && !(v ? _type) && !(v ? outPath);

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOrder = priority: content: {
    _type = "order";
    inherit priority content;
  };

  mkOptionType =
    name: check: extra:
    {
      _type = "type";
      inherit name check;
    }
    // extra;

  types = rec {
    bool = mkOptionType "bool" isBool { };
    str = mkOptionType "str" isString { };
    nonEmptyStr = mkOptionType "nonEmptyStr" (v: isString v && v != "") { };
    lines = str;
    int = mkOptionType "int" isInt { };
    float = mkOptionType "float" isFloat { };
    number = mkOptionType "number" (v: isInt v || isFloat v) { };
    port = mkOptionType "port" (v: isInt v && v >= 0 && v <= 65535) { };
    ints = {
      positive = mkOptionType "positiveInt" (v: isInt v && v > 0) { };
      unsigned = mkOptionType "unsignedInt" (v: isInt v && v >= 0) { };
      between = lo: hi: mkOptionType "intBetween" (v: isInt v && v >= lo && v <= hi) { };
    };
    path = mkOptionType "path" (v: isPath v || (isString v && hasPrefix "/" v)) { };
    package = mkOptionType "package" (v: isAttrs v && v ? outPath) { };
    # Shallow, as in nixpkgs: a later definition's key replaces an earlier
    # one's whole value (github-runner's serviceOverrides has this type).
    attrs = mkOptionType "attrs" isAttrs { shallowAttrs = true; };
    anything = mkOptionType "anything" (_: true) { mergesAsAttrs = true; };
    nullOr = t: mkOptionType "nullOr ${t.name}" (v: v == null || t.check v) { };
    listOf = t: mkOptionType "listOf ${t.name}" (v: isList v && all t.check v) { mergesAsList = true; };
    nonEmptyListOf =
      t: mkOptionType "nonEmptyListOf ${t.name}" (v: isList v && v != [ ] && all t.check v) {
        mergesAsList = true;
      };
    attrsOf =
      t: mkOptionType "attrsOf ${t.name}" (v: isAttrs v && all t.check (attrValues v)) {
        mergesAsAttrs = true;
        elemType = t;
      };
    strMatching = pattern: mkOptionType "strMatching ${pattern}" (v: isString v && builtins.match pattern v != null) { };
    enum = values: mkOptionType "one of ${builtins.toJSON values}" (v: elem v values) { };
    either = a: b: mkOptionType "${a.name} or ${b.name}" (v: a.check v || b.check v) { };
    oneOf = ts: mkOptionType "oneOf" (v: any (t: t.check v) ts) { };
    submodule =
      m:
      let
        module = if isFunction m then m { } else m;
      in
      mkOptionType "submodule" isAttrs {
        submodule = true;
        options = module.options or { };
        freeformType = module.freeformType or null;
      };
  };

  mkOption = attrs: attrs // { _type = "option"; };

  lib = {
    inherit
      types
      mkOption
      mkIf
      mkMerge
      mkOverride
      mkOrder
      nameValuePair
      filterAttrs
      mapAttrs
      mapAttrs'
      genAttrs
      optional
      optionals
      optionalAttrs
      optionalString
      hasPrefix
      unique
      toList
      ;
    inherit (builtins)
      concatMap
      filter
      length
      elem
      attrNames
      attrValues
      concatStringsSep
      listToAttrs
      ;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOptionDefault = mkOverride 1500;
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;
    mkEnableOption =
      description:
      mkOption {
        type = types.bool;
        default = false;
        description = "Whether to enable ${description}.";
      };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    fileContents = path: builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile path);
    fileset = {
      unions = list: list;
      toSource =
        { root, fileset }:
        {
          outPath = "/nix/store/00000000000000000000000000000000-source";
          root = toString root;
          files = map toString fileset;
        };
    };
    licenses.mit = "mit";
    platforms.linux = [ "x86_64-linux" ];
  };

  # ---------------------------------------------------------------- pkgs

  drv = name: {
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    inherit name;
    type = "derivation";
  };

  # Dependencies a package asks for by name get a stand-in derivation each.
  stubScope = name: drv name;

  buildPythonApplication =
    attrs:
    attrs
    // drv "${attrs.pname}-${attrs.version}"
    // {
      meta = attrs.meta or { };
      overridePythonAttrs = f: buildPythonApplication (attrs // f attrs);
    };

  python3Packages = {
    inherit buildPythonApplication;
  }
  // genAttrs [
    "setuptools"
    "trio"
    "msgspec"
    "sdnotify"
    "pytestCheckHook"
    "pytest-xdist"
    "hypothesis"
    "anyio"
    "build"
    "prometheus-client"
    "uvicorn"
    "mypy"
    # nixpkgs attribute names, checked in nixpkgs' pkgs/development/python-modules.
    "pytest-asyncio"
    "aiohttp"
    "pytest-aiohttp"
    "portpicker"
  ] (name: drv "python3-${name}");

  pkgs = {
    inherit lib python3Packages;
    coreutils = drv "coreutils";
    acl = drv "acl";
    bash = drv "bash";
    systemd = drv "systemd";
    curl = drv "curl";
    github-runner = drv "github-runner";
    writeShellScript = name: text: drv name // { inherit text; };
    # The VM test's arguments, unbuilt: eval.nix reads its node and its script.
    testers.runNixOSTest = test: test;
    formats.toml =
      { }:
      {
        type = types.attrsOf types.anything;
        # The real one writes TOML with remarshal at build time; here the data
        # travels along so the checks can hand it to portlease's own reader.
        generate = name: value: drv name // { stubTomlData = value; };
      };
    callPackage =
      path: args:
      let
        f = import path;
        wanted = builtins.functionArgs f;
        scope = { inherit lib python3Packages; } // pkgs;
      in
      f (
        listToAttrs (
          map (n: nameValuePair n (scope.${n} or (stubScope n))) (
            filter (n: !(wanted.${n}) || scope ? ${n}) (attrNames wanted)
          )
        )
        // args
      );
  };

  # ---------------------------------------------------------------- modules

  # Names a definition defines, found without evaluating any mkIf condition.
  defNames =
    def:
    if isType "if" def || isType "override" def || isType "order" def then
      defNames def.content
    else if isType "merge" def then
      concatMap defNames def.contents
    else if isPlainAttrs def then
      attrNames def
    else
      [ ];

  # The part of a definition under `name`, its properties kept around it.
  pushDown =
    name: def:
    # Checked first, so a condition never guards a name it does not define.
    if !(elem name (defNames def)) then
      mkMerge [ ]
    else if isType "if" def then
      mkIf def.condition (pushDown name def.content)
    else if isType "merge" def then
      mkMerge (map (pushDown name) def.contents)
    else if isType "override" def then
      mkOverride def.priority (pushDown name def.content)
    else if isType "order" def then
      pushDown name def.content
    else if isPlainAttrs def && def ? ${name} then
      def.${name}
    else
      mkMerge [ ];

  # Evaluate the properties: a list of { priority, value }.
  discharge =
    priority: def:
    if isType "if" def then
      (
        if def.condition then discharge priority def.content else [ ]
      )
    else if isType "merge" def then
      concatMap (discharge priority) def.contents
    else if isType "override" def then
      discharge def.priority def.content
    else if isType "order" def then
      discharge priority def.content
    else
      [
        {
          inherit priority;
          value = def;
        }
      ];

  showPath = path: builtins.concatStringsSep "." path;
  minPriority = ds: foldl' (m: d: if d.priority < m then d.priority else m) 9999 ds;

  # Keep each definition's priority when descending into an attrset.
  carry = d: if d.priority == 100 then d.value else mkOverride d.priority d.value;

  mergeLeaf =
    path: ds:
    let
      top = minPriority ds;
      values = map (d: d.value) (filter (d: d.priority == top) ds);
      first = head values;
    in
    if ds == [ ] then
      throw "${showPath path} is used but has no definition"
    else if all isList values then
      concatLists values
    else if all (v: v == first) values then
      first
    else
      throw "${showPath path} has conflicting definitions: ${builtins.toJSON values}";

  # Paths no option declares (systemd.*, users.*, …): merged structurally.
  mergeAny =
    path: defs:
    let
      ds = concatMap (discharge 100) defs;
    in
    if ds != [ ] && all (d: isPlainAttrs d.value) ds then
      mergeAttrsDefs path (map carry ds)
    else
      mergeLeaf path ds;

  mergeAttrsDefs =
    path: defs:
    listToAttrs (
      concatMap (
        name:
        let
          sub = map (pushDown name) defs;
        in
        if concatMap (discharge 100) sub == [ ] then [ ] else [ (nameValuePair name (mergeAny (path ++ [ name ]) sub)) ]
      ) (unique (concatMap defNames defs))
    );

  evalOption =
    path: opt: defs:
    let
      type = opt.type or types.anything;
      ds = concatMap (discharge 100) defs;
      withDefault =
        ds
        ++ optional (opt ? default) {
          priority = 1500;
          value = opt.default;
        };
      elemType = type.elemType or { };
      # Names defined under an attrsOf, leaving out those only a false mkIf defines.
      liveNames =
        defs': filter (name: concatMap (discharge 100) (map (pushDown name) defs') != [ ]) (unique (concatMap defNames defs'));
      value =
        if elemType.submodule or false then
          let
            defs' = map carry (filter (d: isAttrs d.value) withDefault);
          in
          listToAttrs (
            map (
              name:
              nameValuePair name (
                evalTree (path ++ [ name ]) elemType.options elemType.freeformType true (map (pushDown name) defs')
              )
            ) (liveNames defs')
          )
        else if type.shallowAttrs or false then
          let
            top = minPriority withDefault;
          in
          foldl' (acc: d: acc // d.value) { } (filter (d: d.priority == top) withDefault)
        else if type.submodule or false then
          evalTree path type.options type.freeformType true (
            map carry (filter (d: isAttrs d.value) withDefault)
          )
        else if type.mergesAsAttrs or false && ds != [ ] && all (d: isPlainAttrs d.value) ds then
          mergeAttrsDefs path (map carry ds)
        else
          mergeLeaf path (if ds == [ ] then withDefault else ds);
    in
    if type.check value then
      value
    else
      throw "${showPath path} is not of type ${type.name}: ${builtins.toJSON value}";

  # A set of options (or namespaces). `strict`: names no option declares are
  # refused unless a freeformType takes them.
  evalTree =
    path: options: freeformType: strict: defs:
    let
      declares = any (n: isType "option" options.${n}) (attrNames options);
      names = unique (attrNames options ++ concatMap defNames defs);
      one =
        name:
        let
          sub = map (pushDown name) defs;
          here = path ++ [ name ];
          node = options.${name} or null;
        in
        if node == null then
          (
            if freeformType != null then
              mergeAny here sub
            else if strict || declares then
              throw "${showPath here} is not a declared option"
            else if path == [ ] then
              # The root's names must not depend on a condition (that would
              # recurse), so an empty namespace stays as {}.
              (if concatMap (discharge 100) sub == [ ] then { } else mergeAny here sub)
            else
              mergeAny here sub
          )
        else if isType "option" node then
          evalOption here node sub
        else
          evalTree here node null false sub;
      keep =
        name:
        path == [ ]
        || options ? ${name}
        || concatMap (discharge 100) (map (pushDown name) defs) != [ ];
    in
    listToAttrs (map (name: nameValuePair name (one name)) (filter keep names));

  recursiveMergeOptions =
    a: b:
    a
    // mapAttrs (
      name: v:
      if a ? ${name} && !(isType "option" v) && !(isType "option" a.${name}) then
        recursiveMergeOptions a.${name} v
      else if a ? ${name} then
        throw "option ${name} declared twice"
      else
        v
    ) b;

  evalModules =
    {
      modules,
      specialArgs ? { },
    }:
    let
      args = {
        inherit lib pkgs config;
      }
      // specialArgs;
      load =
        m:
        let
          loaded = if isPath m || isString m then import m else m;
          value = if isFunction loaded then loaded args else loaded;
          normal =
            if value ? options || value ? config then
              {
                imports = value.imports or [ ];
                options = value.options or { };
                config = value.config or { };
              }
            else
              {
                imports = value.imports or [ ];
                options = { };
                config = removeAttrs value [ "imports" ];
              };
        in
        [ normal ] ++ concatMap load normal.imports;
      all' = concatMap load modules;
      options = foldl' recursiveMergeOptions { } (map (m: m.options) all');
      config = evalTree [ ] options null false (map (m: m.config) all');
    in
    {
      inherit config options;
    };

  # Default values of an option set, for comparing with what a reader assumes.
  optionDefaults =
    options:
    mapAttrs (
      _: opt: if isType "option" opt then (if opt ? default then opt.default else null) else optionDefaults opt
    ) options;
in
{
  inherit
    lib
    pkgs
    evalModules
    optionDefaults
    drv
    ;
}
