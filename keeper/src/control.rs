//! The control file, read with `pg_controldata`: what a data directory
//! is (its system identifier) and where it ended, also while PostgreSQL is
//! stopped. After a clean shutdown ("shut down") the latest checkpoint is
//! the shutdown checkpoint, the last WAL record the server wrote: a
//! switchover promotes a standby only once it has received up to there.

/// What `pg_controldata` says of a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_id: String,
    /// "shut down", "shut down in recovery", "in production", ...
    pub state: String,
    /// The latest checkpoint's location.
    pub checkpoint_lsn: u64,
    /// The latest checkpoint's timeline.
    pub timeline: u32,
    /// The primary's values of the settings a standby needs at least as
    /// high (from the last parameter change it replayed, or its own), by
    /// parameter name: a standby started with less refuses to start
    /// ("insufficient parameter settings").
    pub hot_standby_minimums: Vec<(&'static str, i64)>,
}

/// For each setting a standby needs at least as high as its primary's
/// ([`cluster::data::HOT_STANDBY_SETTINGS`]): `pg_controldata`'s line for
/// it, and PostgreSQL's default (`max_wal_senders`: keelson's minimum).
const MINIMUM_FIELDS: &[(&str, &str, i64)] = &[
    ("max_connections setting", "max_connections", 100),
    ("max_worker_processes setting", "max_worker_processes", 8),
    ("max_wal_senders setting", "max_wal_senders", 10),
    ("max_prepared_xacts setting", "max_prepared_transactions", 0),
    (
        "max_locks_per_xact setting",
        "max_locks_per_transaction",
        64,
    ),
];

/// PostgreSQL's default of hot-standby setting `name`.
pub fn hot_standby_default(name: &str) -> Option<i64> {
    MINIMUM_FIELDS
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(_, _, d)| *d)
}

impl ControlData {
    /// Whether the server was shut down cleanly as a primary: the latest
    /// checkpoint is then the last record it wrote.
    pub fn shut_down_cleanly(&self) -> bool {
        self.state == "shut down"
    }
}

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Parses `pg_controldata` output (run with `LC_ALL=C`).
pub fn parse(text: &str) -> Option<ControlData> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    Some(ControlData {
        system_id: field("Database system identifier")?.to_owned(),
        state: field("Database cluster state")?.to_owned(),
        checkpoint_lsn: parse_lsn(field("Latest checkpoint location")?)?,
        timeline: field("Latest checkpoint's TimeLineID")?.parse().ok()?,
        hot_standby_minimums: MINIMUM_FIELDS
            .iter()
            .filter_map(|(f, name, _)| Some((*name, field(f)?.parse().ok()?)))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pg_controldata() {
        let text = "pg_control version number:            1300\n\
                    Catalog version number:               202209061\n\
                    Database system identifier:           7301634125178430000\n\
                    Database cluster state:               shut down\n\
                    pg_control last modified:             Tue 01 Dec 2026 10:00:00 PM UTC\n\
                    Latest checkpoint location:           16/B374D848\n\
                    Latest checkpoint's REDO location:    16/B374D810\n\
                    Latest checkpoint's TimeLineID:       3\n\
                    max_connections setting:              150\n\
                    max_locks_per_xact setting:           64\n";
        let c = parse(text).unwrap();
        assert_eq!(c.system_id, "7301634125178430000");
        assert!(c.shut_down_cleanly());
        assert_eq!(c.checkpoint_lsn, (0x16 << 32) | 0xB374_D848);
        assert_eq!(c.timeline, 3);
        assert_eq!(
            c.hot_standby_minimums,
            vec![("max_connections", 150), ("max_locks_per_transaction", 64)]
        );
        assert_eq!(parse("garbage"), None);
        // The same five settings as the cluster's list.
        let mut names: Vec<&str> = MINIMUM_FIELDS.iter().map(|(_, n, _)| *n).collect();
        names.sort();
        assert_eq!(names, cluster::data::HOT_STANDBY_SETTINGS);
        assert_eq!(parse_lsn("0/3000060"), Some(0x300_0060));
        assert_eq!(parse_lsn("x/1"), None);
    }
}
