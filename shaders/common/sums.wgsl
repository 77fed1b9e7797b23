// Long sums of the fused kernels (flash, flash_coop; CPU twins: src/cpu/flash.rs `fold_tiles`
// and src/cpu/flash_coop.rs). The including kernel defines BC, its keys per tile (a power of
// two).
//
// Adding a weight p to a running sum S rounds by up to ε·S/2, so one running sum over N keys is
// off by up to ε·N relative (ε·√N typically), and in a peaked row the many small weights that
// fall below half an ulp of S are dropped outright. A row's sums (its weights l, the
// statistic t = Σ p·(m − s), its O accumulator) are therefore kept in levels:
//   - each tile's l and t are summed on their own, then added to the block's once;
//   - the block's l, t and O take the row's tiles as before (rescaled when the max grows);
//   - every G tiles of the key loop, and after its last, the block folds into the row's sums
//     (rebased from their max to the block's) and starts again from zero.
// With T tiles, a block of B = G·BC keys and T / G folds round by about ε·√(B / T) and
// ε·√(T / G) relative: G ≈ T^(2/3) / BC^(1/3) balances them (`fold_tiles`, a power of two, at
// least 4: a loop of a few tiles is one block, as the fold's own cost shows on llvmpipe), and
// the error grows like ε·N^(1/6) where one running sum's grows like ε·√N. Rescaling factors
// and kept keys' weights are at least MIN_WEIGHT (common/params.wgsl).

// G: the tiles per block of a key loop over `keys` keys.
fn fold_tiles(keys: u32) -> u32 {
    let tiles = max(1u, (keys + BC - 1u) / BC);
    let e = max(6i, 2i * i32(firstLeadingBit(tiles)) - i32(firstLeadingBit(BC)) + 1i) / 3i;
    return 1u << u32(e);
}
