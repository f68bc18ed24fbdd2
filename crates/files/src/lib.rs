//! Small pieces shared by the crates that write and read the project's files.
//!
//! - [`write_atomic`] (and [`write_atomic_with`], [`copy_atomic`]): a file is written to a
//!   temporary file beside the target, synced, renamed over the target, and the folder synced,
//!   so the target is always either its old content or the whole new one;
//! - [`ShardSpec`]: part `i` of `n` of a job split across processes, written `"i/n"` with
//!   1 ≤ i ≤ n, or `"auto"`: read from a Slurm job array or a Kubernetes Indexed Job;
//! - [`FolderLock`]: one writer per output folder, through a lock file holding the writer's
//!   process id and host;
//! - [`read_capped`]: a regular file of bounded size (never a device such as `/dev/zero`), and
//!   [`check_relative`] for paths written in files, which must stay inside their folder;
//! - [`pngtext`]: the text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG file, where generated images
//!   keep their prompt, seed and settings.

mod atomic;
mod lock;
pub mod pngtext;
mod read;
mod shard;

pub use atomic::{copy_atomic, write_atomic, write_atomic_with, WriteError};
pub use lock::{host_name, FolderLock, LockError, LockHolder, LOCK_FILE};
pub use pngtext::{parse_png_text, png_text_chunks, read_png_text, PngTextError};
pub use read::{check_relative, read_capped, read_text_capped, ReadError, MAX_IMAGE_BYTES};
pub use shard::{ParseShardError, ShardSpec};
