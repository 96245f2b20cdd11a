//! Rendering for messages: durations as people read them, rejected input
//! quoted and cut short. The bottom of the crate: it depends on nothing.

use std::time::Duration;

/// A duration as a person reads it: `850 ms`, `29.8 s`, `2 h 5 min`.
pub fn human(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1_000 {
        if duration > Duration::ZERO && millis == 0 {
            return format!("{} µs", duration.as_micros());
        }
        format!("{millis} ms")
    } else if millis < 120_000 {
        format!("{:.1} s", duration.as_secs_f64())
    } else if millis < 7_200_000 {
        format!("{} min {} s", duration.as_secs() / 60, duration.as_secs() % 60)
    } else {
        format!("{} h {} min", duration.as_secs() / 3600, duration.as_secs() / 60 % 60)
    }
}

/// A short, printable rendering of rejected input for error messages:
/// quoted and escaped like `{:?}`, and cut to a readable length (a megabyte
/// name must not become a megabyte message). Core's own errors use it, and
/// so do stores' checks of their settings.
pub fn quote(text: &str) -> String {
    quote_within(text, 120)
}

/// `text` quoted and escaped as `{:?}` does, cut so that the quoted part
/// has at most `budget` bytes. The budget counts escaped bytes, not
/// characters: a control character escapes to up to ten bytes (`\u{1f}`),
/// so sixty-four of them would make a message too long to read.
pub(crate) fn quote_within(text: &str, budget: usize) -> String {
    const SHOWN_CHARS: usize = 64;
    let mut end = text.char_indices().nth(SHOWN_CHARS).map_or(text.len(), |(at, _)| at);
    let mut shown = format!("{:?}", &text[..end]);
    while shown.len() > budget {
        end /= 2;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        shown = format!("{:?}", &text[..end]);
    }
    if end < text.len() {
        format!("{shown}… ({} bytes)", text.len())
    } else {
        shown
    }
}
