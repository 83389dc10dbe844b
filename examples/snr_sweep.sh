#!/usr/bin/env bash
# Recovery at low SNR (issue figures): Method 2, L = 11, lmax up to 6, well-separated
# projections, from a homolog with FSC 0.5 at about half the band. Usage:
#   bash examples/snr_sweep.sh OUTDIR [SNR ...]      (default SNRs: 1 0.5 0.25)
set -euo pipefail
out=${1:-snr-sweep}; shift || true
snrs=${*:-1 0.5 0.25}
mkdir -p "$out"
numbaem molecule -o "$out/truth41.mrc" --size 41 --seed 0 --force -q
numbaem molecule -o "$out/homolog41.mrc" --size 41 --seed 1 --homolog-of 0 --homolog-strength 0.8 --force -q
for snr in $snrs; do
  d="$out/snr$snr"; mkdir -p "$d"
  numbaem simulate "$out/truth41.mrc" -o "$d/mic.mrc" --patch-size 11 --micrograph-size 1100 --count 2 \
      --method 2 --density 0.15 --snr "$snr" --seed 1 --force -q
  s2=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['sigma2'])" "$d/mic.json")
  numbaem reconstruct "$d"/mic_00*.mrc --patch-size 11 -o "$d/est.mrc" --init "$out/homolog41.mrc" \
      --downsample-init --noise-var "$s2" --truth "$d/mic.truth.mrc" --log "$d/run.jsonl" --plot "$d/convergence.png" \
      --schedule "lmax=2,iters=3,frac=0.5,rotations=100;lmax=4,iters=3,frac=0.5,rotations=300;lmax=6,iters=4,frac=0.5,rotations=600" \
      --seed 0 --force -q --json > "$d/summary.json"
  numbaem fsc "$d/est.mrc" "$d/mic.truth.mrc" --align --json > "$d/fsc_aligned.json"
  numbaem fsc "$out/homolog41.mrc" "$out/truth41.mrc" --json > /dev/null 2>&1 || true
done
