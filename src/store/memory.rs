//! `memory://NAME/PREFIX/`: an in-process store for benchmarks and tests;
//! its objects are kept as their parts and are gone when ferry exits.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;

use super::{Address, Backend, ObjectInfo, PartReceipt, StoreError, url_escape};
use crate::chunk::Part;

/// An in-process object store: objects are kept as their parts.
#[derive(Default)]
pub(super) struct MemoryStore {
    uploads: Mutex<HashMap<String, BTreeMap<u32, Bytes>>>,
    objects: Mutex<HashMap<String, Arc<Vec<Bytes>>>>,
}

impl MemoryStore {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn missing(op: &'static str, key: &str, what: &str) -> StoreError {
        StoreError::Io {
            op,
            key: key.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()),
        }
    }

    fn object(&self, op: &'static str, key: &str) -> Result<Arc<Vec<Bytes>>, StoreError> {
        Self::lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| Self::missing(op, key, "no such object"))
    }
}

/// Every memory store of the process, by name.
static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<MemoryStore>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(super) struct MemoryBackend {
    store: Arc<MemoryStore>,
    name: String,
    prefix: String,
}

impl MemoryBackend {
    pub(super) fn new(name: &str, prefix: String) -> Result<(MemoryBackend, Address), StoreError> {
        let store = MEMORY_STORES
            .lock()
            .map_err(|_| StoreError::Setup("memory store registry poisoned".into()))?
            .entry(name.to_string())
            .or_default()
            .clone();
        Ok((
            MemoryBackend {
                store,
                name: name.to_string(),
                prefix,
            },
            Address::Memory {
                name: name.to_string(),
            },
        ))
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn object_url(&self, name: &str) -> String {
        format!("memory://{}/{}", self.name, url_escape(&self.key(name)))
    }

    fn import_url(&self, _name: &str) -> Result<String, String> {
        Err(
            "this destination is ferry's in-memory store (memory://, for tests and benchmarks); \
             OCI imports custom images only from OCI Object Storage"
                .into(),
        )
    }

    async fn begin(&self, _name: &str) -> Result<String, StoreError> {
        let id = format!("{:016x}", rand::random::<u64>());
        MemoryStore::lock(&self.store.uploads).insert(id.clone(), BTreeMap::new());
        Ok(id)
    }

    async fn put_part(
        &self,
        name: &str,
        upload_id: &str,
        part: &Part,
    ) -> Result<String, StoreError> {
        // The store keeps what it is given. Pooled buffers are copied, so
        // their share of the budget comes back when the part is sent, as
        // with any store; page-cache mappings are kept as they are.
        let bytes = if part.bytes_are_shareable() {
            part.bytes().clone()
        } else {
            let len = part.bytes().len();
            let mut copy = crate::chunk::buffer(len).map_err(|source| StoreError::Io {
                op: "upload part",
                key: self.key(name),
                source,
            })?;
            copy[..len].copy_from_slice(part.bytes());
            Bytes::from_owner(copy).slice(..len)
        };
        let mut uploads = MemoryStore::lock(&self.store.uploads);
        let upload = uploads.get_mut(upload_id).ok_or_else(|| {
            MemoryStore::missing("upload part", &self.key(name), "no such upload")
        })?;
        upload.insert(part.index(), bytes);
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
        let key = self.key(name);
        let mut upload = MemoryStore::lock(&self.store.uploads)
            .remove(upload_id)
            .ok_or_else(|| MemoryStore::missing("complete upload", &key, "no such upload"))?;
        let parts: Option<Vec<Bytes>> = receipts.iter().map(|r| upload.remove(&r.index)).collect();
        let parts = parts.ok_or_else(|| {
            MemoryStore::missing("complete upload", &key, "a listed part was never sent")
        })?;
        MemoryStore::lock(&self.store.objects).insert(key, Arc::new(parts));
        Ok(None)
    }

    async fn abort_key(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        MemoryStore::lock(&self.store.uploads).remove(upload_id);
        Ok(())
    }

    async fn head(&self, name: &str) -> Result<ObjectInfo, StoreError> {
        let parts = self.store.object("head", &self.key(name))?;
        Ok(ObjectInfo {
            size_bytes: parts.iter().map(|b| b.len() as u64).sum(),
            parts: u32::try_from(parts.len()).ok(),
            crc32c: None,
        })
    }

    async fn readback(&self, name: &str) -> Result<(u64, u32), StoreError> {
        let parts = self.store.object("read back", &self.key(name))?;
        Ok(parts.iter().fold((0u64, 0u32), |(size, crc), b| {
            (size + b.len() as u64, crate::crc::crc32c_append(crc, b))
        }))
    }

    async fn put_small(&self, name: &str, body: Bytes) -> Result<(), StoreError> {
        MemoryStore::lock(&self.store.objects).insert(self.key(name), Arc::new(vec![body]));
        Ok(())
    }

    async fn get_small(&self, name: &str) -> Result<Bytes, StoreError> {
        let parts = self.store.object("read", &self.key(name))?;
        Ok(parts.iter().flat_map(|b| b.iter().copied()).collect())
    }

    async fn probe(&self, _part_bytes: u64) -> Result<(), StoreError> {
        Ok(())
    }
}
