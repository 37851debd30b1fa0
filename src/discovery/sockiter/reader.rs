//! Reading an iterator file to its end: whole records out, in as few read() calls
//! as the kernel allows, and every way a walk can end short made an error.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::{SockIterError, RECORD_SIZE};

/// What the reads of one walk cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReadTally {
    pub io: Duration,
    pub bytes: usize,
    pub reads: usize,
    pub eintr: u64,
}

/// Reads `fd` until end of file, handing `batch` the whole records of each read
/// (a record cut by the end of a read is kept for the next). Ends short, and
/// nothing else: a read error, or an end of file inside a record.
pub(super) fn read_records(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    iter: &'static str,
    tally: &mut ReadTally,
    batch: &mut dyn FnMut(&[u8]) -> Result<(), SockIterError>,
) -> Result<(), SockIterError> {
    assert!(
        buf.len() >= RECORD_SIZE,
        "read buffer smaller than a record"
    );
    let mut filled = 0;
    let mut total = 0;
    loop {
        let t = Instant::now();
        // SAFETY: valid fd; the pointer and length describe the unfilled tail of
        // the caller's buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[filled..].as_mut_ptr().cast(),
                buf.len() - filled,
            )
        };
        tally.io += t.elapsed();
        if n < 0 {
            let source = io::Error::last_os_error();
            if source.kind() == io::ErrorKind::Interrupted {
                tally.eintr += 1;
                continue;
            }
            // EAGAIN included: a read that passed a million sockets without one
            // record (bpf_seq_read's MAX_ITER_OBJECTS); ours write every socket.
            return Err(SockIterError::Read {
                iter,
                bytes: total,
                source,
            });
        }
        let n = n as usize;
        if n == 0 {
            return match filled {
                0 => Ok(()),
                left => Err(SockIterError::Truncated { iter, left }),
            };
        }
        total += n;
        filled += n;
        tally.bytes += n;
        tally.reads += 1;
        let whole = filled - filled % RECORD_SIZE;
        batch(&buf[..whole])?;
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    /// A pipe holding `bytes` written in `pieces`, its write end closed.
    fn pipe_with(bytes: &[u8], pieces: &[usize]) -> std::os::fd::OwnedFd {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(w);
        let mut at = 0;
        for &p in pieces {
            w.write_all(&bytes[at..at + p]).unwrap();
            at += p;
        }
        w.write_all(&bytes[at..]).unwrap();
        r
    }

    fn collect(fd: BorrowedFd<'_>, buf_len: usize) -> (Result<(), SockIterError>, Vec<u8>) {
        let mut buf = vec![0; buf_len];
        let mut got = Vec::new();
        let mut tally = ReadTally::default();
        let r = read_records(fd, &mut buf, "tcp", &mut tally, &mut |b| {
            assert_eq!(b.len() % RECORD_SIZE, 0);
            got.extend_from_slice(b);
            Ok(())
        });
        (r, got)
    }

    #[test]
    fn records_cut_by_a_read_are_joined() {
        let bytes: Vec<u8> = (0..3 * RECORD_SIZE).map(|i| i as u8).collect();
        // A buffer of 1.5 records: every read ends inside one.
        let fd = pipe_with(&bytes, &[]);
        let (r, got) = collect(fd.as_fd(), RECORD_SIZE * 3 / 2);
        r.unwrap();
        assert_eq!(got, bytes);
    }

    #[test]
    fn a_walk_ending_inside_a_record_is_an_error() {
        let bytes = vec![7u8; 2 * RECORD_SIZE + 10];
        let fd = pipe_with(&bytes, &[RECORD_SIZE]);
        let (r, got) = collect(fd.as_fd(), 4 * RECORD_SIZE);
        assert_eq!(got.len(), 2 * RECORD_SIZE);
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                SockIterError::Truncated {
                    iter: "tcp",
                    left: 10
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("dump incomplete"));
    }

    #[test]
    fn a_read_error_is_an_error_naming_the_iterator() {
        // Reading the write end of a pipe fails (EBADF).
        let (_r, w) = nix::unistd::pipe().unwrap();
        let (r, got) = collect(w.as_fd(), 4 * RECORD_SIZE);
        assert!(got.is_empty());
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                SockIterError::Read {
                    iter: "tcp",
                    bytes: 0,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_refused_batch_ends_the_walk() {
        let fd = pipe_with(&vec![0u8; 2 * RECORD_SIZE], &[]);
        let mut buf = vec![0; 4 * RECORD_SIZE];
        let r = read_records(
            fd.as_fd(),
            &mut buf,
            "udp",
            &mut ReadTally::default(),
            &mut |_| {
                Err(SockIterError::Truncated {
                    iter: "udp",
                    left: 1,
                })
            },
        );
        assert!(r.is_err());
    }
}
