//! Reading one policy file safely: the policy directory may hold anything (a
//! FIFO would block open() and read() forever, a link to /dev/zero never ends),
//! so only a regular file of bounded size is read, and the check is made on the
//! opened file, not on the name.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The largest policy file read; real ones are a few KiB.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// The text of the policy file at `path` and, when it is writable by anyone, a
/// warning to log. The error says what the file is instead of a policy.
pub fn read_policy_file(path: &Path) -> Result<(String, Option<String>), String> {
    // O_NONBLOCK: opening a FIFO with no writer returns at once instead of
    // waiting for one; the type is then refused from fstat.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if let Some(what) = not_regular(&meta) {
        return Err(format!(
            "is {what}, not a regular file: a policy must be a regular *.toml file; remove or rename it"
        ));
    }
    if meta.len() > MAX_POLICY_BYTES {
        return Err(format!(
            "is {} bytes, over the {MAX_POLICY_BYTES}-byte limit for a policy file",
            meta.len()
        ));
    }
    let mut text = String::new();
    // Bounded even if the file grows while it is read.
    (&mut file)
        .take(MAX_POLICY_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(format!(
            "grew over the {MAX_POLICY_BYTES}-byte limit for a policy file while read"
        ));
    }
    Ok((text, world_writable(&meta, "policy file")))
}

/// What a non-regular file is, in words.
fn not_regular(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a named pipe (FIFO)")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// A warning when anyone may write `meta`'s file: anyone could then change how
/// every flow is marked.
pub fn world_writable(meta: &Metadata, what: &str) -> Option<String> {
    let mode = meta.permissions().mode();
    (mode & 0o002 != 0).then(|| {
        format!(
            "{what} is writable by every user (mode {:o}): anyone can change the marking; chmod o-w",
            mode & 0o7777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_a_device_a_directory_and_an_oversized_file_are_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK this open() waits for a writer forever.
        let e = read_policy_file(&fifo).unwrap_err();
        assert!(e.contains("named pipe (FIFO)"), "{e}");
        let zero = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = read_policy_file(&zero).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let sub = dir.path().join("x.toml");
        std::fs::create_dir(&sub).unwrap();
        let e = read_policy_file(&sub).unwrap_err();
        assert!(e.contains("a directory"), "{e}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_POLICY_BYTES as usize + 1]).unwrap();
        let e = read_policy_file(&big).unwrap_err();
        assert!(e.contains("over the 1048576-byte limit"), "{e}");
    }

    #[test]
    fn a_world_writable_policy_is_read_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "experiment = 2\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            read_policy_file(&p).unwrap(),
            ("experiment = 2\n".into(), None)
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (_, warning) = read_policy_file(&p).unwrap();
        assert!(warning.unwrap().contains("mode 666"));
    }
}
