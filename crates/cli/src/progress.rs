//! qemu-img's progress output (`util/qemu-progress.c`), reproduced exactly because
//! scripts parse it: `    (xx.xx/100%)\r` lines, then `\n` at the end.
//!
//! The state is kept in `f32` and updated with the same operations in the same order as
//! QEMU, so that the same values are printed and the same ones are skipped.

use std::io::Write;

/// Where progress lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Not printed (`-p` absent, or `-q`).
    Off,
    Stdout,
    /// With `--output json`, so that stdout stays one JSON document.
    Stderr,
    /// Kept in memory ([`Progress::captured`]), for tests.
    Capture,
}

/// qemu-img's `IO_BUF_SIZE`: one safe-mode copy-loop step covers this much.
pub const STEP_BYTES: u64 = 2 << 20;

/// QEMU's progress state (`min_skip` is 2.0 for rebase).
#[derive(Debug)]
pub struct Progress {
    target: Target,
    current: f32,
    last_print: f32,
    min_skip: f32,
    captured: String,
}

impl Progress {
    pub fn new(target: Target) -> Self {
        Progress {
            target,
            current: 0.0,
            last_print: 0.0,
            min_skip: 2.0,
            captured: String::new(),
        }
    }

    /// `qemu_progress_print(delta, max)`.
    pub fn print(&mut self, delta: f32, max: i32) {
        let mut current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            self.last_print = self.current;
            self.emit(&format!("    ({:.2}/100%)\r", self.current as f64));
        }
    }

    /// `qemu_progress_end()`.
    pub fn end(&mut self) {
        self.emit("\n");
    }

    /// Everything emitted so far with [`Target::Capture`].
    pub fn captured(&self) -> &str {
        &self.captured
    }

    fn emit(&mut self, text: &str) {
        // Output errors (a closed pipe) must not turn a finished rebase into a failure.
        match self.target {
            Target::Off => {}
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
            Target::Stderr => {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
            Target::Capture => self.captured.push_str(text),
        }
    }
}

/// qemu-img's per-step increment, `(float)100 / (size / MIN(size, IO_BUF_SIZE))`, for an
/// overlay of virtual size `size` (0 for an empty image).
pub fn step_increment(size: u64) -> f32 {
    if size == 0 {
        return 0.0;
    }
    let steps = size / size.min(STEP_BYTES);
    100.0f32 / steps as f32
}

/// The smallest region one counted step of qemu-img's copy loop covers: a step is
/// widened to the overlay's (sub)cluster size, and no qcow2 or vmdk unit is smaller than
/// a sector.
const MIN_STEP_BYTES: u64 = 512;

/// The most steps qemu-img's copy loop can count over an image of `virtual_size` bytes
/// whose files (overlay and chains) hold `file_bytes` bytes in all: an iteration ends
/// 2 MiB after it started or where the allocation status changes, and every change is
/// recorded in the files, at most two per byte (qcow2 extended L2 entries describe 32
/// subclusters in 16 bytes; plain L2 and vmdk grain table entries take 8 and 4). So at
/// most `ceil(size / 2 MiB)` iterations plus one per change: this many progress lines,
/// and no more, could qemu-img print.
pub fn max_steps(virtual_size: u64, file_bytes: u64) -> u64 {
    virtual_size
        .div_ceil(STEP_BYTES)
        .saturating_add(file_bytes.saturating_mul(2))
        .saturating_add(1)
}

/// Turns the guest's cumulative step counts into `qemu_progress_print` calls.
///
/// qemu-img counts one step per loop iteration that is not skipped, and an iteration can
/// be much shorter than 2 MiB (it stops where the overlay's allocation, or with the
/// in-chain optimisation the old chain's, changes), so a run can count more steps than
/// `size / 2 MiB`; past 100% each prints `(100.00/100%)` again, as in qemu-img.
/// The count comes from the guest, so it is bounded: it may only grow, and never past
/// one step per sector of the image (the sandbox also bounds it by the files, see
/// [`max_steps`]). Steps too small to move an `f32` percentage print nothing and are
/// skipped at once: an image of 2^61 bytes must not cost 2^32 rounds.
#[derive(Debug)]
pub struct StepCounter {
    increment: f32,
    max_steps: u64,
    seen: u64,
}

impl StepCounter {
    pub fn new(virtual_size: u64) -> Self {
        StepCounter {
            increment: step_increment(virtual_size),
            max_steps: virtual_size.div_ceil(MIN_STEP_BYTES),
            seen: 0,
        }
    }

    /// The guest reports `steps` steps done so far.
    pub fn advance(&mut self, steps: u32, progress: &mut Progress) {
        let steps = u64::from(steps).min(self.max_steps);
        while self.seen < steps {
            self.seen += 1;
            let before = progress.current;
            progress.print(self.increment, 100);
            // Same state, same sum: every later step would change nothing either.
            if progress.current == before && before != 100.0 && before != 0.0 {
                self.seen = steps;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a whole run prints: start, `steps` counted steps, the final 100, the end.
    fn run(size: u64, steps: u32) -> String {
        let mut p = Progress::new(Target::Capture);
        p.print(0.0, 100);
        let mut c = StepCounter::new(size);
        for n in 1..=steps {
            c.advance(n, &mut p);
        }
        p.print(100.0, 0);
        p.end();
        p.captured().to_string()
    }

    fn lines(values: &[&str]) -> String {
        let mut s: String = values.iter().map(|v| format!("    ({v}/100%)\r")).collect();
        s.push('\n');
        s
    }

    #[test]
    fn qemu_recorded_sequences() {
        // Reference §1.4: 1 MiB overlay, nothing allocated: 0, 100, 100.
        assert_eq!(run(1 << 20, 1), lines(&["0.00", "100.00", "100.00"]));
        // 8 MiB fully allocated (no step counted): 0, 100.
        assert_eq!(run(8 << 20, 0), lines(&["0.00", "100.00"]));
        // Unsafe mode has no steps: exactly QEMU's "(0.00)\r(100.00)\r\n".
        assert_eq!(run(8 << 20, 0), "    (0.00/100%)\r    (100.00/100%)\r\n");
        // 64 MiB, nothing allocated: 0, 3.12, 6.25, ..., 96.88, 100, 100.
        let mut want = vec!["0.00".to_string()];
        for k in 1..=31 {
            want.push(format!("{:.2}", k as f64 * 3.125));
        }
        want.extend(["100.00".to_string(), "100.00".to_string()]);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_eq!(run(64 << 20, 32), lines(&want));
        assert!(run(64 << 20, 32)
            .starts_with("    (0.00/100%)\r    (3.12/100%)\r    (6.25/100%)\r    (9.38/100%)\r"));
    }

    #[test]
    fn five_mib_prints_fifty() {
        // 5 MiB: size / 2 MiB = 2 steps counted as 50 each, three loop iterations.
        assert_eq!(
            run(5 << 20, 3),
            lines(&["0.00", "50.00", "100.00", "100.00", "100.00"])
        );
    }

    #[test]
    fn more_steps_than_chunks_print_100_again() {
        // 4 MiB with the in-chain optimisation: steps at 960 KiB, 1 MiB and 3 MiB
        // (recorded from qemu-img 10.2).
        assert_eq!(
            run(4 << 20, 3),
            lines(&["0.00", "50.00", "100.00", "100.00", "100.00"])
        );
    }

    #[test]
    fn hostile_counts_are_bounded() {
        let mut p = Progress::new(Target::Off);
        let mut c = StepCounter::new(4 << 20);
        c.advance(u32::MAX, &mut p);
        assert_eq!(c.seen, 8192);
        c.advance(1, &mut p);
        assert_eq!(c.seen, 8192);
    }

    #[test]
    fn steps_that_change_nothing_are_skipped() {
        // 2^61 bytes: each step adds ~9e-11, which stops changing the f32 sum long before
        // u32::MAX steps; nothing past the first line is printed, and it is quick.
        let mut p = Progress::new(Target::Capture);
        p.print(0.0, 100);
        let mut c = StepCounter::new(1 << 61);
        let t = std::time::Instant::now();
        c.advance(u32::MAX, &mut p);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(c.seen, u64::from(u32::MAX));
        assert_eq!(p.captured(), "    (0.00/100%)\r");
    }

    #[test]
    fn the_step_bound_follows_the_files() {
        assert_eq!(max_steps(0, 0), 1);
        assert_eq!(max_steps(5 << 20, 0), 4);
        assert_eq!(max_steps(4 << 20, 1000), 2 + 2000 + 1);
        assert_eq!(max_steps(u64::MAX, u64::MAX), u64::MAX);
    }
}
