//! Where a worker's own log lines go.
//!
//! Normally stderr, which the master reads into `logs/<id>.log`. If the master dies, that pipe breaks;
//! from then on lines are appended to the log file directly (up to its size cap), so an orphaned worker
//! that a new master adopts has not lost what it said in between.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone)]
pub struct FallbackWriter {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: PathBuf,
    max_bytes: u64,
    file: Option<(File, u64)>,
    broken: bool,
}

impl FallbackWriter {
    pub fn new(path: PathBuf, max_bytes: u64) -> FallbackWriter {
        FallbackWriter { inner: Arc::new(Mutex::new(Inner { path, max_bytes, file: None, broken: false })) }
    }
}

impl Inner {
    fn write_file(&mut self, buf: &[u8]) {
        if self.file.is_none() {
            let opened = pomelo_proto::files::open(&self.path, pomelo_proto::files::Mode::Append);
            if let Ok(f) = opened {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some((f, len));
            }
        }
        if let Some((f, len)) = self.file.as_mut() {
            if *len + buf.len() as u64 <= self.max_bytes && f.write_all(buf).is_ok() {
                *len += buf.len() as u64;
            }
        }
    }
}

pub struct Handle(Arc<Mutex<Inner>>);

impl Write for Handle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Ok(mut inner) = self.0.lock() else { return Ok(buf.len()) };
        if !inner.broken {
            match io::stderr().write_all(buf) {
                Ok(()) => return Ok(buf.len()),
                Err(_) => inner.broken = true,
            }
        }
        inner.write_file(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for FallbackWriter {
    type Writer = Handle;
    fn make_writer(&'a self) -> Handle {
        Handle(self.inner.clone())
    }
}
