//! keelson's cluster state: the data model ([`data`]), the [`Store`] trait
//! and its two backends, the embedded file store ([`file`]) and etcd v3
//! ([`etcd`]). Depends on no other keelson crate.

pub mod data;
pub mod etcd;
pub mod file;
pub mod node_api;
pub mod params;
pub mod status;
pub mod store;

use std::time::Duration;

pub use data::{ClusterData, ClusterSpec, ProxyView};
pub use store::{Cas, KeyValue, Keys, LeaseId, Store, StoreError, Watch, WatchEvent};

/// A store chosen at run time from its URL.
#[derive(Debug, Clone)]
pub enum AnyStore {
    File(file::FileStore),
    Etcd(Box<etcd::EtcdStore>),
}

/// Opens a store from its URL: `file:///dir` or `etcd://host:port[,host:port...]`.
pub async fn open(url: &str) -> store::Result<AnyStore> {
    open_with(url, &etcd::EtcdSecurity::default()).await
}

/// [`open`], reaching etcd over TLS and with a user as `security` says.
pub async fn open_with(url: &str, security: &etcd::EtcdSecurity) -> store::Result<AnyStore> {
    if let Some(path) = url.strip_prefix("file://") {
        if !security.is_empty() {
            return Err(StoreError::Invalid(
                "TLS and user settings of the store apply to etcd only, not to file:// stores"
                    .into(),
            ));
        }
        if !path.starts_with('/') {
            return Err(StoreError::Invalid(format!(
                "store URL {url:?} needs an absolute path, like file:///var/lib/keelson"
            )));
        }
        return Ok(AnyStore::File(file::FileStore::open(path)?));
    }
    if let Some(hosts) = url.strip_prefix("etcd://") {
        let endpoints: Vec<String> = hosts
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        return Ok(AnyStore::Etcd(Box::new(
            etcd::EtcdStore::connect_secured(endpoints, security).await?,
        )));
    }
    Err(StoreError::Invalid(format!(
        "unknown store URL {url:?}: use file:///dir (one host) or etcd://host:2379[,host:2379...]"
    )))
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::File($s) => $e,
            AnyStore::Etcd($s) => $e,
        }
    };
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> store::Result<Option<KeyValue>> {
        delegate!(self, s => s.get(key).await)
    }
    async fn list(&self, prefix: &str) -> store::Result<(Vec<KeyValue>, i64)> {
        delegate!(self, s => s.list(prefix).await)
    }
    async fn put_if_revision(
        &self,
        key: &str,
        value: &str,
        expected: i64,
        lease: LeaseId,
    ) -> store::Result<Cas> {
        delegate!(self, s => s.put_if_revision(key, value, expected, lease).await)
    }
    async fn put(&self, key: &str, value: &str, lease: LeaseId) -> store::Result<i64> {
        delegate!(self, s => s.put(key, value, lease).await)
    }
    async fn delete(&self, key: &str) -> store::Result<bool> {
        delegate!(self, s => s.delete(key).await)
    }
    async fn delete_if_revision(&self, key: &str, expected: i64) -> store::Result<bool> {
        delegate!(self, s => s.delete_if_revision(key, expected).await)
    }
    async fn watch(&self, prefix: &str, revision: i64) -> store::Result<Watch> {
        delegate!(self, s => s.watch(prefix, revision).await)
    }
    async fn grant(&self, ttl: Duration) -> store::Result<LeaseId> {
        delegate!(self, s => s.grant(ttl).await)
    }
    async fn keep_alive(&self, lease: LeaseId) -> store::Result<()> {
        delegate!(self, s => s.keep_alive(lease).await)
    }
    async fn keep_alive_within(&self, lease: LeaseId, attempt: Duration) -> store::Result<()> {
        delegate!(self, s => s.keep_alive_within(lease, attempt).await)
    }
    async fn revoke(&self, lease: LeaseId) -> store::Result<()> {
        delegate!(self, s => s.revoke(lease).await)
    }
    async fn compact_keeping(&self, keep: i64) -> store::Result<()> {
        delegate!(self, s => s.compact_keeping(keep).await)
    }
}
