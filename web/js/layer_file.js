// A cross-attention layer's weights as a safetensors file, in Hugging Face's names
// (q_proj, k_proj, v_proj, out_proj): what the page and the tests hand to device.layer().

// A seeded generator (mulberry32): the same seed gives the same weights everywhere.
export function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// `len` values uniform in [-scale, scale).
export function uniform(rng, len, scale = 1) {
  const out = new Float32Array(len);
  for (let i = 0; i < len; i++) out[i] = (2 * rng() - 1) * scale;
  return out;
}

// The bytes of a safetensors file holding `tensors` ({name: [Float32Array, shape]}) in F32.
export function safetensors(tensors) {
  const header = {};
  let offset = 0;
  for (const [name, [data, shape]] of Object.entries(tensors)) {
    header[name] = { dtype: "F32", shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (json.length % 8)) % 8); // the data starts 8-aligned
  const head = new TextEncoder().encode(json);
  const bytes = new Uint8Array(8 + head.length + offset);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(head.length), true);
  bytes.set(head, 8);
  let at = 8 + head.length;
  for (const [data] of Object.values(tensors)) {
    bytes.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), at);
    at += data.byteLength;
  }
  return bytes;
}

// A random layer `{embedDim, heads, kdim, vdim}` (biases included) under `prefix`, weights
// scaled like PyTorch's Linear initialization (1/sqrt(fan_in)).
export function randomLayerFile({ embedDim, kdim = embedDim, vdim = embedDim }, seed, prefix = "") {
  const rng = random(seed);
  const linear = (out, inp) => [
    [uniform(rng, out * inp, 1 / Math.sqrt(inp)), [out, inp]],
    [uniform(rng, out, 1 / Math.sqrt(inp)), [out]],
  ];
  const tensors = {};
  for (const [name, out, inp] of [
    ["q_proj", embedDim, embedDim],
    ["k_proj", embedDim, kdim],
    ["v_proj", embedDim, vdim],
    ["out_proj", embedDim, embedDim],
  ]) {
    const [w, b] = linear(out, inp);
    tensors[`${prefix}${name}.weight`] = w;
    tensors[`${prefix}${name}.bias`] = b;
  }
  return safetensors(tensors);
}
