//! Finding the cgroup2 mount point (unified hierarchy), where the tracker attaches
//! its cgroup programs so that they see every socket of the host.
//!
//! Pure v2 hosts mount it at /sys/fs/cgroup, hybrid ones (systemd's "hybrid" mode)
//! at /sys/fs/cgroup/unified: read it from /proc/self/mountinfo rather than guess.

use std::path::PathBuf;

/// The first cgroup2 mount point of a mountinfo text (proc(5), /proc/pid/mountinfo),
/// preferring a mount of the hierarchy's root ("/" as the mount's root field).
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = left.split_whitespace();
        let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let path = PathBuf::from(unescape_octal(mount_point));
        if root == "/" {
            return Some(path);
        }
        fallback.get_or_insert(path);
    }
    fallback
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_host_finds_unified() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pure_v2_host_finds_sys_fs_cgroup() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_only_host_has_none() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(find_cgroup2_mount(mi), None);
    }

    #[test]
    fn root_mount_preferred_over_bind_of_subtree() {
        let mi = "50 23 0:38 /sub /mnt/x rw - cgroup2 cgroup2 rw\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn escaped_mount_point_is_unescaped() {
        let mi = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount(mi), Some(PathBuf::from("/mnt/my cg")));
    }
}
