//! Files only this user may read: the run directory (0700) and what holds secrets or logs (0600).
//!
//! Every open refuses to follow a symlink at the last component (`O_NOFOLLOW`) and refuses a file or
//! directory owned by another user, so another account on the host cannot plant a link that makes the
//! master write into a file of its choosing, or a directory it can read.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

fn refuse(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("{}: {why}", path.display()))
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates `path` (and its parents) as needed, mode 0700 for what is created; then checks that it is a
/// real directory (not a symlink) owned by this user, and makes it 0700.
pub fn private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(path, "is a symlink; the run directory must be a real directory"));
    }
    if !meta.is_dir() {
        return Err(refuse(path, "is not a directory"));
    }
    if meta.uid() != euid() {
        return Err(refuse(path, &format!("is owned by uid {}, not by this user (uid {})", meta.uid(), euid())));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates `dir` (and parents) if missing with mode 0700; an existing directory is left as it is.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// How [`open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Append,
    Truncate,
    Read,
}

/// Opens `path` without following a symlink, created 0600 if missing; refuses a file of another user and
/// makes an existing one 0600.
pub fn open(path: &Path, mode: Mode) -> io::Result<File> {
    let mut o = OpenOptions::new();
    match mode {
        Mode::Append => o.append(true).create(true),
        Mode::Truncate => o.write(true).create(true).truncate(true),
        Mode::Read => o.read(true),
    };
    let f = o.mode(0o600).custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits()).open(path).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::ELOOP) {
            refuse(path, "is a symlink; refusing to follow it")
        } else {
            e
        }
    })?;
    let meta = f.metadata()?;
    if meta.uid() != euid() {
        return Err(refuse(path, &format!("is owned by uid {}, not by this user (uid {})", meta.uid(), euid())));
    }
    if !meta.is_file() {
        return Err(refuse(path, "is not a regular file"));
    }
    if mode != Mode::Read && meta.permissions().mode() & 0o777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// The text of `path` (opened as [`open`] does for reading), at most `max` bytes of it.
pub fn read_to_string(path: &Path, max: u64) -> io::Result<String> {
    io::read_to_string(io::Read::take(open(path, Mode::Read)?, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn files_are_0600_dirs_0700_and_symlinks_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run");
        private_dir(&dir).expect("create");
        assert_eq!(std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("again");
        assert_eq!(std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777, 0o700, "tightened");

        let log = dir.join("a.log");
        open(&log, Mode::Append).expect("open").write_all(b"x").expect("write");
        assert_eq!(std::fs::metadata(&log).expect("meta").permissions().mode() & 0o777, 0o600);

        let target = tmp.path().join("victim");
        std::fs::write(&target, "keep").expect("victim");
        let link = dir.join("b.log");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = open(&link, Mode::Append).expect_err("a symlink is refused");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep", "nothing written through the link");

        let linked_dir = tmp.path().join("linked");
        std::os::unix::fs::symlink(&dir, &linked_dir).expect("symlink");
        assert!(private_dir(&linked_dir).is_err(), "a symlinked run directory is refused");
    }
}
