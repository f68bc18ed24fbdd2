//! A convolution's shape and its patch matrix (im2col), with the adjoint (col2im): shared by the
//! per-image product of frozen kernels ([`super::conv`]) and the batched one of trained kernels
//! ([`crate::conv`]).
//!
//! Row (c, i, j) of the matrix, in the kernel's (c_in, k_h, k_w) order, holds for every image b
//! and output pixel (y, x) the input (b, c, y·s + i − p, x·s + j − p), zero outside the image;
//! columns run over (b, y, x). Each row is built from contiguous copies of input rows.

use std::ops::Range;

use candle_core::{Result, WithDType};
use rayon::prelude::*;

/// Shape of one 2-D convolution: input (batch, c_in, h, w), kernel (c_out, c_in, k_h, k_w),
/// the same stride and padding on both axes, no dilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// The geometry of `input` (B, C, H, W) under `kernel` (C_out, C, k_h, k_w), or an error
    /// naming both shapes when they do not fit.
    pub fn new(input: &[usize], kernel: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let fits = input.len() == 4
            && kernel.len() == 4
            && kernel[1] == input[1]
            && stride > 0
            && input[2] + 2 * padding >= kernel[2]
            && input[3] + 2 * padding >= kernel[3];
        if !fits {
            candle_core::bail!(
                "conv2d: input {input:?}, kernel {kernel:?}, stride {stride}, padding {padding}"
            );
        }
        Ok(Self {
            batch: input[0],
            c_in: input[1],
            h: input[2],
            w: input[3],
            c_out: kernel[0],
            k_h: kernel[2],
            k_w: kernel[3],
            stride,
            padding,
        })
    }

    /// The same convolution on one image of the batch.
    pub fn one_image(self) -> Self {
        Self { batch: 1, ..self }
    }

    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k_h) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k_w) / self.stride + 1
    }

    /// Output pixels of one image.
    pub fn pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Rows of the patch matrix: (c_in, kernel row, kernel column).
    pub fn rows(&self) -> usize {
        self.c_in * self.k_h * self.k_w
    }

    /// Columns: (image, output row, output column).
    pub fn cols(&self) -> usize {
        self.batch * self.pixels()
    }

    /// Elements of the input batch.
    pub fn input_len(&self) -> usize {
        self.batch * self.c_in * self.h * self.w
    }

    /// Calls `f(offset in the row, offset in the input, length)` for every in-image piece of
    /// patch row `r`: output row `y` of image `b` reads input row `y·s + i − p`, its output
    /// columns whose input column `x·s + j − p` lies inside the image. With stride > 1 the
    /// piece's input elements are `stride` apart.
    fn for_each_piece(&self, r: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (c, i, j) = (
            r / (self.k_h * self.k_w),
            (r / self.k_w) % self.k_h,
            r % self.k_w,
        );
        let cols = self.valid_cols(j);
        if cols.is_empty() {
            return;
        }
        let (s, p, ow) = (self.stride, self.padding, self.out_w());
        for b in 0..self.batch {
            let plane = (b * self.c_in + c) * self.h * self.w;
            for y in 0..self.out_h() {
                let iy = y * s + i;
                if iy < p || iy - p >= self.h {
                    continue;
                }
                let dst = (b * self.out_h() + y) * ow + cols.start;
                let src = plane + (iy - p) * self.w + cols.start * s + j - p;
                f(dst, src, cols.len());
            }
        }
    }

    /// The output columns `x` whose input column `x·stride + j − padding` is inside the image.
    fn valid_cols(&self, j: usize) -> Range<usize> {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(j).div_ceil(s);
        let hi = (self.w + p).saturating_sub(j).div_ceil(s).min(self.out_w());
        lo..hi.max(lo)
    }

    /// Patch row `r` of the batch `x` into `row` (`cols()` elements).
    fn fill_row<T: WithDType>(&self, r: usize, x: &[T], row: &mut [T]) {
        let s = self.stride;
        // The pieces come in increasing order: zero the gaps between them, each element once.
        let mut filled = 0;
        self.for_each_piece(r, |dst, src, len| {
            row[filled..dst].fill(T::zero());
            filled = dst + len;
            let dst = &mut row[dst..dst + len];
            if s == 1 {
                dst.copy_from_slice(&x[src..src + len]);
            } else {
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = x[src + k * s];
                }
            }
        });
        row[filled..].fill(T::zero());
    }

    /// The patch matrix of the batch `x` into `col` (`rows() × cols()`), rows on the thread
    /// pool when the matrix is large.
    pub fn im2col_into<T: WithDType>(&self, x: &[T], col: &mut [T]) {
        let n = self.cols();
        assert!(x.len() >= self.input_len() && col.len() >= self.rows() * n);
        let col = &mut col[..self.rows() * n];
        if col.len() >= super::PARALLEL_MIN_ELEMENTS && candle_core::utils::get_num_threads() > 1 {
            col.par_chunks_exact_mut(n)
                .enumerate()
                .for_each(|(r, row)| self.fill_row(r, x, row));
        } else {
            for (r, row) in col.chunks_exact_mut(n).enumerate() {
                self.fill_row(r, x, row);
            }
        }
    }

    /// The patch matrix of the batch `x`.
    pub fn im2col<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let mut col = vec![T::zero(); self.rows() * self.cols()];
        self.im2col_into(x, &mut col);
        col
    }

    /// The adjoint of [`im2col`](Self::im2col): every matrix entry added back to its pixel.
    pub fn col2im<T: WithDType>(&self, col: &[T]) -> Vec<T> {
        let mut x = vec![T::zero(); self.input_len()];
        self.col2im_add(col, &mut x);
        x
    }

    /// Adds every entry of `col` (`rows() × cols()`) to its pixel of `x`; for one image, input
    /// channels on the thread pool when the matrix is large (each channel's rows land in its
    /// own plane only).
    pub fn col2im_add<T: WithDType>(&self, col: &[T], x: &mut [T]) {
        let n = self.cols();
        assert!(x.len() >= self.input_len() && col.len() >= self.rows() * n);
        let (col, x) = (&col[..self.rows() * n], &mut x[..self.input_len()]);
        let taps = self.k_h * self.k_w;
        let plane = self.h * self.w;
        let parallel = self.batch == 1
            && col.len() >= super::PARALLEL_MIN_ELEMENTS
            && candle_core::utils::get_num_threads() > 1;
        if parallel {
            x.par_chunks_exact_mut(plane)
                .zip(col.par_chunks_exact(taps * n))
                .enumerate()
                .for_each(|(c, (x, rows))| {
                    for (t, row) in rows.chunks_exact(n).enumerate() {
                        self.add_row(c * taps + t, row, x, c * plane);
                    }
                });
        } else {
            for (r, row) in col.chunks_exact(n).enumerate() {
                self.add_row(r, row, x, 0);
            }
        }
    }

    /// Adds patch row `r` to `x`, which starts at element `origin` of the input.
    fn add_row<T: WithDType>(&self, r: usize, row: &[T], x: &mut [T], origin: usize) {
        let s = self.stride;
        self.for_each_piece(r, |dst, src, len| {
            let (seg, src) = (&row[dst..dst + len], src - origin);
            if s == 1 {
                let out = &mut x[src..src + len];
                out.iter_mut().zip(seg).for_each(|(o, &v)| *o += v);
            } else {
                for (k, &v) in seg.iter().enumerate() {
                    x[src + k * s] += v;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patch matrix entry by entry from its definition.
    fn im2col_by_definition(g: &Geometry, x: &[f64]) -> Vec<f64> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut col = vec![0.0; g.rows() * g.cols()];
        for c in 0..g.c_in {
            for i in 0..g.k_h {
                for j in 0..g.k_w {
                    let r = (c * g.k_h + i) * g.k_w + j;
                    for b in 0..g.batch {
                        for y in 0..oh {
                            for xo in 0..ow {
                                let iy = (y * g.stride + i) as isize - g.padding as isize;
                                let ix = (xo * g.stride + j) as isize - g.padding as isize;
                                let inside = (0..g.h as isize).contains(&iy)
                                    && (0..g.w as isize).contains(&ix);
                                if inside {
                                    let at = ((b * g.c_in + c) * g.h + iy as usize) * g.w;
                                    col[r * g.cols() + (b * oh + y) * ow + xo] =
                                        x[at + ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        col
    }

    #[test]
    fn im2col_matches_its_definition_and_col2im_is_its_adjoint() {
        for (input, kernel, stride, padding) in [
            ([2, 3, 5, 6], [4, 3, 3, 3], 2, 1),
            ([1, 2, 7, 7], [2, 2, 3, 3], 1, 1),
            ([2, 2, 6, 5], [3, 2, 1, 3], 1, 0),
            ([1, 1, 4, 4], [1, 1, 5, 5], 1, 2),
            ([3, 2, 10, 9], [2, 2, 3, 2], 3, 1),
            ([1, 3, 2, 2], [1, 3, 3, 3], 1, 1),
        ] {
            let g = Geometry::new(&input, &kernel, stride, padding).unwrap();
            let x: Vec<f64> = (0..g.input_len())
                .map(|i| (i as f64 * 0.37).sin())
                .collect();
            assert_eq!(g.im2col(&x), im2col_by_definition(&g, &x), "{g:?}");
            let c: Vec<f64> = (0..g.rows() * g.cols())
                .map(|i| (i as f64 * 0.11).cos())
                .collect();
            let lhs: f64 = g.im2col(&x).iter().zip(&c).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&g.col2im(&c)).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-12, "{g:?}: {lhs} vs {rhs}");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        for (input, kernel, stride) in [
            (vec![1, 3, 5, 5], vec![2, 4, 3, 3], 1),
            (vec![1, 3, 2, 2], vec![2, 3, 5, 5], 1),
            (vec![1, 3, 5, 5], vec![2, 3, 3, 3], 0),
            (vec![3, 5, 5], vec![2, 3, 3, 3], 1),
        ] {
            let err = Geometry::new(&input, &kernel, stride, 0).unwrap_err();
            assert!(err.to_string().contains("conv2d: input"), "{err}");
        }
    }
}
