//! The cluster view: which backend is the primary and which are replicas, at
//! which generation. The proxy reads it lock-free on every new session through
//! `ArcSwap::load`; whoever owns the view (a static config, or a store
//! watcher) swaps in a new one with [`ViewHandle::store`].
//!
//! Invariant: a session is routed only from a view it loaded; a newer view
//! never changes where an already-routed session goes, it can only fence it.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// A backend PostgreSQL server, as `host:port`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    addr: Arc<str>,
}

impl Backend {
    pub fn new(addr: impl Into<Arc<str>>) -> Self {
        Backend { addr: addr.into() }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A standby that may take read-only sessions, with how far behind the
/// primary it was last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub backend: Backend,
    /// WAL bytes the primary has written that this standby has not replayed.
    pub lag_bytes: u64,
    /// Time since its last replayed transaction while it is behind; `None`
    /// when unknown.
    pub lag: Option<std::time::Duration>,
    /// Whether it is streaming from its upstream.
    pub streaming: bool,
}

impl Replica {
    /// A streaming standby with no known lag (static configuration).
    pub fn fresh(backend: Backend) -> Self {
        Replica {
            backend,
            lag_bytes: 0,
            lag: None,
            streaming: true,
        }
    }
}

/// One immutable snapshot of the cluster, as the proxy routes by it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Increases with every change the cluster store makes.
    pub generation: u64,
    /// Where primary traffic goes. `None` while there is no confirmed primary.
    pub primary: Option<Backend>,
    /// Standbys that may take read-only traffic.
    pub replicas: Vec<Replica>,
}

impl View {
    /// A view with a fixed primary and no replicas (static mode).
    pub fn fixed(primary: Backend) -> Self {
        View {
            generation: 1,
            primary: Some(primary),
            replicas: Vec::new(),
        }
    }

    /// Every backend the view knows, primary first, without duplicates.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        let primary = self.primary.iter();
        primary.chain(
            self.replicas
                .iter()
                .map(|r| &r.backend)
                .filter(move |r| Some(*r) != self.primary.as_ref()),
        )
    }
}

/// Shared, hot-swappable access to the current view.
///
/// Reads are lock-free. Writers also notify a `watch` channel so that
/// sessions waiting for a change (fencing, holding) wake at once.
#[derive(Clone)]
pub struct ViewHandle {
    current: Arc<ArcSwap<View>>,
    changed: watch::Sender<u64>,
}

impl fmt::Debug for ViewHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ViewHandle").field(&self.load()).finish()
    }
}

impl ViewHandle {
    pub fn new(view: View) -> Self {
        let (changed, _) = watch::channel(view.generation);
        ViewHandle {
            current: Arc::new(ArcSwap::from_pointee(view)),
            changed,
        }
    }

    /// The current view. Lock-free.
    pub fn load(&self) -> Arc<View> {
        self.current.load_full()
    }

    /// Replaces the view and wakes everyone watching for changes.
    pub fn store(&self, view: View) {
        let generation = view.generation;
        self.current.store(Arc::new(view));
        self.changed.send_replace(generation);
    }

    /// A receiver that is marked changed whenever a new view is stored.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
