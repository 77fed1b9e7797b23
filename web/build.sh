#!/bin/sh
# Builds the npm package's pkg/: the crate for wasm32 with wgpu's WebGPU backend, then
# wasm-bindgen's CLI (the version Cargo.lock pins for the wasm-bindgen crate) writes the ES
# module, its TypeScript declarations and the .wasm. PROFILE=release for a small file; the
# default dev profile (dependencies at opt-level 2) builds faster and serves the tests.
set -eu
cd "$(dirname "$0")"
profile="${PROFILE:-dev}"
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
target="${CARGO_TARGET_DIR:-../target}"
cargo build -p xattn-web --lib --target wasm32-unknown-unknown --profile "$profile"
wasm-bindgen --target web --out-dir pkg "$target/wasm32-unknown-unknown/$dir/xattn_web.wasm"
echo "web: pkg/xattn_web_bg.wasm is $(wc -c < pkg/xattn_web_bg.wasm) bytes ($profile)"
