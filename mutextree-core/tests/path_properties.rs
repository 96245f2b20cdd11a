//! The fuzz targets' properties on stable: the committed seed corpus of each
//! target replayed, then a proptest over the same functions
//! (`mutextree_core::checks`), so `cargo test` checks what the fuzzer checks
//! without nightly.

use std::path::PathBuf;

use mutextree_core::checks::{encode_segment_lists, path_keys, path_text, replay_seeds};
use proptest::prelude::*;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

#[test]
fn path_text_seeds_hold() {
    replay_seeds(&corpus("path_text"), path_text);
}

#[test]
fn path_keys_seeds_hold() {
    replay_seeds(&corpus("path_keys"), path_keys);
}

/// Segments made of what breaks encodings: separators, escapes, wildcards,
/// unnormalised unicode, and the characters on either side of `/` in byte
/// order (`.` and `0`); or any string at all.
fn segment() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "A", "B", "AB", "/", "\\", "%", "%2F", "%25", "*", "?", "[", "]", "_", "{", "}", ":", ";", " ", ".", "..", "0",
        "\0", "\n", "\x7f", "\u{e9}", "e\u{301}", "🔒", "名前",
    ]);
    prop_oneof![
        4 => proptest::collection::vec(atoms, 0..5).prop_map(|parts| parts.concat()),
        1 => "\\PC{0,12}",
        1 => any::<String>(),
        1 => (1usize..300).prop_map(|n| "x".repeat(n)),
    ]
}

/// Text forms: the same atoms with `/` and `\` as they appear in text.
fn text() -> impl Strategy<Value = Vec<u8>> {
    let atoms = prop::sample::select(vec![
        "A", "B", "/", "//", "\\", "\\/", "\\\\", "\\x", "%", "%2F", "%25", "*?[]", "_", "{x}", ":", ".", "..", "\0",
        "\u{e9}", "e\u{301}", "🔒",
    ]);
    prop_oneof![
        3 => proptest::collection::vec(atoms, 0..12).prop_map(|parts| parts.concat().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => "\\PC{0,40}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn path_text_holds(data in text()) {
        path_text(&data);
    }

    #[test]
    fn path_keys_holds(paths in proptest::collection::vec(proptest::collection::vec(segment(), 0..5), 0..5)) {
        path_keys(&encode_segment_lists(paths));
    }
}
