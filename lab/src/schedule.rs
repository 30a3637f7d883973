//! The seeded schedule: cycles of fault, heal, settle. The same seed gives
//! the same schedule (which fault, on which host, for how long).

use std::time::Duration;

/// splitmix64: small, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// Which node a fault picks: the primary at the time, or a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Primary,
    Standby,
}

/// One kind of fault. The host is chosen when it is applied (the primary
/// or a standby at that moment), so a schedule stays meaningful whatever
/// the previous faults did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    KillKeeper(Who),
    KillPostmaster(Who),
    KillProxy,
    KillSentinelLeader,
    KillEtcdMember,
    PauseKeeper(Who),
    PausePostmaster(Who),
    PauseProxy,
    PauseSentinelLeader,
    PauseEtcdMember,
    PauseAllEtcd,
    /// A short store blip, inside the margin: no failover may follow.
    StoreBlip,
    FreezeNode(Who),
    IsolateNode(Who),
    /// Cut from the store and the sentinels, still reachable by clients.
    CutFromStore(Who),
    /// It cannot send to the store and the sentinels; it still receives.
    OneWayLoss(Who),
    EtcdMinority,
    CutReplication,
    PacketLoss(Who),
    ThrottleStandby,
    ClockSkew(Who),
    DiskFull(Who),
    Switchover,
    Failkeeper,
    SpecUpdate,
}

impl FaultKind {
    pub const ALL: &'static [FaultKind] = &[
        FaultKind::KillKeeper(Who::Primary),
        FaultKind::KillKeeper(Who::Standby),
        FaultKind::KillPostmaster(Who::Primary),
        FaultKind::KillPostmaster(Who::Standby),
        FaultKind::KillProxy,
        FaultKind::KillSentinelLeader,
        FaultKind::KillEtcdMember,
        FaultKind::PauseKeeper(Who::Primary),
        FaultKind::PausePostmaster(Who::Primary),
        FaultKind::PauseProxy,
        FaultKind::PauseSentinelLeader,
        FaultKind::PauseEtcdMember,
        FaultKind::PauseAllEtcd,
        FaultKind::StoreBlip,
        FaultKind::FreezeNode(Who::Primary),
        FaultKind::FreezeNode(Who::Standby),
        FaultKind::IsolateNode(Who::Primary),
        FaultKind::CutFromStore(Who::Primary),
        FaultKind::OneWayLoss(Who::Primary),
        FaultKind::EtcdMinority,
        FaultKind::CutReplication,
        FaultKind::PacketLoss(Who::Primary),
        FaultKind::ThrottleStandby,
        FaultKind::ClockSkew(Who::Primary),
        FaultKind::ClockSkew(Who::Standby),
        FaultKind::DiskFull(Who::Primary),
        FaultKind::DiskFull(Who::Standby),
        FaultKind::Switchover,
        FaultKind::Failkeeper,
        FaultKind::SpecUpdate,
    ];

    /// Faults that need the etcd store (the file store is one directory
    /// on one host).
    pub fn needs_etcd(self) -> bool {
        matches!(
            self,
            FaultKind::KillEtcdMember
                | FaultKind::PauseEtcdMember
                | FaultKind::PauseAllEtcd
                | FaultKind::StoreBlip
                | FaultKind::EtcdMinority
                | FaultKind::CutFromStore(_)
                | FaultKind::OneWayLoss(_)
        )
    }

    /// Faults on keelson's sentinels (Patroni has none).
    pub fn needs_sentinel(self) -> bool {
        matches!(
            self,
            FaultKind::KillSentinelLeader | FaultKind::PauseSentinelLeader
        )
    }

    /// Faults the design rides out without a failover (checked).
    pub fn tolerated(self) -> bool {
        matches!(
            self,
            FaultKind::KillProxy
                | FaultKind::PauseProxy
                | FaultKind::KillSentinelLeader
                | FaultKind::PauseSentinelLeader
                | FaultKind::KillEtcdMember
                | FaultKind::PauseEtcdMember
                | FaultKind::StoreBlip
                | FaultKind::EtcdMinority
                | FaultKind::CutReplication
                | FaultKind::ThrottleStandby
                | FaultKind::KillKeeper(Who::Standby)
                | FaultKind::KillPostmaster(Who::Standby)
                | FaultKind::FreezeNode(Who::Standby)
                | FaultKind::ClockSkew(_)
                | FaultKind::DiskFull(Who::Standby)
        )
    }

    /// How long the fault lasts: (shortest, longest).
    pub fn duration(self, quick: bool) -> (Duration, Duration) {
        let s = Duration::from_secs;
        match self {
            // Inside the documented margin: shorter than fence_timeout,
            // and than fail_interval less a report interval (docs/reliability.md).
            FaultKind::StoreBlip if quick => {
                (Duration::from_millis(800), Duration::from_millis(1200))
            }
            FaultKind::StoreBlip => (Duration::from_millis(2000), Duration::from_millis(3000)),
            FaultKind::Switchover | FaultKind::Failkeeper | FaultKind::SpecUpdate => (s(1), s(1)),
            _ if quick => (s(3), s(5)),
            _ => (s(10), s(30)),
        }
    }

    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

/// One cycle of the schedule.
#[derive(Debug, Clone)]
pub struct Step {
    pub fault: FaultKind,
    pub lasts: Duration,
    pub settle: Duration,
}

/// The schedule for `minutes` of faults from `seed`. With `quick`, every
/// fault class once, in a seed-shuffled order, with short durations.
pub fn make(seed: u64, minutes: f64, quick: bool, etcd: bool, sentinels: bool) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    // Faults on sentinels are drawn for Patroni too and then dropped, so
    // that one seed gives both targets the same faults, with the same
    // durations, in the same order.
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .iter()
        .copied()
        .filter(|k| etcd || !k.needs_etcd())
        .collect();
    let keep = |steps: Vec<Step>| -> Vec<Step> {
        steps
            .into_iter()
            .filter(|s| sentinels || !s.fault.needs_sentinel())
            .collect()
    };
    let settle = |rng: &mut Rng| {
        if quick {
            Duration::from_secs(6)
        } else {
            rng.between(Duration::from_secs(20), Duration::from_secs(30))
        }
    };
    let mut steps = Vec::new();
    if quick {
        // Every class once: one of its variants (primary or standby).
        let mut order: Vec<FaultKind> = Vec::new();
        for k in &kinds {
            let same: Vec<FaultKind> = kinds
                .iter()
                .copied()
                .filter(|o| std::mem::discriminant(o) == std::mem::discriminant(k))
                .collect();
            if order
                .iter()
                .any(|o| std::mem::discriminant(o) == std::mem::discriminant(k))
            {
                continue;
            }
            order.push(same[rng.below(same.len() as u64) as usize]);
        }
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for k in order {
            let (lo, hi) = k.duration(true);
            let lasts = rng.between(lo, hi);
            steps.push(Step {
                fault: k,
                lasts,
                settle: settle(&mut rng),
            });
        }
        return keep(steps);
    }
    let mut total = Duration::ZERO;
    let budget = Duration::from_secs_f64(minutes * 60.0);
    while total < budget {
        let k = kinds[rng.below(kinds.len() as u64) as usize];
        let (lo, hi) = k.duration(false);
        let lasts = rng.between(lo, hi);
        let st = settle(&mut rng);
        total += lasts + st;
        steps.push(Step {
            fault: k,
            lasts,
            settle: st,
        });
    }
    keep(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a: Vec<String> = make(7, 5.0, false, true, true)
            .iter()
            .map(|s| format!("{:?}{:?}", s.fault, s.lasts))
            .collect();
        let b: Vec<String> = make(7, 5.0, false, true, true)
            .iter()
            .map(|s| format!("{:?}{:?}", s.fault, s.lasts))
            .collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            make(8, 5.0, false, true, true)
                .iter()
                .map(|s| format!("{:?}{:?}", s.fault, s.lasts))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn quick_covers_every_class_once() {
        let q = make(1, 0.0, true, true, true);
        let classes: std::collections::HashSet<_> =
            FaultKind::ALL.iter().map(std::mem::discriminant).collect();
        assert_eq!(q.len(), classes.len());
        let f = make(1, 0.0, true, false, true);
        assert!(f.iter().all(|s| !s.fault.needs_etcd()));
    }

    #[test]
    fn patroni_gets_the_same_schedule_less_the_sentinel_faults() {
        for seed in [11, 12, 14, 15] {
            let keelson: Vec<String> = make(seed, 5.0, false, true, true)
                .iter()
                .filter(|s| !s.fault.needs_sentinel())
                .map(|s| format!("{:?}{:?}{:?}", s.fault, s.lasts, s.settle))
                .collect();
            let patroni: Vec<String> = make(seed, 5.0, false, true, false)
                .iter()
                .map(|s| format!("{:?}{:?}{:?}", s.fault, s.lasts, s.settle))
                .collect();
            assert_eq!(keelson, patroni, "seed {seed}");
        }
    }
}
