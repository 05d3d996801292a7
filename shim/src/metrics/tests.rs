use std::time::Duration;

use super::http::{self, parse_request, Request};
use super::monitor;
use super::pod::{parse_stat_cpu_ticks, parse_status, proc_stats, PodLabels};
use super::text::{escape_label_value, format_value, parse_sample, Exposition, Kind, Merged};

#[test]
fn writes_families_samples_and_histograms() {
    let mut e = Exposition::new();
    e.single("up", Kind::Gauge, "Up.", 1.0);
    e.family("rpc_seconds", Kind::Histogram, "Latency\nof \\ calls.");
    e.histogram(
        "rpc_seconds",
        &[("method", "Check")],
        &[(0.5, 1), (f64::INFINITY, 3)],
        2.25,
        3,
    );
    e.family("names", Kind::Counter, "Odd values.")
        .sample("names", &[("v", "a\"b\\c\nd")], 0.125);
    assert_eq!(
        e.finish(),
        "# HELP up Up.\n# TYPE up gauge\nup 1\n\
         # HELP rpc_seconds Latency\\nof \\\\ calls.\n# TYPE rpc_seconds histogram\n\
         rpc_seconds_bucket{method=\"Check\",le=\"0.5\"} 1\n\
         rpc_seconds_bucket{method=\"Check\",le=\"+Inf\"} 3\n\
         rpc_seconds_sum{method=\"Check\"} 2.25\n\
         rpc_seconds_count{method=\"Check\"} 3\n\
         # HELP names Odd values.\n# TYPE names counter\n\
         names{v=\"a\\\"b\\\\c\\nd\"} 0.125\n"
    );
}

#[test]
fn formats_values() {
    assert_eq!(format_value(3.0), "3");
    assert_eq!(format_value(0.0005), "0.0005");
    assert_eq!(format_value(f64::INFINITY), "+Inf");
    assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
    assert_eq!(format_value(f64::NAN), "NaN");
    assert_eq!(format_value(1e12), "1000000000000");
    assert_eq!(escape_label_value("plain"), "plain");
}

#[test]
fn reads_samples_back() {
    let s = parse_sample(r#"m_bucket{a="x,y}",b="q\"\\\n"} 12 1700000000"#).expect("a sample");
    assert_eq!(s.name, "m_bucket");
    assert_eq!(
        s.labels,
        vec![
            ("a".to_string(), "x,y}".to_string()),
            ("b".to_string(), "q\"\\\n".to_string())
        ]
    );
    assert_eq!(s.rest, "12 1700000000");
    let bare = parse_sample("up 1").expect("a sample");
    assert!(bare.labels.is_empty());
    assert_eq!(bare.render_with(&[("id", "p1")]), "up{id=\"p1\"} 1");
    assert_eq!(
        s.render_with(&[("id", "p\"1"), ("a", "not this")]),
        r#"m_bucket{id="p\"1",a="x,y}",b="q\"\\\n"} 12 1700000000"#
    );
    assert!(parse_sample("").is_none());
    assert!(parse_sample("m{a=\"unterminated} 1").is_none());
    assert!(parse_sample("m{a=\"v\"}").is_none());
}

#[test]
fn a_written_exposition_reads_back_whole() {
    let mut e = Exposition::new();
    let odd = "we\"ird\\ \n value";
    e.family("m", Kind::Gauge, "M.")
        .sample("m", &[("k", odd), ("j", "")], 2.5);
    let text = e.finish();
    let line = text.lines().last().expect("a line");
    let s = parse_sample(line).expect("a sample");
    assert_eq!(s.label("k"), Some(odd));
    assert_eq!(s.label("j"), Some(""));
    assert_eq!(s.rest, "2.5");
}

#[test]
fn merging_groups_each_family_once_with_each_sources_labels() {
    let pod = |v: &str| {
        let mut e = Exposition::new();
        e.single("clh_up", Kind::Gauge, "Up.", 1.0);
        e.family("clh_rpc", Kind::Histogram, "Rpc.").histogram(
            "clh_rpc",
            &[("method", "Check")],
            &[(f64::INFINITY, 2)],
            0.5,
            2,
        );
        e.family("clh_pod_info", Kind::Gauge, "Info.").sample(
            "clh_pod_info",
            &[("pod_name", v)],
            1.0,
        );
        e.finish()
    };
    let mut m = Merged::default();
    m.add(&pod("a"), &[("sandbox_id", "s1"), ("pod_name", "a")]);
    m.add(&pod("b"), &[("sandbox_id", "s2"), ("pod_name", "b")]);
    let out = m.finish();
    assert_eq!(out.matches("# TYPE clh_up gauge").count(), 1);
    assert_eq!(out.matches("# TYPE clh_rpc histogram").count(), 1);
    // Each family's lines are contiguous.
    let lines: Vec<&str> = out.lines().collect();
    let family_of = |l: &str| {
        if let Some(meta) = l.strip_prefix("# ") {
            meta.split(' ').nth(1).unwrap_or_default().to_string()
        } else {
            let name = parse_sample(l).expect("a sample").name;
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string()
        }
    };
    let mut seen: Vec<String> = Vec::new();
    for l in &lines {
        let f = family_of(l);
        if seen.last() != Some(&f) {
            assert!(!seen.contains(&f), "family {f} split:\n{out}");
            seen.push(f);
        }
    }
    assert!(out.contains("clh_up{sandbox_id=\"s1\",pod_name=\"a\"} 1\n"));
    assert!(out.contains(
        "clh_rpc_bucket{sandbox_id=\"s2\",pod_name=\"b\",method=\"Check\",le=\"+Inf\"} 2\n"
    ));
    // A label the sample has already is not added twice.
    assert!(out.contains("clh_pod_info{sandbox_id=\"s1\",pod_name=\"a\"} 1\n"));
}

#[test]
fn reads_requests() {
    assert_eq!(
        parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        Request::Metrics
    );
    assert_eq!(
        parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
        Request::Metrics
    );
    assert_eq!(
        parse_request(b"GET /other HTTP/1.1\r\n\r\n"),
        Request::NotFound
    );
    assert_eq!(
        parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
        Request::BadMethod
    );
    assert_eq!(parse_request(b"hello\r\n\r\n"), Request::Malformed);
    assert_eq!(parse_request(b"\xff\xfe\r\n\r\n"), Request::Malformed);
}

#[tokio::test]
async fn answers_get_metrics_and_refuses_the_rest() {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(http::answer(server, || async { "up 1\n".to_string() }));
    let body = tokio::time::timeout(Duration::from_secs(10), http::get(client))
        .await
        .expect("in time")
        .expect("a 200");
    assert_eq!(body, "up 1\n");
    served.await.expect("served");

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(http::answer(server, || async { unreachable!() }));
    client
        .write_all(b"DELETE /metrics HTTP/1.1\r\n\r\n")
        .await
        .expect("written");
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    served.await.expect("served");
}

#[tokio::test]
async fn a_silent_client_is_given_up_on() {
    tokio::time::pause();
    let (_client, server) = tokio::io::duplex(1024);
    // With the clock paused, the deadline passes as soon as nothing else
    // can run.
    tokio::time::timeout(
        http::IO_TIMEOUT * 2,
        http::answer(server, || async { unreachable!() }),
    )
    .await
    .expect("answer gives up at its own deadline");
}

#[test]
fn pod_labels_come_from_the_cri_annotations() {
    let spec = serde_json::json!({"annotations": {
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.kubernetes.cri.sandbox-uid": "u-1",
    }});
    assert_eq!(
        PodLabels::from_spec(&spec),
        PodLabels {
            name: "web".into(),
            namespace: "default".into(),
            uid: "u-1".into()
        }
    );
    assert_eq!(
        PodLabels::from_spec(&serde_json::json!({})),
        PodLabels::default()
    );
}

#[test]
fn reads_host_process_figures() {
    assert_eq!(
        parse_status("Name:\tx\nVmRSS:\t  2048 kB\nThreads:\t7\n"),
        (2048, 7)
    );
    assert_eq!(parse_status("Name:\tzombie\n"), (0, 0));
    let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 30 12 0 0 20 0 1 0";
    assert_eq!(parse_stat_cpu_ticks(stat), Some(42));
    assert_eq!(parse_stat_cpu_ticks("42 (x) S 1"), None);
    let me = proc_stats(std::process::id()).expect("this process");
    assert!(me.rss_bytes > 0 && me.threads >= 1 && me.fds >= 3, "{me:?}");
}

#[test]
fn parses_the_monitor_arguments() {
    let args = |a: &[&str]| monitor::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(
        args(&[]),
        Ok(monitor::Args {
            listen: monitor::DEFAULT_LISTEN.into(),
            config: None
        })
    );
    assert_eq!(
        args(&["--listen", "0.0.0.0:9", "--config", "/c.toml"]),
        Ok(monitor::Args {
            listen: "0.0.0.0:9".into(),
            config: Some("/c.toml".into())
        })
    );
    assert!(args(&["--listen"]).is_err());
    assert!(args(&["x"]).is_err());
}

/// The monitor scrapes every VM directory's socket, labels what a shim
/// answers and says which did not answer.
#[tokio::test]
async fn the_monitor_merges_the_pods_and_reports_the_silent_ones() {
    let root = tempfile::tempdir().expect("tempdir");
    let serve_pod = |id: &str, name: &str| {
        let dir = root.path().join(id);
        std::fs::create_dir(&dir).expect("dir");
        let listener = tokio::net::UnixListener::bind(dir.join(super::SOCKET_NAME)).expect("bind");
        let name = name.to_string();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let name = name.clone();
                tokio::spawn(http::answer(stream, move || async move {
                    let mut e = Exposition::new();
                    e.family("clh_pod_info", Kind::Gauge, "Info.").sample(
                        "clh_pod_info",
                        &[
                            ("pod_name", &name),
                            ("pod_namespace", "ns"),
                            ("pod_uid", "u"),
                        ],
                        1.0,
                    );
                    e.single("clh_guest_uptime_seconds", Kind::Gauge, "Up.", 3.0);
                    e.finish()
                }));
            }
        })
    };
    let a = serve_pod("sa", "pa");
    let b = serve_pod("sb", "pb");
    // A directory whose shim is gone: its socket refuses.
    let dead = root.path().join("sc");
    std::fs::create_dir(&dead).expect("dir");
    drop(std::os::unix::net::UnixListener::bind(dead.join(super::SOCKET_NAME)).expect("bind"));
    // A directory without a socket is not a pod of ours.
    std::fs::create_dir(root.path().join("other")).expect("dir");

    let out = monitor::gather(root.path(), Duration::from_secs(5)).await;
    a.abort();
    b.abort();
    assert_eq!(
        out.matches("# TYPE clh_guest_uptime_seconds gauge").count(),
        1
    );
    assert!(out.contains("clh_guest_uptime_seconds{sandbox_id=\"sa\",pod_name=\"pa\",pod_namespace=\"ns\",pod_uid=\"u\"} 3\n"), "{out}");
    assert!(out.contains("clh_guest_uptime_seconds{sandbox_id=\"sb\",pod_name=\"pb\",pod_namespace=\"ns\",pod_uid=\"u\"} 3\n"), "{out}");
    assert!(
        out.contains("clh_monitor_scrape_up{sandbox_id=\"sa\"} 1\n"),
        "{out}"
    );
    assert!(
        out.contains("clh_monitor_scrape_up{sandbox_id=\"sc\"} 0\n"),
        "{out}"
    );
    assert!(out.contains("clh_monitor_pods 3\n"), "{out}");
    assert!(!out.contains("other"), "{out}");
    let errors = out
        .lines()
        .find_map(|l| l.strip_prefix("clh_monitor_scrape_errors_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the error count");
    assert!(errors >= 1.0, "{out}");
}
