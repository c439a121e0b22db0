#!/bin/sh
# Renders every *.dot here to .svg and .png (Graphviz: apt-get install -y graphviz).
# The rendered files are committed so that the docs show them without a build step;
# run this after editing a .dot and commit both.
set -eu
cd "$(dirname "$0")"
command -v dot >/dev/null || { echo "render.sh: needs Graphviz's dot (apt-get install -y graphviz)" >&2; exit 1; }
for src in *.dot; do
    name=${src%.dot}
    dot -Tsvg "$src" -o "$name.svg"
    dot -Tpng -Gdpi=150 "$src" -o "$name.png"
    echo "$src -> $name.svg $name.png"
done
