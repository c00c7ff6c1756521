//! Minimal pingora reverse proxy for the router benchmark: every request to
//! one upstream (argv[2]) with pingora's keep-alive pool, listening on argv[1].
use async_trait::async_trait;
use pingora_core::prelude::*;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

struct One(String);

#[async_trait]
impl ProxyHttp for One {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0.as_str(), false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let mut conf = pingora_core::server::configuration::ServerConf::default();
    conf.threads = threads;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora_proxy::http_proxy_service(&server.configuration, One(args[2].clone()));
    svc.add_tcp(&args[1]);
    server.add_service(svc);
    server.run_forever();
}
