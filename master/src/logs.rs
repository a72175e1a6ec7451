//! Worker output: `logs/<server-id>.log`, size-capped with rotation, and the terminal when in the foreground.
//!
//! One reader task per child pipe reads continuously, whatever the terminal or disk does, so a chatty
//! child never blocks on a full pipe. Lines are cut at [`MAX_LINE`] so one endless line cannot grow a buffer.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pomelo_proto::config::LogConfig;
use pomelo_proto::files::{self, Mode};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A longer line is split.
pub const MAX_LINE: usize = 16 * 1024;

/// An append-only file that rotates to `.1`, `.2`, ... when it reaches its cap.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    max_bytes: u64,
    keep: u32,
}

impl RotatingFile {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent() {
            files::create_dir(dir)?;
        }
        let file = files::open(&path, Mode::Append)?;
        let written = file.metadata()?.len();
        Ok(RotatingFile { path, file: Some(file), written, max_bytes, keep })
    }

    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.written + line.len() as u64 + 1 > self.max_bytes && self.written > 0 {
            self.rotate()?;
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(line)?;
            f.write_all(b"\n")?;
            self.written += line.len() as u64 + 1;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let name = |i: u32| -> PathBuf {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            fs::remove_file(&self.path).ok();
        } else {
            fs::remove_file(name(self.keep)).ok();
            for i in (1..self.keep).rev() {
                fs::rename(name(i), name(i + 1)).ok();
            }
            fs::rename(&self.path, name(1))?;
        }
        self.file = Some(files::open(&self.path, Mode::Append)?);
        self.written = 0;
        Ok(())
    }
}

/// Whole lines written (as a logger writes one event per call) go through [`RotatingFile::write_line`], so
/// the master's own log (`logs/master.log` when it runs in the background) is capped and rotated like a
/// worker's.
impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = buf.strip_suffix(b"\n").unwrap_or(buf);
        for line in text.split(|b| *b == b'\n') {
            self.write_line(line)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

/// Where one server's output goes.
#[derive(Clone)]
pub struct LogSink {
    id: Arc<str>,
    file: Arc<Mutex<RotatingFile>>,
    echo: bool,
}

impl LogSink {
    pub fn open(dir: &Path, id: &str, cfg: &LogConfig, echo: bool) -> io::Result<LogSink> {
        let file = RotatingFile::open(dir.join(format!("{id}.log")), cfg.max_bytes, cfg.keep)?;
        Ok(LogSink { id: id.into(), file: Arc::new(Mutex::new(file)), echo })
    }

    fn line(&self, line: &[u8]) {
        if let Ok(mut f) = self.file.lock() {
            if let Err(e) = f.write_line(line) {
                tracing::warn!(server = %self.id, "cannot write its log file: {e}");
            }
        }
        if self.echo {
            let mut out = io::stdout().lock();
            // A closed terminal must not stop the pipe being drained.
            let _ = out.write_all(format!("[{}] ", self.id).as_bytes());
            let _ = out.write_all(line);
            let _ = out.write_all(b"\n");
        }
    }

    /// Drains `pipe` into the sink until it closes.
    pub async fn pump(self, mut pipe: impl AsyncRead + Unpin) {
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                self.line(&buf[..pos]);
                buf.drain(..=pos);
            }
            while buf.len() >= MAX_LINE {
                let cut = char_boundary(&buf, MAX_LINE);
                self.line(&buf[..cut]);
                buf.drain(..cut);
            }
        }
        if !buf.is_empty() {
            self.line(&buf);
        }
    }
}

/// Where to cut `buf` at most `max` bytes in so that a UTF-8 character is never split: before the last
/// character's first byte when that character does not end by `max` (invalid UTF-8 is cut anywhere).
fn char_boundary(buf: &[u8], max: usize) -> usize {
    let max = max.min(buf.len());
    let lead = (max.saturating_sub(3)..max).rev().find(|&i| buf[i] & 0xC0 != 0x80);
    let Some(i) = lead else { return max };
    let width = match buf[i] {
        b if b < 0x80 => 1,
        b if b >= 0xF0 => 4,
        b if b >= 0xE0 => 3,
        _ => 2,
    };
    if i + width > max && i > 0 {
        i
    } else {
        max
    }
}

/// The last `lines` lines of a server's log (current file only), for the dashboard. Read lossily: a log
/// holds whatever the child printed, and one invalid UTF-8 byte must cost one character, not the view.
pub fn tail(dir: &Path, id: &str, lines: usize) -> io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(dir.join(format!("{id}.log")))?;
    let len = f.metadata()?.len();
    // Read at most 1 MiB from the end: enough for any sane request, bounded for any file.
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(1 << 20).read_to_end(&mut bytes)?;
    let mut text = &bytes[..];
    if start > 0 {
        // The read began inside a line (maybe inside a character): skip to the next whole one.
        text = text.iter().position(|b| *b == b'\n').map_or(&[][..], |i| &text[i + 1..]);
    }
    let text = String::from_utf8_lossy(text);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].iter().map(|s| s.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_n_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let mut f = RotatingFile::open(path.clone(), 100, 2).expect("open");
        for i in 0..30 {
            f.write_line(format!("line {i:04} ........").as_bytes()).expect("write");
        }
        assert!(fs::metadata(&path).expect("current").len() <= 100);
        assert!(dir.path().join("x.log.1").exists());
        assert!(dir.path().join("x.log.2").exists());
        assert!(!dir.path().join("x.log.3").exists());
        let last = tail(dir.path(), "x", 1).expect("tail");
        assert_eq!(last, vec!["line 0029 ........".to_string()]);
    }

    #[tokio::test]
    async fn pump_splits_lines_and_caps_long_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = LogConfig { dir: dir.path().into(), max_bytes: 1 << 20, keep: 1 };
        let sink = LogSink::open(dir.path(), "w", &cfg, false).expect("open");
        let mut input = b"a\nbb\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        sink.pump(&input[..]).await;
        let lines = tail(dir.path(), "w", 10).expect("tail");
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "a");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3].len(), 10);
    }

    #[tokio::test]
    async fn an_invalid_byte_or_a_split_character_does_not_blank_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = LogConfig { dir: dir.path().into(), max_bytes: 1 << 20, keep: 1 };
        let sink = LogSink::open(dir.path(), "w", &cfg, false).expect("open");
        // A 3-byte character straddling the 16 KiB cut, then a line with a byte that is never UTF-8.
        let mut input = vec![b'x'; MAX_LINE - 1];
        input.extend_from_slice("€tail\n".as_bytes());
        input.extend_from_slice(b"bad \xff byte\nlast line\n");
        sink.pump(&input[..]).await;
        let lines = tail(dir.path(), "w", 10).expect("tail");
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0].len(), MAX_LINE - 1, "cut before the character, not inside it");
        assert_eq!(lines[1], "€tail");
        assert_eq!(lines[2], "bad \u{FFFD} byte");
        assert_eq!(lines[3], "last line");
    }
}
