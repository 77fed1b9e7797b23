// Runs the browser tests (tests/index.html) and the example page (examples/web/) in headless
// Chromium on WebGPU: a static server on loopback serves the repository, puppeteer-core drives
// the system's chromium (CHROMIUM, default /usr/bin/chromium). Prints each case, the counts
// ("N passed, N failed") and where the page's screenshot is; exits non-zero on any failure.
import { createServer } from "node:http";
import { readFile, mkdir, mkdtemp, rm } from "node:fs/promises";
import { extname, join, normalize, resolve } from "node:path";
import { tmpdir } from "node:os";
import puppeteer from "puppeteer-core";

const root = resolve(import.meta.dirname, "../..");
const out = resolve(process.env.XATTN_WEB_OUT ?? join(root, "target/web"));
const types = {
  ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
  ".wasm": "application/wasm", ".json": "application/json", ".css": "text/css",
  ".ts": "text/plain", ".safetensors": "application/octet-stream",
};

const server = createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
  try {
    const body = await readFile(join(root, path.endsWith("/") ? path + "index.html" : path));
    res.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" });
    res.end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const base = `http://127.0.0.1:${server.address().port}`;

// WebGPU in headless Chromium as root: SwiftShader's Vulkan adapter needs
// --enable-unsafe-webgpu; no network services, a fresh profile.
const profile = await mkdtemp(join(tmpdir(), "xattn-chromium-"));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  userDataDir: profile,
  args: [
    "--no-sandbox", "--enable-unsafe-webgpu", "--enable-features=Vulkan", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
  ],
  protocolTimeout: 600_000,
});

let failed = 0;
let passed = 0;
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  const start = Date.now();
  await page.goto(`${base}/web/tests/index.html`);
  const result = await page.evaluate(() => window.xattnTests);
  for (const line of result.lines) console.log(`web: ${line}`);
  console.log(`web: the cases took ${((Date.now() - start) / 1000).toFixed(1)} s`);
  passed += result.passed;
  failed += result.failed;

  // The example page: it runs the layer, checks it against the f64 reference itself and
  // says so in #status; the screenshot is what a person would see.
  const demo = await browser.newPage();
  demo.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  await demo.setViewport({ width: 1200, height: 900 });
  await demo.goto(`${base}/examples/web/index.html`);
  await demo.waitForFunction(() => window.xattnPage !== undefined, { timeout: 300_000 });
  const page_ = await demo.evaluate(() => window.xattnPage);
  await mkdir(out, { recursive: true });
  const shot = join(out, "example-page.png");
  await demo.screenshot({ path: shot, fullPage: true });
  const status = await demo.$eval("#status", (e) => e.textContent);
  if (page_.ok) {
    passed++;
    console.log(`web: ok   the example page ran its layer and matched the reference: ${status}`);
  } else {
    failed++;
    console.log(`web: FAIL the example page: ${status}`);
  }
  console.log(`web: screenshot ${shot}`);
  if (process.env.XATTN_WEB_BENCH) {
    const { rows, plans } = await demo.evaluate(() => window.xattnQuickSuite());
    for (const [name, plan] of Object.entries(plans)) console.log(`web: plan ${name}: ${plan}`);
    for (const r of rows) {
      console.log(`web: bench ${r.name.padEnd(10)} ${r.path.padEnd(10)} ${r.ms.toFixed(2).padStart(9)} ms  ${r.gflops.toFixed(2)} GFLOP/s`);
    }
  }
} finally {
  await browser.close();
  server.close();
  await rm(profile, { recursive: true, force: true });
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
