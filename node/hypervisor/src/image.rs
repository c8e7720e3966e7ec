//! Content-addressed qcow2 base images and per-VM copy-on-write overlays, through `qemu-img`.
//!
//! A base image lives at `<dir>/base/<sha256>.qcow2`, read-only, named by the SHA-256 of its
//! bytes. Many VMs share it through their own overlay. Before a VM boots, the base is hashed
//! again and compared with its name ([`ImageStore::verify`]); a tampered or truncated base
//! refuses to boot. The overlay's own backing-file header is not trusted: QEMU is given the
//! backing chain explicitly with `-blockdev`, so an overlay that names another host file as its
//! backing file cannot make QEMU open it.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// Largest `qemu-img info` output accepted.
const MAX_TOOL_OUTPUT: usize = 1 << 20;

/// SHA-256 of a base image's bytes, 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageId(String);

impl ImageId {
    /// Parses a hex digest.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidSpec(format!(
                "image id '{}' is not 64 hex digits",
                s.escape_debug()
            )));
        }
        Ok(ImageId(s.to_ascii_lowercase()))
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ImageId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        ImageId::parse(&s)
    }
}
impl From<ImageId> for String {
    fn from(id: ImageId) -> String {
        id.0
    }
}
impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest: [u8; 32] = h.finalize().into();
    Ok(hex::encode(digest))
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageInfo {
    /// `qcow2`, `raw`, ...
    pub format: String,
    /// Virtual size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Backing file named in the header, if any.
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

/// The image store under a node's data dir.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    qemu_img: PathBuf,
}

impl ImageStore {
    /// Opens (creating) the store at `dir`, using the `qemu-img` binary at `qemu_img`.
    pub fn open(dir: impl Into<PathBuf>, qemu_img: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("base"))
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(ImageStore {
            dir,
            qemu_img: qemu_img.into(),
        })
    }

    /// Path of a base image (whether or not it exists).
    pub fn base_path(&self, id: &ImageId) -> PathBuf {
        self.dir.join("base").join(format!("{id}.qcow2"))
    }

    /// Runs `qemu-img info` on `path`.
    pub fn info(&self, path: &Path) -> Result<ImageInfo, Error> {
        let out = self.qemu_img(&[
            "info".as_ref(),
            "--output=json".as_ref(),
            "-U".as_ref(),
            path.as_os_str(),
        ])?;
        if out.len() > MAX_TOOL_OUTPUT {
            return Err(Error::Tool {
                tool: "qemu-img",
                detail: "info output too large".into(),
            });
        }
        serde_json::from_slice(&out).map_err(|e| Error::Image {
            path: path.to_owned(),
            detail: format!("unreadable qemu-img info: {e}"),
        })
    }

    /// Imports `src` as a base image: raw images are converted to qcow2; images with a backing
    /// file are refused (a base must be self-contained). Returns its content id.
    pub fn import(&self, src: &Path) -> Result<ImageId, Error> {
        let info = self.info(src)?;
        if info.backing_filename.is_some() {
            return Err(Error::Image {
                path: src.to_owned(),
                detail: "a base image must not have a backing file".into(),
            });
        }
        let tmp = self
            .dir
            .join("base")
            .join(format!(".import-{}.tmp", std::process::id()));
        match info.format.as_str() {
            "qcow2" => {
                std::fs::copy(src, &tmp)
                    .map_err(|e| Error::io(format!("copy {}", src.display()), e))?;
            }
            "raw" => {
                self.qemu_img(&[
                    "convert".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "raw".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    src.as_os_str(),
                    tmp.as_os_str(),
                ])?;
            }
            other => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Image {
                    path: src.to_owned(),
                    detail: format!("format '{other}' is not supported (qcow2 or raw)"),
                });
            }
        }
        let id = ImageId::parse(&sha256_file(&tmp)?)?;
        let dst = self.base_path(&id);
        set_read_only(&tmp)?;
        std::fs::rename(&tmp, &dst)
            .map_err(|e| Error::io(format!("install {}", dst.display()), e))?;
        Ok(id)
    }

    /// Creates a fresh empty base image of `size_mib` (for blank data disks and tests).
    pub fn create_blank_base(&self, size_mib: u64) -> Result<ImageId, Error> {
        let tmp = self
            .dir
            .join("base")
            .join(format!(".blank-{}.qcow2", std::process::id()));
        self.qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            tmp.as_os_str(),
            format!("{size_mib}M").as_ref(),
        ])?;
        let id = self.import(&tmp);
        let _ = std::fs::remove_file(&tmp);
        id
    }

    /// Hashes the base image again and checks it against its id. Returns its path.
    pub fn verify(&self, id: &ImageId) -> Result<PathBuf, Error> {
        let path = self.base_path(id);
        let actual = sha256_file(&path)?;
        if actual != id.as_str() {
            return Err(Error::Image {
                path,
                detail: format!("content hash is {actual}, expected {id}: refusing to boot"),
            });
        }
        Ok(path)
    }

    /// Creates a qcow2 overlay at `dst` backed by base `id`; `size_mib` grows it.
    /// Returns the overlay's virtual size in MiB.
    pub fn create_overlay(
        &self,
        id: &ImageId,
        dst: &Path,
        size_mib: Option<u64>,
    ) -> Result<u64, Error> {
        let base = self.base_path(id);
        if !base.exists() {
            return Err(Error::Image {
                path: base,
                detail: "no such base image".into(),
            });
        }
        let base_info = self.info(&base)?;
        let base_mib = base_info.virtual_size.div_ceil(1 << 20);
        let size = size_mib.unwrap_or(base_mib).max(base_mib);
        let backing = format!("backing_file={},backing_fmt=qcow2", base.display());
        if backing.contains(",,") || base.to_str().is_none_or(|s| s.contains(',')) {
            return Err(Error::Image {
                path: base,
                detail: "image paths must not contain ','".into(),
            });
        }
        self.qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            backing.as_ref(),
            dst.as_os_str(),
            format!("{size}M").as_ref(),
        ])?;
        Ok(size)
    }

    /// Virtual size of the image at `path`, MiB.
    pub fn virtual_size_mib(&self, path: &Path) -> Result<u64, Error> {
        Ok(self.info(path)?.virtual_size.div_ceil(1 << 20))
    }

    /// Virtual size of base `id`, MiB.
    pub fn base_size_mib(&self, id: &ImageId) -> Result<u64, Error> {
        self.virtual_size_mib(&self.base_path(id))
    }

    fn qemu_img(&self, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, Error> {
        let out = StdCommand::new(&self.qemu_img)
            .args(args)
            .output()
            .map_err(|e| {
                Error::io(
                    format!(
                        "run {} (Debian package qemu-utils)",
                        self.qemu_img.display()
                    ),
                    e,
                )
            })?;
        if !out.status.success() {
            return Err(Error::Tool {
                tool: "qemu-img",
                detail: String::from_utf8_lossy(&out.stderr)
                    .chars()
                    .take(1000)
                    .collect(),
            });
        }
        Ok(out.stdout)
    }
}

fn set_read_only(path: &Path) -> Result<(), Error> {
    let mut perm = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(path, perm)
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn qemu_img() -> PathBuf {
        PathBuf::from("qemu-img")
    }

    #[test]
    fn image_id_parsing() {
        assert!(ImageId::parse("zz").is_err());
        assert!(ImageId::parse(&"g".repeat(64)).is_err());
        let id = ImageId::parse(&"AB".repeat(32)).unwrap();
        assert_eq!(id.as_str(), "ab".repeat(32));
    }

    #[test]
    fn import_verify_overlay_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("images"), qemu_img()).unwrap();
        // A raw source with content gets converted; the id is the hash of the stored qcow2.
        let raw = dir.path().join("src.raw");
        let mut f = std::fs::File::create(&raw).unwrap();
        f.write_all(&vec![7u8; 2 << 20]).unwrap();
        drop(f);
        let id = store.import(&raw).unwrap();
        let base = store.verify(&id).unwrap();
        assert_eq!(sha256_file(&base).unwrap(), id.as_str());
        assert_eq!(store.info(&base).unwrap().format, "qcow2");
        // The same content imports to the same id.
        assert_eq!(store.import(&raw).unwrap(), id);

        let ov = dir.path().join("vm.qcow2");
        let size = store.create_overlay(&id, &ov, Some(8)).unwrap();
        assert_eq!(size, 8);
        let info = store.info(&ov).unwrap();
        assert_eq!(info.virtual_size, 8 << 20);
        assert_eq!(info.backing_filename.as_deref(), base.to_str());

        // Tamper with the base: verification must fail.
        let mut perm = std::fs::metadata(&base).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&base, perm).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&base)
            .unwrap();
        f.write_all(b"evil").unwrap();
        drop(f);
        let err = store.verify(&id).unwrap_err();
        assert!(err.to_string().contains("refusing to boot"), "{err}");
    }

    #[test]
    fn base_with_backing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("images"), qemu_img()).unwrap();
        let id = store.create_blank_base(4).unwrap();
        let ov = dir.path().join("ov.qcow2");
        store.create_overlay(&id, &ov, None).unwrap();
        let err = store.import(&ov).unwrap_err();
        assert!(err.to_string().contains("backing file"), "{err}");
    }
}
