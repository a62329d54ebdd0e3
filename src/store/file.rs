//! `file://PATH/`: a directory as a destination, resumable like S3. Each
//! part is written with `pwrite` at its own offset into a staging file
//! (`.ferry-upload.<id>`) beside the object, which is then fsynced and renamed
//! into place; small objects are written temp, fsync, rename.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};

use bytes::Bytes;

use super::{Address, Backend, ObjectInfo, PartReceipt, StoreError, blocking, url_escape};
use crate::chunk::Part;

pub(super) struct FileBackend {
    dir: PathBuf,
    object_url_base: String,
}

impl FileBackend {
    pub(super) fn new(dir: PathBuf) -> (FileBackend, Address) {
        let abs = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
        let mut base = format!("file://{}", url_escape(&abs.display().to_string()));
        if !base.ends_with('/') {
            base.push('/');
        }
        (
            FileBackend {
                dir,
                object_url_base: base,
            },
            Address::File { dir: abs },
        )
    }

    /// The object and its staging file; the staging name is short (the upload
    /// id is unique) so a 255-byte object name still fits.
    fn paths(&self, name: &str, upload_id: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(name),
            self.dir.join(format!(".ferry-upload.{upload_id}")),
        )
    }

    fn io(&self, op: &'static str, name: &str) -> impl Fn(std::io::Error) -> StoreError {
        let key = self.key(name);
        move |source| StoreError::Io {
            op,
            key: key.clone(),
            source,
        }
    }
}

#[async_trait::async_trait]
impl Backend for FileBackend {
    fn key(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn object_url(&self, name: &str) -> String {
        format!("{}{}", self.object_url_base, url_escape(name))
    }

    fn import_url(&self, _name: &str) -> Result<String, String> {
        let dir = std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone());
        Err(format!(
            "this destination is a local directory ({}); OCI imports custom images only from \
             OCI Object Storage: ship the image to an s3:// destination on OCI's \
             S3-compatible endpoint to get a CreateImage body",
            dir.display()
        ))
    }

    async fn begin(&self, name: &str) -> Result<String, StoreError> {
        let id = format!("{:016x}", rand::random::<u64>());
        let (_, staging) = self.paths(name, &id);
        let dir = self.dir.clone();
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
                .map(drop)
        })
        .await
        .map_err(self.io("begin upload", name))?;
        Ok(id)
    }

    async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<String, StoreError> {
        let (_, staging) = self.paths(name, upload_id);
        let bytes: Bytes = part.bytes().clone();
        let offset = part.offset();
        blocking(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&staging)?;
            f.write_all_at(&bytes, offset)
        })
        .await
        .map_err(self.io("write part", name))?;
        Ok(String::new())
    }

    fn server_check(&self) -> &'static str {
        "none"
    }

    async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        receipts: &[PartReceipt],
    ) -> Result<Option<u32>, StoreError> {
        let (final_path, staging) = self.paths(name, upload_id);
        let dir = self.dir.clone();
        let size: u64 = receipts.iter().map(|r| r.size_bytes).sum();
        blocking(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&staging)?;
            // A resumed staging file may be longer than a smaller new plan.
            f.set_len(size)?;
            f.sync_all()?;
            std::fs::rename(&staging, &final_path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map(|()| None)
        .map_err(self.io("complete upload", name))
    }

    async fn abort_key(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let (_, staging) = self.paths("", upload_id);
        blocking(move || match std::fs::remove_file(&staging) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        })
        .await
        .map_err(|source| StoreError::Io {
            op: "abort upload",
            key: key.to_string(),
            source,
        })
    }

    async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError> {
        let meta = tokio::fs::metadata(self.dir.join(name))
            .await
            .map_err(self.io("head", name))?;
        Ok(ObjectInfo {
            size_bytes: meta.len(),
            parts: None,
            crc32c: None,
        })
    }

    async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError> {
        let path = self.dir.join(name);
        blocking(move || {
            let f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 8 << 20];
            let (mut crc, mut size) = (0u32, 0u64);
            loop {
                let n = f.read_at(&mut buf, size)?;
                if n == 0 {
                    return Ok((size, crc));
                }
                crc = crate::crc::crc32c_append(crc, &buf[..n]);
                size += n as u64;
            }
        })
        .await
        .map_err(self.io("read back", name))
    }

    async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let target = name.to_string();
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!(".ferry-tmp.{:016x}", rand::random::<u64>()));
            std::fs::write(&tmp, &body)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, dir.join(&target))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(self.io("write", name))
    }

    async fn get_small(&self, name: &str) -> Result<Bytes, StoreError> {
        tokio::fs::read(self.dir.join(name))
            .await
            .map(Bytes::from)
            .map_err(self.io("read", name))
    }

    async fn probe(&self, need: u64) -> Result<(), StoreError> {
        let d = self.dir.clone();
        blocking(move || {
            std::fs::create_dir_all(&d)?;
            let probe = d.join(".ferry-probe");
            std::fs::write(&probe, b"")?;
            std::fs::remove_file(&probe)?;
            let free = free_bytes(&d)?;
            if free < need {
                let show = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "its filesystem has {} free, less than one part ({}): every part would fail; free some space",
                        show(free),
                        show(need)
                    ),
                ));
            }
            Ok(())
        })
        .await
        .map_err(|source| StoreError::Io {
            op: "probe",
            key: self.dir.display().to_string(),
            source,
        })
    }

    async fn sweep(&self, live: &HashSet<String>) {
        let dir = self.dir.clone();
        let live = live.clone();
        let _ = blocking(move || {
            for e in std::fs::read_dir(&dir)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let orphan = name.starts_with(".ferry-tmp.")
                    || name
                        .strip_prefix(".ferry-upload.")
                        .is_some_and(|id| !live.contains(id));
                if orphan {
                    tracing::info!(
                        "removing {}, left by an interrupted write",
                        e.path().display()
                    );
                    let _ = std::fs::remove_file(e.path());
                }
            }
            Ok(())
        })
        .await;
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
fn free_bytes(dir: &FsPath) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs with a NUL-terminated path and a zeroed struct to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}
