//! A stand-in for the Kubernetes API server, enough for the node
//! installer's label calls: HTTPS with a certificate from a CA of its own
//! (openssl), a service account directory (token, ca.crt) as the kubelet
//! mounts one, and every request recorded. Served by python3's http.server.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

pub const TOKEN: &str = "test-token-4711";

const SERVER: &str = r#"
import http.server, json, ssl, sys
port, cert, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    def do_PATCH(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        with open(log, "a") as f:
            f.write(json.dumps({"method": "PATCH", "path": self.path,
                "auth": self.headers.get("Authorization"),
                "type": self.headers.get("Content-Type"), "body": body}) + "\n")
        out = b'{"kind":"Node"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = http.server.HTTPServer(("127.0.0.1", port), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// One request the fake API server answered.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub auth: Option<String>,
    #[serde(rename = "type")]
    pub content_type: Option<String>,
    pub body: String,
}

pub struct FakeApiServer {
    child: Child,
    pub port: u16,
    /// token and ca.crt, as mounted in a pod.
    pub service_account_dir: PathBuf,
    log: PathBuf,
}

impl FakeApiServer {
    /// Makes a CA and a server certificate for 127.0.0.1 in `dir`, and
    /// serves on a free port; returns once it accepts connections.
    pub fn start(dir: &Path) -> Result<FakeApiServer> {
        let sa = dir.join("serviceaccount");
        fs::create_dir_all(&sa)?;
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()?;
            ensure!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=fake-kube-ca",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=kubernetes",
        ])?;
        fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ])?;
        fs::copy(dir.join("ca.crt"), sa.join("ca.crt"))?;
        fs::write(sa.join("token"), format!("{TOKEN}\n"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.join("requests.jsonl");
        let child = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .arg(port.to_string())
            .arg(dir.join("srv.crt"))
            .arg(dir.join("srv.key"))
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning python3 for the fake API server")?;
        let mut me = FakeApiServer {
            child,
            port,
            service_account_dir: sa,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = me.child.try_wait()? {
                bail!("the fake API server exited: {status}");
            }
            ensure!(
                Instant::now() < deadline,
                "the fake API server is not up within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    /// The environment a pod gets for its API server.
    pub fn env(&self) -> [(String, String); 2] {
        [
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), self.port.to_string()),
        ]
    }

    pub fn requests(&self) -> Result<Vec<Request>> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("request log line {l:?}")))
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
