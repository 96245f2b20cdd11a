//! Arbitrary segment lists (paths split by 0xFF, segments by 0xFE) through
//! `LockPath::new` and the key encoding: see
//! `mutextree_core::checks::path_keys`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mutextree_core::checks::path_keys(data));
