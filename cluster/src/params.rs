//! The spec's PostgreSQL parameters: the value text PostgreSQL reads, how
//! a keeper writes it, what a spec may not set, and checks against the
//! parameter catalog a keeper read from its running PostgreSQL
//! (`pg_settings`), with PostgreSQL's own messages.
//!
//! The catalog is written to the store by keepers ([`Catalog`],
//! `Keys::pg_settings`) so that `ctl spec update`, which runs anywhere and
//! has no database connection, refuses a value the servers would refuse,
//! instead of it being found at the next reload or restart.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Parameters keelson sets on every instance; a spec that names one is
/// refused (keelson's value would silently win).
pub const MANAGED: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
    "wal_level",
    "hot_standby",
    "wal_log_hints",
    "password_encryption",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "synchronous_standby_names",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "include",
    "include_if_exists",
    "include_dir",
];

/// Parameters a spec may set to at least what keelson needs.
pub const AT_LEAST: &[(&str, i64)] = &[("max_wal_senders", 10), ("max_replication_slots", 10)];

/// The value as PostgreSQL reads it: a value written the way
/// postgresql.conf quotes it (`'7MB'`) is unquoted, anything else is taken
/// as it is, without surrounding white space.
pub fn text(value: &str) -> Cow<'_, str> {
    let v = value.trim();
    match v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        Some(inner) => Cow::Owned(unescape(inner)),
        None => Cow::Borrowed(v),
    }
}

/// The inside of a postgresql.conf string literal as PostgreSQL's scanner
/// reads it (`GUC_scanstr`): `''` and backslash escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\'' if it.peek() == Some(&'\'') => {
                it.next();
                out.push('\'');
            }
            '\\' => match it.next() {
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some(d @ '0'..='7') => {
                    let mut n = d.to_digit(8).unwrap_or(0);
                    for _ in 0..2 {
                        match it.peek().and_then(|c| c.to_digit(8)) {
                            Some(x) => {
                                n = n * 8 + x;
                                it.next();
                            }
                            None => break,
                        }
                    }
                    out.push(char::from_u32(n).unwrap_or('?'));
                }
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// `s` as a postgresql.conf string literal: PostgreSQL's configuration
/// scanner reads backslash escapes and doubled quotes in it.
pub fn conf_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The checks that need no server: a parameter name PostgreSQL can read, a
/// value that fits on one line, not one keelson manages, and keelson's
/// minimum where it has one.
pub fn check_spec_parameter(name: &str, value: &str) -> Result<(), String> {
    let ok_part = |p: &str| {
        let mut c = p.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '$')
    };
    if !name.split('.').all(ok_part) {
        return Err(format!("{name:?} is not a PostgreSQL parameter name"));
    }
    let lower = name.to_ascii_lowercase();
    if MANAGED.contains(&lower.as_str()) {
        return Err(format!(
            "{name} is set by keelson on every instance and cannot be set in the spec; \
             remove it with --patch '{{\"pg_parameters\": {{\"{name}\": null}}}}'"
        ));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(format!("the value of {name} must be a single line"));
    }
    if let Some((_, min)) = AT_LEAST.iter().find(|(n, _)| *n == lower) {
        match text(value).trim().parse::<i64>() {
            Ok(n) if n >= *min => {}
            Ok(n) => {
                return Err(format!(
                    "{name} = {n} is below {min}, what keelson needs (replication to every \
                     standby, pg_basebackup and pg_rewind)"
                ))
            }
            Err(_) => return Err(format!("{name} must be a whole number, at least {min}")),
        }
    }
    Ok(())
}

/// One row of `pg_settings`, as far as checking a value needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    /// `bool`, `integer`, `real`, `string` or `enum`.
    pub vartype: String,
    /// The base unit (`8kB`, `kB`, `ms`, `s`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enumvals: Vec<String>,
    /// `postmaster`, `sighup`, `internal`, ...
    pub context: String,
}

/// Every parameter a running PostgreSQL knows (`pg_settings`), with its
/// version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub server_version_num: u32,
    pub server_version: String,
    /// The keeper whose PostgreSQL this was read from.
    pub keeper: String,
    pub settings: BTreeMap<String, Setting>,
}

const MEMORY_HINT: &str = r#"Valid units for this parameter are "B", "kB", "MB", "GB", and "TB"."#;
const TIME_HINT: &str =
    r#"Valid units for this parameter are "us", "ms", "s", "min", "h", and "d"."#;

/// What a unit is worth in bytes or microseconds, and whether it measures
/// memory.
fn unit_value(unit: &str) -> Option<(f64, bool)> {
    Some(match unit {
        "B" => (1.0, true),
        "kB" => (1024.0, true),
        "MB" => (1024.0 * 1024.0, true),
        "GB" => (1024.0 * 1024.0 * 1024.0, true),
        "TB" => (1024.0 * 1024.0 * 1024.0 * 1024.0, true),
        "us" => (1.0, false),
        "ms" => (1e3, false),
        "s" => (1e6, false),
        "min" => (60e6, false),
        "h" => (3600e6, false),
        "d" => (86400e6, false),
        _ => return None,
    })
}

/// A base unit as pg_settings prints it (`8kB`, `16MB`, `ms`).
fn base_unit(unit: &str) -> Option<(f64, bool)> {
    let digits = unit
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(unit.len());
    let (n, u) = unit.split_at(digits);
    let n: f64 = if n.is_empty() { 1.0 } else { n.parse().ok()? };
    unit_value(u).map(|(v, mem)| (n * v, mem))
}

/// The leading number of `s` as C's `strtol(s, _, 0)` then `strtod` read
/// it (PostgreSQL's `parse_int`, `parse_real`), and the rest.
fn leading_number(s: &str, integer: bool) -> Option<(f64, &str)> {
    let t = s.trim_start();
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let sign = if neg { -1.0 } else { 1.0 };
    if integer {
        if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            let end = hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            if end > 0 {
                let v = i64::from_str_radix(&hex[..end], 16).ok()? as f64;
                return Some((sign * v, &hex[end..]));
            }
        }
        let end = body
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(body.len());
        let next = body[end..].chars().next();
        if end > 0 && !matches!(next, Some('.' | 'e' | 'E')) {
            let digits = &body[..end];
            let v = if digits.len() > 1 && digits.starts_with('0') {
                i64::from_str_radix(digits, 8).ok()? as f64
            } else {
                digits.parse::<f64>().ok()?
            };
            return Some((sign * v, &body[end..]));
        }
    }
    // A decimal number with an optional fraction and exponent.
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    if int_digits == 0 && i <= 1 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > start {
            i = j;
        }
    }
    let v: f64 = body[..i].parse().ok()?;
    Some((sign * v, &body[i..]))
}

/// PostgreSQL's `parse_int` / `parse_real`: the value in the parameter's
/// base unit, or the hint to give.
fn parse_number(value: &str, s: &Setting, integer: bool) -> Result<f64, Option<&'static str>> {
    let (n, rest) = leading_number(value, integer).ok_or(None)?;
    let rest = rest.trim_start();
    let n = if rest.is_empty() {
        n
    } else {
        let base = s.unit.as_deref().and_then(base_unit).ok_or(None)?;
        let hint = if base.1 { MEMORY_HINT } else { TIME_HINT };
        let unit = rest.trim_end();
        match unit_value(unit) {
            Some((v, mem)) if mem == base.1 => n * v / base.0,
            _ => return Err(Some(hint)),
        }
    };
    if integer {
        let r = n.round();
        if r > i32::MAX as f64 || r < i32::MIN as f64 {
            return Err(Some("Value exceeds integer range."));
        }
        Ok(r)
    } else if n.is_finite() {
        Ok(n)
    } else {
        Err(None)
    }
}

/// PostgreSQL's `parse_bool`.
fn parse_bool(v: &str) -> Option<bool> {
    let l = v.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| l.len() >= min && word.starts_with(&l);
    if prefix_of("true", 1) || prefix_of("yes", 1) || l == "on" || l == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || l == "0" {
        Some(false)
    } else {
        None
    }
}

/// PostgreSQL's range check of a number for `s` (`name`), with its message.
fn within_range<T>(n: T, s: &Setting, name: &str) -> Result<(), String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let bound = |b: &Option<String>| b.as_deref().and_then(|m| m.parse::<T>().ok());
    if let (Some(lo), Some(hi)) = (bound(&s.min), bound(&s.max)) {
        if n < lo || n > hi {
            let unit = s
                .unit
                .as_deref()
                .map(|u| format!(" {u}"))
                .unwrap_or_default();
            return Err(format!(
                r#"{n}{unit} is outside the valid range for parameter "{name}" ({lo} .. {hi})"#
            ));
        }
    }
    Ok(())
}

impl Catalog {
    /// Checks `value` for parameter `name` as PostgreSQL does when it reads
    /// its configuration, with PostgreSQL's message (and hint) when it is
    /// refused. A name with a dot that the server does not know is an
    /// extension's placeholder, which PostgreSQL accepts too.
    pub fn check(&self, name: &str, value: &str) -> Result<(), String> {
        let lower = name.to_ascii_lowercase();
        let Some(s) = self.settings.get(&lower) else {
            if lower.contains('.') {
                return Ok(());
            }
            return Err(format!(r#"unrecognized configuration parameter "{name}""#));
        };
        if s.context == "internal" {
            return Err(format!(r#"parameter "{lower}" cannot be changed"#));
        }
        let v = text(value);
        let invalid = |hint: Option<&str>| {
            let mut m = format!(r#"invalid value for parameter "{lower}": "{v}""#);
            if let Some(h) = hint {
                m.push_str(&format!(" (HINT: {h})"));
            }
            m
        };
        match s.vartype.as_str() {
            "bool" if parse_bool(&v).is_none() => {
                return Err(format!(r#"parameter "{lower}" requires a Boolean value"#));
            }
            "integer" => {
                let n = parse_number(&v, s, true).map_err(invalid)? as i64;
                within_range(n, s, &lower)?;
            }
            "real" => {
                let n = parse_number(&v, s, false).map_err(invalid)?;
                within_range(n, s, &lower)?;
            }
            "enum" => {
                let l = v.trim().to_ascii_lowercase();
                let known = s.enumvals.iter().any(|e| e.eq_ignore_ascii_case(&l));
                // pg_settings leaves out hidden values: enums with on and
                // off take the boolean spellings (true, yes, 1, ...), the
                // message levels "debug" (and the client's "info").
                let has = |v: &str| s.enumvals.iter().any(|e| e == v);
                let boolean_alias = has("on")
                    && has("off")
                    && ["true", "false", "yes", "no", "1", "0"].contains(&l.as_str());
                let level_alias = has("debug1") && (l == "debug" || (l == "info" && has("notice")));
                if !known && !boolean_alias && !level_alias {
                    return Err(invalid(Some(&format!(
                        "Available values: {}.",
                        s.enumvals.join(", ")
                    ))));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether a change of `name` takes effect only at a restart; `None`
    /// for a parameter the server does not know.
    pub fn needs_restart(&self, name: &str) -> Option<bool> {
        self.settings
            .get(&name.to_ascii_lowercase())
            .map(|s| s.context == "postmaster")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(vartype: &str, unit: Option<&str>, min: &str, max: &str) -> Setting {
        Setting {
            vartype: vartype.into(),
            unit: unit.map(str::to_owned),
            min: Some(min.into()).filter(|m: &String| !m.is_empty()),
            max: Some(max.into()).filter(|m: &String| !m.is_empty()),
            enumvals: Vec::new(),
            context: "user".into(),
        }
    }

    /// A few rows of PostgreSQL 15's pg_settings.
    fn catalog() -> Catalog {
        let mut settings = BTreeMap::new();
        settings.insert(
            "work_mem".into(),
            setting("integer", Some("kB"), "64", "2147483647"),
        );
        settings.insert(
            "shared_buffers".into(),
            Setting {
                context: "postmaster".into(),
                ..setting("integer", Some("8kB"), "16", "1073741823")
            },
        );
        settings.insert(
            "max_connections".into(),
            Setting {
                context: "postmaster".into(),
                ..setting("integer", None, "1", "262143")
            },
        );
        settings.insert(
            "statement_timeout".into(),
            setting("integer", Some("ms"), "0", "2147483647"),
        );
        settings.insert(
            "random_page_cost".into(),
            setting("real", None, "0", "1.79769e+308"),
        );
        settings.insert("enable_seqscan".into(), setting("bool", None, "", ""));
        settings.insert(
            "huge_pages".into(),
            Setting {
                enumvals: vec!["off".into(), "on".into(), "try".into()],
                context: "postmaster".into(),
                ..setting("enum", None, "", "")
            },
        );
        settings.insert(
            "client_min_messages".into(),
            Setting {
                enumvals: [
                    "debug5", "debug4", "debug3", "debug2", "debug1", "log", "notice", "warning",
                    "error",
                ]
                .map(str::to_owned)
                .to_vec(),
                ..setting("enum", None, "", "")
            },
        );
        settings.insert("timezone".into(), setting("string", None, "", ""));
        settings.insert(
            "block_size".into(),
            Setting {
                context: "internal".into(),
                ..setting("integer", None, "8192", "8192")
            },
        );
        Catalog {
            server_version_num: 150000,
            server_version: "15.0".into(),
            keeper: "k1".into(),
            settings,
        }
    }

    #[test]
    fn values_are_checked_as_postgresql_checks_them() {
        let c = catalog();
        for (name, ok) in [
            ("work_mem", "64MB"),
            ("work_mem", "'7MB'"),
            ("work_mem", " 4096 "),
            ("work_mem", "1.5GB"),
            ("work_mem", "0x100"),
            ("Work_Mem", "1 GB"),
            ("shared_buffers", "128MB"),
            ("statement_timeout", "5min"),
            ("statement_timeout", "1.5s"),
            ("random_page_cost", "1.1"),
            ("random_page_cost", "4e-1"),
            ("enable_seqscan", "of"),
            ("enable_seqscan", "YES"),
            ("huge_pages", "Try"),
            ("huge_pages", "true"),
            ("pg_stat_statements.max", "1000"),
            ("client_min_messages", "info"),
            ("client_min_messages", "DEBUG"),
            ("TimeZone", "UTC"),
        ] {
            assert_eq!(c.check(name, ok), Ok(()), "{name} = {ok}");
        }
        let refused = |name: &str, v: &str| c.check(name, v).expect_err(v);
        assert_eq!(
            refused("work_mem", "lots"),
            r#"invalid value for parameter "work_mem": "lots""#
        );
        assert_eq!(
            refused("work_mem", "5XB"),
            r#"invalid value for parameter "work_mem": "5XB" (HINT: Valid units for this parameter are "B", "kB", "MB", "GB", and "TB".)"#
        );
        assert_eq!(
            refused("work_mem", "5s"),
            r#"invalid value for parameter "work_mem": "5s" (HINT: Valid units for this parameter are "B", "kB", "MB", "GB", and "TB".)"#
        );
        assert_eq!(
            refused("work_mem", "32kB"),
            r#"32 kB is outside the valid range for parameter "work_mem" (64 .. 2147483647)"#
        );
        assert_eq!(
            refused("work_mem", "4TB"),
            r#"invalid value for parameter "work_mem": "4TB" (HINT: Value exceeds integer range.)"#
        );
        assert_eq!(
            refused("max_connections", "0"),
            r#"0 is outside the valid range for parameter "max_connections" (1 .. 262143)"#
        );
        assert_eq!(
            refused("max_connections", "10MB"),
            r#"invalid value for parameter "max_connections": "10MB""#
        );
        assert_eq!(
            refused("statement_timeout", "5 kB"),
            r#"invalid value for parameter "statement_timeout": "5 kB" (HINT: Valid units for this parameter are "us", "ms", "s", "min", "h", and "d".)"#
        );
        assert_eq!(
            refused("enable_seqscan", "maybe"),
            r#"parameter "enable_seqscan" requires a Boolean value"#
        );
        assert_eq!(
            refused("enable_seqscan", "o"),
            r#"parameter "enable_seqscan" requires a Boolean value"#
        );
        assert_eq!(
            refused("huge_pages", "sometimes"),
            r#"invalid value for parameter "huge_pages": "sometimes" (HINT: Available values: off, on, try.)"#
        );
        assert_eq!(
            refused("wrok_mem", "1MB"),
            r#"unrecognized configuration parameter "wrok_mem""#
        );
        assert_eq!(
            refused("block_size", "4096"),
            r#"parameter "block_size" cannot be changed"#
        );
        assert_eq!(c.needs_restart("shared_buffers"), Some(true));
        assert_eq!(c.needs_restart("WORK_MEM"), Some(false));
        assert_eq!(c.needs_restart("pg_stat_statements.max"), None);
    }

    #[test]
    fn the_spec_cannot_set_what_keelson_manages_or_break_the_file() {
        assert_eq!(check_spec_parameter("work_mem", "'7MB'"), Ok(()));
        assert_eq!(check_spec_parameter("max_wal_senders", "'12'"), Ok(()));
        assert_eq!(
            check_spec_parameter("pg_stat_statements.track", "all"),
            Ok(())
        );
        assert!(check_spec_parameter("Port", "5433")
            .expect_err("managed")
            .contains("set by keelson"));
        assert!(check_spec_parameter("max_wal_senders", "5")
            .expect_err("low")
            .contains("below 10"));
        assert!(check_spec_parameter("max_replication_slots", "many")
            .expect_err("nan")
            .contains("whole number"));
        assert!(
            check_spec_parameter("work_mem", "1MB\nlisten_addresses = '*'")
                .expect_err("newline")
                .contains("single line")
        );
        assert!(check_spec_parameter("work mem", "1MB").is_err());
        assert!(check_spec_parameter("a = 1\nport", "1").is_err());
    }

    #[test]
    fn values_are_unquoted_and_written_back_as_literals() {
        assert_eq!(text("'7MB'"), "7MB");
        assert_eq!(text(" 64MB "), "64MB");
        assert_eq!(text("'it''s'"), "it's");
        assert_eq!(text(r"'a\\b'"), r"a\b");
        assert_eq!(text(r"'x\ty'"), "x\ty");
        assert_eq!(text(r"'\101'"), "A");
        assert_eq!(text(r"'a\'b'"), "a'b");
        assert_eq!(text("''"), "");
        assert_eq!(text("'"), "'");
        assert_eq!(text(r#""$user", public"#), r#""$user", public"#);
        assert_eq!(conf_literal(r"a'b\c"), r"'a''b\\c'");
    }
}
