// The engine's GPU checks in the browser: every path, masks, GQA, f16, statistics, the layer,
// device-resident tensors and errors, each against xattn's f64 CPU reference compiled to wasm
// (xattn.reference), with the error budget of the native tests (tests/common: budget_masked).
import init, * as xattn from "../pkg/xattn_web.js";
import { random, uniform, randomLayerFile } from "../js/layer_file.js";

const EPS = 2 ** -23; // f32's unit roundoff ×2 (f32::EPSILON)
const HALF_ULP = 2 ** -11; // f16's unit roundoff: one rounding of an f16 output

// f32 → f16 bits, round to nearest even (inputs here are small and finite).
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function toHalf(x) {
  f32[0] = x;
  const b = u32[0];
  const sign = (b >>> 16) & 0x8000;
  const e = ((b >>> 23) & 0xff) - 112;
  let m = b & 0x7fffff;
  if (e <= 0) {
    if (e < -10) return sign;
    m |= 0x800000;
    const shift = 14 - e;
    let h = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (m >>> 13);
  const rem = m & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}
const halves = (a) => Uint16Array.from(a, toHalf);

const amax = (a) => a.reduce((m, x) => Math.max(m, Math.abs(x)), 0);

// The worst element of `got` against `want` under tolerance tol(i, want): throws naming it.
function close(what, got, want, tol) {
  if (!got || got.length !== want.length) {
    throw new Error(`${what}: ${got?.length} elements, want ${want.length}`);
  }
  let worst = -1;
  let worstExcess = 0;
  for (let i = 0; i < want.length; i++) {
    const w = want[i];
    const g = got[i];
    const same = w === g || (Number.isNaN(g) === false && Math.abs(g - w) <= tol(i, w));
    if (!same) {
      const excess = Number.isNaN(g) ? Infinity : Math.abs(g - w) - tol(i, w);
      if (worst < 0 || excess > worstExcess) [worst, worstExcess] = [i, excess];
    }
  }
  if (worst >= 0) {
    throw new Error(
      `${what}[${worst}]: got ${got[worst]}, want ${want[worst]} (tolerance ${tol(worst, want[worst])})`,
    );
  }
  return true;
}

function inputs(dims, seed, f16) {
  const rng = random(seed);
  const { batch, m, n, heads, kvHeads = heads, dk, dv = dk } = dims;
  const make = (len) => (f16 ? halves(uniform(rng, len)) : uniform(rng, len));
  return [make(batch * m * heads * dk), make(batch * n * kvHeads * dk), make(batch * n * kvHeads * dv)];
}

const widen = (a) => (a instanceof Uint16Array ? Float32Array.from(a, fromHalf) : a);
function fromHalf(h) {
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  const v = e === 0 ? m * 2 ** -24 : e === 31 ? (m ? NaN : Infinity) : (1 + m / 1024) * 2 ** (e - 15);
  return h & 0x8000 ? -v : v;
}

// One attention call against the reference: O always, LSE, weights and statistics as asked.
async function check(device, dims, options, { f16 = false, seed = 1 } = {}) {
  const [q, k, v] = inputs(dims, seed, f16);
  const got = await device.attention(q, k, v, dims, options);
  const want = xattn.reference(q, k, v, dims, options);
  const base = EPS * (4 * (1 + want.maxLogit) + dims.n);
  const round = f16 ? HALF_ULP : 0;
  const oTol = base * Math.max(amax(widen(v)), 1e-3);
  close("O", got.o, want.o, (_, w) => oTol + round * Math.abs(w));
  if (options.lse) {
    const lseTol = base * (1 + amax(want.lse.filter(Number.isFinite)));
    close("LSE", got.lse, want.lse, () => lseTol);
  }
  if (options.weights) close("P", got.weights, want.weights, (_, w) => base + round * w);
  if (options.stats) {
    const rel = 11 * base;
    const s = want.stats;
    close("entropy", got.stats.entropy, s.entropy, (_, h) => (rel + dims.n * EPS) * (1 + h));
    close("focus", got.stats.focus, s.focus, (_, f) => rel * f);
    close("coverage", got.stats.coverage, s.coverage, (_, c) => (rel + dims.m * EPS) * c);
  }
  if (options.path && got.path !== options.path) {
    throw new Error(`ran ${got.path}, asked for ${options.path}`);
  }
  return got.path;
}

// A call that must reject with xattn's message containing `words`.
async function rejects(call, words) {
  try {
    await call();
  } catch (e) {
    if (!String(e.message ?? e).includes(words)) {
      throw new Error(`rejected with "${e.message ?? e}", want a message with "${words}"`);
    }
    return true;
  }
  throw new Error(`resolved; want a rejection with "${words}"`);
}

const cross = { batch: 2, m: 13, n: 77, heads: 3, dk: 40 };
const decode = { batch: 1, m: 1, n: 1500, heads: 4, dk: 64 };
const all = { lse: true, stats: true };

export const cases = {
  "three-pass matches the reference (O, LSE, P, statistics)": (d) =>
    check(d, cross, { ...all, weights: true, path: "three-pass" }),
  "fused matches the reference (O, LSE, statistics)": (d) => check(d, cross, { ...all, path: "fused" }),
  "split-K matches the reference on a decode step (M 1, N 1500)": (d) =>
    check(d, decode, { ...all, path: "split-k" }),
  "the planner's own choice matches the reference": (d) => check(d, decode, { lse: true }),
  "bottom-right causal with kv lengths, fused": (d) =>
    check(d, { ...cross, m: 20, n: 33 }, { lse: true, causal: "bottom-right", kvLens: [33, 21], path: "fused" }),
  "a window and a causal diagonal, split-K": (d) =>
    check(d, { ...decode, m: 3 }, { lse: true, causal: "top-left", window: [200, 0], path: "split-k" }),
  "an explicit mask and a bias, three-pass": (d) => {
    const dims = { batch: 1, m: 9, n: 17, heads: 2, dk: 8 };
    const rng = random(7);
    const mask = Uint8Array.from({ length: 9 * 17 }, () => (rng() < 0.8 ? 1 : 0));
    const bias = uniform(rng, 2 * 9 * 17);
    return check(d, dims, {
      lse: true, weights: true, mask, maskDims: [1, 1, 9, 17], bias, biasDims: [1, 2, 9, 17], path: "three-pass",
    });
  },
  "GQA (6 query heads over 2 KV heads) on every path": async (d) => {
    const dims = { batch: 1, m: 5, n: 300, heads: 6, kvHeads: 2, dk: 32, dv: 48 };
    for (const path of ["three-pass", "fused", "split-k"]) await check(d, dims, { lse: true, path });
  },
  "f16 inputs on every path (packed where the device has no shader-f16)": async (d) => {
    for (const path of ["three-pass", "fused", "split-k"]) {
      await check(d, { ...cross, n: 200 }, { lse: true, stats: true, path }, { f16: true, seed: 3 });
    }
  },
  "head dims 1, 3, 80, 128 and 256": async (d) => {
    for (const dk of [1, 3, 80, 128, 256]) await check(d, { batch: 1, m: 7, n: 19, heads: 2, dk }, { lse: true });
  },
  "K and V stay on the device across calls": async (d) => {
    const dims = { batch: 1, m: 4, n: 50, heads: 2, dk: 16 };
    const [, k, v] = inputs(dims, 11, false);
    const [kt, vt] = [d.upload(k, [1, 50, 2, 16]), d.upload(v, [1, 50, 2, 16])];
    for (const seed of [12, 13]) {
      const [q] = inputs(dims, seed, false);
      const got = await d.attentionOnDevice(d.upload(q, [1, 4, 2, 16]), kt, vt, {});
      const want = xattn.reference(q, k, v, dims, {});
      close("O", got.o, want.o, () => EPS * (4 * (1 + want.maxLogit) + 50));
    }
    close("K read back", await kt.toHost(), k, () => 0);
  },
  "a layer from a safetensors file matches the f64 layer": async (d) => {
    const config = { embedDim: 48, heads: 4, kdim: 24, vdim: 24 };
    const bytes = randomLayerFile(config, 21, "decoder.layers.0.encoder_attn.");
    const layer = d.layer(bytes, "decoder.layers.0.encoder_attn.", config);
    const rng = random(22);
    const [query, key] = [uniform(rng, 2 * 6 * 48), uniform(rng, 2 * 30 * 24)];
    const got = await layer.forward(query, key, key, { batch: 2, m: 6, n: 30 }, { weights: "per-head" });
    const want = xattn.layerReference(bytes, "decoder.layers.0.encoder_attn.", config, query, key, key, 2);
    // Four f32 matrix products and the attention: a few ulps of each output's magnitude.
    close("layer out", got.out, want.out, (_, w) => 64 * EPS * (1 + Math.abs(w)));
    close("layer P", got.weights, want.weights, () => 64 * EPS);
  },
  "bad input rejects with xattn's message": async (d) => {
    const [q, k, v] = inputs(cross, 5, false);
    await rejects(() => d.attention(q.subarray(1), k, v, cross, {}), "expected");
    await rejects(() => d.attention(q, k, v, cross, { window: [1, 1] }), "windowAlign");
    await rejects(() => d.attention(q, k, v, cross, { path: "sideways" }), "unknown path");
    await rejects(async () => d.layer(new Uint8Array([1, 2, 3]), "", { embedDim: 8, heads: 2 }), "weights");
  },
};

// Runs every case, recording each outcome in window.results; resolves to the counts.
export async function runAll(log) {
  await init();
  const device = await xattn.open();
  log(`adapter: ${device.adapter.describe}`);
  let passed = 0;
  let failed = 0;
  for (const [name, run] of Object.entries(cases)) {
    const start = performance.now();
    try {
      await run(device);
      passed++;
      log(`ok   ${name} (${(performance.now() - start).toFixed(0)} ms)`);
    } catch (e) {
      failed++;
      log(`FAIL ${name}: ${e.message ?? e}`);
    }
  }
  return { passed, failed, adapter: device.adapter };
}
