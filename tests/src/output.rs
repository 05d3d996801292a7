//! A container's large output, checked byte by byte: `yes LINE | head -c
//! N` writes N bytes of one 64-byte line over and over (the last one cut
//! short), so what arrives can be compared with what was written at every
//! offset, and a stream cut anywhere (the tail above all) is caught.

/// 63 characters and the newline `yes` adds: 64 bytes a line.
pub const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_";

/// The shell command that writes `bytes` bytes of the pattern to stdout
/// and exits as soon as they are written (`yes` dies of the closed pipe
/// then, and its complaint is kept off stderr).
pub fn script(bytes: u64) -> String {
    format!("yes {LINE} 2>/dev/null | head -c {bytes}")
}

/// Compares a stream with the pattern as it arrives.
#[derive(Debug, Default)]
pub struct Checker {
    /// Bytes seen so far.
    pub bytes: u64,
    /// The offset of the first byte that differs from the pattern.
    pub first_mismatch: Option<u64>,
}

impl Checker {
    pub fn feed(&mut self, chunk: &[u8]) {
        let line = LINE.as_bytes();
        let period = line.len() as u64 + 1;
        if self.first_mismatch.is_none() {
            for (i, &b) in chunk.iter().enumerate() {
                let at = self.bytes + i as u64;
                let pos = usize::try_from(at % period).unwrap_or_default();
                let want = line.get(pos).copied().unwrap_or(b'\n');
                if b != want {
                    self.first_mismatch = Some(at);
                    break;
                }
            }
        }
        self.bytes += chunk.len() as u64;
    }

    /// Ok when exactly `bytes` bytes of the pattern arrived.
    pub fn verify(&self, bytes: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.first_mismatch.is_none(),
            "the output differs from what was written at byte {:?} (of {} received)",
            self.first_mismatch,
            self.bytes
        );
        anyhow::ensure!(
            self.bytes == bytes,
            "{} bytes of output arrived, {bytes} were written ({} lost)",
            self.bytes,
            i128::from(bytes) - i128::from(self.bytes)
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_checks_out_and_a_cut_is_caught() {
        let mut whole = Vec::new();
        while whole.len() < 1000 {
            whole.extend_from_slice(LINE.as_bytes());
            whole.push(b'\n');
        }
        whole.truncate(1000);
        let mut c = Checker::default();
        for chunk in whole.chunks(7) {
            c.feed(chunk);
        }
        c.verify(1000).unwrap();
        assert!(c.verify(1001).is_err());
        let mut bad = Checker::default();
        bad.feed(&whole[..100]);
        bad.feed(&whole[101..]);
        assert!(bad.verify(999).is_err());
    }
}
