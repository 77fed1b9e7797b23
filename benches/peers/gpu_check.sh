#!/usr/bin/env bash
# The one device call for a lent GPU (../shared/GPU-CHECK.md), run from the repository root
# there. Prepare here first (no device time):
#   cargo build --release --bin xattn
#   cargo test --release --test matrix_units --no-run   # prints the test binary's path
#   mkdir -p .devbin && cp target/release/xattn <that path> .devbin/   (name it matrix_units)
#   echo /.devbin/ >> .git/info/exclude, and the .gl folder of Vulkan loader packages as
#   GPU-CHECK.md says; then run this with carry [".gl", ".devbin"].
# Writes to $OUT: info (with and without XATTN_MATRIX_UNITS), the matrix-unit kernel's check
# against the f64 reference (tests/matrix_units.rs), the standard suite in f32 and f16 (checked),
# f16 fused with and without matrix units, PyTorch's SDPA on the same shapes, and the ratios.
set -u
out=${OUT:-/tmp/xattn-gpu-check}
mkdir -p "$out"
for deb in .gl/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" /; done
ldconfig
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -e "$nvidia_icd" ] && export VK_DRIVER_FILES=$nvidia_icd
export XATTN_REQUIRE_GPU=1
step() { echo "== $*" | tee -a "$out/log.txt"; "$@" 2>&1 | tail -40 | tee -a "$out/log.txt"; }
step ./.devbin/xattn info
step env XATTN_MATRIX_UNITS=1 ./.devbin/xattn info
step env XATTN_MATRIX_UNITS=1 ./.devbin/matrix_units --nocapture
step ./.devbin/xattn bench --suite standard --dtype f32,f16 --check --json "$out/xattn.json"
step env XATTN_MATRIX_UNITS=1 ./.devbin/xattn bench --suite standard --dtype f16 --path fused \
    --fused-config matrix-units --check --json "$out/xattn-matrix-units.json"
step python3 benches/peers/torch_sdpa.py --suite standard --dtype f32,f16 --json "$out/torch.json"
step python3 benches/peers/compare.py "$out/xattn.json" "$out/torch.json"
