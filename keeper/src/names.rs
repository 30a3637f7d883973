//! Names keepers put into PostgreSQL: the keeper uid (as
//! `application_name` and in `synchronous_standby_names`) and the
//! replication slot derived from it.
//!
//! PostgreSQL's scanner for `synchronous_standby_names`
//! (`src/backend/replication/syncrep_scanner.l`) takes an unquoted name
//! only as `[A-Za-z\200-\377_][A-Za-z\200-\377_0-9$]*`: `pg-1` or `db.2` is a
//! syntax error, `2a` a number and `first` a keyword. PostgreSQL then keeps
//! its old value, and synchronous replication is silently off. So every
//! name is double-quoted, and uids are restricted to what survives every
//! place they go.

/// Slots named so are keelson's; others are left alone.
pub const SLOT_PREFIX: &str = "keelson_";

/// The longest uid: `keelson_` plus the uid must fit a slot name (63
/// bytes, NAMEDATALEN - 1), and the uid itself `application_name` (63).
pub const MAX_UID_LEN: usize = 63 - SLOT_PREFIX.len();

/// Checks a keeper uid: 1 to 55 characters, lower-case letters, digits,
/// `-`, `.` and `_`, starting with a letter or digit (a Kubernetes pod
/// name fits).
pub fn validate_uid(uid: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if uid.is_empty() || uid.len() > MAX_UID_LEN {
        return Err(format!(
            "keeper uid {uid:?} must be 1 to {MAX_UID_LEN} characters long"
        ));
    }
    if !uid.chars().all(ok_char) || !uid.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "keeper uid {uid:?} may only hold lower-case letters, digits, '-', '.' and '_', \
             and must start with a letter or digit (it names the standby in \
             synchronous_standby_names and its replication slot)"
        ));
    }
    Ok(())
}

/// The replication slot a primary keeps for the standby of keeper `uid`:
/// `keelson_` and the uid in lower case, other characters as `_`.
pub fn slot_name(uid: &str) -> String {
    let mut s = String::from(SLOT_PREFIX);
    s.extend(uid.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        }
    }));
    s.truncate(63);
    s
}

/// One name for `synchronous_standby_names`, double-quoted with embedded
/// quotes doubled, as the scanner reads it.
fn quote_name(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The value of `synchronous_standby_names` for these standbys: every one
/// must confirm (`FIRST n` of `n`), so that any of them can be promoted
/// without losing an acknowledged commit; empty for none.
pub fn synchronous_standby_names(standbys: &[String]) -> String {
    if standbys.is_empty() {
        return String::new();
    }
    let names: Vec<String> = standbys.iter().map(|s| quote_name(s)).collect();
    format!("FIRST {} ({})", standbys.len(), names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        for ok in [
            "k1",
            "pg-1",
            "db.2",
            "2a",
            "first",
            "keelson-cluster-0",
            &"a".repeat(55),
        ] {
            assert_eq!(validate_uid(ok), Ok(()), "{ok}");
        }
        for bad in ["", "K1", "-a", "a b", "a\"b", "é", &"a".repeat(56)] {
            let e = validate_uid(bad).unwrap_err();
            assert!(e.contains("keeper uid"), "{e}");
        }
    }

    #[test]
    fn names_are_quoted_for_the_scanner() {
        let n = |v: &[&str]| {
            synchronous_standby_names(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(n(&[]), "");
        assert_eq!(n(&["pg-1"]), r#"FIRST 1 ("pg-1")"#);
        assert_eq!(
            n(&["db.2", "first", "2a"]),
            r#"FIRST 3 ("db.2", "first", "2a")"#
        );
        assert_eq!(n(&["a\"b"]), r#"FIRST 1 ("a""b")"#);
    }

    #[test]
    fn slot_names() {
        assert_eq!(slot_name("pg-1.x"), "keelson_pg_1_x");
        assert_eq!(slot_name(&"a".repeat(55)).len(), 63);
    }
}
