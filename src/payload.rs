//! Payload files: each request's raw body in its own 0600 file, in a private 0700 directory that one daemon
//! owns (an exclusive `flock` on the directory itself, and on `.lock` in it), removed when the request ends
//! whatever happened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, CWD, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

const LOCK_FILE: &str = ".lock";

#[derive(Debug)]
pub struct PayloadDir {
    path: PathBuf,
    /// Random for each run, in every file name: a script a killed daemon left running still holds the path
    /// of its own payload, and must never find another request's body there after a restart.
    run: u32,
    next: AtomicU64,
    /// Held for the daemon's lifetime: the flocks on them mark the directory as ours.
    _locks: [File; 2],
}

impl PayloadDir {
    /// Creates (or adopts) the directory, takes its lock, and removes files a crashed run left behind,
    /// returning how many: the caller reports them, once it has said where it listens.
    pub fn open(path: &Path) -> io::Result<(PayloadDir, usize)> {
        let context = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("payload_dir {}: {what}: {e}", path.display()),
            )
        };
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(context("cannot create", e)),
        }
        let meta = fs::symlink_metadata(path).map_err(|e| context("cannot stat", e))?;
        let euid = rustix::process::geteuid().as_raw();
        // InvalidInput, for what only the operator can mend (the daemon exits 78, not restarted).
        if !meta.is_dir() || meta.uid() != euid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "payload_dir {} must be a directory owned by uid {euid}",
                    path.display()
                ),
            ));
        }
        // Never adopt a directory that holds anything but ours (`payload_dir = "/tmp"`): it would be made
        // private and emptied.
        let foreign = fs::read_dir(path)
            .map_err(|e| context("cannot list", e))?
            .filter_map(Result::ok)
            .find(|entry| !is_ours(&entry.file_name()));
        if let Some(entry) = foreign {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "payload_dir {} holds {:?}, which is not a hookrunner payload file: give hookrunner \
                     a directory of its own",
                    path.display(),
                    entry.file_name()
                ),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .map_err(|e| context("cannot chmod 0700", e))?;
        }
        // The directory itself first: a `.lock` someone removed must not let a second daemon empty the
        // directory under the first, and systemd-tmpfiles leaves a directory alone while it is locked (its
        // age-based cleaning of $TMPDIR, where the default payload_dir lives outside the service).
        let directory = File::open(path).map_err(|e| context("cannot open", e))?;
        // `.lock` too, as daemons before this one locked only it.
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path.join(LOCK_FILE))
            .map_err(|e| context("cannot open lock file", e))?;
        for file in [&directory, &lock] {
            match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => {
                    return Err(io::Error::other(format!(
                        "payload_dir {} is in use by another hookrunner; give each daemon its own \
                         payload_dir",
                        path.display()
                    )));
                }
                Err(e) => return Err(context("cannot lock", e.into())),
            }
        }
        let dir = PayloadDir {
            path: path.to_path_buf(),
            run: run_tag(),
            next: AtomicU64::new(0),
            _locks: [directory, lock],
        };
        let stale = dir.remove_stale().map_err(|e| context("cannot clean", e))?;
        Ok((dir, stale))
    }

    /// Removes the payload files a crashed run left (the directory holds nothing else: see `open`). NFS
    /// refuses to remove a `.nfs` file that a process of this machine still holds open (a script the
    /// last run left running): it goes by itself when that closes it.
    fn remove_stale(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_name() == LOCK_FILE {
                continue;
            }
            // What a script made of its payload beside it (`gzip "$1"`, `mkdir "$1.d"`) may be a directory.
            let gone = if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())
            } else {
                fs::remove_file(entry.path())
            };
            match gone {
                Ok(()) => removed += 1,
                Err(e) if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name(&self, n: u64) -> String {
        format!("payload-{:08x}-{n}", self.run)
    }

    /// A new, empty payload file. Names are a counter: the directory is ours alone and emptied at start, and
    /// `create_new` would refuse a clash rather than share a file.
    pub fn create(&self) -> io::Result<Payload> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.path.join(self.name(n));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Payload {
            path,
            file: Some(file),
            naming: Naming::Named,
        })
    }

    /// A new payload file without a name yet (`O_TMPFILE`): it appears in the directory only when
    /// [`Payload::finish`] links it, so a body streamed to disk before the request is authenticated and
    /// routed leaves no file behind when it is refused. On a file system without `O_TMPFILE`, see
    /// [`PayloadDir::create_anonymous`].
    pub fn create_unnamed(&self) -> io::Result<Payload> {
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        match rustix::fs::open(&self.path, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                Ok(Payload {
                    path: self.path.join(self.name(n)),
                    file: Some(File::from(fd)),
                    naming: Naming::Linked,
                })
            }
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => self.create_anonymous(),
            Err(e) => Err(e.into()),
        }
    }

    /// Where there is no `O_TMPFILE` (overlayfs before Linux 6.6, NFS): a file whose name is removed as
    /// soon as it is created, so none stays in the directory while an unverified body streams in (NFS
    /// keeps it as a `.nfs` file while it is open); [`Payload::finish`] copies it to its name. What a
    /// crash leaves (the file, between its creation and its removal; NFS's `.nfs` file) is removed at
    /// start.
    fn create_anonymous(&self) -> io::Result<Payload> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.path.join(self.name(n));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut payload = Payload {
            path,
            file: Some(file),
            naming: Naming::Named,
        };
        // On an error the payload still has its name, and dropping it removes the file.
        fs::remove_file(&payload.path)?;
        payload.naming = Naming::Copied;
        Ok(payload)
    }
}

/// A random tag for this run's file names (the clock's nanoseconds where /dev/urandom cannot be read).
fn run_tag() -> u32 {
    let mut seed = [0u8; 4];
    match File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut seed)) {
        Ok(()) => u32::from_ne_bytes(seed),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    }
}

/// `.lock`, `payload-RUN-N` (RUN eight hex digits) or the older `payload-N`: the only names hookrunner
/// creates in its directory; and on NFS `.nfs` and hex digits, the name NFS gives one of them removed while
/// still open (a payload a script still reads, or an unverified body streaming in without `O_TMPFILE`),
/// which a crash can leave behind.
/// Whether a name in a payload directory is one hookrunner makes there (its lock, a payload file, NFS's
/// stand-in for a removed one still open).
pub fn is_ours(name: &std::ffi::OsStr) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    // The digits of a payload's number, and anything after them: scripts run with the directory's owner and
    // may leave what they made of their `$1` beside it (`$1.gz`, `$1.bak`, `$1.d/`), which is ours to
    // remove at the next start, not a sign of somebody else's directory.
    let numbered = |s: &str| s.bytes().next().is_some_and(|b| b.is_ascii_digit());
    name == LOCK_FILE
        || name.to_str().is_some_and(|n| {
            n.strip_prefix(".nfs")
                .is_some_and(|rest| !rest.is_empty() && hex(rest))
        })
        || name.to_str().is_some_and(|n| {
            n.strip_prefix("payload-")
                .is_some_and(|rest| match rest.split_once('-') {
                    Some((run, n)) if run.len() == 8 && hex(run) => numbered(n),
                    // Names of daemons before the run tag: `payload-N`.
                    _ => numbered(rest) && !rest.contains('-'),
                })
        })
}

/// A payload file, removed on drop.
#[derive(Debug)]
pub struct Payload {
    path: PathBuf,
    file: Option<File>,
    naming: Naming,
}

/// Whether a payload file has its name in the directory yet, and how [`Payload::finish`] gives it one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    Named,
    /// An `O_TMPFILE` file: linked to its name.
    Linked,
    /// A file whose name was removed at once: copied to its name.
    Copied,
}

impl Payload {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives an unnamed file its name, and closes the file so the script sees it complete and does not
    /// inherit it.
    pub fn finish(&mut self) -> io::Result<()> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        match self.naming {
            Naming::Named => {}
            Naming::Linked => {
                // Linking through /proc is how an O_TMPFILE file gets a name without
                // CAP_DAC_READ_SEARCH.
                let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                rustix::fs::linkat(CWD, fd_path, CWD, &self.path, AtFlags::SYMLINK_FOLLOW)?;
                self.naming = Naming::Named;
            }
            Naming::Copied => {
                let mut named = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&self.path)?;
                // Named from here on, so that a failed copy is removed on drop too.
                self.naming = Naming::Named;
                file.seek(SeekFrom::Start(0))?;
                io::copy(&mut file, &mut named)?;
            }
        }
        Ok(())
    }
}

impl Write for Payload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(file) => file.write(buf),
            None => Err(io::Error::other("payload file already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        self.file = None;
        if self.naming != Naming::Named {
            return;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            // The script removed or renamed its `$1`: its own business (a renamed one beside it goes at
            // the next start).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::error!("cannot remove payload file {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_unique_files_removed_on_drop_and_stale_ones_at_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir_path = tmp.path().join("payloads");
        let first;
        {
            let (dir, stale) = PayloadDir::open(&dir_path).expect("open");
            assert_eq!(stale, 0, "a new directory holds nothing stale");
            assert_eq!(fs::metadata(&dir_path).expect("stat").mode() & 0o777, 0o700);
            assert!(
                PayloadDir::open(&dir_path).is_err(),
                "a second daemon is refused"
            );
            let mut a = dir.create().expect("create a");
            let b = dir.create().expect("create b");
            assert_ne!(a.path(), b.path());
            a.write_all(b"body").expect("write");
            a.finish().expect("finish");
            assert_eq!(fs::read(a.path()).expect("read"), b"body");
            assert_eq!(fs::metadata(a.path()).expect("stat").mode() & 0o777, 0o600);
            first = a.path().to_path_buf();
            drop(a);
            assert!(!first.exists());
            std::mem::forget(b); // as if the daemon crashed mid-request
        }
        // What NFS leaves of a payload file removed while open, when the machine then went down.
        fs::write(dir_path.join(".nfs000000000123abcd00000004"), "").expect("nfs file");
        assert_eq!(
            fs::read_dir(&dir_path).expect("ls").count(),
            3,
            "lock + stale files"
        );
        let (dir, stale) = PayloadDir::open(&dir_path).expect("reopen");
        assert_eq!(stale, 2, "the stale files are counted");
        let left: Vec<_> = fs::read_dir(&dir_path)
            .expect("ls")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(LOCK_FILE)]);
        // A script the crashed run left behind still holds `first`: the new run never reuses the name.
        let again = dir.create().expect("create after the restart");
        assert_ne!(
            again.path(),
            first,
            "a restarted daemon's first payload has a new name"
        );
    }

    #[test]
    fn an_unnamed_file_appears_only_when_finished() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir_path = tmp.path().join("payloads");
        let (dir, _) = PayloadDir::open(&dir_path).expect("open");
        let names = || {
            let mut names: Vec<String> = fs::read_dir(&dir_path)
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // With O_TMPFILE (this test's file system has it), and as where there is none.
        type Create = fn(&PayloadDir) -> io::Result<Payload>;
        let kinds: [(&str, Create); 2] = [
            ("O_TMPFILE", PayloadDir::create_unnamed),
            ("unlinked at once", PayloadDir::create_anonymous),
        ];
        for (kind, create) in kinds {
            let mut refused = create(&dir).expect("create");
            refused.write_all(b"never seen").expect("write");
            assert_eq!(
                names(),
                [LOCK_FILE],
                "{kind}: an unnamed file is in no directory listing"
            );
            drop(refused);
            assert_eq!(names(), [LOCK_FILE], "{kind}");
            let mut accepted = create(&dir).expect("create");
            let body = vec![b'x'; 300 << 10];
            accepted.write_all(&body).expect("write");
            assert_eq!(names(), [LOCK_FILE], "{kind}");
            accepted.finish().expect("name");
            assert_eq!(fs::read(accepted.path()).expect("read"), body, "{kind}");
            assert_eq!(
                fs::metadata(accepted.path()).expect("stat").mode() & 0o777,
                0o600,
                "{kind}"
            );
            drop(accepted);
            assert_eq!(
                names(),
                [LOCK_FILE],
                "{kind}: removed on drop like any payload file"
            );
        }
    }

    #[test]
    fn a_directory_holding_anything_not_ours_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(shared.join("someone-elses.txt"), "keep me").expect("write");
        fs::write(shared.join("payload-7"), "stale").expect("write");
        let error = PayloadDir::open(&shared).expect_err("refused");
        assert!(error.to_string().contains("someone-elses.txt"), "{error}");
        assert_eq!(
            fs::read(shared.join("someone-elses.txt")).expect("kept"),
            b"keep me"
        );
        assert!(
            shared.join("payload-7").exists(),
            "nothing is removed from a refused directory"
        );
        assert_eq!(
            fs::metadata(&shared).expect("stat").mode() & 0o777,
            0o755,
            "nor is it chmodded"
        );
        assert!(!shared.join(LOCK_FILE).exists());
        for name in [
            "payload-",
            "payload-x1",
            "Payload-1",
            ".lock2",
            "payload-abc-1",
            "payload-0123456z-1",
        ] {
            assert!(!is_ours(std::ffi::OsStr::new(name)), "{name}");
        }
        for name in [".nfs", ".nfsxyz", ".nfs0000-1"] {
            assert!(!is_ours(std::ffi::OsStr::new(name)), "{name}");
        }
        for name in [
            "payload-7",
            "payload-0123abcd-7",
            ".nfs000000000123abcd00000004",
            // What scripts leave beside their `$1`.
            "payload-0123abcd-7.gz",
            "payload-0123abcd-7.bak",
            "payload-0123abcd-7~",
            "payload-7.done",
        ] {
            assert!(is_ours(std::ffi::OsStr::new(name)), "{name}");
        }
    }
}
