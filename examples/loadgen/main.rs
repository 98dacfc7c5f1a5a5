//! Drives `Check` over gRPC at a fixed concurrency and prints requests per
//! second and latency percentiles.
//!
//! cargo run --release --example loadgen -- --target http://127.0.0.1:50051 \
//!     --concurrency 64 --connections 4 --seconds 10

use std::time::{Duration, Instant};

use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tonic::transport::Channel;

struct Args {
    target: String,
    concurrency: usize,
    connections: usize,
    seconds: u64,
    keys: usize,
}

fn args() -> Args {
    let mut a = Args {
        target: "http://127.0.0.1:50051".to_string(),
        concurrency: 64,
        connections: 4,
        seconds: 10,
        keys: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--target" => a.target = value.clone(),
            "--concurrency" => a.concurrency = n(),
            "--connections" => a.connections = n(),
            "--seconds" => a.seconds = n() as u64,
            "--keys" => a.keys = n(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn request(i: usize, keys: usize) -> pb::CheckRequest {
    pb::CheckRequest {
        attributes: Some(pb::Attributes {
            api_key: format!("sk-load-{}", i % keys),
            team: format!("team-{}", i % 10),
            environment: "production".to_string(),
            model: "gpt-5".to_string(),
            ..Default::default()
        }),
        estimate: Some(pb::Estimate {
            input_tokens: Some(500),
            output_tokens: Some(200),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let mut channels = Vec::new();
    for _ in 0..a.connections.max(1) {
        let ch = Channel::from_shared(a.target.clone())
            .expect("target URL")
            .connect()
            .await
            .expect("connect to target");
        channels.push(ch);
    }
    // Warm up connections and caches.
    let mut warm = TollgateClient::new(channels[0].clone());
    for i in 0..200 {
        warm.check(request(i, a.keys)).await.expect("warm-up check");
    }

    let until = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..a.concurrency {
        let mut client = TollgateClient::new(channels[t % channels.len()].clone());
        let keys = a.keys;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let mut i = t * 7919;
            while Instant::now() < until {
                i += 1;
                let sent = Instant::now();
                match client.check(request(i, keys)).await {
                    Ok(r) if r.get_ref().verdict() == pb::Verdict::Allow => {}
                    _ => errors += 1,
                }
                latencies.push(sent.elapsed());
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        all.get(i).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
    };
    println!(
        "requests={} errors={} rate={:.0}/s p50={:.2}ms p99={:.2}ms p999={:.2}ms",
        all.len(),
        errors,
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
}
