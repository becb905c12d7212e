//! Opening a user's image path: the one place that decides what kind of file
//! a path names before anything opens it for real. Used by the VMM (pmem and
//! disk images) and by `cargo xtask` (`format`, `inspect`, `reproduce`).
//!
//! * A regular file is opened as asked; its size is its length.
//! * A block device (a loop device, `/dev/pmem0`) is opened read-only only;
//!   its size comes from the device (seek to its end), not from its metadata
//!   (which says 0).
//! * A FIFO, a socket, a directory or a character device is refused with an
//!   error that says what it is, without opening it (opening a FIFO blocks
//!   until a writer appears). A DAX character device (`/dev/dax0.0`) gets a
//!   hint: use the namespace in fsdax mode (`/dev/pmem0`) or an image file.
//!
//! The open itself uses `O_NONBLOCK` and checks the opened file's type again,
//! so a path swapped for a FIFO between the check and the open cannot block
//! either.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What kind of file an image path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Regular,
    BlockDevice,
    Fifo,
    Socket,
    Directory,
    CharDevice,
    Other,
}

impl ImageKind {
    fn of(t: std::fs::FileType) -> Self {
        if t.is_file() {
            ImageKind::Regular
        } else if t.is_block_device() {
            ImageKind::BlockDevice
        } else if t.is_fifo() {
            ImageKind::Fifo
        } else if t.is_socket() {
            ImageKind::Socket
        } else if t.is_dir() {
            ImageKind::Directory
        } else if t.is_char_device() {
            ImageKind::CharDevice
        } else {
            ImageKind::Other
        }
    }
}

/// Why an image path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is a FIFO (named pipe), not an image file; opening it would wait for a writer for ever", path.display())]
    Fifo { path: PathBuf },
    #[error("{} is a socket, not an image file", path.display())]
    Socket { path: PathBuf },
    #[error("{} is a directory, not an image file", path.display())]
    Directory { path: PathBuf },
    #[error("{} is a character device, which is not supported (a DAX character device such as /dev/dax0.0 cannot be used: switch the namespace to fsdax mode and use its block device, e.g. /dev/pmem0, or copy it into an image file)", path.display())]
    CharDevice { path: PathBuf },
    #[error("{} is not a regular file or a block device", path.display())]
    Other { path: PathBuf },
    #[error("{} is a block device, which is only used read-only (copy it into an image file to write to it)", path.display())]
    BlockDeviceWrite { path: PathBuf },
}

/// An opened image: the file, its size and its kind (regular or block device).
#[derive(Debug)]
pub struct ImageFile {
    pub file: File,
    pub size: u64,
    pub kind: ImageKind,
}

/// Refuses every kind that is not a regular file or a block device, with an
/// error that names the kind (and, for a character device, what to do).
pub fn check_kind(path: &Path, kind: ImageKind) -> Result<(), ImageFileError> {
    let path = path.to_path_buf();
    match kind {
        ImageKind::Regular | ImageKind::BlockDevice => Ok(()),
        ImageKind::Fifo => Err(ImageFileError::Fifo { path }),
        ImageKind::Socket => Err(ImageFileError::Socket { path }),
        ImageKind::Directory => Err(ImageFileError::Directory { path }),
        ImageKind::CharDevice => Err(ImageFileError::CharDevice { path }),
        ImageKind::Other => Err(ImageFileError::Other { path }),
    }
}

/// What `path` names (following symbolic links), without opening it.
/// `Ok(None)` when nothing exists there.
pub fn classify(path: &Path) -> Result<Option<ImageKind>, ImageFileError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(ImageKind::of(m.file_type()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ImageFileError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The size of an open image: a regular file's length, or a block device's
/// size as the device reports it (its metadata length is 0).
pub fn image_size(file: &mut File, kind: ImageKind) -> io::Result<u64> {
    match kind {
        ImageKind::BlockDevice => {
            let size = file.seek(SeekFrom::End(0))?;
            file.seek(SeekFrom::Start(0))?;
            Ok(size)
        }
        _ => Ok(file.metadata()?.len()),
    }
}

/// Opens an existing image path, read-only or read-write, after checking what
/// it is (see the module docs). Never blocks on a FIFO.
pub fn open_image_file(path: &Path, writable: bool) -> Result<ImageFile, ImageFileError> {
    let io_err = |source| ImageFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let kind = match classify(path)? {
        Some(k) => k,
        None => return Err(io_err(io::Error::from_raw_os_error(libc::ENOENT))),
    };
    check_kind(path, kind)?;
    if writable && kind == ImageKind::BlockDevice {
        return Err(ImageFileError::BlockDeviceWrite {
            path: path.to_path_buf(),
        });
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    // The path may have changed since `classify`: check what was opened.
    let opened = ImageKind::of(file.metadata().map_err(io_err)?.file_type());
    check_kind(path, opened)?;
    if opened != kind {
        return Err(io_err(io::Error::other(
            "the file changed while it was opened",
        )));
    }
    clear_nonblock(&file).map_err(io_err)?;
    let size = image_size(&mut file, kind).map_err(io_err)?;
    Ok(ImageFile { file, size, kind })
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function's caller owns;
    // no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::tempdir::TempDir;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Runs `f` on a thread and fails the test if it takes more than 10 s, so
    /// a regression (a blocking open) cannot hang the test run.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("opening the path blocked")
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = TempDir::new().unwrap();
        let p = d.as_path().join("fifo");
        mkfifo(&p);
        for writable in [false, true] {
            let q = p.clone();
            let e = within_10s(move || open_image_file(&q, writable)).unwrap_err();
            assert!(matches!(e, ImageFileError::Fifo { .. }), "{e}");
            assert!(e.to_string().contains("FIFO"), "{e}");
        }
    }

    #[test]
    fn directories_sockets_and_char_devices_are_refused() {
        let d = TempDir::new().unwrap();
        let e = open_image_file(d.as_path(), false).unwrap_err();
        assert!(matches!(e, ImageFileError::Directory { .. }), "{e}");
        let sock = d.as_path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = open_image_file(&sock, false).unwrap_err();
        assert!(matches!(e, ImageFileError::Socket { .. }), "{e}");
        let e = open_image_file(Path::new("/dev/null"), false).unwrap_err();
        assert!(matches!(e, ImageFileError::CharDevice { .. }), "{e}");
        assert!(e.to_string().contains("/dev/dax0.0"), "{e}");
        let e = open_image_file(&d.as_path().join("none"), false).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }

    #[test]
    fn a_regular_file_is_opened_with_its_length() {
        let d = TempDir::new().unwrap();
        let p = d.as_path().join("img");
        File::create(&p).unwrap().set_len(3 << 20).unwrap();
        let f = open_image_file(&p, true).unwrap();
        assert_eq!((f.size, f.kind), (3 << 20, ImageKind::Regular));
        // Blocking mode again (the image's reads must not see EAGAIN).
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on an open descriptor.
        let fl = unsafe { libc::fcntl(f.file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        // The block-device branch sizes by seeking to the end (what a loop
        // device needs: see the ignored test below); on a file it agrees.
        let mut file = f.file;
        assert_eq!(
            image_size(&mut file, ImageKind::BlockDevice).unwrap(),
            3 << 20
        );
        use std::io::Seek;
        assert_eq!(file.stream_position().unwrap(), 0, "rewound");
    }

    /// Attaches a loop device to a 3 MiB file; detaches it on drop.
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    #[test]
    #[ignore = "needs root and losetup (a loop device)"]
    fn a_block_device_is_read_only_and_sized_by_the_device() {
        let d = TempDir::new().unwrap();
        let p = d.as_path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(3 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"pcache", 4096).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed");
        let dev = Loop(String::from_utf8(out.stdout).unwrap().trim().to_string());
        let dp = Path::new(&dev.0);
        assert_eq!(std::fs::metadata(dp).unwrap().len(), 0, "metadata says 0");
        let img = open_image_file(dp, false).unwrap();
        assert_eq!((img.size, img.kind), (3 << 20, ImageKind::BlockDevice));
        let mut b = [0u8; 6];
        std::os::unix::fs::FileExt::read_exact_at(&img.file, &mut b, 4096).unwrap();
        assert_eq!(&b, b"pcache");
        let e = open_image_file(dp, true).unwrap_err();
        assert!(matches!(e, ImageFileError::BlockDeviceWrite { .. }), "{e}");
    }
}
