//! Matrix products on the CPU's bf16 units, picked at run time: AMX tiles
//! (`tdpbf16ps`, Sapphire Rapids and later) or AVX512-BF16 (`vdpbf16ps`). Inputs and
//! output are f32; the inputs are rounded to bf16 (to nearest, ties to even) and their
//! products summed in f32 — what PyTorch's bf16 autocast computes. A CPU with neither
//! unit has no [`unit`], and callers stay in f32: emulating bf16 there is slower than
//! f32 (PyTorch's emulation is ~30× slower), so it is never chosen silently.
//!
//! Each output block is computed by one thread with a fixed order over `k`, so results
//! do not depend on the number of threads.
//!
//! Rust's AMX intrinsics are not stable, so the few AMX instructions are inline
//! assembly; Linux must grant the process the tile state first (`arch_prctl`).

use std::sync::OnceLock;

use rayon::prelude::*;

/// The bf16 unit products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Unit {
    /// Intel AMX tiles (`amx-bf16`).
    Amx,
    /// AVX-512 with the BF16 extension (`avx512bf16`).
    Avx512,
}

impl Bf16Unit {
    /// The name logs and `training.json` record.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Unit::Amx => "amx-bf16",
            Bf16Unit::Avx512 => "avx512-bf16",
        }
    }
}

/// The CPU's native bf16 unit, if it has one (detected once).
pub fn unit() -> Option<Bf16Unit> {
    static UNIT: OnceLock<Option<Bf16Unit>> = OnceLock::new();
    *UNIT.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Bf16Unit> {
    if amx::cpu_has_amx_bf16() && amx::request_tile_state() {
        return Some(Bf16Unit::Amx);
    }
    if std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f") {
        return Some(Bf16Unit::Avx512);
    }
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Bf16Unit> {
    None
}

/// An element a product reads: f32 (rounded to bf16 when packed) or bf16 bits as they
/// are (a frozen base's weights read in place).
pub trait Element: Copy + Send + Sync {
    /// Whether the values are bf16 bits already (`u16`) rather than f32: the SIMD
    /// packing reads the memory as one or the other.
    const BF16_BITS: bool;
    /// The bf16 bits of the value.
    fn to_bf16_bits(self) -> u16;
    /// `out[i]` = the bf16 bits of `src[i]`.
    fn convert(src: &[Self], out: &mut [u16]);
}

impl Element for f32 {
    const BF16_BITS: bool = false;
    fn to_bf16_bits(self) -> u16 {
        to_bf16(self)
    }
    fn convert(src: &[f32], out: &mut [u16]) {
        convert(src, out);
    }
}

/// bf16 bits.
impl Element for u16 {
    const BF16_BITS: bool = true;
    fn to_bf16_bits(self) -> u16 {
        self
    }
    fn convert(src: &[u16], out: &mut [u16]) {
        out.copy_from_slice(&src[..out.len()]);
    }
}

/// A read-only matrix view: element `(i, j)` at `data[i * row_stride + j * col_stride]`,
/// so a transpose is a view with the strides swapped.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T: Element = f32> {
    /// The values.
    pub data: &'a [T],
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a, T: Element> MatRef<'a, T> {
    /// A row-major `[_, cols]` matrix as stored.
    pub fn row_major(data: &'a [T], cols: usize) -> MatRef<'a, T> {
        MatRef {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `[_, cols]` matrix: read as `[cols, _]`.
    pub fn transposed(data: &'a [T], cols: usize) -> MatRef<'a, T> {
        MatRef {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    #[cfg(test)]
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// `x` rounded to bf16, to nearest with ties to even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// Rows and columns of a tile, and `k` per tile step (32 bf16 = one 64-byte tile row).
const TILE: usize = 16;
const TILE_K: usize = 32;
/// Elements of one packed tile (16 rows × 32 bf16).
const TILE_ELEMS: usize = TILE * TILE_K;

/// `c[m × n] = a[m × k] · b[k × n]` (row-major `c`) on `unit`.
///
/// # Panics
/// If `c` holds fewer than `m × n` values or a view addresses values it does not hold.
pub fn matmul<A: Element, B: Element>(
    unit: Bf16Unit,
    (m, n, k): (usize, usize, usize),
    a: MatRef<'_, A>,
    b: MatRef<'_, B>,
    c: &mut [f32],
) {
    assert!(
        c.len() >= m * n,
        "output holds {} values, not {m} × {n}",
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    // Blocks of 32 × 32 outputs: two tiles each way.
    let row_pairs = m.div_ceil(2 * TILE);
    let col_pairs = n.div_ceil(2 * TILE);
    let k_steps = k.div_ceil(TILE_K).max(1);
    PACKED.with(|buffers| {
        let mut buffers = buffers.borrow_mut();
        let (packed_a, packed_b) = &mut *buffers;
        pack_rows(a, m, k, 2 * row_pairs, k_steps, packed_a);
        // B is packed a group of columns at a time: a whole 151,936-token head would
        // take hundreds of MB packed.
        let group = (GROUP_ELEMS / (2 * k_steps * TILE_ELEMS)).max(1);
        for first in (0..col_pairs).step_by(group) {
            let pairs = group.min(col_pairs - first);
            pack_columns(b, (k, n), (2 * first, 2 * pairs), k_steps, packed_b);
            compute(
                unit,
                (m, n),
                (row_pairs, first, pairs, k_steps),
                packed_a,
                packed_b,
                c,
            );
        }
    });
}

/// Packed B elements per column group (8 MiB); tests use tiny groups, so that every
/// product of theirs crosses group edges.
#[cfg(not(test))]
const GROUP_ELEMS: usize = 1 << 22;
#[cfg(test)]
const GROUP_ELEMS: usize = 1 << 11;

thread_local! {
    /// The packed operands of this thread's last product, kept for the next: fresh
    /// buffers would cost a page fault per 4 KiB every time.
    static PACKED: std::cell::RefCell<(Vec<u16>, Vec<u16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `c = a · b` in the column pairs `first_col_pair..+col_pairs`, whose B panels
/// `packed_b` holds, from the packed panels: blocks of 32 × 32 outputs spread over threads.
fn compute(
    unit: Bf16Unit,
    (m, n): (usize, usize),
    (row_pairs, first_col_pair, col_pairs, k_steps): (usize, usize, usize, usize),
    packed_a: &[u16],
    packed_b: &[u16],
    c: &mut [f32],
) {
    let threads = rayon::current_num_threads().max(1);
    // Row blocks per task: enough tasks to balance, each reusing its B panels.
    let rows_per_task = row_pairs.div_ceil(threads * 4).max(1);
    c[..m * n]
        .par_chunks_mut(rows_per_task * 2 * TILE * n)
        .enumerate()
        .for_each(|(task, out)| {
            let first_pair = task * rows_per_task;
            let pairs = rows_per_task.min(row_pairs - first_pair);
            let mut block = [0f32; 4 * TILE * TILE];
            let mut session = Session::begin(unit);
            // Columns outside, rows inside: a pair of B panels stays in L1 while this
            // task's A panels (a few rows) stay in L2.
            for index in 0..col_pairs {
                let b_left = &packed_b[(2 * index) * k_steps * TILE_ELEMS..];
                let b_right = &packed_b[(2 * index + 1) * k_steps * TILE_ELEMS..];
                let col0 = (first_col_pair + index) * 2 * TILE;
                let cols = (2 * TILE).min(n - col0);
                for pair in first_pair..first_pair + pairs {
                    let a_top = &packed_a[(2 * pair) * k_steps * TILE_ELEMS..];
                    let a_bottom = &packed_a[(2 * pair + 1) * k_steps * TILE_ELEMS..];
                    let row0 = pair * 2 * TILE;
                    let rows = (2 * TILE).min(m - row0);
                    let local = (row0 - first_pair * 2 * TILE) * n + col0;
                    let (a, b) = ([a_top, a_bottom], [b_left, b_right]);
                    if rows == 2 * TILE && cols == 2 * TILE {
                        // A whole block: straight into the output.
                        session.block(k_steps, a, b, &mut out[local..], n);
                        continue;
                    }
                    session.block(k_steps, a, b, &mut block, 2 * TILE);
                    for r in 0..rows {
                        let at = local + r * n;
                        out[at..at + cols]
                            .copy_from_slice(&block[r * 2 * TILE..r * 2 * TILE + cols]);
                    }
                }
            }
            session.end();
        });
}

/// `a`'s rows in tiles: for each block of 16 rows and step of 32 along `k`, 16 rows of
/// 32 bf16 (zero past the matrix). `row_blocks` may exceed the rows (padding).
fn pack_rows<T: Element>(
    a: MatRef<'_, T>,
    m: usize,
    k: usize,
    row_blocks: usize,
    k_steps: usize,
    packed: &mut Vec<u16>,
) {
    let simd = simd_packing() && (a.col_stride == 1 || a.row_stride == 1);
    fill_panels(
        packed,
        (0, row_blocks),
        k_steps,
        m,
        |panels, first, rows| {
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `simd_packing` checked the CPU; `panels` holds whole panels of
                // k_steps tiles, and the view holds rows `first..first + rows`, columns `..k`.
                unsafe {
                    avx512::pack_rows_panels(a, (first, rows), k, k_steps, panels)
                };
                return;
            }
            for (index, panel) in panels.chunks_mut(k_steps * TILE_ELEMS).enumerate() {
                let first = first + index * TILE;
                let rows = TILE.min(rows.saturating_sub(index * TILE));
                panel.fill(0);
                if a.col_stride == 1 {
                    // Each row is contiguous along k.
                    for r in 0..rows {
                        let start = (first + r) * a.row_stride;
                        for (step, chunk) in a.data[start..start + k].chunks(TILE_K).enumerate() {
                            let at = step * TILE_ELEMS + r * TILE_K;
                            T::convert(chunk, &mut panel[at..at + chunk.len()]);
                        }
                    }
                } else {
                    let mut column = [0u16; TILE];
                    for kk in 0..k {
                        let start = kk * a.col_stride + first * a.row_stride;
                        gather(a.data, start, a.row_stride, &mut column[..rows]);
                        let at = (kk / TILE_K) * TILE_ELEMS + kk % TILE_K;
                        for (r, &value) in column[..rows].iter().enumerate() {
                            panel[at + r * TILE_K] = value;
                        }
                    }
                }
            }
        },
    );
}

/// Panels one parallel task fills: a transposed view is read 128 values at a time.
const PANELS_PER_TASK: usize = 8;

/// Sizes `packed` to `blocks` panels of `k_steps` tiles each and fills them in
/// parallel: `fill(panels, first, count)` gets up to [`PANELS_PER_TASK`] consecutive
/// panels from block `first_block + i`, with their first row (or column) of `extent`
/// and how many they hold (every panel holds some), and must write all their values.
/// Panels past `extent` are zeroed here. Nothing is zeroed twice: the packed operands
/// are too large for the caches, and every pass over them costs.
fn fill_panels(
    packed: &mut Vec<u16>,
    (first_block, blocks): (usize, usize),
    k_steps: usize,
    extent: usize,
    fill: impl Fn(&mut [u16], usize, usize) + Sync,
) {
    let panel = k_steps * TILE_ELEMS;
    if packed.len() < blocks * panel {
        packed.resize(blocks * panel, 0);
    }
    packed[..blocks * panel]
        .par_chunks_mut(PANELS_PER_TASK * panel)
        .enumerate()
        .for_each(|(task, panels)| {
            let first = (first_block + task * PANELS_PER_TASK) * TILE;
            let count = (panels.len() / panel * TILE).min(extent.saturating_sub(first));
            let (used, padding) = panels.split_at_mut(count.div_ceil(TILE) * panel);
            padding.fill(0);
            if count > 0 {
                fill(used, first, count);
            }
        });
}

/// `b`'s columns in AMX's pair layout: for each block of 16 columns and step of 32 along
/// `k`, 16 rows (pairs of `k`) of 16 columns × 2 bf16; element `(k, j)` of the step at row
/// `k / 2`, position `2 j + k % 2`.
fn pack_columns<T: Element>(
    b: MatRef<'_, T>,
    (k, n): (usize, usize),
    (first_block, col_blocks): (usize, usize),
    k_steps: usize,
    packed: &mut Vec<u16>,
) {
    let simd = simd_packing() && (b.col_stride == 1 || b.row_stride == 1);
    fill_panels(
        packed,
        (first_block, col_blocks),
        k_steps,
        n,
        |panels, first, cols| {
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as in `pack_rows`, for columns `first..first + cols`.
                unsafe {
                    avx512::pack_columns_panels(b, (first, cols), k, k_steps, panels)
                };
                return;
            }
            let place =
                |kk: usize| (kk / TILE_K) * TILE_ELEMS + (kk % TILE_K / 2) * TILE_K + kk % 2;
            for (index, panel) in panels.chunks_mut(k_steps * TILE_ELEMS).enumerate() {
                let first = first + index * TILE;
                let cols = TILE.min(cols.saturating_sub(index * TILE));
                panel.fill(0);
                if b.row_stride == 1 {
                    // Each column is contiguous along k (a transposed view of a row-major
                    // matrix, such as a weight `[out, in]` read as `[in, out]`).
                    let mut converted = vec![0u16; k];
                    for c in 0..cols {
                        let start = (first + c) * b.col_stride;
                        T::convert(&b.data[start..start + k], &mut converted);
                        for (kk, &value) in converted.iter().enumerate() {
                            panel[place(kk) + 2 * c] = value;
                        }
                    }
                } else {
                    // Each row is contiguous along the columns.
                    let mut row = [0u16; TILE];
                    for kk in 0..k {
                        let start = kk * b.row_stride + first * b.col_stride;
                        gather(b.data, start, b.col_stride, &mut row[..cols]);
                        let at = place(kk);
                        for (c, &value) in row[..cols].iter().enumerate() {
                            panel[at + 2 * c] = value;
                        }
                    }
                }
            }
        },
    );
}

/// `out[i] = bf16(src[i])`: 16 at a time with AVX512-BF16's conversion where the CPU
/// has it (every CPU with a [`unit`]; same rounding as [`to_bf16`]), the rest one by one.
fn convert(src: &[f32], out: &mut [u16]) {
    let len = src.len().min(out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        done = len - len % 16;
        // SAFETY: the CPU has avx512f and avx512bf16; `done` ≤ both lengths.
        unsafe { avx512::convert(&src[..done], &mut out[..done]) };
    }
    for (out, &value) in out[done..len].iter_mut().zip(&src[done..len]) {
        *out = to_bf16(value);
    }
}

/// Whether packing can use AVX-512 (BW and VL for the 16-bit moves, BF16 for the
/// conversion): every CPU with a bf16 unit so far, checked anyway.
fn simd_packing() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx512_bf16()
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f")
    })
}

/// `out[i] = bf16(data[start + i·stride])`.
fn gather<T: Element>(data: &[T], start: usize, stride: usize, out: &mut [u16]) {
    if stride == 1 {
        T::convert(&data[start..start + out.len()], out);
    } else {
        for (i, out) in out.iter_mut().enumerate() {
            *out = data[start + i * stride].to_bf16_bits();
        }
    }
}

/// One thread's use of the unit: AMX needs its tile configuration loaded per thread.
struct Session {
    unit: Bf16Unit,
}

impl Session {
    fn begin(unit: Bf16Unit) -> Session {
        #[cfg(target_arch = "x86_64")]
        if unit == Bf16Unit::Amx {
            // SAFETY: `unit()` returned Amx only after the CPU reported AMX and Linux
            // granted the tile state.
            unsafe { amx::configure() };
        }
        Session { unit }
    }

    /// The 32 × 32 block `[a_top; a_bottom] · [b_left, b_right]` over `k_steps` packed
    /// steps, written to `out` with rows `row_stride` apart.
    fn block(
        &mut self,
        k_steps: usize,
        a: [&[u16]; 2],
        b: [&[u16]; 2],
        out: &mut [f32],
        row_stride: usize,
    ) {
        for panel in a.iter().chain(&b) {
            assert!(panel.len() >= k_steps * TILE_ELEMS);
        }
        assert!(row_stride >= 2 * TILE && out.len() >= (2 * TILE - 1) * row_stride + 2 * TILE);
        let block = out.as_mut_ptr();
        match self.unit {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: panels hold k_steps tiles (checked above); the session configured
            // the tiles.
            Bf16Unit::Amx => unsafe { amx::block(k_steps, a, b, block, row_stride) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `unit()` returned Avx512 only where avx512bf16 is available.
            Bf16Unit::Avx512 => unsafe { avx512::block(k_steps, a, b, block, row_stride) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no bf16 unit outside x86_64"),
        }
    }

    fn end(self) {
        #[cfg(target_arch = "x86_64")]
        if self.unit == Bf16Unit::Amx {
            // SAFETY: releases the tile state this thread configured.
            unsafe { amx::release() };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use super::{TILE, TILE_ELEMS, TILE_K};

    /// The 64-byte tile configuration (palette 1): eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// Whether CPUID reports AMX tiles with bf16 (leaf 7: EDX bits 22 and 24); std's
    /// detection of these features is not stable yet.
    pub fn cpu_has_amx_bf16() -> bool {
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }

    /// Asks Linux for the AMX tile data state (`ARCH_REQ_XCOMP_PERM`,
    /// `XFEATURE_XTILEDATA`); false where it is refused (old kernels).
    pub fn request_tile_state() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let result: i64;
        // SAFETY: the arch_prctl system call with plain integer arguments; it changes
        // only the process's permission to use AMX state.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => result,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        result == 0
    }

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// The CPU must have AMX and the process its tile state.
    pub unsafe fn configure() {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for tile in 0..8 {
            config.bytes_per_row[tile] = 64;
            config.rows[tile] = TILE as u8;
        }
        // SAFETY: as the caller guarantees; the configuration is valid for palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &raw const config, options(nostack)) };
    }

    /// Releases this thread's tile state.
    ///
    /// # Safety
    /// As [`configure`].
    pub unsafe fn release() {
        // SAFETY: as the caller guarantees.
        unsafe { asm!("tilerelease", options(nostack)) };
    }

    /// See `Session::block`: tmm0–3 accumulate the four 16 × 16 outputs, tmm4–5 hold
    /// the A tiles, tmm6–7 the B tiles of each step.
    ///
    /// # Safety
    /// Tiles configured by [`configure`] on this thread; each panel holds `k_steps` tiles;
    /// `out` addresses 32 rows of 32 writable floats `row_stride` apart.
    pub unsafe fn block(
        k_steps: usize,
        a: [&[u16]; 2],
        b: [&[u16]; 2],
        out: *mut f32,
        row_stride: usize,
    ) {
        const STRIDE: usize = TILE_K * 2;
        // SAFETY: every load reads 16 rows of 64 bytes inside a panel (k_steps tiles of
        // TILE_ELEMS u16 each); the stores write 16 rows of 64 bytes, `row_stride` floats
        // apart, inside `out` as the caller guarantees.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3"
            );
            for step in 0..k_steps {
                let offset = step * TILE_ELEMS;
                asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a[0].as_ptr().add(offset),
                    a1 = in(reg) a[1].as_ptr().add(offset),
                    b0 = in(reg) b[0].as_ptr().add(offset),
                    b1 = in(reg) b[1].as_ptr().add(offset),
                    s = in(reg) STRIDE,
                    options(nostack, readonly),
                );
            }
            let row_bytes = row_stride * 4;
            asm!(
                "tilestored [{c00} + {s}*1], tmm0",
                "tilestored [{c01} + {s}*1], tmm1",
                "tilestored [{c10} + {s}*1], tmm2",
                "tilestored [{c11} + {s}*1], tmm3",
                c00 = in(reg) out,
                c01 = in(reg) out.add(TILE),
                c10 = in(reg) out.add(TILE * row_stride),
                c11 = in(reg) out.add(TILE * row_stride + TILE),
                s = in(reg) row_bytes,
                options(nostack),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Element, MatRef, TILE, TILE_ELEMS, TILE_K};

    /// A mask of the first `len` (≤ 16) lanes.
    fn mask16(len: usize) -> __mmask16 {
        ((1u32 << len.min(16)) - 1) as __mmask16
    }

    /// Elements `0..len` (≤ 32) from `src` as 32 bf16 in order, zero past `len`: one
    /// tile row of A, or the 16 `k` pairs of one B column.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `src..src + len` readable.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run32<T: Element>(src: *const T, len: usize) -> __m512i {
        // SAFETY: masked-off lanes are not read.
        unsafe {
            if T::BF16_BITS {
                let mask = ((1u64 << len.min(32)) - 1) as __mmask32;
                _mm512_maskz_loadu_epi16(mask, src.cast())
            } else {
                let src = src.cast::<f32>();
                let low = _mm512_maskz_loadu_ps(mask16(len), src);
                let high = _mm512_maskz_loadu_ps(mask16(len.saturating_sub(16)), src.add(16));
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low))
            }
        }
    }

    /// Lane `i` (< `len` ≤ 16) = bf16 `first[i]` in the low half, `second[i]` in the
    /// high half (zero where `second` is None): AMX's pairs along `k`.
    ///
    /// # Safety
    /// As [`run32`], for `len` elements of `first` and of `second`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pairs16<T: Element>(
        first: *const T,
        second: Option<*const T>,
        len: usize,
    ) -> __m512i {
        // SAFETY: masked-off lanes are not read.
        unsafe {
            let widen = |src: *const T| -> __m512i {
                if T::BF16_BITS {
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask16(len), src.cast()))
                } else {
                    let values = _mm512_maskz_loadu_ps(mask16(len), src.cast());
                    _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                        _mm512_cvtneps_pbh(values),
                    ))
                }
            };
            let low = widen(first);
            match second {
                Some(second) => _mm512_or_si512(low, _mm512_slli_epi32(widen(second), 16)),
                None => low,
            }
        }
    }

    /// Transposes 16 × 16 32-bit lanes in place.
    #[target_feature(enable = "avx512f")]
    fn transpose16(rows: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
        }
        for i in 0..4 {
            rows[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            rows[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            rows[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            rows[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for half in 0..2 {
            for j in 0..4 {
                let (x, y) = (rows[8 * half + j], rows[8 * half + j + 4]);
                t[8 * half + j] = _mm512_shuffle_i32x4(x, y, 0x88);
                t[8 * half + j + 4] = _mm512_shuffle_i32x4(x, y, 0xdd);
            }
        }
        for j in 0..8 {
            rows[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
            rows[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
        }
    }

    /// Stores 16 tile rows (64 bytes each) at `panel[at..]`.
    ///
    /// # Safety
    /// AVX-512 F; `panel` holds `at + TILE_ELEMS` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile(rows: &[__m512i; 16], panel: &mut [u16], at: usize) {
        assert!(panel.len() >= at + TILE_ELEMS);
        for (r, row) in rows.iter().enumerate() {
            // SAFETY: 32 u16 at `at + r·32` lie inside the tile checked above.
            unsafe { _mm512_storeu_si512(panel.as_mut_ptr().add(at + r * TILE_K).cast(), *row) };
        }
    }

    /// `super::pack_rows`'s panels of rows `first..first + rows`, 16 a panel, for a
    /// view contiguous along rows or along columns. Every value of the panels is
    /// written (zero past the matrix).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/BF16; the view holds the rows `first..first + rows` and columns
    /// `0..k`, with `col_stride` or `row_stride` 1; `panels` holds exactly ⌈rows / 16⌉
    /// panels of `k_steps` tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pack_rows_panels<T: Element>(
        a: MatRef<'_, T>,
        (first, rows): (usize, usize),
        k: usize,
        k_steps: usize,
        panels: &mut [u16],
    ) {
        let data = a.data.as_ptr();
        let panel_len = k_steps * TILE_ELEMS;
        let mut tile = [_mm512_setzero_si512(); 16];
        if a.col_stride == 1 {
            // Each row's 32 values of a step are contiguous: one tile row.
            for (index, panel) in panels.chunks_mut(panel_len).enumerate() {
                let first = first + index * TILE;
                let rows = TILE.min(rows - index * TILE);
                for step in 0..k_steps {
                    let k0 = step * TILE_K;
                    let len = TILE_K.min(k.saturating_sub(k0));
                    for (r, row) in tile.iter_mut().enumerate() {
                        *row = if r < rows && len > 0 {
                            // SAFETY: row first + r, columns k0..k0 + len, in the view.
                            unsafe { run32(data.add((first + r) * a.row_stride + k0), len) }
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    // SAFETY: the panel holds k_steps tiles.
                    unsafe { store_tile(&tile, panel, step * TILE_ELEMS) };
                }
            }
            return;
        }
        // Each k's row values are contiguous: pair them along k, then turn the pairs
        // (rows of the transposed tile) into tile rows. Steps outside, panels inside, so
        // that each k's values are read in one sweep.
        for step in 0..k_steps {
            let k0 = step * TILE_K;
            for (index, panel) in panels.chunks_mut(panel_len).enumerate() {
                let first = first + index * TILE;
                let rows = TILE.min(rows - index * TILE);
                for (pair, units) in tile.iter_mut().enumerate() {
                    let kk = k0 + 2 * pair;
                    *units = if kk < k {
                        let at = |kk: usize| data.wrapping_add(kk * a.col_stride + first);
                        let second = (kk + 1 < k).then(|| at(kk + 1));
                        // SAFETY: rows first..first + rows at k and k + 1, in the view.
                        unsafe { pairs16(at(kk), second, rows) }
                    } else {
                        _mm512_setzero_si512()
                    };
                }
                transpose16(&mut tile);
                // SAFETY: the panel holds k_steps tiles.
                unsafe { store_tile(&tile, panel, step * TILE_ELEMS) };
            }
        }
    }

    /// `super::pack_columns`'s panels of columns `first..first + cols`, 16 a panel, in
    /// AMX's pair layout, for a view contiguous along rows or along columns.
    ///
    /// # Safety
    /// As [`pack_rows_panels`], for the columns `first..first + cols` and rows `0..k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pack_columns_panels<T: Element>(
        b: MatRef<'_, T>,
        (first, cols): (usize, usize),
        k: usize,
        k_steps: usize,
        panels: &mut [u16],
    ) {
        let data = b.data.as_ptr();
        let panel_len = k_steps * TILE_ELEMS;
        let mut tile = [_mm512_setzero_si512(); 16];
        if b.row_stride == 1 {
            // Each column's 32 values of a step are contiguous: its 16 pairs, turned
            // into the tile's rows.
            for (index, panel) in panels.chunks_mut(panel_len).enumerate() {
                let first = first + index * TILE;
                let cols = TILE.min(cols - index * TILE);
                for step in 0..k_steps {
                    let k0 = step * TILE_K;
                    let len = TILE_K.min(k.saturating_sub(k0));
                    for (c, units) in tile.iter_mut().enumerate() {
                        *units = if c < cols && len > 0 {
                            // SAFETY: column first + c, rows k0..k0 + len, in the view.
                            unsafe { run32(data.add((first + c) * b.col_stride + k0), len) }
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    transpose16(&mut tile);
                    // SAFETY: the panel holds k_steps tiles.
                    unsafe { store_tile(&tile, panel, step * TILE_ELEMS) };
                }
            }
            return;
        }
        // Each k's column values are contiguous: a pair of them is a tile row. Steps
        // outside, panels inside, as in `pack_rows_panels`.
        for step in 0..k_steps {
            let k0 = step * TILE_K;
            for (index, panel) in panels.chunks_mut(panel_len).enumerate() {
                let first = first + index * TILE;
                let cols = TILE.min(cols - index * TILE);
                for (pair, row) in tile.iter_mut().enumerate() {
                    let kk = k0 + 2 * pair;
                    *row = if kk < k {
                        let at = |kk: usize| data.wrapping_add(kk * b.row_stride + first);
                        let second = (kk + 1 < k).then(|| at(kk + 1));
                        // SAFETY: columns first..first + cols at k and k + 1, in the view.
                        unsafe { pairs16(at(kk), second, cols) }
                    } else {
                        _mm512_setzero_si512()
                    };
                }
                // SAFETY: the panel holds k_steps tiles.
                unsafe { store_tile(&tile, panel, step * TILE_ELEMS) };
            }
        }
    }

    /// `out[i] = bf16(src[i])` for lengths that are multiples of 16, rounding to nearest
    /// even as [`super::to_bf16`] does.
    ///
    /// # Safety
    /// The CPU must have avx512f and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn convert(src: &[f32], out: &mut [u16]) {
        for (src, out) in src.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            // SAFETY: 16 floats are read from `src` and 16 u16 written to `out`.
            unsafe {
                let values = _mm512_loadu_ps(src.as_ptr());
                let converted: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(values));
                _mm256_storeu_si256(out.as_mut_ptr().cast(), converted);
            }
        }
    }

    /// Rows of the block whose accumulators are held in registers at once: 8 rows × 2
    /// vectors = 16 of the 32 zmm registers, enough independent `vdpbf16ps` chains to
    /// hide its latency, while each pair of B vectors loaded serves 16 of them.
    const ROWS: usize = 8;

    /// The same 512 bits as 32 bf16: the dot-product intrinsics take `__m512bh`, loads
    /// and broadcasts give `__m512i`.
    #[inline(always)]
    fn as_bf16(bits: __m512i) -> __m512bh {
        // SAFETY: both types are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(bits) }
    }

    /// The same block as the AMX kernel: per pair of `k`, the two 16-column B vectors
    /// are loaded once and multiplied with 8 rows' broadcast A pairs into 16 accumulators.
    /// Each output's sum runs over `k` in order, as the AMX kernel's does.
    ///
    /// # Safety
    /// The CPU must have avx512f and avx512bf16; each panel holds `k_steps` tiles; `out`
    /// addresses 32 rows of 32 writable floats `row_stride` apart.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(
        k_steps: usize,
        a: [&[u16]; 2],
        b: [&[u16]; 2],
        out: *mut f32,
        row_stride: usize,
    ) {
        let (b_left, b_right) = (b[0].as_ptr(), b[1].as_ptr());
        for (half, a_panel) in a.iter().enumerate() {
            let a_panel = a_panel.as_ptr();
            for group in 0..TILE / ROWS {
                let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
                for step in 0..k_steps {
                    let offset = step * TILE_ELEMS;
                    for pair in 0..TILE_K / 2 {
                        let b_at = offset + pair * TILE_K;
                        // SAFETY: 32 u16 at b_at lie inside each panel (step < k_steps,
                        // pair < 16).
                        let (left, right) = unsafe {
                            (
                                as_bf16(_mm512_loadu_si512(b_left.add(b_at).cast())),
                                as_bf16(_mm512_loadu_si512(b_right.add(b_at).cast())),
                            )
                        };
                        for (row, sums) in sums.iter_mut().enumerate() {
                            let a_at = offset + (group * ROWS + row) * TILE_K + 2 * pair;
                            // SAFETY: the pair at a_at lies inside the panel's tile.
                            let bits = unsafe { a_panel.add(a_at).cast::<i32>().read_unaligned() };
                            let a_pair = as_bf16(_mm512_set1_epi32(bits));
                            sums[0] = _mm512_dpbf16_ps(sums[0], left, a_pair);
                            sums[1] = _mm512_dpbf16_ps(sums[1], right, a_pair);
                        }
                    }
                }
                for (row, sums) in sums.iter().enumerate() {
                    let at = (half * TILE + group * ROWS + row) * row_stride;
                    // SAFETY: 32 floats from `at` lie inside `out` (the caller's guarantee).
                    unsafe {
                        _mm512_storeu_ps(out.add(at), sums[0]);
                        _mm512_storeu_ps(out.add(at + TILE), sums[1]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
        let widen = |x: f32| f32::from_bits(u32::from(to_bf16(x)) << 16);
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0f64;
                for kk in 0..k {
                    sum += f64::from(widen(a.at(i, kk))) * f64::from(widen(b.at(kk, j)));
                }
                c[i * n + j] = sum as f32;
            }
        }
        c
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32::from_bits(u32::from(to_bf16(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn products_match_bf16_rounded_inputs_on_every_unit_of_this_cpu() {
        let mut units = vec![];
        if let Some(unit) = unit() {
            units.push(unit);
            if unit == Bf16Unit::Amx
                && std::is_x86_feature_detected!("avx512bf16")
                && std::is_x86_feature_detected!("avx512f")
            {
                units.push(Bf16Unit::Avx512);
            }
        }
        if units.is_empty() {
            eprintln!("no bf16 unit on this CPU: nothing to compare");
            return;
        }
        let mut rng = crate::rng::Rng::new(7, 0);
        // Odd sizes cross every tile edge; the transposed view checks strides;
        // 200 × 150 spans more than one task of panels each way.
        for (m, n, k) in [
            (1, 1, 1),
            (37, 45, 70),
            (64, 33, 96),
            (5, 100, 31),
            (200, 150, 40),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect();
            // Each operand stored row-major or as its transpose: every packing path.
            let view = |data, rows, cols, stored_transposed| match stored_transposed {
                false => MatRef::row_major(data, cols),
                true => MatRef::transposed(data, rows),
            };
            let (a, b): (&'static [f32], &'static [f32]) =
                (Vec::leak(a.clone()), Vec::leak(b.clone()));
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let a_view = view(a, m, k, a_t);
                let b_view = view(b, k, n, b_t);
                let expected = reference(m, n, k, a_view, b_view);
                // The same B given as bf16 bits (a mapped bf16 weight) gives the same result.
                let b_bits: Vec<u16> = b_view.data.iter().map(|&x| to_bf16(x)).collect();
                let b_bits_view = MatRef {
                    data: b_bits.as_slice(),
                    row_stride: b_view.row_stride,
                    col_stride: b_view.col_stride,
                };
                for &unit in &units {
                    let mut c = vec![f32::NAN; m * n];
                    matmul(unit, (m, n, k), a_view, b_view, &mut c);
                    for (got, want) in c.iter().zip(&expected) {
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{unit:?} {m}×{n}×{k} (a_t {a_t}, b_t {b_t}): {got} vs {want}"
                        );
                    }
                    let mut from_bits = vec![f32::NAN; m * n];
                    matmul(unit, (m, n, k), a_view, b_bits_view, &mut from_bits);
                    assert_eq!(c, from_bits, "{unit:?}: bf16-bit input differs");
                }
            }
        }
    }
}
