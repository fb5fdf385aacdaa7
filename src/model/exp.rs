//! `exp` for the training kernels' softmaxes and sigmoids, and the row reductions
//! (maximum, sums) of their softmaxes and norms. `exp` is one polynomial (Cephes'
//! `expf`, ~1 ulp), run over whole slices with the widest vectors the CPU has
//! (AVX-512, AVX2 + FMA, or one value at a time), picked at run time. Every path does
//! the same fused multiply-adds in the same order, so the bits are the same on every
//! CPU and thread count. libm's `expf` is called once per value and was the largest
//! single cost of a training step after the products (16 million calls a step for a
//! 4,096-token vocabulary at 2,048 positions).

use std::sync::OnceLock;

/// Inputs below this give 0 (`exp(-87.34)` is the smallest normal f32).
const LOWEST: f32 = -87.33;
/// 1.5 · 2^23: floats from 2^23 to 2^24 are the integers.
const MAGIC: f32 = 12_582_912.0;
/// Inputs above this are clamped to it (`exp(88.37)` ≈ 2.6e38, just below f32's max).
const HIGHEST: f32 = 88.37;

/// `e^x` as [`exp_in_place`] computes it, for one value.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Comparisons rather than min/max, so that NaN stays NaN.
    let clamped = if x > HIGHEST { HIGHEST } else { x };
    let clamped = if clamped < LOWEST { LOWEST } else { clamped };
    // Adding 1.5·2^23 rounds x·log2(e) to the nearest integer n (ties to even) and
    // leaves n in the low mantissa bits: no float-to-int conversion, which compilers
    // do not vectorise with Rust's saturating semantics.
    let shifted = clamped.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = shifted - MAGIC;
    // x − n·ln 2 in two parts (Cody–Waite), exact enough for |r| ≤ ln 2 / 2.
    let r = (-n).mul_add(0.693_359_4, clamped);
    let r = (-n).mul_add(-2.121_944_4e-4, r);
    let p = 1.987_569_2e-4_f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 0.166_666_65)
        .mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // 2^n from its exponent bits: n is in -126..=127 after the clamp (NaN stays NaN
    // through `e`).
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < LOWEST { 0.0 } else { e * scale }
}

/// The largest of `values` (NaN ignored, as by `f32::max`; −∞ when empty), over 16
/// lanes: a single running maximum waits on each comparison in turn (its latency per
/// value), and the softmaxes take the maximum of every row first.
pub fn max_of(values: &[f32]) -> f32 {
    on_widest(|| {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut blocks = values.chunks_exact(16);
        for block in &mut blocks {
            for (lane, &value) in lanes.iter_mut().zip(block) {
                *lane = lane.max(value);
            }
        }
        let rest = blocks.remainder().iter().copied();
        lanes
            .into_iter()
            .chain(rest)
            .fold(f32::NEG_INFINITY, f32::max)
    })
}

/// The sum of `values` over 16 lanes added in a fixed order (vectorised, and the same
/// bits on every CPU), where a single running sum waits on each addition in turn.
pub fn sum_of(values: &[f32]) -> f32 {
    on_widest(|| sum_of_lanes(values, |value| value))
}

/// The sum of the squares of `values`, in the lanes and order of [`sum_of`].
pub fn sum_of_squares(values: &[f32]) -> f32 {
    on_widest(|| sum_of_lanes(values, |value| value * value))
}

#[inline(always)]
fn sum_of_lanes(values: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut blocks = values.chunks_exact(16);
    for block in &mut blocks {
        for (lane, &value) in lanes.iter_mut().zip(block) {
            *lane += term(value);
        }
    }
    let rest: f32 = blocks.remainder().iter().map(|&value| term(value)).sum();
    lanes.iter().sum::<f32>() + rest
}

/// Runs `work` compiled for the widest vectors this CPU has. The lanes of the
/// reductions above are the same on every path (no fused multiply-add is formed from
/// separate operations), so the bits are too.
#[inline(always)]
fn on_widest<R>(work: impl FnOnce() -> R) -> R {
    match width() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `width` saw AVX-512 F on this CPU.
        Width::Avx512 => unsafe { on_avx512(work) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `width` saw AVX2 and FMA on this CPU.
        Width::Avx2 => unsafe { on_avx2(work) },
        Width::Scalar => work(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn on_avx512<R>(work: impl FnOnce() -> R) -> R {
    work()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<R>(work: impl FnOnce() -> R) -> R {
    work()
}

/// `values[i] = e^values[i]`.
pub fn exp_in_place(values: &mut [f32]) {
    match width() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `width` saw AVX-512 F on this CPU.
        Width::Avx512 => unsafe { exp_avx512(values) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `width` saw AVX2 and FMA on this CPU.
        Width::Avx2 => unsafe { exp_avx2(values) },
        Width::Scalar => values.iter_mut().for_each(|v| *v = exp(*v)),
    }
}

#[derive(Clone, Copy)]
enum Width {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

fn width() -> Width {
    static WIDTH: OnceLock<Width> = OnceLock::new();
    *WIDTH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                return Width::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Width::Avx2;
            }
        }
        Width::Scalar
    })
}

/// The loop of [`exp`], which the compiler vectorises with the features enabled here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_avx512(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = exp(*v));
}

/// As [`exp_avx512`], eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = exp(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane reductions give the maximum, sum and sum of squares of slices of every
    /// length around their 16-lane blocks (the maximum exactly, NaN ignored).
    #[test]
    fn row_reductions_cover_every_value() {
        for len in [0usize, 1, 15, 16, 17, 33, 1000] {
            let values: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&values), max, "len {len}");
            let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let squares: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            assert!((f64::from(sum_of(&values)) - sum).abs() < 1e-3, "len {len}");
            assert!(
                (f64::from(sum_of_squares(&values)) - squares).abs() < 1e-2,
                "len {len}"
            );
        }
        let mut with_nan = vec![1.0f32; 40];
        with_nan[3] = f32::NAN;
        with_nan[37] = 2.5;
        assert_eq!(max_of(&with_nan), 2.5);
    }

    /// Within 2 ulp-ish (relative 4e-7) of f64's exp over the range softmaxes use, 0
    /// below it, NaN kept; the vector paths give the bits of the one-value path.
    #[test]
    fn matches_f64_exp_and_every_path_gives_the_same_bits() {
        let inputs: Vec<f32> = (-900_000..=880_000).map(|i| i as f32 * 1e-4).collect();
        let mut vectorised = inputs.clone();
        exp_in_place(&mut vectorised);
        for (&x, &got) in inputs.iter().zip(&vectorised) {
            assert_eq!(got.to_bits(), exp(x).to_bits(), "exp({x}): paths differ");
            if x < LOWEST {
                assert_eq!(got, 0.0);
                continue;
            }
            let want = f64::from(x).exp();
            let relative = ((f64::from(got) - want) / want).abs();
            assert!(
                relative < 4e-7,
                "exp({x}) = {got}, want {want} ({relative:e})"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let mut eight_wide = inputs.clone();
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { exp_avx2(&mut eight_wide) };
            assert!(
                eight_wide
                    .iter()
                    .zip(&vectorised)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
        let mut special = [f32::NAN, f32::NEG_INFINITY, 0.0, -0.0, 1000.0];
        exp_in_place(&mut special);
        assert!(special[0].is_nan());
        assert_eq!(&special[1..4], &[0.0, 1.0, 1.0]);
        assert!(special[4].is_finite() && special[4] > 1e38);
    }
}
