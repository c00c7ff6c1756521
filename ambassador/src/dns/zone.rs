//! The zone at one moment, pure: built from the watched `ports/alloc/` and `services/` keys,
//! looked up by name and type.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use runtime::watch::Kv;
use schema::{PortRange, Prefix};

use super::DnsSettings;
use crate::routes;

/// The outcome of a lookup, borrowing the zone's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'z> {
    /// Not in this zone: REFUSED.
    Refused,
    /// No such name: NXDOMAIN, SOA in authority.
    NxDomain,
    /// The name exists, not with this type: NOERROR, SOA in authority.
    NoData,
    Found {
        answers: Vec<&'z Record>,
        additionals: Vec<&'z Record>,
    },
}

/// The whole zone at one moment.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: LowerName,
    soa: Record,
    records: HashMap<LowerName, BTreeMap<RecordType, Vec<Record>>>,
    /// Every name that exists: owners of records and their ancestors inside the zone.
    names: HashSet<LowerName>,
}

impl Zone {
    /// An empty zone: only the apex and its SOA.
    pub fn empty(settings: &DnsSettings) -> Zone {
        Self::build(
            settings,
            &Prefix::new(schema::DEFAULT_PREFIX).expect("default prefix"),
            PortRange::DEFAULT,
            &BTreeMap::new(),
            &BTreeMap::new(),
            0,
        )
    }

    /// Builds the zone from the watched `ports/alloc/` and `services/` keys; `serial` is the
    /// SOA serial (the etcd revision, truncated).
    pub fn build(
        settings: &DnsSettings,
        prefix: &Prefix,
        range: PortRange,
        allocs: &BTreeMap<String, Kv>,
        services: &BTreeMap<String, Kv>,
        serial: u32,
    ) -> Zone {
        let origin = settings.zone.clone();
        let name = |s: &str| Name::parse(s, Some(&origin)).ok();
        let ttl = settings.ttl;
        let soa = Record::from_rdata(
            origin.clone(),
            ttl,
            RData::SOA(SOA::new(
                name("ns").expect("ns label"),
                name("hostmaster").expect("hostmaster label"),
                serial,
                3600,
                600,
                86_400,
                ttl,
            )),
        );
        let mut zone = Zone {
            origin: LowerName::from(&origin),
            soa: soa.clone(),
            records: HashMap::new(),
            names: HashSet::new(),
        };
        zone.add(soa);
        let address = |owner: Name, ip: IpAddr| match ip {
            IpAddr::V4(v4) => Record::from_rdata(owner, ttl, RData::A(A(v4))),
            IpAddr::V6(v6) => Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))),
        };
        for (sp, port) in routes::allocations(prefix, range, allocs) {
            let Some(service) = name(&format!("{}.{}", sp.service.job, sp.service.stack)) else {
                continue;
            };
            zone.add(address(service.clone(), settings.addr));
            if let Some(srv) = name(&format!(
                "_{}._{}.{}.{}",
                sp.port, sp.proto, sp.service.job, sp.service.stack
            )) {
                zone.add(Record::from_rdata(
                    srv,
                    ttl,
                    RData::SRV(SRV::new(0, 0, port, service)),
                ));
            }
        }
        for e in routes::endpoints(prefix, services) {
            let (sp, instance, ip) = (&e.service_port, &e.instance, e.addr.ip());
            let service = format!("{}.{}.endpoints", sp.service.job, sp.service.stack);
            let (Some(owner), Some(srv), Some(target)) = (
                name(&service),
                name(&format!("_{}._{}.{service}", sp.port, sp.proto)),
                name(&format!(
                    "{}-{}.{}.endpoints",
                    instance.container_id, instance.container_port, instance.host
                )),
            ) else {
                continue;
            };
            zone.add(address(owner, ip));
            zone.add(address(target.clone(), ip));
            zone.add(Record::from_rdata(
                srv,
                ttl,
                RData::SRV(SRV::new(0, 0, e.addr.port(), target)),
            ));
        }
        zone
    }

    fn add(&mut self, record: Record) {
        let owner = LowerName::from(&record.name);
        let mut ancestor = owner.clone();
        while self.origin.zone_of(&ancestor) && self.names.insert(ancestor.clone()) {
            if ancestor == self.origin {
                break;
            }
            ancestor = ancestor.base_name();
        }
        let set = self
            .records
            .entry(owner)
            .or_default()
            .entry(record.record_type())
            .or_default();
        if !set.contains(&record) {
            set.push(record);
        }
    }

    /// Answers `name`/`rtype` from this zone.
    pub fn lookup(&self, name: &LowerName, rtype: RecordType) -> Lookup<'_> {
        if !self.origin.zone_of(name) {
            return Lookup::Refused;
        }
        if !self.names.contains(name) {
            return Lookup::NxDomain;
        }
        let Some(types) = self.records.get(name) else {
            return Lookup::NoData;
        };
        let answers: Vec<&Record> = if rtype == RecordType::ANY {
            types.values().flatten().collect()
        } else {
            types
                .get(&rtype)
                .map(|r| r.iter().collect())
                .unwrap_or_default()
        };
        if answers.is_empty() {
            return Lookup::NoData;
        }
        let mut additionals = Vec::new();
        for record in &answers {
            if let RData::SRV(srv) = &record.data {
                if let Some(target) = self.records.get(&LowerName::from(&srv.target)) {
                    for t in [RecordType::A, RecordType::AAAA] {
                        additionals.extend(target.get(&t).into_iter().flatten());
                    }
                }
            }
        }
        Lookup::Found {
            answers,
            additionals,
        }
    }

    /// The SOA, for the authority section of negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }
}
