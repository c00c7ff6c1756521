//! The ambassador's DNS query path on arbitrary packets: the UDP loop's `answer_udp` and the
//! TCP handler, over a zone with services and endpoints, each response encoded. It must
//! never panic, and every response it encodes must parse back.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use ambassador::dns::{DnsSettings, Handler, Zone};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::Message;
use hickory_server::proto::rr::{Name, Record};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use libfuzzer_sys::fuzz_target;
use runtime::watch::Kv;
use schema::Prefix;

#[derive(Clone)]
struct Capture;

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::with_capacity(512);
        let info = response
            .destructive_emit(&mut BinEncoder::new(&mut buf))
            .map_err(NetError::from)?;
        Message::from_vec(&buf).expect("our own response parses");
        Ok(info)
    }
}

fn kv(key: &str, value: &str) -> (String, Kv) {
    let kv = Kv {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        mod_revision: 1,
        lease: 0,
    };
    (key.to_owned(), kv)
}

static HANDLER_ZONE: LazyLock<tokio::sync::watch::Receiver<Arc<Zone>>> = LazyLock::new(|| {
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

static HANDLER: LazyLock<Handler> = LazyLock::new(|| Handler::new(HANDLER_ZONE.clone()));

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
});

static ZONE: LazyLock<tokio::sync::watch::Receiver<Arc<Zone>>> = LazyLock::new(|| HANDLER_ZONE.clone());

fuzz_target!(|data: &[u8]| {
    let src = "127.0.0.1:5353".parse().expect("addr");
    // UDP: the ambassador's own loop.
    let mut out = Vec::new();
    if ambassador::dns::answer_udp(&ZONE.borrow(), data, src, &mut out) {
        Message::from_vec(&out).expect("our own UDP response parses");
    }
    // TCP: hickory's server and our handler.
    if let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Tcp) {
        RT.block_on(HANDLER.handle_request::<_, TokioTime>(&request, Capture));
    }
});
