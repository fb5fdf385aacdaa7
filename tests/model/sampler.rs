//! The token sampler (`SamplingOptions::sample`) on fixed logits: greedy is the argmax,
//! a seed gives a pinned sequence of draws, top-k and top-p keep exactly the right
//! tokens, and the draws follow the tempered probabilities.

use trainyard::generate::SamplingOptions;
use trainyard::rng::Rng;

fn sampler(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingOptions {
    SamplingOptions {
        temperature,
        top_k,
        top_p,
        ..SamplingOptions::default()
    }
}

/// How often each id comes up in `draws` samples of `logits`.
fn frequencies(options: &SamplingOptions, logits: &[f32], draws: usize) -> Vec<f64> {
    let mut rng = Rng::new(3, 0);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[options.sample(logits, &mut rng) as usize] += 1;
    }
    counts.iter().map(|&n| n as f64 / draws as f64).collect()
}

#[test]
fn greedy_and_top_k_1_pick_the_argmax_and_ignore_the_seed() {
    let logits = [0.5, 2.0, f32::NEG_INFINITY, 2.0, -1.0];
    for seed in 0..20 {
        let mut rng = Rng::new(seed, 0);
        // Ties go to the lower id.
        assert_eq!(sampler(0.0, None, None).sample(&logits, &mut rng), 1);
        assert_eq!(sampler(0.9, Some(1), None).sample(&logits, &mut rng), 1);
    }
    let banned = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
    assert_eq!(frequencies(&sampler(5.0, None, None), &banned, 100)[1], 1.0);
}

#[test]
fn a_seed_gives_a_pinned_sequence_of_draws() {
    // The reproducibility contract of `--seed`: change these only on purpose.
    let logits = [1.0, 0.5, 0.0, -0.5, 2.0, 1.5, 0.25, -1.0];
    let draws = |options: SamplingOptions| {
        let mut rng = Rng::new(42, 0);
        (0..12)
            .map(|_| options.sample(&logits, &mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        draws(sampler(1.0, None, None)),
        [4, 1, 1, 0, 6, 2, 3, 1, 5, 2, 5, 5]
    );
    // Top 4 of 8, then the nucleus cuts id 1: p = 0.75 of the whole distribution.
    assert_eq!(
        draws(sampler(0.8, Some(4), Some(0.75))),
        [5, 4, 4, 4, 0, 4, 4, 4, 5, 4, 5, 0]
    );
}

#[test]
fn top_p_keeps_the_smallest_set_that_reaches_p() {
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let nucleus = frequencies(&sampler(1.0, None, Some(0.7)), &logits, 20_000);
    assert_eq!(nucleus[2], 0.0, "{nucleus:?}");
    assert!((nucleus[0] - 0.5 / 0.8).abs() < 0.02, "{nucleus:?}");
    let wider = frequencies(&sampler(1.0, None, Some(0.85)), &logits, 20_000);
    assert!(wider[2] > 0.15, "{wider:?}");
    let top = frequencies(&sampler(1.0, None, Some(0.1)), &logits, 1_000);
    assert_eq!(top[0], 1.0, "at least the most likely token: {top:?}");
    let top_2 = frequencies(&sampler(1.0, Some(2), None), &logits, 1_000);
    assert_eq!(top_2[2], 0.0, "{top_2:?}");
}

#[test]
fn frequencies_match_the_tempered_probabilities() {
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), f32::NEG_INFINITY];
    let plain = frequencies(&sampler(1.0, None, None), &logits, 50_000);
    // Temperature 2 flattens: probabilities ∝ sqrt(p).
    let roots = [0.5f64.sqrt(), 0.3f64.sqrt(), 0.2f64.sqrt()];
    let sum: f64 = roots.iter().sum();
    let hot = frequencies(&sampler(2.0, None, None), &logits, 50_000);
    for (id, p) in [0.5, 0.3, 0.2].into_iter().enumerate() {
        assert!((plain[id] - p).abs() < 0.01, "{plain:?}");
        assert!((hot[id] - roots[id] / sum).abs() < 0.01, "{hot:?}");
    }
    assert_eq!(plain[3], 0.0);
}
