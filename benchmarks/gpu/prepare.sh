#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before a GPU check on the device machine:
# that machine reaches nothing, its image lacks Hydra, and the datasets (the argument, else
# $FINETUNE_DATA_ROOT) do not travel with the working tree. Puts both into .gpu_carry/ (git-ignored, about 47 MB): name it in the run's
# `carry` and run benchmarks/gpu/check.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-${FINETUNE_DATA_ROOT:?give the datasets folder: prepare.sh DIR, or set FINETUNE_DATA_ROOT}}"
rm -rf .gpu_carry
mkdir -p .gpu_carry/whl .gpu_carry/data
# Pure-Python wheels: any Python there (3.12) takes them. antlr4 4.9.3 exists only as a source
# archive, so its wheel is built here.
python -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/whl \
    hydra-core==1.3.8 omegaconf==2.3.1
python -m pip wheel -q --no-deps -w .gpu_carry/whl antlr4-python3-runtime==4.9.3
cp -r "$data/hymenoptera_data" .gpu_carry/data/
du -sh .gpu_carry
