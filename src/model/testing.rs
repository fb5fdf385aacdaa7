//! Helpers shared by the unit tests of the model's ops.

use candle_core::{DType, Device, Tensor, Var};

/// A variable of `shape` with values uniform in [-1, 1) from `seed`.
pub fn random(shape: &[usize], seed: u64) -> Var {
    let mut rng = crate::rng::Rng::new(seed, 0);
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
        .collect();
    Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
}

/// max |a − b| (of f32 or f64 tensors).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// [`random`] as an f64 tensor.
pub fn random_f64(shape: &[usize], seed: u64) -> Tensor {
    random(shape, seed).to_dtype(DType::F64).unwrap()
}
