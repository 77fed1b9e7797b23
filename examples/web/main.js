// The example page: a cross-attention layer (random seeded weights, written as a safetensors
// file and loaded as a model's would be) runs on WebGPU through xattn; the page draws its
// attention map, each row's entropy and focus, prints timings and the adapter, and checks
// the layer against xattn's f64 reference (window.xattnPage says how that went).
import init, * as xattn from "../../web/pkg/xattn_web.js";
import { random, uniform, randomLayerFile } from "../../web/js/layer_file.js";

const $ = (id) => document.getElementById(id);
const ms = (t) => `${t.toFixed(2)} ms`;
const PREFIX = "decoder.layers.0.encoder_attn.";

let device;
let shown; // { weights, stats, heads, m, n }

// Viridis at five stops, interpolated.
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function viridis(t) {
  const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

function draw() {
  if (!shown) return;
  const { weights, stats, heads, m, n } = shown;
  const h = Number($("head").value);
  const row = Number($("qrow").value);
  $("qrow-value").textContent = row;
  const p = weights.subarray(h * m * n, (h + 1) * m * n);
  const top = p.reduce((a, x) => Math.max(a, x), 0) || 1;

  const map = $("map").getContext("2d");
  const image = map.createImageData(n, m);
  p.forEach((x, i) => image.data.set([...viridis(x / top), 255], 4 * i));
  const scratch = new OffscreenCanvas(n, m);
  scratch.getContext("2d").putImageData(image, 0, 0);
  map.imageSmoothingEnabled = false;
  map.clearRect(0, 0, 480, 320);
  map.drawImage(scratch, 0, 0, 480, 320);
  map.strokeStyle = "red";
  map.lineWidth = 2;
  map.strokeRect(1, (row * 320) / m, 478, 320 / m);

  const bars = $("rows").getContext("2d");
  bars.clearRect(0, 0, 300, 320);
  const entropy = stats.entropy.subarray(h * m, (h + 1) * m);
  const focus = stats.focus.subarray(h * m, (h + 1) * m);
  const bh = 320 / m;
  for (let i = 0; i < m; i++) {
    bars.fillStyle = i === row ? "#c00" : "#3b6fb6";
    bars.fillRect(0, i * bh, (145 * entropy[i]) / Math.log(n), Math.max(bh - 1, 1));
    bars.fillStyle = "#e08a1e";
    bars.fillRect(155, i * bh, 145 * focus[i], Math.max(bh - 1, 1));
  }

  const line = $("row").getContext("2d");
  line.clearRect(0, 0, 800, 120);
  const r = p.subarray(row * n, (row + 1) * n);
  const rTop = r.reduce((a, x) => Math.max(a, x), 0) || 1;
  r.forEach((x, j) => {
    line.fillStyle = `rgb(${viridis(x / rTop).join(",")})`;
    line.fillRect((j * 800) / n, 120 - (110 * x) / rTop, Math.max(800 / n - 1, 1), (110 * x) / rTop);
  });
  $("status").dataset.row = `head ${h}, row ${row}: entropy ${entropy[row].toFixed(3)}, focus ${focus[row].toFixed(3)}`;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function runLayer() {
  const [embedDim, heads, m, n, seed] = ["embed", "heads", "m", "n", "seed"].map((id) => Number($(id).value));
  const config = { embedDim, heads };
  const t0 = performance.now();
  const bytes = randomLayerFile(config, seed, PREFIX);
  const layer = device.layer(bytes, PREFIX, config);
  const t1 = performance.now();
  const rng = random(seed + 1);
  // Inputs of amplitude 3: random weights then give peaked rows worth drawing.
  const query = uniform(rng, m * embedDim, 3);
  const source = uniform(rng, n * embedDim, 3);
  const dims = { batch: 1, m, n };
  const options = { weights: "per-head", stats: true };
  const first = await layer.forward(query, source, source, dims, options);
  const t2 = performance.now();
  const times = [];
  for (let i = 0; i < 5; i++) {
    const s = performance.now();
    await layer.forward(query, source, source, dims, options);
    times.push(performance.now() - s);
  }
  const want = xattn.layerReference(bytes, PREFIX, config, query, source, source, 1);
  // The browser tests' bound for a layer: a few ulps of each output's magnitude.
  let worst = 0;
  let ok = true;
  first.out.forEach((x, i) => {
    const err = Math.abs(x - want.out[i]);
    worst = Math.max(worst, err);
    ok &&= err <= 64 * 2 ** -23 * (1 + Math.abs(want.out[i]));
  });

  shown = { weights: first.weights, stats: first.stats, heads, m, n };
  $("head").innerHTML = [...Array(heads).keys()].map((h) => `<option>${h}</option>`).join("");
  $("qrow").max = m - 1;
  $("qrow").value = Math.min(Number($("qrow").value), m - 1);
  draw();
  $("status").textContent =
    `layer E ${embedDim}, ${heads} heads, M ${m} × N ${n}: ` +
    (ok ? `matches the f64 reference (max |error| ${worst.toExponential(2)})` : `DIFFERS from the f64 reference by ${worst}`);
  $("timings").textContent =
    `load (safetensors → device): ${ms(t1 - t0)}\n` +
    `first forward (pipelines compile, upload, read back): ${ms(t2 - t1)}\n` +
    `forward, median of 5 (upload, run, read back out + weights + statistics): ${ms(median(times))}`;
  window.xattnPage = { ok, worst, median: median(times) };
}

// The CLI's quick suite (cli/src/suite.rs) on every path: prepared once, one warm-up, median
// of three timed runs, each awaited until the device is done.
export async function quickSuite() {
  const shapes = [
    ["diffusion", 1, 8, 1024, 77, 40],
    ["decode", 1, 8, 1, 1500, 64],
    ["square", 1, 8, 256, 256, 64],
    ["perceiver", 1, 1, 64, 4096, 64],
  ];
  const rows = [];
  const plans = {};
  for (const [name, batch, heads, m, n, d] of shapes) {
    const rng = random(5);
    const q = device.upload(uniform(rng, batch * m * heads * d), [batch, m, heads, d]);
    const k = device.upload(uniform(rng, batch * n * heads * d), [batch, n, heads, d]);
    const v = device.upload(uniform(rng, batch * n * heads * d), [batch, n, heads, d]);
    plans[name] = device.prepare(q, k, v, {}).plan;
    for (const path of ["three-pass", "fused", "split-k"]) {
      const call = device.prepare(q, k, v, { path });
      await call.run();
      const times = [];
      for (let i = 0; i < 3; i++) {
        const s = performance.now();
        await call.run();
        times.push(performance.now() - s);
      }
      const t = median(times);
      const gflops = (4 * batch * heads * m * n * d) / (t * 1e6);
      rows.push({ name, path, ms: t, gflops });
    }
  }
  $("timings").textContent +=
    "\n\nquick suite (median of 3):\n" +
    rows.map((r) => `${r.name.padEnd(10)} ${r.path.padEnd(10)} ${ms(r.ms).padStart(11)} ${r.gflops.toFixed(2)} GFLOP/s`).join("\n");
  return { rows, plans };
}

async function main() {
  try {
    await init();
    device = await xattn.open();
    const a = device.adapter;
    // WebGPU names the adapter only through GPUAdapter.info.
    const info = (await navigator.gpu.requestAdapter())?.info ?? {};
    const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ");
    $("adapter").textContent =
      `adapter: ${name || "unnamed"} ${a.describe}; subgroups ${a.features.subgroups}, shader-f16 ${a.features.shaderF16}, ` +
      `storage binding ${a.limits.maxStorageBufferBindingSize} B, workgroup memory ${a.limits.maxComputeWorkgroupStorageSize} B`;
    window.xattnQuickSuite = quickSuite;
    $("run").onclick = () => runLayer().catch(fail);
    $("suite").onclick = () => quickSuite().catch(fail);
    $("head").onchange = draw;
    $("qrow").oninput = draw;
    await runLayer();
  } catch (e) {
    fail(e);
  }
}

function fail(e) {
  $("status").textContent = `error: ${e.message ?? e}`;
  window.xattnPage = { ok: false, error: String(e.message ?? e) };
}

main();
