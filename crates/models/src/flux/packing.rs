//! FLUX sees the VAE latent as a sequence of 2×2 patches: (B, C, H, W) ↔ (B, H/2·W/2, 4C), patches
//! row-major, each patch's features ordered (channel, dy, dx).

use candle_core::{Result, Tensor};

/// (batch, channels, height, width) → (batch, height/2 · width/2, channels·4). Height and width
/// must be even.
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("pack_latents: latent of {h}×{w}, expected even sides");
    }
    latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack_latents`]: `grid` is the packed (rows, cols), i.e. half the latent size.
pub fn unpack_latents(packed: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
    let (b, n, f) = packed.dims3()?;
    let (gh, gw) = grid;
    if n != gh * gw || f % 4 != 0 {
        candle_core::bail!("unpack_latents: packed shape ({b}, {n}, {f}) does not fit a {gh}×{gw} grid of 2×2 patches");
    }
    packed
        .reshape((b, gh, gw, f / 4, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, f / 4, gh * 2, gw * 2))
}

/// The packed grid of an image of `height`×`width` pixels for a VAE that downsamples by `factor`
/// (FluxPipeline rounds each side down to a multiple of 2·factor).
pub fn packed_grid(height: usize, width: usize, factor: usize) -> (usize, usize) {
    (height / (2 * factor), width / (2 * factor))
}
