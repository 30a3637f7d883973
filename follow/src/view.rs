//! From cluster data to the view a proxy routes by: a pure function, so the
//! mapping is tested by a table and needs no store.

use std::time::Duration;

use cluster::ClusterData;
use proxy_core::{Backend, Replica, View};

/// The view `data` gives a proxy. `fresh` says whether the proxy has
/// confirmed `data` against the store within `proxy_timeout`; a view that
/// is not fresh names no primary (another may have been named since) and no
/// replicas (their lag figures are frozen, so the lag limits cannot be
/// honoured). The generation is kept either way.
pub fn view_of(data: &ClusterData, fresh: bool) -> View {
    let pv = data.proxy_view();
    if !fresh {
        return View {
            generation: pv.generation,
            primary: None,
            replicas: Vec::new(),
        };
    }
    View {
        generation: pv.generation,
        primary: pv.primary.map(Backend::new),
        replicas: pv
            .replicas
            .into_iter()
            .map(|r| Replica {
                backend: Backend::new(r.address),
                lag_bytes: r.lag_bytes,
                lag: r.lag_ms.map(Duration::from_millis),
                streaming: r.streaming,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::data::{Db, DbSpec, DbStatus, Role};
    use cluster::ClusterSpec;

    /// A database: uid, role, healthy, in recovery, streaming, replayed LSN.
    type DbRow = (&'static str, Role, bool, bool, bool, u64);

    fn data(master: Option<&str>, dbs: &[DbRow]) -> ClusterData {
        let mut d = ClusterData::new(ClusterSpec::default());
        for (i, (uid, role, healthy, in_recovery, streaming, replay)) in dbs.iter().enumerate() {
            d.dbs.insert(
                (*uid).to_owned(),
                Db {
                    keeper: (*uid).to_owned(),
                    spec: DbSpec {
                        role: *role,
                        ..Default::default()
                    },
                    status: DbStatus {
                        healthy: *healthy,
                        address: Some(format!("h:{}", i + 1)),
                        in_recovery: *in_recovery,
                        streaming: *streaming,
                        lsn: 1000,
                        replay_lsn: *replay,
                        replay_lag_ms: Some(20),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            );
        }
        d.set_proxy_master(master);
        d.set_proxy_master(master);
        d
    }

    fn replica(addr: &str, lag_bytes: u64, streaming: bool) -> Replica {
        Replica {
            backend: Backend::new(addr),
            lag_bytes,
            lag: Some(Duration::from_millis(20)),
            streaming,
        }
    }

    #[test]
    fn view_of_names_the_primary_and_usable_standbys_only_while_fresh() {
        use Role::{Master, None as Nothing, Standby};
        let a_master: DbRow = ("a", Master, true, false, false, 0);
        let b_standby: DbRow = ("b", Standby, true, true, true, 900);
        #[rustfmt::skip]
        #[allow(clippy::type_complexity)]
        let rows: Vec<(&str, ClusterData, bool, Option<&str>, Vec<Replica>)> = vec![
            ("a primary and a streaming standby",
                data(Some("a"), &[a_master, b_standby]), true,
                Some("h:1"), vec![replica("h:2", 100, true)]),
            ("stale: no primary and no replicas, whatever the data says",
                data(Some("a"), &[a_master, b_standby]), false, None, vec![]),
            ("no primary named (failover in progress): standbys still serve",
                data(None, &[a_master, b_standby]), true,
                None, vec![replica("h:2", 0, true)]),
            ("an unhealthy standby is left out",
                data(Some("a"), &[a_master, ("b", Standby, false, true, true, 900)]), true,
                Some("h:1"), vec![]),
            ("a standby that left recovery (promoted by hand) is left out",
                data(Some("a"), &[a_master, ("b", Standby, true, false, true, 900)]), true,
                Some("h:1"), vec![]),
            ("a database with no role is not a replica",
                data(Some("a"), &[a_master, ("b", Nothing, true, true, true, 900)]), true,
                Some("h:1"), vec![]),
            ("a standby that stopped streaming stays, marked (it takes no new sessions)",
                data(Some("a"), &[a_master, ("b", Standby, true, true, false, 400)]), true,
                Some("h:1"), vec![replica("h:2", 600, false)]),
            ("the named primary is never a replica too",
                data(Some("b"), &[a_master, b_standby]), true,
                Some("h:2"), vec![]),
        ];
        for (name, d, fresh, primary, replicas) in rows {
            let v = view_of(&d, fresh);
            assert_eq!(v.generation, 2, "{name}");
            assert_eq!(v.primary, primary.map(Backend::new), "{name}");
            assert_eq!(v.replicas, replicas, "{name}");
        }
    }
}
