//! The file sink: complete documents appended to NDJSON files in `_bulk` format (each
//! document an `index` action line and its source line, exactly the body the writer
//! builds), so that a file loads into Elasticsearch later with
//! `curl -H 'Content-Type: application/x-ndjson' --data-binary @FILE $ES/INDEX/_bulk`.
//!
//! Files are `embedjoin-000001.ndjson`, `-000002`, ... in the configured directory. The
//! next file is started before a batch would take the current one past `file.max_bytes`
//! (a batch is never split: one larger than that goes alone into a file). At start the
//! sink resumes the highest-numbered file.
//!
//! Durability: a batch is written and fsynced before any of its items is answered 201.
//! A failed write is truncated away and reported as a transport error, which the writer
//! retries; a crash during a write can leave a torn tail, which the next start cuts back to
//! the last whole document. A document can appear twice (a resend after a crash); loading
//! is still idempotent because `_id` is the item id.
//!
//! File I/O blocks, so it runs on tokio's blocking pool; one batch is written at a time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{ItemStatus, SinkError};
use crate::config::FileSettings;

const PREFIX: &str = "embedjoin-";
const SUFFIX: &str = ".ndjson";
/// How an action line starts (see `encode.rs`); a file must not end with one.
const ACTION: &[u8] = b"{\"index\"";

/// A handle on the file sink; clones share the open file.
#[derive(Clone)]
pub struct FileSink {
    out: Arc<Mutex<Output>>,
}

struct Output {
    dir: PathBuf,
    max_bytes: u64,
    /// Opened at the first use (or by [`FileSink::open`]).
    current: Option<Current>,
}

struct Current {
    number: u32,
    file: File,
    /// Bytes in the file: every one of them fsynced whole batches.
    len: u64,
}

/// The name of output file number `n`.
pub fn file_name(n: u32) -> String {
    format!("{PREFIX}{n:06}{SUFFIX}")
}

fn number_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> SinkError {
    SinkError::Transport(format!("file sink: {what} {}: {e}", path.display()))
}

impl FileSink {
    /// A sink writing into `settings.dir`; nothing is opened yet.
    pub fn new(settings: &FileSettings) -> FileSink {
        let out = Output { dir: settings.dir.clone(), max_bytes: settings.max_bytes, current: None };
        FileSink { out: Arc::new(Mutex::new(out)) }
    }

    /// Creates the directory and opens the file to append to, so that a directory that
    /// cannot be written shows at start.
    pub async fn open(&self) -> Result<(), SinkError> {
        self.with(|out| out.current().map(|_| ())).await
    }

    /// Appends one `_bulk` body of `count` operations and fsyncs it; every item is 201.
    pub async fn bulk(&self, body: Bytes, count: usize) -> Result<Vec<ItemStatus>, SinkError> {
        if body.is_empty() {
            return Ok(vec![ItemStatus { status: 201, error: None, noop: false }; count]);
        }
        self.with(move |out| out.append(&body)).await?;
        Ok(vec![ItemStatus { status: 201, error: None, noop: false }; count])
    }

    /// The file being appended to, once open.
    pub fn current_path(&self) -> Option<PathBuf> {
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.current.as_ref().map(|c| out.dir.join(file_name(c.number)))
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Output) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let out = self.out.clone();
        tokio::task::spawn_blocking(move || f(&mut out.lock().unwrap_or_else(|e| e.into_inner())))
            .await
            .map_err(|e| SinkError::Transport(format!("file sink: the write task failed: {e}")))?
    }
}

impl Output {
    /// The open file; at the first call, the highest-numbered one (or number 1).
    fn current(&mut self) -> Result<&mut Current, SinkError> {
        if self.current.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(|e| io_error("cannot create", &self.dir, e))?;
            let mut highest = None;
            for entry in std::fs::read_dir(&self.dir).map_err(|e| io_error("cannot list", &self.dir, e))? {
                let entry = entry.map_err(|e| io_error("cannot list", &self.dir, e))?;
                highest = highest.max(entry.file_name().to_str().and_then(number_of));
            }
            self.current = Some(self.open_file(highest.unwrap_or(1))?);
        }
        Ok(self.current.as_mut().expect("just opened"))
    }

    fn open_file(&self, number: u32) -> Result<Current, SinkError> {
        let path = self.dir.join(file_name(number));
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_error("cannot open", &path, e))?;
        let len = repair_tail(&mut file).map_err(|e| io_error("cannot read", &path, e))?;
        if !existed {
            // The new name must survive a crash too, not only the data written into it.
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io_error("cannot sync", &self.dir, e))?;
        }
        Ok(Current { number, file, len })
    }

    fn append(&mut self, body: &[u8]) -> Result<(), SinkError> {
        let max = self.max_bytes;
        let full = {
            let current = self.current()?;
            current.len > 0 && current.len + body.len() as u64 > max
        };
        if full {
            let next = self.current.as_ref().expect("open").number + 1;
            self.current = Some(self.open_file(next)?);
        }
        let path = self.dir.join(file_name(self.current.as_ref().expect("open").number));
        let current = self.current.as_mut().expect("open");
        let written = current.file.write_all(body).and_then(|()| current.file.sync_data());
        if let Err(e) = written {
            // Leave no partial batch behind: the retry appends the whole body again.
            if let Err(cut) = current.file.set_len(current.len) {
                tracing::error!(path = %path.display(), error = %cut, "A failed write could not be cut back; the file may hold a torn batch.");
                self.current = None; // reopening repairs the tail
            }
            return Err(io_error("cannot write", &path, e));
        }
        current.len += body.len() as u64;
        Ok(())
    }
}

/// Cuts a torn tail left by a crash: a partial last line, then an action line without its
/// source line. Returns the file's length after the cut.
fn repair_tail(file: &mut File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut keep = match rfind_newline(file, len)? {
        Some(at) => at + 1,
        None => 0,
    };
    if keep > 0 {
        let start = rfind_newline(file, keep - 1)?.map_or(0, |at| at + 1);
        let mut head = [0u8; ACTION.len()];
        let n = (keep - 1 - start).min(head.len() as u64) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut head[..n])?;
        if head[..n] == *ACTION {
            keep = start;
        }
    }
    if keep != len {
        tracing::warn!(
            cut = len - keep,
            "The output file ended in a torn document (a crash while writing); it was cut back."
        );
        file.set_len(keep)?;
        file.sync_all()?;
    }
    Ok(keep)
}

/// The position of the last `\n` before `end`.
fn rfind_newline(file: &mut File, end: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = end;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_output_file_names_have_a_number() {
        assert_eq!(number_of("embedjoin-000012.ndjson"), Some(12));
        assert_eq!(number_of("embedjoin-1234567.ndjson"), Some(1234567));
        assert_eq!(number_of("embedjoin-12.ndjson"), None);
        assert_eq!(number_of("embedjoin-00001x.ndjson"), None);
        assert_eq!(number_of("other-000001.ndjson"), None);
        assert_eq!(file_name(3), "embedjoin-000003.ndjson");
    }

    #[test]
    fn a_torn_tail_is_cut_back_to_the_last_whole_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let whole = "{\"index\":{\"_id\":\"a\"}}\n{\"id\":\"a\"}\n";
        for (content, kept) in [
            (format!("{whole}{{\"index\":{{\"_id\":\"b\"}}}}\n{{\"id\":"), whole.len()),
            (format!("{whole}{{\"index\":{{\"_id\":\"b\"}}}}\n"), whole.len()),
            (format!("{whole}{{\"ind"), whole.len()),
            (whole.to_owned(), whole.len()),
            ("{\"index\":{}}\n".to_owned(), 0),
            (String::new(), 0),
        ] {
            std::fs::write(&path, &content).unwrap();
            let mut file = OpenOptions::new().read(true).append(true).open(&path).unwrap();
            assert_eq!(repair_tail(&mut file).unwrap(), kept as u64, "{content:?}");
            assert_eq!(std::fs::read(&path).unwrap(), content.as_bytes()[..kept]);
        }
    }
}
