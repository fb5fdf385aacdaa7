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

/// `fused` and `composed` of the same `inputs` agree: outputs within `tolerance`, and
/// the gradients of every input under a random linear loss within 10 × `tolerance`.
pub fn assert_same_op(
    inputs: &[&Var],
    tolerance: f32,
    fused: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
) {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&tensors), composed(&tensors));
    let diff = max_diff(&a, &b);
    assert!(diff < tolerance, "outputs differ by {diff}");
    let weights = random(a.dims(), 99);
    let loss = |t: &Tensor| (t * weights.as_tensor()).unwrap().sum_all().unwrap();
    let (ga, gb) = (loss(&a).backward().unwrap(), loss(&b).backward().unwrap());
    for (index, input) in inputs.iter().enumerate() {
        let diff = max_diff(
            ga.get(input.as_tensor()).unwrap(),
            gb.get(input.as_tensor()).unwrap(),
        );
        assert!(
            diff < 10.0 * tolerance,
            "gradient of input {index} differs by {diff}"
        );
    }
}

/// `analytic`, the gradient of `loss` at `x`, agrees with central finite differences
/// of `loss` at the coordinates `indices`.
pub fn assert_finite_differences(
    name: &str,
    x: &Tensor,
    analytic: &Tensor,
    indices: &[usize],
    loss: impl Fn(&Tensor) -> f64,
) {
    let analytic = analytic.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eps = 1e-2f32;
    for &index in indices {
        let at = |delta: f32| {
            let mut moved = base.clone();
            moved[index] += delta;
            loss(&Tensor::from_vec(moved, x.shape(), x.device()).unwrap())
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
        let error = (numeric - f64::from(analytic[index])).abs();
        assert!(
            error < 2e-3 * numeric.abs().max(1.0),
            "{name}[{index}]: analytic {} numeric {numeric}",
            analytic[index]
        );
    }
}

/// `sum(y ⊙ probe)` as an f64: a linear loss for finite differences.
pub fn linear_loss(y: &Tensor, probe: &Tensor) -> f64 {
    f64::from(
        (y * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
}
