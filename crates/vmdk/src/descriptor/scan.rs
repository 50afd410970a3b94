//! The text scanning QEMU's vmdk driver does on a descriptor: substring searches
//! (`strstr`) and `sscanf` directives over the text up to its first NUL. Every reader
//! of the descriptor (the sparse image, its rewrite, the probe) scans through these.

/// Where `needle` first occurs (`strstr`).
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `isspace` in the C locale: what scanf skips.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Skip white space from `at` (scanf's ` ` directive, and what `%s`, `%d` and `%x`
/// skip first).
pub(super) fn skip_space(text: &[u8], mut at: usize) -> usize {
    while text.get(at).copied().is_some_and(is_space) {
        #[cfg(test)]
        steps::add(1);
        at += 1;
    }
    at
}

/// Skip an optional sign from `at`; true when it was `-`.
fn sign(text: &[u8], at: &mut usize) -> bool {
    let neg = text.get(*at) == Some(&b'-');
    if matches!(text.get(*at), Some(b'+' | b'-')) {
        *at += 1;
    }
    neg
}

/// scanf's `%Ns`: up to `max` non-space bytes from `at` (after white space), and
/// where they end.
pub(super) fn word(text: &[u8], at: usize, max: usize) -> Option<(&[u8], usize)> {
    let start = skip_space(text, at);
    let rest = text.get(start..)?;
    let len = rest.iter().take(max).take_while(|&&c| !is_space(c)).count();
    (len > 0).then(|| (&rest[..len], start + len))
}

/// scanf's `%d` into an unsigned count: white space, a sign, digits (saturating).
/// `None` without a digit; a negative number reads as `Some(None)`.
fn number(text: &[u8], at: usize) -> Option<(Option<u64>, usize)> {
    let mut i = skip_space(text, at);
    let neg = sign(text, &mut i);
    let digits = text.get(i..)?.iter().take_while(|c| c.is_ascii_digit());
    let (n, value) = digits.fold((0usize, 0u64), |(n, v), &d| {
        (
            n + 1,
            v.saturating_mul(10).saturating_add(u64::from(d - b'0')),
        )
    });
    (n > 0).then_some(((!neg || value == 0).then_some(value), i + n))
}

/// `sscanf("%x")` on `s`: white space, a sign, an optional `0x`, hex digits; the value
/// (saturating like glibc's `strtoul`, negated after `-`, truncated to 32 bits), or
/// `None` without a digit, and where the scan stopped.
pub(super) fn hex(s: &[u8]) -> (Option<u32>, usize) {
    let mut i = skip_space(s, 0);
    let neg = sign(s, &mut i);
    let prefixed = s.get(i) == Some(&b'0') && matches!(s.get(i + 1), Some(b'x' | b'X'));
    if prefixed && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit) {
        i += 2;
    }
    let start = i;
    let mut v: u64 = 0;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(16)) {
        v = v.saturating_mul(16).saturating_add(u64::from(d));
        i += 1;
    }
    let value = (i > start).then(|| if neg { v.wrapping_neg() } else { v } as u32);
    (value, i)
}

/// `name`, skip two bytes (`="`), then everything up to the next `"`
/// (`vmdk_parse_description`); `Err` when no quote follows.
pub(super) fn quoted_after<'a>(text: &'a [u8], name: &[u8]) -> Option<Result<&'a [u8], ()>> {
    let p = find(text, name)? + name.len() + 2;
    let rest = text.get(p..).unwrap_or(&[]);
    Some(match rest.iter().position(|&c| c == b'"') {
        Some(end) => Ok(&rest[..end]),
        None => Err(()),
    })
}

/// One extent line as QEMU's
/// `sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %" SCNd64, …)` reads it from
/// `at` (white space directives run over line ends). Fields after the first one that
/// does not match are `None`, as scanf leaves them unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scanned<'a> {
    pub access: &'a [u8],
    /// The sector count; `Some(None)` when it was negative.
    pub sectors: Option<Option<u64>>,
    pub kind: Option<&'a [u8]>,
    pub file_name: Option<&'a [u8]>,
    pub offset: Option<u64>,
}

impl<'a> Scanned<'a> {
    /// The line at `at`, when its access mode is one QEMU knows (`RW`, `RDONLY`,
    /// `NOACCESS`).
    pub(super) fn at(text: &'a [u8], at: usize) -> Option<Scanned<'a>> {
        let (access, at) = word(text, at, 10)?;
        if !matches!(access, b"RW" | b"RDONLY" | b"NOACCESS") {
            return None;
        }
        let mut line = Scanned {
            access,
            sectors: None,
            kind: None,
            file_name: None,
            offset: None,
        };
        let Some((sectors, at)) = number(text, at) else {
            return Some(line);
        };
        line.sectors = Some(sectors);
        let Some((kind, at)) = word(text, at, 10) else {
            return Some(line);
        };
        line.kind = Some(kind);
        let at = skip_space(text, at);
        if text.get(at) != Some(&b'"') {
            return Some(line);
        }
        let rest = text.get(at + 1..).unwrap_or(&[]);
        let len = rest
            .iter()
            .take(511)
            .take_while(|&&c| !matches!(c, b'\n' | b'\r' | b'"'))
            .count();
        if len == 0 {
            return Some(line);
        }
        line.file_name = Some(&rest[..len]);
        let after = at + 1 + len;
        if text.get(after) == Some(&b'"') {
            line.offset = number(text, after + 1).and_then(|(v, _)| v);
        }
        Some(line)
    }

    /// Every line start of `text` (QEMU reads an extent line at each), one item per
    /// line start that reads as an extent line.
    ///
    /// A scan begins by skipping white space, so it reads the same from every line
    /// start before one first non-space byte: the line starts inside a run of blank
    /// lines share one scan (the next line start past that byte starts a new one).
    /// Scanning from each of them again would cost time quadratic in the run's length.
    pub(super) fn each(text: &'a [u8]) -> impl Iterator<Item = Scanned<'a>> + 'a {
        let starts = core::iter::once(0).chain(
            text.iter()
                .enumerate()
                .filter(|&(_, &c)| c == b'\n')
                .map(|(i, _)| i + 1),
        );
        // The last scan: its first non-space byte and what it read.
        let mut last: Option<(usize, Option<Scanned<'a>>)> = None;
        starts.filter(|&at| at < text.len()).filter_map(move |at| {
            match last {
                // Every byte from the previous line start to `first` is white space.
                Some((first, scanned)) if at <= first => scanned,
                _ => {
                    let first = skip_space(text, at);
                    let scanned = Scanned::at(text, first);
                    last = Some((first, scanned));
                    scanned
                }
            }
        })
    }
}

/// The bytes the white-space skips have stepped over, for the tests that bound the
/// scanner's work.
#[cfg(test)]
pub(super) mod steps {
    use core::cell::Cell;

    std::thread_local! {
        static STEPS: Cell<usize> = const { Cell::new(0) };
    }

    pub fn add(n: usize) {
        STEPS.with(|s| s.set(s.get() + n));
    }

    /// The steps taken on this thread since the last call.
    pub fn take() -> usize {
        STEPS.with(|s| s.replace(0))
    }
}
