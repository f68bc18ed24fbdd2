#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = l2s_fuzz_targets::classifier_checkpoint(data);
});
