#!/usr/bin/env bash
# The standard-width runs of issue 15 (ResNet stages 64-128-256-512) on a lent GPU machine, in two steps:
#
#   here:   bash benchmarks/gpu_widths.sh pack brain      # or fashion: what the machine lacks, into .device/
#   there:  bash benchmarks/gpu_widths.sh run brain       # through the device tool, carry [".device"]
#
# The GPU machine has PyTorch but neither MONAI, nibabel, nilearn nor Ignite, nor the Debian data packages, and
# reaches no network: `pack` downloads their wheels (pure Python) and copies the data files the task reads into
# .device/ (git-ignored; under the tool's 64 MiB with the working tree, one task a call). `run` installs them, then
# runs every (lineage, seed) of the task as its own process on the one GPU (--set device=cuda): seed 0 of each
# lineage first (it pretrains and caches that lineage's sources and ancestor), then the other seeds together, and
# leaves the result files in $OUT/parts.tgz (unpack into benchmarks/results/parts/, then join each lineage's seeds
# with `python -m medmerge_bench.comparison join` and run benchmarks/report.py).
#
# Settings, from the environment: SEEDS (default 5), LINEAGES ("independent shared"; one a call if both may not
# end inside the tool's 10 minutes), DEVICE (cuda), WIDTHS (64,128,256,512), QUICK=1 (`--quick`: an epoch or two a
# phase), OUT (where parts.tgz goes; the device tool sets it). Checked on a CPU (2026-12-07, 173 s):
#   DEVICE=cpu QUICK=1 SEEDS=2 WIDTHS=8,16,32,64 OUT=/tmp/out bash benchmarks/gpu_widths.sh run brain
# (again with the named protocols, 2026-12-07, SEEDS=1: both lineages ran with their settings, 11 min beside a run)
# How long the full runs take on the GPU is not known yet: the first call should say (it prints the times).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:?usage: gpu_widths.sh pack|run brain|fashion}
what=${2:?usage: gpu_widths.sh pack|run brain|fashion}
case $what in
brain) task=brain_colin_test_split_regions ;;
fashion) task=fashion ;;
*) echo "gpu_widths.sh: the task is brain or fashion, got '$what'" >&2 && exit 2 ;;
esac
MRICRON=/usr/share/mricron/templates
FASHION=/usr/share/datasets/fashion-mnist

if [ "$mode" = pack ]; then
    grep -qx '/.device/' .git/info/exclude || echo '/.device/' >>.git/info/exclude
    rm -rf .device.tmp && mkdir -p .device.tmp/whl .device.tmp/data
    wheels=(monai pytorch-ignite)
    [ "$what" = brain ] && wheels+=(nibabel nilearn)
    specs=()
    for name in "${wheels[@]}"; do specs+=("$name==$(python3 -m pip show "$name" | sed -n 's/^Version: //p')"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .device.tmp/whl "${specs[@]}"
    if [ "$what" = brain ]; then
        # the files medmerge_bench.data.brain reads (MRICRON_FILES and ATLAS_FILES), times kept
        mkdir -p .device.tmp/data/mricron
        cp -p "$MRICRON"/{ch2bet.nii.gz,aal.nii.gz,aal.nii.txt,brodmann.nii.gz,brodmann.nii.lut} .device.tmp/data/mricron/
        cp -p "$MRICRON"/{AICHAmc.nii.gz,AICHAmc.nii.txt,HarvardOxford-cort-maxprob-thr0-1mm.nii.gz} .device.tmp/data/mricron/
        cp -p "$MRICRON"/JHU-WhiteMatter-labels-1mm.nii.{gz,txt} .device.tmp/data/mricron/
    else
        mkdir -p .device.tmp/data/fashion && cp -p "$FASHION"/* .device.tmp/data/fashion/
    fi
    rm -rf .device && mv .device.tmp .device
    du -sh .device
    exit 0
fi

[ "$mode" = run ] || { echo "gpu_widths.sh: the mode is pack or run, got '$mode'" >&2 && exit 2; }
if [ -d .device/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .device/data/mricron ]; then mkdir -p $MRICRON && cp -p .device/data/mricron/* $MRICRON/; fi
if [ -d .device/data/fashion ]; then mkdir -p $FASHION && cp -p .device/data/fashion/* $FASHION/; fi
export MONAI_MEDMERGE_CACHE=${MONAI_MEDMERGE_CACHE:-/tmp/medmerge_cache}
out=${OUT:-/tmp/gpu_widths_out}
runs=/tmp/gpu_widths_parts
mkdir -p "$out" "$runs"
python3 -c "import torch, monai, ignite; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"

# the protocols of the recorded head-first/distill benchmarks (medmerge_bench.transfer.PROTOCOLS), at the standard
# widths: the independent lineage, and the shared one of the rotation ancestor
methods=(ft_a ft_b lpft_a lpft_b medmerge_ft paper_lpft_medmerge_distill lpft_distill lpft_steps ensemble ensemble_lpft)
settings=(device=${DEVICE:-cuda} widths=${WIDTHS:-64,128,256,512})
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)

one() { # lineage seed: one process, its log beside the parts
    local lineage=$1 seed=$2 protocol=(lpft_distill_ft150)
    [ "$lineage" = shared ] && protocol+=(shared_rotation)
    local name=${task}_k10_w512_${lineage}_lpft_distill_ft150_s$seed
    OMP_NUM_THREADS=1 python3 -m monai_medmerge.cli benchmark --task $task --k 10 --seeds 1 --first-seed "$seed" \
        --name "$name" --out "$runs" --methods "${methods[@]}" --protocol "${protocol[@]}" "${quick[@]}" \
        --set "${settings[@]}" --no-progress \
        >"$runs/$name.log" 2>&1 || echo "FAILED: $name (log in parts.tgz)"
}
start=$(date +%s)
for lineage in ${LINEAGES:-independent shared}; do one "$lineage" 0 & done
wait
echo "seed 0 of each lineage (sources pretrained) after $(($(date +%s) - start)) s"
tar czf "$out/parts.tgz" -C "$runs" . # what has landed, should the call be stopped before the end
for lineage in ${LINEAGES:-independent shared}; do
    for seed in $(seq 1 $((${SEEDS:-5} - 1))); do one "$lineage" "$seed" & done
done
wait
echo "all seeds after $(($(date +%s) - start)) s"
grep -h "room with every\|test macro-F1" "$runs"/*.log || true
tar czf "$out/parts.tgz" -C "$runs" .
