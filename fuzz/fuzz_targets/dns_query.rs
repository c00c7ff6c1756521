//! The ambassador's DNS query path on arbitrary packets: `answer_udp` and `answer_tcp`, over a zone with services and endpoints, each response encoded. It must
//! never panic, and every response it encodes must parse back.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use ambassador::dns::{DnsSettings, Zone};
use hickory_server::proto::op::Message;
use hickory_server::proto::rr::Name;
use libfuzzer_sys::fuzz_target;
use runtime::watch::Kv;
use schema::Prefix;

fn kv(key: &str, value: &str) -> (String, Kv) {
    let kv = Kv {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        mod_revision: 1,
        lease: 0,
    };
    (key.to_owned(), kv)
}

static ZONE: LazyLock<tokio::sync::watch::Receiver<Arc<Zone>>> = LazyLock::new(|| {
    let settings = DnsSettings {
        zone: Name::from_ascii("viking.internal.").expect("zone"),
        addr: "172.17.0.1".parse().expect("addr"),
        ttl: 5,
    };
    let allocs = BTreeMap::from([kv("/viking/ports/alloc/shared/mongo/27017-tcp", r#"{"v":1,"port":20000}"#)]);
    let services = BTreeMap::from([kv(
        "/viking/services/shared/mongo/27017-tcp/node-a:0123456789ab:27017",
        r#"{"v":1,"host":"node-a","addr":"10.0.0.1","port":32768,"container_id":"0123456789ab"}"#,
    )]);
    let zone = Zone::build(&settings, &Prefix::new("/viking").expect("prefix"), &allocs, &services, 1);
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(zone));
    std::mem::forget(tx);
    rx
});

fuzz_target!(|data: &[u8]| {
    let src = "127.0.0.1:5353".parse().expect("addr");
    let mut out = Vec::new();
    if ambassador::dns::answer_udp(&ZONE.borrow(), data, src, &mut out) {
        Message::from_vec(&out).expect("our own UDP response parses");
    }
    if ambassador::dns::answer_tcp(&ZONE.borrow(), data, src, &mut out) {
        Message::from_vec(&out).expect("our own TCP response parses");
    }
});
