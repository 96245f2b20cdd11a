//! Arbitrary bytes as the text form and as a key: see
//! `mutextree_core::checks::path_text`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mutextree_core::checks::path_text(data));
