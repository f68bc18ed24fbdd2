//! Matrix products whose output is eight columns wide (f32), as attention's value and gradient
//! products are for heads of width 8.
//!
//! The `gemm` crate's kernels tile the output by 16-lane vectors, so a product eight wide runs
//! its narrowest kernel with half of every vector idle: measured 25 µs for (64 × 1024)·(1024 × 8)
//! against 10.5 µs here, where each output row is one 8-lane vector that every step of the
//! inner dimension updates with a broadcast of the left operand.

/// Output columns this kernel covers.
pub(crate) const WIDTH: usize = 8;
/// Output rows per pass over the inner dimension: eight accumulators hide the FMA latency.
const ROWS: usize = 8;

/// True when the CPU runs the kernel (AVX2 with FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst (m × 8) = [dst +] a (m × k) · b (k × 8)`, with `a[i, j]` at `a + i·a_rs + j·a_cs`, row
/// `j` of `b` contiguous at `b + j·b_rs`, row `i` of `dst` at `dst + i·dst_rs`.
///
/// # Safety
/// [`available`] must be true, every pointer must address the elements its strides reach for
/// these sizes, and nothing else may access `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    m: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs): (*const f32, usize),
) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut i = 0;
        while i + ROWS <= m {
            rows_fma::<ROWS>(i, k, dst, dst_rs, accumulate, (a, a_rs, a_cs), (b, b_rs));
            i += ROWS;
        }
        while i < m {
            rows_fma::<1>(i, k, dst, dst_rs, accumulate, (a, a_rs, a_cs), (b, b_rs));
            i += 1;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, k, dst, dst_rs, accumulate, a, a_rs, a_cs, b, b_rs);
        unreachable!("narrow::product without narrow::available()");
    }
}

/// Output rows `i0..i0 + R` of [`product`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_fma<const R: usize>(
    i0: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs): (*const f32, usize),
) {
    let mut acc = [[0f32; WIDTH]; R];
    for j in 0..k {
        let bj = &*(b.add(j * b_rs) as *const [f32; WIDTH]);
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = *a.add((i0 + r) * a_rs + j * a_cs);
            for c in 0..WIDTH {
                acc[c] = x.mul_add(bj[c], acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = &mut *(dst.add((i0 + r) * dst_rs) as *mut [f32; WIDTH]);
        for c in 0..WIDTH {
            row[c] = if accumulate { row[c] + acc[c] } else { acc[c] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the plain triple loop in f64, for a left operand read row-wise and transposed,
    /// a row count with a partial last group, padded row strides and accumulation.
    #[test]
    fn product_matches_the_definition() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2 with FMA, and the kernel does not run");
            return;
        }
        let (m, k) = (19, 37);
        let value = |i: usize| ((i * 7919 % 101) as f32 - 50.0) / 25.0;
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let b_rs = WIDTH + 3;
        let b: Vec<f32> = (0..k * b_rs).map(|i| value(i + 5)).collect();
        let dst_rs = WIDTH + 5;
        for (transposed, accumulate) in [(false, false), (true, false), (false, true)] {
            // Row-wise: a[i, j] at i·k + j; transposed: the same buffer read as (k × m)ᵀ.
            let (a_rs, a_cs) = if transposed { (1, m) } else { (k, 1) };
            let start: Vec<f32> = (0..m * dst_rs).map(|i| value(i + 11)).collect();
            let mut dst = start.clone();
            // SAFETY: the buffers hold every element these strides reach.
            unsafe {
                product(
                    m,
                    k,
                    dst.as_mut_ptr(),
                    dst_rs,
                    accumulate,
                    (a.as_ptr(), a_rs, a_cs),
                    (b.as_ptr(), b_rs),
                );
            }
            for i in 0..m {
                for c in 0..dst_rs {
                    let got = dst[i * dst_rs + c];
                    if c >= WIDTH {
                        assert_eq!(got, start[i * dst_rs + c], "wrote outside the output");
                        continue;
                    }
                    let mut want: f64 = (0..k)
                        .map(|j| a[i * a_rs + j * a_cs] as f64 * b[j * b_rs + c] as f64)
                        .sum();
                    if accumulate {
                        want += start[i * dst_rs + c] as f64;
                    }
                    assert!(
                        (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "({i}, {c}), transposed {transposed}, accumulate {accumulate}: \
                         {got} vs {want}"
                    );
                }
            }
        }
    }
}
